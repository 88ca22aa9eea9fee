"""Prior evaluation: samples of the tiny pixel and latent pipelines, classified and reported."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from magic3d.eval.prior import evaluate_prior
from magic3d.eval.prior_report import write_prior_report


def prior_with_card(pipeline: Path, tmp_path: Path) -> Path:
    """A copy of ``pipeline`` with a model card whose Quality section waits for the evaluator."""
    import shutil

    from magic3d.priors.card import EVALUATOR_MARKER

    folder = tmp_path / "prior"
    shutil.copytree(pipeline, folder)
    (folder / "README.md").write_text(f"# card\n\n## Quality\n\n{EVALUATOR_MARKER}\nTo be filled.\n\n## End\n")
    return folder


def test_evaluate_prior_mechanics_on_the_tiny_pipeline(
    tiny_pixel_pipeline: Path, smoke_classifier: Path, tmp_path: Path
) -> None:
    result = evaluate_prior(tiny_pixel_pipeline, n_per_caption=2, steps=2, classifier=smoke_classifier,
                            shapes=("cube", "duck"), colours=("red",), batch_size=3, device="cpu")
    assert result.n_images == 4
    assert result.samples is not None and result.samples.shape == (4, 32, 32, 3)  # the tiny UNet is 32x32
    for value in (result.shape_accuracy, result.colour_accuracy, result.caption_accuracy):
        assert 0.0 <= value <= 1.0
    assert result.view_accuracy_asymmetric is not None  # the duck is asymmetric
    paths = write_prior_report(result, tmp_path / "prior_eval")
    assert all(p.is_file() for p in paths)
    assert json.loads(paths[0].read_text())["n_images"] == 4


def test_prior_command_writes_its_figures_into_the_model_card(
    tiny_pixel_pipeline: Path, smoke_classifier: Path, tmp_path: Path
) -> None:
    from magic3d.eval.__main__ import main

    folder = prior_with_card(tiny_pixel_pipeline, tmp_path)
    argv = ["prior", str(folder), "--n-per-caption", "1", "--steps", "2", "--shapes", "cube", "--colours", "red",
            "--classifier", str(smoke_classifier), "--device", "cpu", "--update-card"]
    assert main(argv) == 0
    card = (folder / "README.md").read_text()
    assert "| shape acc | colour acc |" in card and "To be filled" not in card
    assert card.endswith("## End\n") and (folder / "eval" / "prior_eval.json").is_file()


def test_evaluate_prior_decodes_latent_priors_through_their_vae(
    tiny_latent_pipeline: Path, smoke_classifier: Path
) -> None:
    result = evaluate_prior(tiny_latent_pipeline, n_per_caption=1, steps=2, classifier=smoke_classifier,
                            shapes=("cube",), colours=("red", "blue"), batch_size=2, device="cpu")
    vae_size = 8 * 8  # the tiny SD UNet's 8x8 latents through the 8x VAE: images, not latents
    assert result.samples is not None and result.samples.shape == (2, vae_size, vae_size, 3)
    assert bool(torch.isfinite(result.samples).all())




def test_held_out_pairs_are_reported_apart(tiny_pixel_pipeline: Path, smoke_classifier: Path, tmp_path: Path) -> None:
    # pink duck is held out of every prior's training data; red duck and pink cube are not.
    result = evaluate_prior(tiny_pixel_pipeline, n_per_caption=1, steps=2, classifier=smoke_classifier,
                            shapes=("cube", "duck"), colours=("red", "pink"), batch_size=4, device="cpu")
    assert result.n_images == 3, "the top-level figures cover the trained captions only"
    assert result.held_out is not None and result.held_out.n_images == 1
    assert result.held_out_captions == ["a pink duck"]
    assert set(result.per_shape_accuracy) == {"cube", "duck"}
    _, md_path, _ = write_prior_report(result, tmp_path / "report")
    assert "| held out (a pink duck) | 1 |" in md_path.read_text()


def test_guidance_sweep_grades_each_scale_once_and_reaches_the_card(
    tiny_pixel_pipeline: Path, smoke_classifier: Path, tmp_path: Path
) -> None:
    from magic3d.eval.__main__ import main

    folder = prior_with_card(tiny_pixel_pipeline, tmp_path)
    # 5 is the main scale and appears again in the sweep: graded once, not twice
    argv = ["prior", str(folder), "--n-per-caption", "1", "--steps", "2", "--shapes", "cube", "--colours", "red",
            "--classifier", str(smoke_classifier), "--device", "cpu", "--update-card", "--sweep-guidance", "5", "1"]
    assert main(argv) == 0
    sweep = json.loads((folder / "eval" / "guidance_sweep.json").read_text())
    assert [r["settings"]["guidance_scale"] for r in sweep] == [1.0, 5.0]
    rows = [line for line in (folder / "eval" / "guidance_sweep.md").read_text().splitlines() if line.startswith("| 1 ")
            or line.startswith("| 5 ")]
    assert len(rows) == 2
    card = (folder / "README.md").read_text()
    assert "Guidance sweep" in card and card.endswith("## End\n")
