"""The fine-NeRF ablation (§5) end to end on CPU with tiny random priors: coarse NeRF ->
warm start -> the same NeRF fine-tuned by latent SDS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_main, stages_in_this_process
from magic3d.checkpoints import load_scene
from magic3d.config import load_yaml
from magic3d.scenes.hash_nerf import HashGridNeRF

pytestmark = pytest.mark.slow

FEW_STEPS = ("trainer.max_steps=3", "data.steps_per_epoch=3", "run.checkpoint_every=3", "run.video_views=2",
             "model.preview_every=0", "trainer.log_every_n_steps=1",
             # One 32^2 validation view a stage: the warm start is under test, not the renders.
             "data.n_val_views=1", "data.eval_height=32", "data.eval_width=32")


def test_coarse_to_fine_nerf_warm_starts_and_fine_tunes(tmp_path: Path, tiny_pixel_pipeline: Path,
                                                        tiny_latent_pipeline: Path, capfd: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "nerf"
    # In-process, stages too (conftest stages_in_this_process): the warm start between the stages
    # is under test; the smoke run is the command line's, test_single_stage_ldm's the latent-SDS
    # NeRF stage as a process.
    stages_in_this_process(monkeypatch)
    result = run_main(capfd, "run", "coarse_to_fine_nerf", "--prompt", "a red cube", "--run", str(run_dir),
                     f"coarse:model.guidance.pretrained={tiny_pixel_pipeline}",
                     f"fine:model.guidance.pretrained={tiny_latent_pipeline}", *FEW_STEPS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in ("coarse", "fine"):
        assert json.loads((run_dir / stage / "DONE.json").read_text())["steps"] == 3
    config = load_yaml(run_dir / "fine" / "config.yaml")
    assert config["start"]["mode"] == "warm_start"
    assert config["model"]["init_args"]["guidance"]["class_path"] == "magic3d.guidance.latent_sds.LatentSDS"
    coarse = load_scene(run_dir / "coarse" / "checkpoints" / "last.ckpt")
    fine = load_scene(run_dir / "fine" / "checkpoints" / "last.ckpt")
    assert isinstance(fine, HashGridNeRF)
    # Warm-started, then trained: the same table shape, moved by the fine stage's steps.
    assert fine.encoding.params.shape == coarse.encoding.params.shape
    assert not torch.equal(fine.encoding.params, coarse.encoding.params)
    # Started from the coarse weights, not from scratch: 3 Adam steps at lr 0.01 move each
    # entry by at most ~0.03, while a fresh table is U(-1e-4, 1e-4) and the coarse one is not.
    assert (fine.encoding.params - coarse.encoding.params).abs().max() < 0.05
