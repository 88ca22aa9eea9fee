"""Evaluator metrics on known inputs: prompt parsing, classifier metrics, IoU, Chamfer, surfaces, images."""

from __future__ import annotations

import math

import pytest
import torch

from eval_stubs import StubClassifier
from magic3d.data.cameras import VIEW_NAMES, orbit_cameras
from magic3d.eval.classifier import Prediction
from magic3d.eval.metrics import (
    PromptOutsideToyWorld,
    area_downsample,
    chamfer_distance,
    colour_accuracy,
    density_surface_points,
    janus_rate,
    mesh_surface_points,
    parse_prompt,
    r_precision,
    shape_accuracy,
    silhouette_iou,
)
from magic3d.toyworld.dataset import ground_truth_views
from magic3d.toyworld.shapes import COLOUR_NAMES, SHAPE_NAMES, get_shape, surface_points


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def test_parse_prompt_articles_case_and_view_suffix() -> None:
    p = parse_prompt("a red cube")
    assert (p.shape, p.colour, p.view) == ("cube", "red", None)
    assert (p.shape_id, p.colour_id) == (SHAPE_NAMES.index("cube"), COLOUR_NAMES.index("red"))
    assert parse_prompt("an orange duck").caption == "an orange duck"
    q = parse_prompt("  A Blue Car, back view. ")
    assert (q.shape, q.colour, q.view, q.view_id) == ("car", "blue", "back", VIEW_NAMES.index("back"))
    assert parse_prompt("green torus,front view").view == "front"


@pytest.mark.parametrize("prompt", ["a red dragon", "a cube", "a shiny red cube", "a red cube, upside view", ""])
def test_parse_prompt_outside_toy_world_raises(prompt: str) -> None:
    with pytest.raises(PromptOutsideToyWorld, match="toy world|toy-world|not one of"):
        parse_prompt(prompt)
    assert issubclass(PromptOutsideToyWorld, ValueError)


# ---------------------------------------------------------------------------------------------
# Classifier metrics
# ---------------------------------------------------------------------------------------------


def test_perfect_stub_on_ground_truth_renders_scores_one_and_wrong_colour_zero() -> None:
    cams = orbit_cameras(4, 20.0, 2.0, 50.0, 32, 32)
    gt = ground_truth_views("duck", "red", cams)
    cube, red, blue = SHAPE_NAMES.index("duck"), COLOUR_NAMES.index("red"), COLOUR_NAMES.index("blue")
    right = StubClassifier("duck", "red").predict(gt.rgb)
    assert r_precision(right, cube, red) == 1.0
    assert shape_accuracy(right, cube) == 1.0 and colour_accuracy(right, red) == 1.0
    wrong = StubClassifier("duck", "blue").predict(gt.rgb)
    assert colour_accuracy(wrong, red) == 0.0 and colour_accuracy(wrong, blue) == 1.0
    assert r_precision(wrong, cube, red) == 0.0 and shape_accuracy(wrong, cube) == 1.0


def test_r_precision_uses_the_joint_caption_score() -> None:
    # View 0: shape and colour both right; view 1: shape right, colour wrong; view 2: a close
    # call where the joint score still picks the right caption; view 3: colour right, shape
    # wrong. A hit needs both, so views 1 and 3 are misses (a colour-only or shape-only
    # metric would score 3/4).
    shape = torch.full((4, len(SHAPE_NAMES)), -5.0)
    colour = torch.full((4, len(COLOUR_NAMES)), -5.0)
    shape[:3, 1] = 5.0
    shape[3, 2] = 5.0
    colour[0, 0], colour[1, 2], colour[2, 0], colour[2, 3], colour[3, 0] = 5.0, 5.0, 1.0, 0.9, 5.0
    pred = Prediction(shape, colour, torch.zeros(4, 4))
    assert r_precision(pred, 1, 0) == 0.5  # two hits in four views: exact in binary
    assert r_precision(pred, 2, 0) == 0.25  # the wrong-shape view is a hit for its own caption


def test_janus_rate_on_hand_made_predictions() -> None:
    az_deg = torch.tensor([0.0, 90.0, 180.0, -160.0, 150.0, 170.0, 180.0])
    el_deg = torch.tensor([20.0, 20.0, 20.0, 20.0, 20.0, 20.0, 75.0])  # the last one is overhead
    front, back = VIEW_NAMES.index("front"), VIEW_NAMES.index("back")
    called = torch.tensor([front, front, front, back, front, front, front])
    logits = torch.nn.functional.one_hot(called, 4).float()
    pred = Prediction(torch.zeros(7, 2), torch.zeros(7, 2), logits)
    # Back views: 180, -160, 150, 170 (not the overhead one); three of them are called front
    # (and one back: a rate of back views called back would be 1/4).
    assert janus_rate(pred, torch.deg2rad(el_deg), torch.deg2rad(az_deg)) == 0.75  # exact in binary
    assert janus_rate(pred[:2], torch.deg2rad(el_deg[:2]), torch.deg2rad(az_deg[:2])) is None


# ---------------------------------------------------------------------------------------------
# Geometry metrics
# ---------------------------------------------------------------------------------------------


def test_silhouette_iou_identical_disjoint_and_partial() -> None:
    a = torch.zeros(3, 8, 8, 1)
    a[:, :4] = 1.0
    b = a.clone()
    b[1] = 1.0 - a[1]  # disjoint
    b[2, :, :] = 0.0
    b[2, :2] = 1.0  # half of a
    iou = silhouette_iou(a, b)
    assert iou.tolist() == [1.0, 0.0, 0.5]
    assert silhouette_iou(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)).item() == 1.0  # both empty


def test_chamfer_identical_is_zero_and_shift_gives_the_shift() -> None:
    g = torch.arange(4.0)
    points = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)  # spacing 1
    assert chamfer_distance(points, points).distance == 0.0
    shifted = points + torch.tensor([0.1, 0.0, 0.0])
    result = chamfer_distance(points, shifted, chunk=7)  # odd chunk exercises the chunking
    # Each point's nearest neighbour is its own shifted copy (0.1 < spacing / 2); float32 rounding.
    assert result.distance == pytest.approx(0.1, abs=1e-6)
    assert result.gt_to_pred == pytest.approx(0.1, abs=1e-6) and result.pred_to_gt == pytest.approx(0.1, abs=1e-6)
    # The two directions are not interchangeable: a reconstruction holding only the half
    # x <= 1 of the grid is accurate (each of its points is a ground-truth point) but
    # incomplete (ground-truth planes x = 2 and x = 3 lie 1 and 2 away from it). Distances
    # between integer points are exact in float32, so these compare exactly.
    partial = chamfer_distance(points, points[points[:, 0] < 1.5])
    assert partial.pred_to_gt == 0.0
    assert partial.gt_to_pred == 0.75  # (0 + 0 + 1 + 2) / 4 planes of equal size
    assert partial.distance == 0.375
    with pytest.raises(ValueError, match="non-empty"):
        chamfer_distance(points, points[:0])


def test_density_surface_of_an_opaque_sphere_lies_on_its_surface() -> None:
    sphere = get_shape("sphere")  # radius 0.45 * WORLD_SCALE = 0.585
    surface = density_surface_points(lambda p: torch.where(sphere.sdf(p) < 0, 1000.0, 0.0), 1.0, 32, 4000,
                                     generator=torch.Generator().manual_seed(0))
    h = surface.voxel_size
    assert surface.level == pytest.approx(1000.0)  # the density where the solid meets the outside
    assert 1500 < surface.points.shape[0] <= 4000  # ~3 axes x 2 x pi (0.585 / h)^2 voxel faces
    # A density step inside a voxel is seen at the voxel's face: within half a voxel of the surface.
    assert float(sphere.sdf(surface.points).abs().max()) < 0.5 * h + 1e-4
    gt = surface_points(sphere, 4000, torch.Generator().manual_seed(0))
    # The voxel staircase (mean offset ~h / 4) plus the gaps between two samplings.
    assert chamfer_distance(gt, surface.points).distance < h / 2


def test_density_surface_of_a_soft_sphere_that_renders_opaque() -> None:
    """Density 8 inside the toy sphere: below one voxel's half opacity (ln 2 / h = 11.1 at
    32^3), so a fixed half-opacity level finds nothing, yet a ray through the centre meets
    optical depth 8 x 1.17 = 9.4 (transmittance 1e-4): it renders opaque."""
    sphere = get_shape("sphere")
    radius = float(-sphere.sdf(torch.zeros(1, 3)))
    density = 8.0
    surface = density_surface_points(lambda p: torch.where(sphere.sdf(p) < 0, density, 0.0), 1.0, 32, 4000)
    h = surface.voxel_size
    assert math.log(2.0) / h > density and surface.level == pytest.approx(density)
    # Transmittance from outside halves ln 2 / 8 = 0.087 deep along the cheapest axis, which
    # is at most that deep along the normal (plus the voxelisation, half a voxel).
    r = surface.points.norm(dim=-1)
    depth = math.log(2.0) / density
    assert float(r.min()) > radius - depth - 0.5 * h and float(r.max()) < radius + 0.5 * h
    # Along the axes the cheapest ray is the radial one: the point is that deep exactly (the
    # grid lines nearest the +x axis are at y, z = ±h / 2).
    pole = surface.points[(surface.points[:, 1:].abs() < 0.6 * h).all(-1) & (surface.points[:, 0] > 0)]
    assert pole.shape[0] > 0 and float((pole[:, 0] - (radius - depth)).abs().max()) < 0.5 * h


def test_density_surface_of_a_transparent_field_is_empty() -> None:
    empty = density_surface_points(lambda p: torch.full((p.shape[0],), 0.1), 1.0, 16, 100)  # depth 0.2 at most
    assert empty.points.shape == (0, 3) and empty.level is None and empty.occupied_fraction == 0.0
    assert empty.max_optical_depth < math.log(2.0)


def test_mesh_surface_points_are_uniform_by_area_and_on_the_faces() -> None:
    # The unit square as three triangles of unequal area, plus a degenerate face.
    vertices = torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0.2, 1, 0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 4], [0, 4, 3], [0, 0, 1]])  # areas 0.5, 0.4, 0.1, 0
    surface = mesh_surface_points(vertices, faces, 20000, torch.Generator().manual_seed(0))
    assert surface.area == pytest.approx(1.0) and (surface.n_vertices, surface.n_faces) == (5, 4)
    p = surface.points
    assert p.shape == (20000, 3) and float(p[:, 2].abs().max()) == 0.0
    assert float(p[:, :2].min()) >= 0.0 and float(p[:, :2].max()) <= 1.0
    # Uniform over the square: each quadrant holds a quarter (binomial sd 0.003 at n = 20000).
    left, low = p[:, 0] < 0.5, p[:, 1] < 0.5
    for quadrant in (left & low, left & ~low, ~left & low, ~left & ~low):
        assert float(quadrant.float().mean()) == pytest.approx(0.25, abs=0.015)
    again = mesh_surface_points(vertices, faces, 20000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.points, p, rtol=0, atol=0)  # deterministic given the generator
    assert mesh_surface_points(vertices, faces[:0], 10).points.shape == (0, 3)


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def test_area_downsample_takes_block_means() -> None:
    images = torch.arange(2 * 4 * 4 * 3, dtype=torch.float32).reshape(2, 4, 4, 3)
    small = area_downsample(images, 2)
    expected = images.reshape(2, 2, 2, 2, 2, 3).mean(dim=(2, 4))  # mean of each 2x2 block
    torch.testing.assert_close(small, expected, rtol=0, atol=1e-5)  # float32 sums of 4 values
    assert area_downsample(images, 4) is images
    with pytest.raises(ValueError, match="only shrinks"):
        area_downsample(images, 8)


