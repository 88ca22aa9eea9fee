"""DMTet scene: silhouette area, silhouette gradients, regularisers, box state, errors.

The shared contract (shapes, gradients to every parameter, state_dict round trip) runs via
SCENE_FACTORIES in test_scene_contract.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from magic3d.data.cameras import look_at_c2w
from magic3d.ops.marching_tets import Mesh
from magic3d.scenes.background import SolidBackground
from magic3d.scenes.dmtet import DMTetScene, laplacian_smoothness, normal_consistency
from magic3d.types import CameraBatch, Shading

SMALL_TEXTURE = dict(n_levels=4, log2_hashmap_size=12, base_resolution=4, per_level_scale=2.0, hidden_dim=16)
ALBEDO = Shading(mode="albedo", ambient=torch.tensor([1.0]))


def front_camera(size: int, distance: float = 2.5, fovy_deg: float = 40.0) -> CameraBatch:
    eye = torch.tensor([[distance, 0.0, 0.0]])
    return CameraBatch(
        c2w=look_at_c2w(eye),
        fovy=torch.full((1,), math.radians(fovy_deg)),
        elevation=torch.zeros(1),
        azimuth=torch.zeros(1),
        distance=torch.full((1,), distance),
        light_position=eye.clone(),
        height=size,
        width=size,
    )


def sphere_scene(resolution: int = 24, radius: float = 0.45) -> DMTetScene:
    return DMTetScene(tet_resolution=resolution, sphere_radius=radius, background=SolidBackground(),
                      raster_backend="torch", **SMALL_TEXTURE)


def test_sphere_renders_a_disk_of_the_analytic_area():
    scene = sphere_scene().eval()
    size, distance, fovy = 64, 2.5, math.radians(40.0)
    with torch.no_grad():
        out = scene.render(front_camera(size, distance, 40.0), ALBEDO)
    focal = 0.5 * size / math.tan(0.5 * fovy)
    disk_radius = focal * math.tan(math.asin(0.45 / distance))  # silhouette cone of a sphere
    expected = math.pi * disk_radius**2  # ~810 px
    # The mesh is inscribed in the sphere (chords of ~0.08 at this grid: <1% area) and the
    # antialiased silhouette is exact to a fraction of a pixel along a ~100 px perimeter.
    assert float(out.opacity.sum()) == pytest.approx(expected, rel=0.03)
    # The disk is centred: the camera looks at the sphere's centre.
    rows, cols = torch.nonzero(out.opacity[0, ..., 0] > 0.5, as_tuple=True)
    assert float(rows.float().mean()) == pytest.approx(size / 2 - 0.5, abs=0.5)
    assert float(cols.float().mean()) == pytest.approx(size / 2 - 0.5, abs=0.5)
    # Depth at the centre pixel is the distance to the sphere's front (mesh chord: < 1%).
    assert float(out.depth[0, size // 2, size // 2, 0]) == pytest.approx(distance - 0.45, rel=0.01)
    # Normals are unit on the object and face the camera at the centre.
    centre_normal = out.normal[0, size // 2, size // 2]
    assert float(centre_normal[0]) > 0.95


def test_silhouette_gradient_reaches_surface_vertices_only():
    # A coarse grid seen large: antialiasing (nvdiffrast's algorithm) only blends where the
    # face covering a boundary pixel owns the silhouette edge, which needs triangles bigger
    # than pixels at the limb; sub-pixel triangles leave most boundary pairs without gradient.
    scene = sphere_scene(resolution=6)
    out = scene.render(front_camera(64), ALBEDO)
    out.opacity.sum().backward()
    grad = scene.sdf.grad
    nonzero = grad != 0
    assert nonzero.any(), "antialiasing must give the silhouette a gradient w.r.t. the SDF"
    surface_vertices = torch.zeros_like(nonzero)
    surface_vertices[scene.extract_mesh().vertex_edge.reshape(-1)] = True
    assert not (nonzero & ~surface_vertices).any()
    # Raising the SDF shrinks the object, so the covered area can only fall.
    assert float(grad.sum()) < 0
    assert scene.deformation.grad.abs().sum() > 0


def _grid_mesh(n: int, noise: float) -> Mesh:
    g = torch.Generator().manual_seed(0)
    xs = torch.linspace(0, 1, n)
    x, y = torch.meshgrid(xs, xs, indexing="ij")
    z = noise * torch.randn(n, n, generator=g)
    vertices = torch.stack([x, y, z], -1).reshape(-1, 3)
    idx = torch.arange(n * n).view(n, n)
    a, b, c, d = idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]
    faces = torch.cat([torch.stack([a, b, c], -1).reshape(-1, 3), torch.stack([a, c, d], -1).reshape(-1, 3)])
    return Mesh(vertices=vertices, faces=faces)


def test_normal_consistency_zero_when_flat_high_when_noisy():
    flat, noisy = _grid_mesh(6, 0.0), _grid_mesh(6, 0.2)
    assert float(normal_consistency(flat)) == pytest.approx(0.0, abs=1e-6)  # float32 dot of unit normals
    assert float(normal_consistency(noisy)) > 0.1
    assert float(laplacian_smoothness(noisy)) > float(laplacian_smoothness(flat))
    # The marching-tets sphere is smooth: small, and the scene exposes the same terms.
    scene = sphere_scene(resolution=12).requires_grad_(False)
    mesh = scene.extract_mesh()
    assert float(scene.normal_consistency(mesh)) < 0.05  # measured 0.008
    out = scene.render(front_camera(16), ALBEDO)
    assert float(out.regularisers["normal_consistency"]) == float(normal_consistency(mesh))
    assert float(out.regularisers["laplacian"]) == float(laplacian_smoothness(mesh))


def test_normal_consistency_has_gradients():
    mesh = _grid_mesh(4, 0.2)
    mesh.vertices.requires_grad_(True)
    (normal_consistency(mesh) + laplacian_smoothness(mesh)).backward()
    assert mesh.vertices.grad.abs().sum() > 0


def test_bbox_is_state_and_moves_the_grid():
    scene = sphere_scene(resolution=8)
    scene.set_bbox(torch.tensor([-0.5, -0.4, -0.3]), torch.tensor([0.5, 0.6, 0.7]))
    vertices = scene.grid_vertices()
    assert torch.allclose(vertices.min(0).values, torch.tensor([-0.5, -0.4, -0.3]))
    assert torch.allclose(vertices.max(0).values, torch.tensor([0.5, 0.6, 0.7]))
    twin = sphere_scene(resolution=8)
    twin.load_state_dict(scene.state_dict())
    assert torch.equal(twin.grid_vertices(), vertices)
    with pytest.raises(ValueError, match="hi > lo"):
        scene.set_bbox(torch.zeros(3), torch.zeros(3))


def test_deformation_is_bounded_by_the_grid_spacing():
    scene = sphere_scene(resolution=8)
    with torch.no_grad():
        scene.deformation.fill_(100.0)
    offset = scene.deformed_vertices() - scene.grid_vertices()
    assert float(offset.abs().max()) <= 0.5 * 2.0 / 8 + 1e-6  # deformation_scale * spacing


def test_empty_surface_error_names_the_sdf_range():
    scene = sphere_scene(resolution=8)
    with torch.no_grad():
        scene.sdf.fill_(0.25)
    with pytest.raises(ValueError, match=r"range \[0.25, 0.25\].*nerf_to_dmtet"):
        scene.render(front_camera(16), ALBEDO)


def test_param_groups_are_geometry_texture_background():
    from magic3d.scenes.background import EnvironmentMapBackground

    scene = DMTetScene(tet_resolution=4, background=EnvironmentMapBackground(), **SMALL_TEXTURE)
    groups = scene.param_groups()
    assert set(groups) == {"geometry", "texture", "background"}
    assert groups["geometry"][0] is scene.sdf and groups["geometry"][1] is scene.deformation
