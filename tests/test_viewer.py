"""``magic3d view``: the offline page of a run (or of every run of an ablation folder) shows each
stage's mesh in a real browser, beside its turntable and metrics, from file:// with no server."""

from __future__ import annotations

import json
import re
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import trimesh
import yaml

from browser import chromium_or_skip, dump_dom, screenshot
from conftest import run_cli
from eval.eval_stubs import make_finished_run
from magic3d.config import ConfigError
from magic3d.export import TexturedMesh, write_glb
from magic3d.viewer import page as viewer_page
from magic3d.viewer.page import runs_to_view, view
from magic3d.visuals import write_video

BACKGROUND = (0xF2, 0xF2, 0xF5)  # viewer.js BACKGROUND, the canvas's clear colour
RED = (0.9, 0.1, 0.1)
WINDOW = (1600, 2400)  # tall enough that both runs' cards are on screen


def _red_cube_stage(run: Path, stage: str = "coarse", evaluated: bool = True) -> Path:
    """A finished stage whose export is a red cube, with a turntable, as the runner leaves it."""
    stage_dir = run / stage
    (stage_dir / "export").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"recipe": "coarse_only", "prompt": "a red cube", "seed": 0}))
    (stage_dir / "config.yaml").write_text(yaml.safe_dump({"seed": 0}))
    (stage_dir / "DONE.json").write_text(json.dumps({"steps": 6, "prompt": "a red cube", "seconds_per_step": 0.5}))
    box = trimesh.creation.box(extents=(0.8, 0.8, 0.8))
    cube = TexturedMesh(vertices=torch.tensor(box.vertices, dtype=torch.float32),
                        faces=torch.tensor(box.faces, dtype=torch.int64),
                        uvs=torch.full((len(box.vertices), 2), 0.5),
                        texture=torch.tensor(RED).expand(4, 4, 3).clone())
    write_glb(cube, stage_dir / "export" / "mesh.glb")
    write_video([torch.full((32, 32, 3), shade) for shade in (0.2, 0.5, 0.8, 0.5)], stage_dir / "turntable.mp4", fps=4)
    if evaluated:
        (run / "eval").mkdir()
        (run / "eval" / "eval.json").write_text(json.dumps(
            {"stages": [{"stage": stage, "metrics": {"r_precision": 0.75, "chamfer": None}}]}))
    return stage_dir


def _attributes(tag: str) -> dict[str, str]:
    return dict(re.findall(r'([\w-]+)="([^"]*)"', tag))


def test_ablation_page_draws_every_mesh_in_chromium(tmp_path: Path) -> None:
    browser = chromium_or_skip()
    ablation = tmp_path / "runs" / "ablations" / "guidance"
    _red_cube_stage(ablation / "scale-10")
    _red_cube_stage(ablation / "scale-50", evaluated=False)
    (ablation / "scale-50" / "fine").mkdir()
    (ablation / "scale-50" / "fine" / "config.yaml").write_text("seed: 0\n")  # started, not finished

    page = view(ablation)
    assert page.index == ablation / "view" / "index.html"
    assert [run.title for run in page.runs] == ["guidance/scale-10", "guidance/scale-50"]
    for name in ("three-bundle.min.js", "LICENSE-three.txt", "viewer.js", "meshes/r0-coarse.js", "meshes/r1-coarse.js"):
        assert (page.index.parent / name).is_file(), name

    dom = dump_dom(browser, page.index, tmp_path / "profile", WINDOW)
    root = _attributes(re.search(r"<html[^>]*>", dom).group(0))
    assert root.get("data-viewer") == "ready", root
    assert (root["data-drawn"], root["data-failed"]) == ("2", "0")
    canvases = [_attributes(tag) for tag in re.findall(r"<canvas[^>]*>", dom)]
    assert [c["data-state"] for c in canvases] == ["drawn", "drawn"], canvases
    videos = [_attributes(tag) for tag in re.findall(r"<video[^>]*>", dom)]
    assert [v.get("data-state") for v in videos] == ["loaded", "loaded"], "the turntables play from file://"
    assert "r_precision" in dom and "0.750" in dom, "the evaluated run's metrics"
    assert "not evaluated" in dom and "the stage is unfinished" in dom

    shot = iio.imread(screenshot(browser, page.index, tmp_path / "profile", tmp_path / "shot.png", WINDOW))[..., :3]
    for canvas in canvases:
        x, y, w, h = (int(v) for v in canvas["data-box"].split(","))
        assert y + h <= shot.shape[0], "the card must be on screen for the check to mean anything"
        corner = shot[y + 3, x + 3].astype(int)
        centre = shot[y + h // 2 - 4 : y + h // 2 + 4, x + w // 2 - 4 : x + w // 2 + 4].reshape(-1, 3).mean(0)
        # The corner is the clear colour (sRGB-encoded exactly; 2 levels for PNG/compositing rounding).
        assert np.abs(corner - BACKGROUND).max() <= 2, corner
        # The centre is the lit red cube: red well above green and blue, far from the background.
        assert centre[0] > 60 and centre[0] > 2 * max(centre[1], centre[2]), centre
        assert np.abs(centre - BACKGROUND).max() > 100, centre


@pytest.mark.slow
def test_a_finished_stage_without_a_mesh_is_exported(tmp_path: Path) -> None:
    run = make_finished_run(tmp_path / "runs" / "coarse_only" / "blob", "a red sphere")
    result = run_cli("view", str(run), "--texture-resolution", "64", "--mesh-resolution", "24")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (run / "coarse" / "export" / "mesh.glb").is_file() and (run / "coarse" / "export" / "mesh.obj").is_file()
    assert f"open {(run / 'view' / 'index.html').resolve().as_uri()}" in result.stdout
    assert (run / "view" / "meshes" / "r0-coarse.js").stat().st_size > 1000


def test_failed_export_is_named_on_the_card(tmp_path: Path) -> None:
    run = tmp_path / "run"
    stage = run / "coarse"
    stage.mkdir(parents=True)
    (stage / "config.yaml").write_text("seed: 0\n")
    (stage / "DONE.json").write_text("{}")  # finished, but its checkpoint is gone
    page = view(run, texture_resolution=64, mesh_resolution=16)
    (card,) = page.runs[0].stages
    assert card.mesh_id is None and card.mesh_error.startswith("the mesh export failed: ")
    assert card.mesh_error in page.index.read_text().replace("&#x27;", "'")
    assert view(run, export_missing=False).runs[0].stages[0].mesh_error == (
        f"no export/mesh.glb yet: run `magic3d export {stage}`")


def test_runs_to_view(tmp_path: Path) -> None:
    run = tmp_path / "abl" / "a"
    _red_cube_stage(run, evaluated=False)
    assert runs_to_view(run) == [run]
    assert runs_to_view(tmp_path / "abl") == [run]
    view(tmp_path / "abl")
    assert runs_to_view(tmp_path / "abl") == [run], "the page's own folder is no run"
    with pytest.raises(ConfigError, match="holds no run"):
        runs_to_view(run / "coarse" / "export")
    with pytest.raises(ConfigError, match="is not a folder"):
        runs_to_view(tmp_path / "nope")
    result = run_cli("view", str(tmp_path / "nope"))
    assert result.returncode == 2 and "is not a folder" in result.stderr


def test_a_failure_keeps_the_previous_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    _red_cube_stage(run, evaluated=False)
    before = view(run).index.read_text()

    def broken(folder: Path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(viewer_page, "_copy_assets", broken)
    with pytest.raises(OSError, match="disk full"):
        view(run)
    assert (run / "view" / "index.html").read_text() == before
    assert sorted(p.name for p in run.iterdir()) == ["coarse", "run.json", "view"], "no half-built folder is left"
