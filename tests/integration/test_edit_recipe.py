"""Prompt-based editing (§6) end to end on CPU with tiny random priors: the edit recipe from
scratch, again from that run's coarse stage (base=RUN), the edit metrics of both, and the
bad inputs, each a one-line error that leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli, run_in_process, run_main, stages_in_this_process
from magic3d.checkpoints import load_scene
from magic3d.config import ConfigError, load_yaml
from magic3d.eval.__main__ import main as eval_main
from magic3d.recipe import RunSettings, resolve_settings

pytestmark = pytest.mark.slow

FEW_STEPS = ("trainer.max_steps=2", "data.steps_per_epoch=2", "run.checkpoint_every=2", "run.video_views=2",
             "model.preview_every=0", "trainer.log_every_n_steps=1",
             # One 32^2 validation view a stage: the recipe's stage wiring is under test, not its renders.
             "data.n_val_views=1", "data.eval_height=32", "data.eval_width=32",
             # The coarsest fine stage that still converts and renders a mesh (as the tiny ablation's):
             # conversion on the CPU profile's 64^3 grid with 50 texture steps took ~40 s of each run.
             "fine:start.converter_args.resolution=32", "fine:start.converter_args.texture_steps=5",
             "fine:model.scene.tet_resolution=8", "fine:data.height=32", "fine:data.width=32")


def priors(pixel: Path, latent: Path, *nerf_stages: str) -> list[str]:
    # A dense blob, so the 2-step NeRF stages already hold an opaque object to convert.
    nerf = [f"{s}:model.scene.blob_density=30" for s in nerf_stages]
    return [*(f"{s}:model.guidance.pretrained={pixel}" for s in nerf_stages), f"fine:model.guidance.pretrained={latent}",
            *nerf]


@pytest.fixture(scope="module")
def edit_run(tmp_path_factory: pytest.TempPathFactory, tiny_pixel_pipeline: Path, tiny_latent_pipeline: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("edit") / "red-to-blue"
    # In-process, stages too (conftest stages_in_this_process): the recipe's stages and prompts are
    # under test; the command-line path of an edit is test_base_run_without_coarse_through_the_cli.
    with pytest.MonkeyPatch.context() as patch:
        stages_in_this_process(patch)
        result = run_in_process("run", "edit", "--prompt", "a red cube", "--edit", "a blue cube", "--run", str(run_dir),
                                *priors(tiny_pixel_pipeline, tiny_latent_pipeline, "coarse", "edit"), *FEW_STEPS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def run_from_base(edit_run: Path, tiny_pixel_pipeline: Path, tiny_latent_pipeline: Path) -> Path:
    """A second edit of the first run's coarse stage, started with base=RUN (no prompt given)."""
    run_dir = edit_run.parent / "from-base"
    with pytest.MonkeyPatch.context() as patch:  # in-process, stages too (as edit_run)
        stages_in_this_process(patch)
        result = run_in_process("run", "edit", "--base", str(edit_run), "--edit", "a blue cube", "--run", str(run_dir),
                                *priors(tiny_pixel_pipeline, tiny_latent_pipeline, "edit"), *FEW_STEPS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "stage coarse: taken from the base run" in result.stdout
    return run_dir


def test_edit_recipe_runs_each_stage_on_its_prompt(edit_run: Path) -> None:
    prompts = {}
    for stage in ("coarse", "edit", "fine"):
        done = json.loads((edit_run / stage / "DONE.json").read_text())
        assert done["steps"] == 2
        prompts[stage] = done["prompt"]
    assert prompts == {"coarse": "a red cube", "edit": "a blue cube", "fine": "a blue cube"}
    assert load_yaml(edit_run / "edit" / "config.yaml")["start"]["mode"] == "warm_start"
    settings = RunSettings.load(edit_run)
    assert (settings.prompt, settings.edit, settings.base) == ("a red cube", "a blue cube", None)


def test_a_continued_edit_run_keeps_its_edit_prompt(edit_run: Path, capfd: pytest.CaptureFixture[str]) -> None:
    result = run_main(capfd, "run", "--run", str(edit_run))  # nothing but the folder (CLI path: test_user_faults)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("already finished") == 3


def test_base_run_supplies_the_coarse_stage_untouched(edit_run: Path, run_from_base: Path) -> None:
    base_ckpt = edit_run / "coarse" / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in run_from_base.iterdir() if p.is_dir()) == ["edit", "fine"]
    config = load_yaml(run_from_base / "edit" / "config.yaml")
    assert Path(config["start"]["checkpoint"]) == base_ckpt
    assert config["model"]["init_args"]["prompt"] == "a blue cube"
    settings = RunSettings.load(run_from_base)
    assert (settings.prompt, settings.edit, settings.base) == ("a red cube", "a blue cube", str(edit_run))
    # Warm-started from the base's weights: 2 Adam steps at lr 0.01 move each entry by ~0.02 at
    # most, while the coarse table is far from a fresh U(-1e-4, 1e-4) one.
    base = load_scene(base_ckpt).encoding.params
    edited = load_scene(run_from_base / "edit" / "checkpoints" / "last.ckpt").encoding.params
    assert (edited - base).abs().max() < 0.05 and not torch.equal(edited, base)
    assert json.loads((edit_run / "coarse" / "DONE.json").read_text())["steps"] == 2  # base run unchanged


def test_edit_metrics_cli(edit_run: Path, run_from_base: Path, random_classifier: Path) -> None:
    cheap = ["--views", "4", "--iou-size", "32", "--chamfer-resolution", "24", "--chamfer-points", "300",
             "--classifier", str(random_classifier), "--device", "cpu"]
    # The edit run is its own base (its coarse stage); the base=RUN edit serves as "scratch".
    assert eval_main(["edit", str(edit_run), str(edit_run), "--scratch", str(run_from_base), *cheap]) == 0
    report = json.loads((edit_run / "eval" / "edit.json").read_text())
    assert report["attribute"] == "colour"
    assert report["base_stage"] == str(edit_run / "coarse")
    assert [s["stage"] for s in report["scores"]] == [str(edit_run / "fine"), str(run_from_base / "fine")]
    assert set(report["difference"]) == {"attribute_accuracy", "preservation", "r_precision",
                                         "silhouette_iou_to_base"}
    for score in report["scores"]:
        assert 0.0 <= score["preservation"] <= 1.0 and score["preservation"] == score["silhouette_iou_to_base"]
    assert "edit − scratch" in (edit_run / "eval" / "edit.md").read_text()


def test_edit_metrics_refuse_a_scratch_run_of_another_prompt(edit_run: Path, random_classifier: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    code = eval_main(["edit", str(edit_run), str(edit_run), "--scratch", str(edit_run / "coarse"),
                      "--classifier", str(random_classifier), "--device", "cpu"])
    assert code == 2
    assert "not the edited prompt 'a blue cube'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ bad input

def test_edit_recipe_without_edit_names_the_fix(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # In-process: the command-line path of a bad edit input is test_base_run_without_coarse_through_the_cli.
    result = run_main(capfd, "run", "edit", "--prompt", "a red cube", "--run", str(tmp_path / "run"))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and 'edit="..."' in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(name="coarse_only", edit="a blue cube"), "has no stage on an edited prompt"),
    (dict(name="edit", edit="  "), "pass it with edit="),
    (dict(name="edit", edit="a blue cube", base="missing"), "does not exist"),
    (dict(name="coarse_only", base="."), "base= has nothing to start from"),
])
def test_bad_edit_settings(tmp_path: Path, kwargs: dict, message: str) -> None:
    if kwargs.get("base") == "missing":
        kwargs["base"] = tmp_path / "missing"
    with pytest.raises(ConfigError, match=message):
        resolve_settings(kwargs.pop("name"), None, None, None, "cpu", None, **kwargs)


def test_base_run_with_an_unfinished_coarse_stage_says_which(tmp_path: Path) -> None:
    base = tmp_path / "base"
    (base / "coarse" / "checkpoints").mkdir(parents=True)
    (base / "coarse" / "config.yaml").write_text("model: {prompt: a red cube}\n")
    with pytest.raises(ConfigError, match=r"no finished stage 'coarse' \(unfinished\)"):
        resolve_settings("edit", None, None, None, "cpu", None, edit="a blue cube", base=base)
    with pytest.raises(ConfigError, match=r"is a stage folder: pass its run folder"):
        resolve_settings("edit", None, None, None, "cpu", None, edit="a blue cube", base=base / "coarse")


def test_base_run_without_coarse_through_the_cli(tmp_path: Path) -> None:
    (tmp_path / "other" / "fine").mkdir(parents=True)
    result = run_cli("run", "edit", "--edit", "a blue cube", "--base", str(tmp_path / "other"),
                     "--run", str(tmp_path / "run"))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no finished stage 'coarse' (missing)" in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_prompt_other_than_the_base_runs_is_refused(edit_run: Path) -> None:
    with pytest.raises(ConfigError, match="is not the base run's prompt 'a red cube'"):
        resolve_settings("edit", "a green cube", None, None, "cpu", None, edit="a blue cube", base=edit_run)
