"""Tet grids generated in code: conforming, positively oriented, exact cover of the box, cached."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from magic3d.ops.tetgrid import make_tet_grid, tet_grid_counts, tet_volumes, tetgrid_cache_dir

KINDS = ("bcc", "kuhn")


def _faces_with_counts(tets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    faces = tets[:, [[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]]].reshape(-1, 3)
    return torch.unique(faces.sort(-1).values, dim=0, return_counts=True)


def _on_box_plane(corners: torch.Tensor) -> torch.Tensor:
    """(F, 3, 3) triangle corners -> (F,) True where all three lie on one face plane of the box."""
    same = (corners == corners[:, :1]).all(1) & (corners[:, 0].abs() == 0.5)
    return same.any(-1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("resolution", [1, 3, 4])
def test_grid_is_conforming_and_covers_the_box(kind: str, resolution: int) -> None:
    grid = make_tet_grid(resolution, kind, use_cache=False)
    vertices = grid.vertices.double()
    faces, counts = _faces_with_counts(grid.tets)
    # A face is shared by at most two tets; interior faces by exactly two, the others on the box.
    assert int(counts.max()) <= 2
    boundary = vertices[faces[counts == 1]]  # (Fb, 3 corners, 3 coords)
    assert bool(_on_box_plane(boundary).all()), "a face used by one tet is not on the box boundary"
    assert not bool(_on_box_plane(vertices[faces[counts == 2]]).any()), "box face used twice"
    # Boundary triangles tile the 6 box faces exactly (area 6); float64 sums of O(1e2) terms.
    p0, p1, p2 = boundary.unbind(1)
    boundary_area = 0.5 * torch.linalg.cross(p1 - p0, p2 - p0).norm(dim=-1).sum()
    assert abs(float(boundary_area) - 6.0) < 1e-9
    # Positive volumes summing to the box volume (with the face checks: an exact tessellation).
    # float64 round-off on ~10^3 terms of size ~1e-3 (n = 3 is not a binary fraction).
    volumes = tet_volumes(vertices, grid.tets)
    assert float(volumes.min()) > 0
    assert abs(float(volumes.sum()) - 1.0) < 1e-9


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("resolution", [1, 2, 5])
def test_edges_are_the_unique_tet_edges(kind: str, resolution: int) -> None:
    grid = make_tet_grid(resolution, kind, use_cache=False)
    pairs = grid.tets[:, [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]].reshape(-1, 2)
    expected = torch.unique(pairs.sort(-1).values, dim=0)  # unique(dim=0) sorts rows
    assert grid.edges.dtype == torch.int64 and grid.tets.dtype == torch.int64
    assert torch.equal(grid.edges, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_counts_and_range_at_resolution_32(kind: str) -> None:
    grid = make_tet_grid(32, kind, use_cache=False)
    n = 32
    v, t, e = tet_grid_counts(n, kind)
    if kind == "bcc":
        assert (v, t) == ((n + 1) ** 3 + n**3, 12 * n**3) == (68_705, 393_216)
    else:
        assert (v, t) == ((n + 1) ** 3, 6 * n**3) == (35_937, 196_608)
    assert grid.vertices.shape == (v, 3) and grid.vertices.dtype == torch.float32
    assert grid.tets.shape == (t, 4) and grid.edges.shape == (e, 2)
    assert float(grid.vertices.min()) == -0.5 and float(grid.vertices.max()) == 0.5
    # float32 positions: volumes of size 1/(6*32^3*2) are still computed to ~1e-7 relative.
    assert float(tet_volumes(grid.vertices, grid.tets).min()) > 0


def test_bbox_maps_the_unit_grid() -> None:
    grid = make_tet_grid(2, bbox=((-1.0, -2.0, 0.0), (1.0, 2.0, 3.0)), use_cache=False)
    assert grid.vertices.min(0).values.tolist() == [-1.0, -2.0, 0.0]
    assert grid.vertices.max(0).values.tolist() == [1.0, 2.0, 3.0]
    volumes = tet_volumes(grid.vertices.double(), grid.tets)
    assert float(volumes.min()) > 0
    assert abs(float(volumes.sum()) - 2 * 4 * 3) < 1e-9  # exact binary fractions


def test_disk_cache_round_trip_and_rebuild_of_a_corrupt_file() -> None:
    # conftest points MAGIC3D_CACHE at a per-test tmp folder.
    assert str(tetgrid_cache_dir()).startswith(os.environ["MAGIC3D_CACHE"])
    first = make_tet_grid(3, "bcc")
    path = tetgrid_cache_dir() / "bcc_3.npz"
    assert path.exists()
    assert sorted(p.name for p in path.parent.iterdir()) == ["bcc_3.npz"]  # no temp leftovers
    again = make_tet_grid(3, "bcc")
    assert torch.equal(first.tets, again.tets) and torch.equal(first.vertices, again.vertices)
    assert torch.equal(first.edges, again.edges)
    path.write_bytes(b"not an npz")
    rebuilt = make_tet_grid(3, "bcc")
    assert torch.equal(rebuilt.tets, first.tets)
    with np.load(path) as data:  # rewritten as a valid file
        assert data["tets"].shape == (12 * 27, 4)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="kind"):
        make_tet_grid(4, "a15")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="resolution"):
        make_tet_grid(0)
    with pytest.raises(ValueError, match="resolution"):
        make_tet_grid(1000)
    with pytest.raises(ValueError, match="bbox"):
        make_tet_grid(2, bbox=((0.0, 0.0, 0.0), (1.0, -1.0, 1.0)), use_cache=False)
