"""The two-stage recipe end to end on CPU (tiny random priors): coarse NeRF -> convert ->
DMTet fine stage -> textured GLB export that reloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trimesh

from conftest import run_cli, run_main

pytestmark = pytest.mark.slow


def test_coarse_to_fine_runs_and_exports(tmp_path: Path, tiny_pixel_pipeline: Path, tiny_latent_pipeline: Path,
                                         capfd: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "c2f"
    # The run in-process (its stages are processes of their own; the smoke run is the command
    # line's), the export through the command line (test_user_faults exports in-process).
    result = run_main(
        capfd, "run", "coarse_to_fine", "--run", str(run_dir),
        f"coarse:model.guidance.pretrained={tiny_pixel_pipeline}",
        f"fine:model.guidance.pretrained={tiny_latent_pipeline}",
        # A dense blob, so the 4-step coarse stage already holds an opaque object to convert.
        "coarse:model.scene.blob_density=30",
        "trainer.max_steps=4", "data.steps_per_epoch=2", "run.checkpoint_every=2",
        "run.video_views=2", "model.preview_every=2", "trainer.log_every_n_steps=1",
        # Mechanics, not quality: a 32^3 conversion grid with 5 texture steps still converts and
        # textures a mesh (the CPU profile's 64^3 and 50 steps took most of this test's time), and
        # 32^2 renders. tet_resolution stays the profile's 16, so the export has its >100 faces.
        "fine:start.converter_args.resolution=32", "fine:start.converter_args.texture_steps=5",
        "fine:data.height=32", "fine:data.width=32", "data.n_val_views=1", "data.eval_height=32",
        "data.eval_width=32",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "converted the coarse NeRF" in result.stdout
    for stage in ("coarse", "fine"):
        assert json.loads((run_dir / stage / "DONE.json").read_text())["steps"] == 4
        assert (run_dir / stage / "turntable.mp4").is_file()

    exported = run_cli("export", str(run_dir / "fine"), "--texture-resolution", "128")
    assert exported.returncode == 0, exported.stderr[-3000:]
    glb = run_dir / "fine" / "export" / "mesh.glb"
    mesh = trimesh.load(glb, force="mesh")
    assert len(mesh.faces) > 100
    assert mesh.visual.material.baseColorTexture is not None
    assert (run_dir / "fine" / "export" / "mesh.obj").is_file()
