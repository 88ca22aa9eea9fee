"""Marching tetrahedra: case table, watertight sphere, outward winding, gradients, empty case."""

from __future__ import annotations

import math

import pytest
import torch

from magic3d.ops.marching_tets import Mesh, marching_tets, mesh_area_volume
from magic3d.ops.tetgrid import make_tet_grid

RADIUS = 0.3


def _face_normals(mesh: Mesh) -> torch.Tensor:
    p0, p1, p2 = mesh.vertices[mesh.faces].unbind(1)
    return torch.linalg.cross(p1 - p0, p2 - p0)


@pytest.fixture(scope="module", params=["bcc", "kuhn"])
def sphere_mesh(request: pytest.FixtureRequest) -> Mesh:
    grid = make_tet_grid(32, request.param, use_cache=False)
    vertices = grid.vertices.double()
    return marching_tets(vertices, vertices.norm(dim=-1) - RADIUS, grid.tets)


def test_sphere_is_watertight_and_consistently_wound(sphere_mesh: Mesh) -> None:
    faces = sphere_mesh.faces
    assert faces.dtype == torch.int64 and faces.shape[1] == 3 and len(faces) > 1000
    directed = faces[:, [[0, 1], [1, 2], [2, 0]]].reshape(-1, 2)
    undirected, counts = torch.unique(directed.sort(-1).values, dim=0, return_counts=True)
    assert bool((counts == 2).all()), "an edge is not shared by exactly two faces"
    # Consistent winding: each directed edge appears once (its twin runs the other way).
    assert len(torch.unique(directed, dim=0)) == len(directed)
    # Every vertex is used and cut from a distinct grid edge (no duplicated crossing points).
    assert len(torch.unique(faces)) == len(sphere_mesh.vertices)
    assert len(torch.unique(sphere_mesh.vertex_edge, dim=0)) == len(sphere_mesh.vertices)
    # Closed manifold of genus 0: V - E + F = 2.
    assert len(sphere_mesh.vertices) - len(undirected) + len(faces) == 2


def test_sphere_area_volume_and_outward_normals(sphere_mesh: Mesh) -> None:
    area, volume = mesh_area_volume(sphere_mesh.vertices, sphere_mesh.faces)
    # Crossing points lie on the sphere (exact SDF, linear interpolation error O(h^2)) and the
    # flat triangles cut inside it: with h = 1/32 and r = 0.3 the measured deficits are 0.15 %
    # (BCC) / 0.3 % (Kuhn) in area and 0.3 % / 0.6 % in volume; 1.5 % leaves room, yet catches
    # a missing or doubled triangle (each is ~0.01 % of the area) only in bulk — the
    # watertightness test catches single ones.
    assert abs(float(area) / (4 * math.pi * RADIUS**2) - 1) < 0.015
    assert abs(float(volume) / (4 / 3 * math.pi * RADIUS**3) - 1) < 0.015
    centroids = sphere_mesh.vertices[sphere_mesh.faces].mean(1)
    assert bool(((_face_normals(sphere_mesh) * centroids).sum(-1) > 0).all())
    radii = sphere_mesh.vertices.norm(dim=-1)
    # Crossing points of an exact distance field interpolated along edges of length <= h:
    # error ≲ h^2 / (2 r) ≈ 1.6e-3.
    assert float((radii - RADIUS).abs().max()) < 2e-3


def test_every_case_of_the_table_on_random_tets() -> None:
    """All 16 sign cases: triangle count, and normals along the SDF gradient (towards sdf > 0).

    Each trial is one call on 16 disjoint copies of a random positive tet, one per case.
    """
    gen = torch.Generator().manual_seed(0)
    cases = torch.arange(16)
    outside = (cases[:, None] >> torch.arange(4)) & 1  # (16, 4)
    signs = outside.double() * 2 - 1
    expected_faces = torch.tensor([0, 1, 2, 1, 0])[outside.sum(-1)]
    for trial in range(20):
        corners = torch.rand(4, 3, generator=gen, dtype=torch.float64)
        e = corners[1:] - corners[0]
        if abs(float(torch.linalg.det(e))) < 1e-3:
            continue  # a near-flat tet makes the gradient below ill-conditioned
        order = [0, 1, 2, 3] if torch.linalg.det(e) > 0 else [0, 1, 3, 2]
        vertices = corners.repeat(16, 1)  # tet c owns vertices 4c .. 4c+3
        tets = (torch.arange(16)[:, None] * 4 + torch.tensor(order)).long()
        sdf = (signs * (0.1 + torch.rand(16, 4, generator=gen, dtype=torch.float64))).reshape(-1)
        mesh = marching_tets(vertices, sdf, tets)
        face_tet = mesh.vertex_edge[mesh.faces[:, 0], 0] // 4
        assert torch.equal(torch.bincount(face_tet, minlength=16), expected_faces), trial
        # The SDF is linear in each tet: its gradient g solves e g = sdf[1:] - sdf[0].
        per_tet = sdf.reshape(16, 4)
        grad = torch.linalg.solve(e, (per_tet[:, 1:] - per_tet[:, :1]).T).T  # (16, 3)
        assert bool(((_face_normals(mesh) * grad[face_tet]).sum(-1) > 0).all()), trial
        # Crossing points are zeros of the linear SDF of their tet.
        vertex_tet = mesh.vertex_edge[:, 0] // 4
        values = per_tet[vertex_tet, 0] + ((mesh.vertices - corners[0]) * grad[vertex_tet]).sum(-1)
        assert float(values.abs().max()) < 1e-12


def test_gradcheck_positions_and_sdf() -> None:
    grid = make_tet_grid(2, "bcc", use_cache=False)
    gen = torch.Generator().manual_seed(1)
    base = grid.vertices.double()
    noise = 0.05 * torch.randn(len(base), generator=gen, dtype=torch.float64)
    sdf0 = base.norm(dim=-1) - 0.35 + noise
    # Keep every value away from 0 so gradcheck's finite differences never flip a sign.
    sdf0 = torch.where(sdf0 >= 0, sdf0.clamp_min(0.05), sdf0.clamp_max(-0.05))
    assert len(marching_tets(base, sdf0, grid.tets).faces) > 0
    vertices = base.clone().requires_grad_(True)
    sdf = sdf0.clone().requires_grad_(True)
    def crossing_points(v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return marching_tets(v, s, grid.tets).vertices

    assert torch.autograd.gradcheck(crossing_points, (vertices, sdf))


def test_no_crossing_gives_an_empty_mesh() -> None:
    grid = make_tet_grid(2, "kuhn", use_cache=False)
    for sign in (1.0, -1.0):
        sdf = torch.full((len(grid.vertices),), sign, requires_grad=True)
        mesh = marching_tets(grid.vertices, sdf, grid.tets)
        assert mesh.is_empty
        assert mesh.vertices.shape == (0, 3) and mesh.faces.shape == (0, 3)
        assert mesh.faces.dtype == torch.int64
        area, volume = mesh_area_volume(mesh.vertices, mesh.faces)
        assert float(area.detach()) == 0.0 and float(volume.detach()) == 0.0


def test_wrong_sdf_shape_raises() -> None:
    grid = make_tet_grid(1, use_cache=False)
    with pytest.raises(ValueError, match="sdf"):
        marching_tets(grid.vertices, torch.zeros(len(grid.vertices) + 1), grid.tets)
