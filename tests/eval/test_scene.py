"""One scene's evaluation: the ground truth as a scene, a DMTet mesh scene, a soft NeRF, empty
scenes, prompts outside the toy world, and the high-resolution path."""

from __future__ import annotations

import math

import pytest
import torch

from eval_stubs import NERF_ARGS, StubClassifier, ToyScene, toy_dmtet
from magic3d.data.cameras import orbit_cameras
from magic3d.eval.classifier import Prediction
from magic3d.eval.metrics import chamfer_distance, density_surface_points, mesh_surface_points
from magic3d.eval.options import EvalOptions
from magic3d.eval.scene import evaluate_scene
from magic3d.eval.views import render_object
from magic3d.ops.voxels import sample_density_grid
from magic3d.scenes.hash_nerf import HashGridNeRF
from magic3d.toyworld.shapes import get_shape, surface_points

SMALL_OPTIONS = dict(views=4, iou_size=64, chamfer_resolution=32, chamfer_points=600)
SMALL = dict(views=4, iou_size=64, chamfer_points=2000)  # mesh scenes: no density grid


# ---------------------------------------------------------------------------------------------
# The ground truth as the scene
# ---------------------------------------------------------------------------------------------


def test_ground_truth_scene_scores_perfectly() -> None:
    options = EvalOptions(**SMALL_OPTIONS)
    scene = ToyScene("duck", "red")
    result = evaluate_scene(scene, "a red duck", StubClassifier("duck", "red", "side"), options)
    m = result.metrics
    assert m["r_precision"] == 1.0 and m["colour_accuracy"] == 1.0 and m["shape_accuracy"] == 1.0
    assert m["gt_r_precision"] == 1.0
    # Same sphere tracer, cameras and supersampling as the ground truth: identical masks.
    assert m["silhouette_iou"] == 1.0
    # Two samplings of one surface already differ by the gaps between 600 points (~0.029);
    # the visible surface of the density step adds its voxel staircase (one voxel is 2 / 32).
    floor = chamfer_distance(surface_points(scene.shape, 600, torch.Generator().manual_seed(1)),
                             surface_points(scene.shape, 600, torch.Generator().manual_seed(2))).distance
    assert m["chamfer"] is not None and m["chamfer"] < floor + 0.0625 / 8
    # 4 views at azimuths 0, 90, 180, -90: one back view, called "side" -> no Janus.
    assert m["janus_rate"] == 0.0 and m["view_accuracy"] == pytest.approx(0.5)
    assert result.renders is not None and result.ground_truth is not None
    # The learned-looking background is removed: the object over white equals the GT render.
    torch.testing.assert_close(result.renders, result.ground_truth, atol=1e-5, rtol=0)

    wrong = evaluate_scene(scene, "a red duck", StubClassifier("duck", "blue"), options)
    assert wrong.metrics["colour_accuracy"] == 0.0 and wrong.metrics["r_precision"] == 0.0
    assert wrong.metrics["janus_rate"] == 1.0  # the stub calls the back view "front"


def test_prompt_outside_toy_world_reports_only_captions() -> None:
    options = EvalOptions(**SMALL_OPTIONS)
    result = evaluate_scene(ToyScene("cube", "red"), "a photo of a corgi", StubClassifier("cube", "red"), options)
    assert all(v is None for v in result.metrics.values())
    assert result.toy_world is None and "toy-world" in result.notes[0]
    assert [v.predicted_caption for v in result.views] == ["a red cube"] * 4


def test_render_object_composites_over_the_neutral_background() -> None:
    cams = orbit_cameras(2, 20.0, 2.0, 50.0, 16, 16)
    views = render_object(ToyScene("cube", "blue", background=(1.0, 0.0, 0.0)), cams, EvalOptions(background=(0.5, 0.5, 0.5)))
    corner = views.object_rgb[:, 0, 0]  # empty pixel: the neutral grey, not the red backdrop
    torch.testing.assert_close(corner, torch.full_like(corner, 0.5), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Density scenes (NeRF)
# ---------------------------------------------------------------------------------------------


def test_soft_nerf_that_renders_opaque_gets_a_chamfer_distance() -> None:
    """The NeRF blob at density 10 peaks below one voxel's half opacity (ln 2 / h = 11.1 on
    the 32^3 grid), the level the evaluator used to take as the surface ("no surface": no
    Chamfer distance), yet it renders opaque through its thickness. Conversion and export
    find its visible surface; the evaluator now finds the same one."""
    torch.manual_seed(0)
    scene = HashGridNeRF(**{**NERF_ARGS, "blob_density": 10.0}).eval()
    options = EvalOptions(**SMALL_OPTIONS)
    with torch.no_grad():
        grid = sample_density_grid(scene.density, float(scene.radius), options.chamfer_resolution)
    assert float(grid.max()) < math.log(2.0) * options.chamfer_resolution / 2.0  # never half opaque per voxel
    opacity = render_object(scene, orbit_cameras(1, 20.0, 2.0, 50.0, 32, 32), options).opacity
    assert float(opacity[0, 16, 16]) > 0.95  # opaque where the view crosses the blob
    result = evaluate_scene(scene, "a red sphere", StubClassifier("sphere", "red"), options)
    detail = result.chamfer_detail
    assert detail is not None and detail["source"] == "density", result.notes
    assert detail["density_level"] < 10.0
    # Concentric spheres: the Chamfer distance is the gap between the toy sphere's radius and
    # the blob's visible one (~0.25: where ln 2 of optical depth has built up from outside).
    visible = density_surface_points(scene.density, float(scene.radius), options.chamfer_resolution,
                                     options.chamfer_points)
    sphere_radius = float(-get_shape("sphere").sdf(torch.zeros(1, 3)))
    gap = float((sphere_radius - visible.points.norm(dim=-1)).abs().mean())
    assert result.metrics["chamfer"] == pytest.approx(gap, abs=0.02)


# ---------------------------------------------------------------------------------------------
# Mesh scenes (DMTet)
# ---------------------------------------------------------------------------------------------


def test_dmtet_of_the_toy_sphere_sdf_scores_like_the_ground_truth() -> None:
    shape = get_shape("sphere")
    scene = toy_dmtet("sphere")
    options = EvalOptions(**SMALL)
    result = evaluate_scene(scene, "a red sphere", StubClassifier("sphere", "red"), options, stage="fine")
    m = result.metrics
    assert result.scene == "DMTetScene" and result.render_size == 64
    assert all(math.isfinite(m[k]) for k in ("r_precision", "silhouette_iou", "chamfer", "gt_r_precision"))
    assert m["r_precision"] == 1.0 and m["view_accuracy"] is None  # a sphere has no front
    # Inscribed mesh (chords sag < h^2 / (6 r) ~ 0.003) and antialiased edges vs the
    # supersampled GT: differ on under one pixel along the silhouette only.
    assert m["silhouette_iou"] > 0.97
    # The learned environment map is taken out: empty corners show the neutral backdrop.
    corner = result.renders[:, 0, 0]
    torch.testing.assert_close(corner, torch.ones_like(corner), rtol=0, atol=1e-6)

    detail = result.chamfer_detail
    assert detail is not None and detail["source"] == "mesh" and detail["n_points"] == SMALL["chamfer_points"]
    radius = float(-shape.sdf(torch.zeros(1, 3)))  # the toy sphere's radius at the world's scale
    # The inscribed mesh loses area as 1 - O(h^2 / r^2): under 2 % at this grid.
    assert detail["surface_area"] == pytest.approx(4 * math.pi * radius**2, rel=0.02)
    # Chamfer of two independent samplings of one surface is the sampling floor (the mean
    # gap between 2000 random points, ~0.023 here); the mesh adds its chord error
    # (< 0.003) and the floor's seed-to-seed spread is ~3e-4: 0.005 covers both.
    floor = chamfer_distance(surface_points(shape, 2000, torch.Generator().manual_seed(1)),
                             surface_points(shape, 2000, torch.Generator().manual_seed(2))).distance
    assert m["chamfer"] < floor + 0.005
    # The samples lie on the true surface to a tenth of the grid spacing (sagitta + the
    # linear crossing of a curved SDF along each edge: ~0.002 measured).
    with torch.no_grad():
        mesh = scene.extract_mesh()
    points = mesh_surface_points(mesh.vertices, mesh.faces, 2000, torch.Generator().manual_seed(0)).points
    spacing = float(scene.grid_spacing().max())
    assert float(shape.sdf(points).abs().max()) < 0.1 * spacing


def test_resolution_renders_once_and_classifies_the_area_averaged_renders() -> None:
    seen: list[tuple[int, ...]] = []

    class Recording(StubClassifier):
        def predict(self, images: torch.Tensor) -> Prediction:
            seen.append(tuple(images.shape))
            return super().predict(images)

    options = EvalOptions(**{**SMALL, "resolution": 128})
    result = evaluate_scene(toy_dmtet("sphere"), "a red sphere", Recording("sphere", "red"), options)
    assert result.renders is not None and result.renders.shape == (4, 128, 128, 3)
    assert result.ground_truth is not None and result.ground_truth.shape == (4, 128, 128, 3)
    # Scene and ground truth both reach the classifier at classify_size, box-filtered from 128.
    assert seen == [(4, 64, 64, 3), (4, 64, 64, 3)]
    assert result.metrics["silhouette_iou"] > 0.97  # as above, at twice the pixels
    with pytest.raises(ValueError, match="classify_size"):
        EvalOptions(resolution=32)


def test_empty_dmtet_surface_is_scored_as_an_empty_scene() -> None:
    scene = toy_dmtet("sphere")
    with torch.no_grad():
        scene.sdf.fill_(1.0)  # outside everywhere: marching tets finds no surface
    result = evaluate_scene(scene, "a red sphere", StubClassifier("sphere", "red"), EvalOptions(**SMALL))
    assert result.metrics["silhouette_iou"] == 0.0 and result.metrics["chamfer"] is None
    assert any("empty surface" in note for note in result.notes)
    torch.testing.assert_close(result.renders, torch.ones_like(result.renders))  # backdrop only
