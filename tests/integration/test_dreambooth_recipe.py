"""The dreambooth recipe end to end on CPU with tiny random priors: both priors personalised on
the toy pink duck, then coarse and fine text-to-3D with the tuned guidance; and its bad inputs,
each one line that names the fix and leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli, run_in_process, run_main, stages_in_this_process
from magic3d.config import ConfigError, load_yaml
from magic3d.recipe import RunSettings, resolve_settings

pytestmark = pytest.mark.slow

FEW_STEPS = ("trainer.max_steps=2", "data.steps_per_epoch=2", "run.checkpoint_every=2", "run.video_views=2",
             "model.preview_every=0", "trainer.log_every_n_steps=1",
             # One personalisation step a prior (a step of the toy pixel prior is ~4 s on 2 cores): enough
             # to write the adapters that the text-to-3D stages must pick up.
             "personalise_pixel:trainer.max_steps=1", "personalise_latent:trainer.max_steps=1",
             "personalise_pixel:model.n_class_images=1", "personalise_latent:model.n_class_images=1",
             "personalise_pixel:model.class_sample_steps=1", "personalise_latent:model.class_sample_steps=1",
             "personalise_pixel:model.n_preview=1", "personalise_latent:model.n_preview=1",
             "personalise_pixel:model.preview_steps=1", "personalise_latent:model.preview_steps=1",
             "coarse:model.scene.blob_density=30", "fine:start.converter_args.resolution=32",
             "fine:start.converter_args.texture_steps=5",
             # The coarsest fine stage that still converts and renders a mesh (as the tiny ablation's),
             # and one 32^2 validation view a stage: the recipe's wiring is under test, not quality.
             "fine:model.scene.tet_resolution=8", "fine:data.height=32", "fine:data.width=32",
             "coarse:data.n_val_views=1", "fine:data.n_val_views=1", "coarse:data.eval_height=32",
             "coarse:data.eval_width=32", "fine:data.eval_height=32", "fine:data.eval_width=32")


def priors(pixel: Path, latent: Path) -> list[str]:
    return [f"personalise_pixel:model.prior.pretrained={pixel}", f"coarse:model.guidance.pretrained={pixel}",
            f"personalise_latent:model.prior.pretrained={latent}", f"fine:model.guidance.pretrained={latent}"]


@pytest.fixture(scope="module")
def dreambooth_run(tmp_path_factory: pytest.TempPathFactory, tiny_pixel_pipeline: Path, tiny_latent_pipeline: Path,
                   pink_duck: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("dreambooth") / "sks-duck"
    # In-process, stages too (conftest stages_in_this_process): the wiring of the stages is under
    # test; the recipe's command-line path is test_a_missing_subject_through_the_cli_is_one_line_and_leaves_nothing.
    with pytest.MonkeyPatch.context() as patch:
        stages_in_this_process(patch)
        result = run_in_process("run", "dreambooth", "--prompt", "a sks duck", "--subject", str(pink_duck),
                                "--run", str(run_dir), "--profile", "cpu",
                                *priors(tiny_pixel_pipeline, tiny_latent_pipeline), *FEW_STEPS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


def test_every_stage_finishes_and_text_to_3d_uses_the_tuned_priors(dreambooth_run: Path, pink_duck: Path) -> None:
    for stage, steps in (("personalise_pixel", 1), ("personalise_latent", 1), ("coarse", 2), ("fine", 2)):
        assert json.loads((dreambooth_run / stage / "DONE.json").read_text())["steps"] == steps, stage
    for stage, lora in (("coarse", "personalise_pixel"), ("fine", "personalise_latent")):
        guidance = load_yaml(dreambooth_run / stage / "config.yaml")["model"]["init_args"]["guidance"]["init_args"]
        assert guidance["lora"] == str(dreambooth_run / lora / "lora")
        assert (dreambooth_run / lora / "lora" / "pytorch_lora_weights.safetensors").is_file()
    config = load_yaml(dreambooth_run / "personalise_pixel" / "config.yaml")["model"]["init_args"]
    assert config["subject"] == str(pink_duck.resolve()) and config["prompt"] == "a sks duck"
    settings = RunSettings.load(dreambooth_run)
    assert (settings.recipe, settings.prompt, settings.subject) == ("dreambooth", "a sks duck", str(pink_duck.resolve()))


def test_a_continued_run_keeps_its_subject(dreambooth_run: Path, capfd: pytest.CaptureFixture[str]) -> None:
    result = run_main(capfd, "run", "--run", str(dreambooth_run))  # nothing but the folder (CLI: test_user_faults)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("already finished") == 4


# ------------------------------------------------------------------------------ bad input

def one_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize(("setup", "message"), [
    ("none", "pass them with subject=FOLDER"),
    ("missing", "is not a folder"),
    ("empty", "holds no PNG or JPEG images"),
    ("one", "needs at least 2"),
])
def test_subject_problems_are_found_before_anything_runs(setup: str, message: str, tmp_path: Path,
                                                         pink_duck: Path) -> None:
    import shutil

    folder = tmp_path / "photos"
    if setup in ("empty", "one"):
        folder.mkdir()
    if setup == "one":
        shutil.copy(next(pink_duck.iterdir()), folder)
    with pytest.raises(ConfigError, match=message):
        resolve_settings("dreambooth", "a sks duck", None, None, "cpu", tmp_path / "run",
                         subject=None if setup == "none" else folder)


def test_a_missing_subject_through_the_cli_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    result = run_cli("run", "dreambooth", "--prompt", "a sks duck", "--subject", str(tmp_path / "photos"),
                     "--run", str(tmp_path / "run"))
    assert result.returncode == 2 and "is not a folder: pass subject=FOLDER" in one_line(result)
    assert not (tmp_path / "run").exists(), "nothing is left behind"


def test_a_prompt_without_the_identifier_stops_the_first_stage(tmp_path: Path, pink_duck: Path,
                                                               tiny_pixel_pipeline: Path,
                                                               capfd: pytest.CaptureFixture[str]) -> None:
    # In-process runner (the stage is still its own process); the CLI path of a bad dreambooth
    # input is test_a_missing_subject_through_the_cli_is_one_line_and_leaves_nothing.
    result = run_main(capfd, "run", "dreambooth", "--prompt", "a pink duck", "--subject", str(pink_duck),
                     "--run", str(tmp_path / "run"), f"personalise_pixel:model.prior.pretrained={tiny_pixel_pipeline}")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and len(lines) <= 2, result.stderr[-2000:]
    assert "does not contain the identifier 'sks'" in lines[0] and 'prompt="a sks duck"' in lines[0]
    assert not (tmp_path / "run").exists()


def test_subject_with_a_recipe_that_does_not_personalise(pink_duck: Path) -> None:
    with pytest.raises(ConfigError, match="subject= has nothing to do"):
        resolve_settings("coarse_only", None, None, None, "cpu", None, subject=pink_duck)


def test_text_to_3d_of_the_subject_is_graded_as_its_toy_caption(dreambooth_run: Path, random_classifier: Path) -> None:
    from magic3d.eval.options import EvalOptions
    from magic3d.eval.run import evaluate_run

    options = EvalOptions(views=2, iou_size=32, chamfer_resolution=24, chamfer_points=300)
    result = evaluate_run(dreambooth_run, options, classifier=random_classifier, device="cpu", as_prompt="a pink duck")
    assert [r.stage for r in result.stages] == ["coarse", "fine"], "personalisation stages make no scene to grade"
    assert all("graded as 'a pink duck'" in " ".join(r.notes) for r in result.stages)
    with pytest.raises(ValueError, match="makes no 3D scene"):
        evaluate_run(dreambooth_run, options, stage="personalise_pixel", classifier=random_classifier, device="cpu")


# --- class_prompts (branch class-prompts) ---
def test_a_class_prompt_beside_the_recipes_class_prompts_stops_the_first_stage(
        tmp_path: Path, pink_duck: Path, tiny_pixel_pipeline: Path, capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # In-process, its stage too: test_a_prompt_without_the_identifier_stops_the_first_stage has a
    # personalisation stage's refusal in a stage process.
    stages_in_this_process(monkeypatch)
    result = run_main(capfd, "run", "dreambooth", "--prompt", "a sks duck", "--subject", str(pink_duck),
                     "--run", str(tmp_path / "run"), f"personalise_pixel:model.prior.pretrained={tiny_pixel_pipeline}",
                     "personalise_pixel:model.class_prompt=a toy duck")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and len(lines) <= 2, result.stderr[-2000:]
    assert "Both class_prompt='a toy duck' and class_prompts are set" in lines[0] and "class_prompts: null" in lines[0]
    assert not (tmp_path / "run").exists()
# --- end class_prompts ---
