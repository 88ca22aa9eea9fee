"""A personalisation stage run by the stage runner: checkpoints hold the adapters alone, and a
stage resumed mid-training ends exactly where an uninterrupted one does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from magic3d.checkpoints import read_checkpoint
from magic3d.config import ConfigError, dump_yaml
from magic3d.guidance.lora import LORA_WEIGHTS
from magic3d.stage import run_stage


def stage_config(pipeline: Path, subject: Path, max_steps: int, rank: int = 4) -> dict:
    return {
        "seed": 3,
        "model": {"class_path": "magic3d.dreambooth.module.DreamBooth", "init_args": {
            "prior": {"class_path": "magic3d.dreambooth.prior.PixelPrior", "init_args": {"pretrained": str(pipeline)}},
            "prompt": "a sks duck", "subject": str(subject), "rank": rank, "lr": 1e-2, "n_class_images": 2,
            "class_sample_steps": 2, "preview_every": 2, "n_preview": 1, "preview_steps": 2}},
        "data": {"class_path": "magic3d.dreambooth.data.PersonalisationSteps",
                 "init_args": {"batch_size": 2, "steps_per_epoch": 3}},
        "trainer": {"max_steps": max_steps, "max_epochs": -1, "accelerator": "cpu", "devices": 1,
                    "enable_model_summary": False, "log_every_n_steps": 1},
        "run": {"checkpoint_every": 2, "video_views": 1, "wandb": "off"},
    }


def run(stage_dir: Path, config: dict) -> None:
    path = stage_dir / "config.yaml"
    dump_yaml(config, path)
    run_stage(path, stage_dir)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, tiny_pixel_pipeline: Path, pink_duck: Path) -> Path:
    stage = tmp_path_factory.mktemp("straight") / "personalise"
    run(stage, stage_config(tiny_pixel_pipeline, pink_duck, 4))
    return stage


def test_a_stage_resumed_mid_training_ends_where_an_uninterrupted_one_does(
        straight: Path, tmp_path: Path, tiny_pixel_pipeline: Path, pink_duck: Path) -> None:
    stage = tmp_path / "personalise"
    run(stage, stage_config(tiny_pixel_pipeline, pink_duck, 2))  # "stopped" after its step-2 checkpoint
    (stage / "DONE.json").unlink()
    run(stage, stage_config(tiny_pixel_pipeline, pink_duck, 4))
    assert json.loads((stage / "DONE.json").read_text())["steps"] == 4
    resumed, uninterrupted = load_file(str(stage / "lora" / LORA_WEIGHTS)), load_file(str(straight / "lora" / LORA_WEIGHTS))
    assert resumed.keys() == uninterrupted.keys()
    # Same draws per global step, Adam moments restored, float32 on CPU: bit for bit.
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_the_stage_folder_has_what_a_stage_writes(straight: Path) -> None:
    done = json.loads((straight / "DONE.json").read_text())
    assert done["steps"] == 4 and done["lora"] == str(straight / "lora") and done["prompt"] == "a sks duck"
    assert sorted(p.name for p in (straight / "train").glob("*.png")) == ["step_000000.png", "step_000002.png"]
    assert (straight / "samples.png").is_file() and (straight / "class_images" / "manifest.json").is_file()
    checkpoint = read_checkpoint(straight / "checkpoints" / "last.ckpt")
    keys = set(checkpoint["state_dict"])
    assert keys and all(k.startswith("adapters.") or k in {"loss_first", "loss_ema", "loss_steps", "train_seconds"}
                        for k in keys), "frozen weights never enter a checkpoint"
    size = (straight / "checkpoints" / "last.ckpt").stat().st_size
    assert size < 2e6, f"{size} bytes: adapters + Adam moments only (the tiny UNet alone is 3 MB)"
    metrics = (next((straight / "logs").glob("version_*/metrics.csv"))).read_text().splitlines()[0]
    assert "train/loss_instance" in metrics and "train/loss_prior" in metrics


def test_a_checkpoint_of_other_settings_is_refused(straight: Path, tmp_path: Path, tiny_pixel_pipeline: Path,
                                                   pink_duck: Path) -> None:
    import shutil

    stage = Path(shutil.copytree(straight, tmp_path / "personalise"))
    (stage / "DONE.json").unlink()
    with pytest.raises(ConfigError, match=r"rank: 4 -> 8"):
        run(stage, stage_config(tiny_pixel_pipeline, pink_duck, 6, rank=8))


@pytest.mark.slow
def test_two_processes_train_one_set_of_adapters(tmp_path: Path, tiny_pixel_pipeline: Path, pink_duck: Path) -> None:
    """DDP over gloo on CPU: each of 2 ranks takes 1 of the 2 subject images per step, rank 0
    alone writes the class images, previews, checkpoints and adapters."""
    import subprocess
    import sys

    config = stage_config(tiny_pixel_pipeline, pink_duck, 2)
    config["trainer"].update(devices=2, strategy="ddp")
    stage = tmp_path / "personalise"
    dump_yaml(config, stage / "config.yaml")
    result = subprocess.run([sys.executable, "-m", "magic3d", "stage", "--config", str(stage / "config.yaml"),
                             "--stage-dir", str(stage)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((stage / "DONE.json").read_text())["steps"] == 2
    assert (stage / "lora" / LORA_WEIGHTS).is_file()
    assert sorted(p.name for p in (stage / "train").iterdir()) == ["step_000000.png"]
    assert sorted(p.name for p in (stage / "class_images").iterdir()) == ["0000.png", "0001.png", "manifest.json"]
