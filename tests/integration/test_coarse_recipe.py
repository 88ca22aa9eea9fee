"""End to end on CPU: the coarse recipe's run folder, resume after interruption, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import pandas as pd
import pytest
import torch

from conftest import SMOKE_OVERRIDES, run_cli, run_main, stages_in_this_process
from magic3d.config import recipes_dir
from magic3d.recipe import available_recipes, compose_stage, load_recipe
from magic3d.stage import validate_stage_config

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", available_recipes())
@pytest.mark.parametrize("profile", ["cpu", "full"])
def test_every_recipe_parses(name: str, profile: str, tmp_path: Path) -> None:
    recipe = load_recipe(name)
    assert recipe.default_prompt, "a recipe must give a default prompt (plain `make` uses it)"
    for spec in recipe.stages:
        config = compose_stage(spec, "a red cube", 0, [], profile, tmp_path)
        validate_stage_config(config, where=f"{name}/{spec.name}")


def test_smoke_run_folder_has_everything(smoke_run: Path) -> None:
    stage = smoke_run / "coarse"
    assert (stage / "config.yaml").is_file()
    assert (stage / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in (stage / "checkpoints").glob("step*.ckpt")) == [
        "step000003.ckpt", "step000006.ckpt"]
    metrics = pd.read_csv(next((stage / "logs").glob("version_*/metrics.csv")))
    for column in ("train/loss", "train/loss_sds", "train/sds_grad_norm", "train/t_mean",
                   "train/param_grad_norm"):
        assert column in metrics.columns, column
    assert (stage / "wandb").is_dir(), "an offline W&B run must be written"
    assert list((stage / "val").glob("step_*.png")), "validation sheets"
    assert list((stage / "train").glob("step_*.png")), "training previews"
    frames = iio.imread(stage / "turntable.mp4")
    assert frames.shape[0] == 4 and frames.shape[-1] == 3
    done = json.loads((stage / "DONE.json").read_text())
    assert done["steps"] == 6 and done["prompt"] == "a red cube"


def test_checkpoint_is_safe_and_self_describing(smoke_run: Path) -> None:
    checkpoint = torch.load(smoke_run / "coarse" / "checkpoints" / "last.ckpt", weights_only=True)
    scene_spec = checkpoint["magic3d"]["scene"]
    assert scene_spec["class_path"] == "magic3d.scenes.hash_nerf.HashGridNeRF"
    assert not any(k.startswith("guidance.") for k in checkpoint["state_dict"]), "frozen prior leaked"


def test_finished_stage_is_not_redone(smoke_run: Path, tiny_pixel_pipeline: Path,
                                      capfd: pytest.CaptureFixture[str]) -> None:
    before = (smoke_run / "coarse" / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    # In-process: test_user_faults continues a finished run folder through the command line.
    result = run_main(capfd, "run", "coarse_only", "--prompt", "a red cube", "--run", str(smoke_run),
                      f"model.guidance.pretrained={tiny_pixel_pipeline}", "run.wandb=offline",
                      *SMOKE_OVERRIDES)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "already finished" in result.stdout
    assert (smoke_run / "coarse" / "checkpoints" / "last.ckpt").stat().st_mtime_ns == before


def test_interrupted_run_resumes_from_last_checkpoint(tmp_path: Path, tiny_pixel_pipeline: Path,
                                                     capfd: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    args = ["run", "coarse_only", "--prompt", "a blue torus", "--run", str(run_dir),
            # 20 steps: the Ctrl-C, sent ~0.5 s after step 2's checkpoint, lands well before the end.
            f"model.guidance.pretrained={tiny_pixel_pipeline}", "trainer.max_steps=20",
            "run.checkpoint_every=2", "data.steps_per_epoch=10", "run.video_views=2", "model.preview_every=0",
            "trainer.log_every_n_steps=1"]
    process = subprocess.Popen([sys.executable, "-m", "magic3d", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    first_ckpt = run_dir / "coarse" / "checkpoints" / "step000002.ckpt"
    deadline = time.time() + 300
    while not first_ckpt.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert first_ckpt.exists(), "no checkpoint before the deadline"
    time.sleep(0.5)  # let the checkpoint file be fully written
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C, as a user would
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "stopping after this step and saving a checkpoint" in output  # not Lightning's exit
    assert not (run_dir / "coarse" / "DONE.json").exists()
    checkpoints = run_dir / "coarse" / "checkpoints"
    interrupted_at = torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < interrupted_at < 20
    periodic = max(torch.load(p, weights_only=True)["global_step"] for p in checkpoints.glob("step*.ckpt"))
    assert interrupted_at >= periodic  # saved at the interrupt, not only at the last periodic save

    # The same command again, in-process, its stage too: the stop above was the processes' (the
    # resume of a stage process: test_user_faults' scribbled checkpoint).
    stages_in_this_process(monkeypatch)
    result = run_main(capfd, *args)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "resuming from" in result.stdout
    done = json.loads((run_dir / "coarse" / "DONE.json").read_text())
    assert done["steps"] == 20
    attempts = sorted((run_dir / "coarse" / "logs").glob("version_*/metrics.csv"))
    assert len(attempts) == 2, "each attempt keeps its own metrics file"
    second = pd.read_csv(attempts[1])
    assert second["step"].min() >= interrupted_at - 1, "the second attempt must not restart from zero"


def test_unknown_recipe_lists_available() -> None:
    result = run_cli("run", "no_such_recipe")  # bad input as the user types it; the others run in-process
    assert result.returncode == 2
    assert "Unknown recipe 'no_such_recipe'" in result.stderr and "coarse_only" in result.stderr


def test_empty_prompt_is_rejected(capfd: pytest.CaptureFixture[str]) -> None:
    result = run_main(capfd, "run", "coarse_only", "--prompt", "  ")
    assert result.returncode == 2 and "prompt is empty" in result.stderr


def test_mistyped_key_is_named(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    result = run_main(capfd, "run", "coarse_only", "--run", str(tmp_path / "r"), "model.scene.n_sampels_per_ray=8")
    assert result.returncode == 2
    assert "n_sampels_per_ray" in result.stderr
    assert len(result.stderr.splitlines()) <= 3, "a short message, not a traceback"
    assert not (tmp_path / "r").exists(), "nothing may be created for an invalid config"


def test_missing_weights_say_which_path(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # In-process, its stage too; test_user_faults has the CLI path (runner and stage processes).
    stages_in_this_process(monkeypatch)
    missing = tmp_path / "no_prior_here"
    result = run_main(capfd, "run", "coarse_only", "--run", str(tmp_path / "r"),
                      f"model.guidance.pretrained={missing}", "trainer.max_steps=2")
    assert result.returncode != 0
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr


def test_corrupt_checkpoint_is_reported_and_kept(tmp_path: Path, tiny_pixel_pipeline: Path,
                                                 capfd: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # In-process, its stage too: test_user_faults' scribbled checkpoint is found by a stage process.
    stages_in_this_process(monkeypatch)
    run_dir = tmp_path / "r"
    ckpt = run_dir / "coarse" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not a checkpoint")
    result = run_main(capfd, "run", "coarse_only", "--run", str(run_dir),
                      f"model.guidance.pretrained={tiny_pixel_pipeline}", "trainer.max_steps=2")
    assert result.returncode != 0
    assert "corrupt" in result.stderr and "last.ckpt" in result.stderr
    kept = ckpt.with_name("last.ckpt.corrupt")
    assert kept.read_bytes() == b"not a checkpoint", "the user's file is kept under another name"
    assert not ckpt.exists(), "the next run may start over: the corrupt file is out of the way"


def test_recipes_dir_is_the_repository_folder() -> None:
    assert (recipes_dir() / "coarse_only.yaml").is_file()
