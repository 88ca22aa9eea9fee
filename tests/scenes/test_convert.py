"""Coarse NeRF -> DMTet conversion: box, floaters, SDF, threshold errors, texture, background."""

from __future__ import annotations

import itertools

import pytest
import torch

from magic3d.scenes.background import EnvironmentMapBackground
from magic3d.scenes.convert import (
    convert_nerf_to_dmtet,
    largest_component,
    nerf_to_dmtet,
    occupied_bbox,
    signed_distance_grid,
    squared_distance_transform,
)
from magic3d.scenes.dmtet import DMTetScene
from magic3d.scenes.hash_nerf import HashGridNeRF

SMALL = dict(n_levels=4, log2_hashmap_size=12, base_resolution=4, per_level_scale=2.0, hidden_dim=16)
CENTRE = torch.tensor([0.1, -0.05, 0.0])
RADII = torch.tensor([0.4, 0.3, 0.25])  # an ellipsoid: the box must be tight per axis
FLOATER = torch.tensor([0.7, 0.7, -0.7])
RESOLUTION = 32  # density grid: voxel 1/16, half-opacity threshold ln 2 * 16 = 11.1
VOXEL = 2.0 / RESOLUTION


def blob_density(points: torch.Tensor) -> torch.Tensor:
    main = ((points - CENTRE) / RADII).norm(dim=-1)
    floater = (points - FLOATER).norm(dim=-1) / 0.12
    return 100.0 * torch.sigmoid((1 - main) / 0.05) + 100.0 * torch.sigmoid((1 - floater) / 0.05)


def colour_ramp(points: torch.Tensor) -> torch.Tensor:
    return ((points + 1) / 2).clamp(0, 1)


def coarse_scene(density=blob_density) -> HashGridNeRF:
    torch.manual_seed(0)
    source = HashGridNeRF(**SMALL, grid_resolution=0, background=EnvironmentMapBackground())
    source.density = density  # a known field instead of a trained one
    source.albedo = colour_ramp
    return source


def fine_scene() -> DMTetScene:
    torch.manual_seed(1)
    return DMTetScene(tet_resolution=12, background=EnvironmentMapBackground(), raster_backend="torch", **SMALL)


@pytest.fixture(scope="module")
def converted():
    source, target = coarse_scene(), fine_scene()
    report = convert_nerf_to_dmtet(source, target, resolution=RESOLUTION, texture_steps=40,
                                   texture_points=4096, texture_batch=1024)
    return source, target, report


def test_mesh_is_tight_around_the_blob_and_the_floater_is_gone(converted):
    _, target, report = converted
    assert report.removed_voxels > 0  # the floater was occupied, then dropped
    mesh = target.extract_mesh()
    lo, hi = mesh.vertices.detach().min(0).values, mesh.vertices.detach().max(0).values
    # The surface follows the ellipsoid to within one density voxel (the SDF's zero level is
    # quantised to voxel boundaries) plus the tet grid's linear interpolation.
    assert torch.allclose(lo, CENTRE - RADII, atol=1.5 * VOXEL)
    assert torch.allclose(hi, CENTRE + RADII, atol=1.5 * VOXEL)
    assert float((mesh.vertices.detach() - FLOATER).norm(dim=-1).min()) > 0.5
    # The box is the occupied extent plus 2 tet cells (m = 2e / (12 - 4) = e / 4 per axis),
    # widened to a quarter of the longest axis at most: nowhere near the floater.
    box = target.bbox
    extent = 2 * RADII
    assert (box[0] < CENTRE - RADII).all() and (box[1] > CENTRE + RADII).all()
    assert torch.allclose(box[1] - box[0], extent * 1.5, atol=2.5 * VOXEL)


def test_sdf_is_a_signed_distance(converted):
    _, target, _ = converted
    vertices, sdf = target.grid_vertices(), target.sdf.detach()
    # For an ellipsoid the distance is between (|q| - 1) * min radius and (|q| - 1) * max
    # radius, q the normalised coordinates; one voxel of slack for the voxel quantisation.
    q = ((vertices - CENTRE) / RADII).norm(dim=-1) - 1
    low = torch.minimum(q * RADII.min(), q * RADII.max()) - VOXEL
    high = torch.maximum(q * RADII.min(), q * RADII.max()) + VOXEL
    near = q.abs() < 0.5  # far from the surface the ellipsoid bound above gets loose
    assert ((sdf >= low) & (sdf <= high))[near].all()
    assert (torch.sign(sdf) == torch.sign(q))[q.abs() > 0.2].all()
    assert (target.deformation == 0).all()


def test_texture_fit_reduces_the_albedo_error(converted):
    _, target, report = converted
    # 40 Adam steps on a linear colour ramp: a large drop, not convergence.
    assert report.texture_mse_after < 0.2 * report.texture_mse_before
    points = CENTRE + RADII * torch.nn.functional.normalize(torch.randn(256, 3), dim=-1)
    with torch.no_grad():
        error = (target.albedo(points) - colour_ramp(points)).abs().mean()
    assert float(error) < 0.05  # colour in [0, 1]; a constant guess would be ~0.15 off


def test_background_is_copied(converted):
    source, target, _ = converted
    for (name, a), (_, b) in zip(source.background.state_dict().items(), target.background.state_dict().items()):
        assert torch.equal(a, b), name


def test_converted_scene_renders_the_coarse_colours(converted):
    import math

    from magic3d.data.cameras import look_at_c2w
    from magic3d.types import CameraBatch, Shading

    _, target, _ = converted
    eye = torch.tensor([[2.5, 0.0, 0.0]])
    camera = CameraBatch(c2w=look_at_c2w(eye), fovy=torch.full((1,), math.radians(40.0)),
                         elevation=torch.zeros(1), azimuth=torch.zeros(1),
                         distance=torch.full((1,), 2.5), light_position=eye.clone(), height=24, width=24)
    target.eval()
    with torch.no_grad():
        out = target.render(camera, Shading("albedo", torch.ones(1)))
    assert out.opacity.sum() > 20  # the blob covers ~100 of 576 pixels
    centre = out.rgb[0, 12, 12]
    # Facing +x, the front of the blob is at x = 0.5: the ramp gives (0.75, ~0.5, ~0.5).
    assert torch.allclose(centre, torch.tensor([0.75, 0.5, 0.5]), atol=0.08)


def test_threshold_outside_the_density_range_reports_the_range():
    with pytest.raises(ValueError, match=r"threshold 1e\+06 .* range \[0, 100\]"):
        convert_nerf_to_dmtet(coarse_scene(), fine_scene(), resolution=16, threshold=1e6, texture_steps=0)
    empty = coarse_scene(density=lambda p: torch.zeros(p.shape[0]))
    with pytest.raises(ValueError, match=r"range \[0, 0\]"):
        nerf_to_dmtet(empty, fine_scene())


def test_box_is_the_occupied_extent_plus_the_margin():
    # 16^3 voxels of 1/8 over [-1, 1]^3; occupied voxels x 4..7, y 4..11, z 6..6 (one layer).
    occupied = torch.zeros(16, 16, 16, dtype=torch.bool)
    occupied[4:8, 4:12, 6] = True
    lo, hi = occupied_bbox(occupied, 1.0, tet_resolution=10, margin_cells=1.0, min_aspect=0.25)
    # Extent: x [-0.5, 0], y [-0.5, 0.5], z [-0.25, -0.125] (the voxels' outer faces). The thin z
    # axis is widened about its centre to 0.25 x the longest (1.0). Margin: 1 cell of the final
    # 10-cell grid, e / 8, at least one voxel: x 0.125 (clamped), y 0.125, z 0.125 (clamped).
    # Dyadic numbers throughout: exact.
    assert lo.tolist() == [-0.625, -0.625, -0.4375]
    assert hi.tolist() == [0.125, 0.625, 0.0625]


def test_largest_component_keeps_the_biggest_blob():
    occupied = torch.zeros(12, 12, 12, dtype=torch.bool)
    occupied[1:5, 1:5, 1:5] = True  # 64 voxels
    occupied[8:10, 8:10, 8:10] = True  # 8 voxels, separate
    kept = largest_component(occupied)
    assert int(kept.sum()) == 64 and bool(kept[1:5, 1:5, 1:5].all())
    assert not largest_component(torch.zeros(3, 3, 3, dtype=torch.bool)).any()


def test_distance_transform_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    feature = torch.rand(6, 7, 5, generator=g) > 0.9
    got = squared_distance_transform(feature)
    cells = torch.tensor(list(itertools.product(range(6), range(7), range(5)))).float()
    sources = torch.nonzero(feature).float()
    expected = torch.cdist(cells, sources).square().min(-1).values.view(6, 7, 5)
    assert torch.allclose(got, expected)  # small integers: exact in float32
    occupied = torch.zeros(5, 5, 5, dtype=torch.bool)
    occupied[2, 2, 2] = True
    sdf = signed_distance_grid(occupied, voxel_size=1.0)
    assert float(sdf[2, 2, 2]) == -0.5 and float(sdf[2, 2, 3]) == 0.5


def soft_blob(points: torch.Tensor) -> torch.Tensor:
    """Peaks at density 8, below the half-opacity-per-voxel level (11.1 at 32^3), yet a ray
    through its 0.5-unit radius accumulates optical depth ~4: it renders opaque."""
    return 8.0 * torch.sigmoid((1 - ((points - CENTRE) / 0.5).norm(dim=-1)) / 0.1)


def test_soft_coarse_density_still_converts():
    target = fine_scene()
    report = convert_nerf_to_dmtet(coarse_scene(soft_blob), target, resolution=RESOLUTION, texture_steps=0)
    assert report.threshold < 8.0
    mesh = target.extract_mesh()
    assert mesh.faces.shape[0] > 0
    # The visible surface lies inside the blob's 0.5 radius, and not collapsed to its core.
    radii = (mesh.vertices.detach() - CENTRE).norm(dim=-1)
    assert 0.25 < float(radii.mean()) < 0.55


def test_transparent_scene_reports_that_nothing_is_opaque():
    faint = lambda points: 0.1 * torch.ones(points.shape[0])  # noqa: E731 - optical depth 0.2 at most
    with pytest.raises(ValueError, match="no part of the coarse scene is opaque"):
        convert_nerf_to_dmtet(coarse_scene(faint), fine_scene(), resolution=16, texture_steps=0)


def translucent_ball(points: torch.Tensor) -> torch.Tensor:
    """Density 0.6 inside a 0.5-radius ball, none outside: optical depth 0.3 at most (opacity
    26 %), so nothing is opaque; the conversion of old refused it and lost the fine stage."""
    inside = ((points - CENTRE).norm(dim=-1) < 0.5).float()
    return 0.6 * inside


def test_translucent_coarse_scene_converts_with_a_warning(capsys: pytest.CaptureFixture[str]):
    target = fine_scene()
    report = convert_nerf_to_dmtet(coarse_scene(translucent_ball), target, resolution=RESOLUTION, texture_steps=0)
    assert report.translucent_max_depth is not None and report.translucent_max_depth < 0.35
    mesh = target.extract_mesh()
    radii = (mesh.vertices.detach() - CENTRE).norm(dim=-1)
    # Surface at a quarter of the peak depth: 80 % of the radius for a uniform ball, within
    # the voxel (1/16) and tet-cell (~1/6 of the box) discretisation.
    assert 0.3 < float(radii.mean()) < 0.5
    nerf_to_dmtet(coarse_scene(translucent_ball), fine_scene(), resolution=RESOLUTION, texture_steps=0)
    assert "translucent" in capsys.readouterr().out


def test_uniform_haze_is_refused_as_no_object():
    haze = lambda points: 0.5 * torch.ones(points.shape[0])  # noqa: E731 - depth up to ~0.47, no contrast
    with pytest.raises(ValueError, match="haze without an object"):
        convert_nerf_to_dmtet(coarse_scene(haze), fine_scene(), resolution=16, texture_steps=0)


def hollow_shell(points: torch.Tensor) -> torch.Tensor:
    """An opaque shell (density 200, 0.1 thick) around a near-empty interior (1e-20) in a faint
    haze (1e-10), as a coarse NeRF that only paints its surface: the interior is hidden."""
    r = ((points - CENTRE) / 0.5).norm(dim=-1)
    shell = ((r > 0.8) & (r < 1.0)).float()
    return torch.where(r < 0.8, torch.full_like(r, 1e-20), 200.0 * shell + 1e-10)


def test_hollow_coarse_scene_converts_to_its_shell_not_the_whole_box():
    target = fine_scene()
    report = convert_nerf_to_dmtet(coarse_scene(hollow_shell), target, resolution=RESOLUTION, texture_steps=0)
    # Solid = inside the shell's outer surface (radius 0.5): (4/3) pi 0.5^3 / VOXEL^3 ~ 2140
    # voxels; the old "lowest density of the solid set" level (1e-20) took the haze too: the whole box.
    assert 1500 < report.occupied_voxels < 3000
    assert report.threshold == pytest.approx(200.0)  # the density where the solid meets the outside
    radii = (target.extract_mesh().vertices.detach() - CENTRE).norm(dim=-1)
    assert 0.4 < float(radii.mean()) < 0.6
