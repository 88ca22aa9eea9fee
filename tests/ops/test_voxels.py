"""Voxel-grid ops: centres, sampling, iso crossings, optical depth and the visible-surface rule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from magic3d.ops.voxels import (
    iso_crossings,
    optical_depth_from_outside,
    sample_density_grid,
    visible_solid,
    visible_surface_points,
    voxel_centres,
)

LN2 = math.log(2.0)


def box_grid(resolution: int, lo: int, hi: int, density: float) -> torch.Tensor:
    """``density`` in voxels [lo, hi) along every axis, 0 elsewhere."""
    grid = torch.zeros(resolution, resolution, resolution)
    grid[lo:hi, lo:hi, lo:hi] = density
    return grid


def test_voxel_centres_and_sampling_in_chunks() -> None:
    centres = voxel_centres(1.0, 4)
    assert centres.shape == (4, 4, 4, 3)
    assert centres[:, 0, 0, 0].tolist() == [-0.75, -0.25, 0.25, 0.75]
    assert centres[1, 2, 3].tolist() == [-0.25, 0.25, 0.75]
    field = lambda p: p[:, 0] + 2 * p[:, 1] + 3 * p[:, 2]  # noqa: E731
    grid = sample_density_grid(field, 2.0, 5, chunk=7)  # a chunk that does not divide 125
    torch.testing.assert_close(grid, field(voxel_centres(2.0, 5).reshape(-1, 3)).reshape(5, 5, 5), rtol=0, atol=0)


def test_iso_crossings_of_a_linear_field_lie_on_its_plane() -> None:
    centres = voxel_centres(1.0, 16)
    values = 10.0 * (0.3 - centres[..., 0]) + 5.0  # crosses 5 at x = 0.3, linear along x
    points = iso_crossings(values, 5.0, 1.0)
    # One crossing per grid line through x = 0.3 (16 x 16), plus the grid's outer faces where
    # the occupied half meets the "outside is empty" padding.
    on_plane = (points[:, 0] - 0.3).abs() < 1e-5  # float32 interpolation
    assert int(on_plane.sum()) == 16 * 16
    assert iso_crossings(torch.zeros(4, 4, 4), 1.0, 1.0).shape == (0, 3)


def test_optical_depth_is_the_cheapest_axis_ray_from_outside() -> None:
    grid = torch.rand(4, 5, 3, generator=torch.Generator().manual_seed(0)) * 3.0
    voxel = 0.1
    depth = optical_depth_from_outside(grid, voxel)
    tau = grid * voxel
    for i, j, k in itertools.product(range(4), range(5), range(3)):
        # Everything in front of the voxel along the ray, plus half of the voxel itself.
        rays = [tau[:i, j, k].sum(), tau[i + 1:, j, k].sum(), tau[i, :j, k].sum(), tau[i, j + 1:, k].sum(),
                tau[i, j, :k].sum(), tau[i, j, k + 1:].sum()]
        expected = min(float(r) for r in rays) + 0.5 * float(tau[i, j, k])
        assert float(depth[i, j, k]) == pytest.approx(expected, abs=1e-6)  # float32 cumulative sums
    # Negative densities absorb nothing (they would cancel the opacity in front of them).
    torch.testing.assert_close(optical_depth_from_outside(grid - 5.0, voxel),
                               optical_depth_from_outside((grid - 5.0).clamp_min(0.0), voxel))


def test_visible_solid_of_a_box_and_of_a_transparent_field() -> None:
    grid = box_grid(16, 4, 12, 100.0)  # voxel 1/8: the first inner centre is 6.25 deep
    visible = visible_solid(grid, 2.0 / 16)
    assert torch.equal(visible.solid, grid > 0) and visible.boundary_level == pytest.approx(100.0)
    assert not visible.is_empty
    faint = visible_solid(torch.full((8, 8, 8), 0.1), 2.0 / 8)  # 2 units of density 0.1: depth 0.2 at most
    assert faint.is_empty and faint.boundary_level is None and not faint.solid.any()
    assert faint.max_optical_depth < LN2


def test_visible_solid_keeps_what_an_opaque_shell_hides() -> None:
    grid = box_grid(16, 3, 13, 200.0)
    grid[4:12, 4:12, 4:12] = 1e-20  # a near-empty interior behind a one-voxel opaque shell
    visible = visible_solid(grid, 2.0 / 16)
    assert torch.equal(visible.solid, grid > 0)  # the interior is hidden, so it is solid
    assert visible.boundary_level == pytest.approx(200.0)  # the density the viewer meets


def test_visible_surface_of_a_density_step_is_its_face() -> None:
    h = 2.0 / 16
    points = visible_surface_points(box_grid(16, 4, 12, 100.0), 1.0)
    assert points.shape == (6 * 8 * 8, 3)  # one point per outer voxel face of the 8^3 box
    # ln 2 of optical depth builds up ln 2 / 100 inside the face at -1 + 4 h = -0.5.
    inset = LN2 / 100.0
    torch.testing.assert_close(points.abs().amax(-1), torch.full((points.shape[0],), 0.5 - inset))
    assert inset < 0.1 * h


def test_visible_surface_of_a_soft_box_is_where_transmittance_halves() -> None:
    h = 2.0 / 16
    density = LN2 / (1.25 * h)  # transmittance halves 1.25 voxels into the box
    points = visible_surface_points(box_grid(16, 2, 14, density), 1.0)  # faces at +-0.75
    # Three voxels or more from the other faces (6 x 6 grid lines per x face), the cheapest
    # ray crosses the nearest face straight on.
    x_face = points[(points[:, 1:].abs() < 0.75 - 2.9 * h).all(-1) & (points[:, 0].abs() > 0.3)]
    assert x_face.shape[0] == 2 * 6 * 6
    torch.testing.assert_close(x_face[:, 0].abs(), torch.full((x_face.shape[0],), 0.75 - 1.25 * h))
    assert visible_surface_points(torch.zeros(4, 4, 4), 1.0).shape == (0, 3)
