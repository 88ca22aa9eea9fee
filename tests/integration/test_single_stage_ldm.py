"""The single-stage ablation (§5) end to end on CPU with a tiny random latent prior: one NeRF
from scratch, optimised by latent SDS only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_main
from magic3d.checkpoints import load_scene
from magic3d.config import load_yaml
from magic3d.scenes.hash_nerf import HashGridNeRF

pytestmark = pytest.mark.slow


def test_single_stage_ldm_trains_a_nerf_from_scratch_with_latent_sds(
        tmp_path: Path, tiny_latent_pipeline: Path, capfd: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "single"
    # In-process (its stage is a process of its own): the recipe is under test; the smoke run
    # (conftest) is the command line's.
    result = run_main(capfd, "run", "single_stage_ldm", "--prompt", "a blue torus", "--run", str(run_dir),
                     f"model.guidance.pretrained={tiny_latent_pipeline}", "trainer.max_steps=2",
                     "data.steps_per_epoch=2", "run.checkpoint_every=2", "run.video_views=2",
                     "model.preview_every=0", "trainer.log_every_n_steps=1",
                     # One 32^2 validation view: the stage's wiring is under test, not its renders.
                     "data.n_val_views=1", "data.eval_height=32", "data.eval_width=32")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == ["nerf"]
    assert json.loads((run_dir / "nerf" / "DONE.json").read_text())["steps"] == 2
    config = load_yaml(run_dir / "nerf" / "config.yaml")
    assert "checkpoint" not in (config.get("start") or {})  # from scratch
    assert config["model"]["init_args"]["guidance"]["class_path"] == "magic3d.guidance.latent_sds.LatentSDS"
    assert isinstance(load_scene(run_dir / "nerf" / "checkpoints" / "last.ckpt"), HashGridNeRF)
