"""Tetrahedral grids of the box [-0.5, 0.5]^3, generated in code (no external tet mesher).

Two tessellations of an ``n``-cells-per-axis cube lattice:

``bcc`` (default): body-centred cubic. Vertices are the ``(n+1)^3`` cube corners plus the
``n^3`` cube centres. Every interior face between two cubes gives 4 tets (the two centres plus
one edge of the shared face): an octahedron around the face. Every boundary face gives the
pyramid (centre + square face), split into 2 tets along the face diagonal from its lowest
corner, so the box is covered exactly and the boundary triangles lie on the box. Interior tets
are the classic near-isotropic BCC tets (edges h, h, and h*sqrt(3)/2). Counts:
``V = (n+1)^3 + n^3`` and ``T = 12 n^3``.

``kuhn``: 6 tets per cube along the main diagonal (Freudenthal/Kuhn split); trivially
conforming, but the tets are less regular. ``V = (n+1)^3`` and ``T = 6 n^3``.

Note that ``resolution`` counts cubes per axis; it is not the "resolution" in the names of
Quartet's A15 grids used by DMTet (Quartet "64" has 36 562 vertices, about BCC n = 26).

Every tet is positively oriented (det[v1-v0, v2-v0, v3-v0] > 0): orientation is decided on
exact integer coordinates, so it never depends on float rounding. Edges are enumerated from the
lattice structure rather than deduplicated from the 6T tet edges, which would not fit in memory
at n = 256. Grids are cached as ``.npz`` under ``$MAGIC3D_CACHE/tetgrids`` (else
``~/.cache/magic3d/tetgrids``), written atomically.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

GridKind = Literal["bcc", "kuhn"]
MAX_RESOLUTION = 256
_CACHE_FORMAT = 1  # bump when the construction changes so stale cache files are rebuilt


@dataclass
class TetGrid:
    """A tetrahedral grid: vertex positions, positively oriented tets and their unique edges."""

    vertices: Float[Tensor, "V 3"]
    tets: Int[Tensor, "T 4"]
    edges: Int[Tensor, "E 2"]  # each row sorted (a < b), rows sorted lexicographically
    resolution: int
    kind: str = "bcc"

    def to(self, device: torch.device | str) -> TetGrid:
        return TetGrid(self.vertices.to(device), self.tets.to(device), self.edges.to(device),
                       self.resolution, self.kind)


def make_tet_grid(
    resolution: int,
    kind: GridKind = "bcc",
    bbox: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None,
    use_cache: bool = True,
) -> TetGrid:
    """Tet grid with ``resolution`` cubes per axis covering [-0.5, 0.5]^3, or ``bbox`` = (lo, hi).

    The unit grid is cached on disk; ``bbox`` is applied after loading (an axis-wise affine map
    with positive scales, so orientation is kept).
    """
    if kind not in ("bcc", "kuhn"):
        raise ValueError(f"kind={kind!r} is not a tet grid kind; use 'bcc' or 'kuhn'")
    if not isinstance(resolution, int) or not 1 <= resolution <= MAX_RESOLUTION:
        raise ValueError(f"resolution={resolution!r} must be an int in [1, {MAX_RESOLUTION}] "
                         "(cubes per axis; 32..128 is typical)")
    arrays = _load_cached(kind, resolution) if use_cache else None
    if arrays is None:
        arrays = _build(kind, resolution)
        if use_cache:
            _save_cached(kind, resolution, arrays)
    vertices = torch.from_numpy(arrays["vertices"])
    if bbox is not None:
        lo = torch.tensor(bbox[0], dtype=torch.float64)
        hi = torch.tensor(bbox[1], dtype=torch.float64)
        if lo.shape != (3,) or hi.shape != (3,) or not bool((hi > lo).all()):
            raise ValueError(f"bbox={bbox!r} must be ((x0, y0, z0), (x1, y1, z1)) "
                             "with x1 > x0, y1 > y0, z1 > z0")
        vertices = ((vertices.double() + 0.5) * (hi - lo) + lo).float()
    return TetGrid(vertices=vertices, tets=torch.from_numpy(arrays["tets"]),
                   edges=torch.from_numpy(arrays["edges"]), resolution=resolution, kind=kind)


def tet_grid_counts(resolution: int, kind: GridKind = "bcc") -> tuple[int, int, int]:
    """(vertices, tets, edges) that ``make_tet_grid`` produces, without building it."""
    n = resolution
    if kind == "bcc":
        return ((n + 1) ** 3 + n**3, 12 * n**3,
                3 * n * (n + 1) ** 2 + 3 * (n - 1) * n**2 + 8 * n**3 + 6 * n**2)
    if kind == "kuhn":
        # 3 axis edges, 3 face diagonals and 1 body diagonal per lattice offset
        return ((n + 1) ** 3, 6 * n**3, 3 * n * (n + 1) ** 2 + 3 * n * n * (n + 1) + n**3)
    raise ValueError(f"kind={kind!r} is not a tet grid kind; use 'bcc' or 'kuhn'")


def tet_volumes(vertices: Float[Tensor, "V 3"], tets: Int[Tensor, "T 4"]) -> Float[Tensor, "T"]:
    """Signed volumes (positive for positively oriented tets)."""
    v = vertices[tets]
    return torch.linalg.det(v[:, 1:] - v[:, :1]) / 6.0


# ---------------------------------------------------------------------------- construction


def _build(kind: str, n: int) -> dict[str, np.ndarray]:
    coords2, tet_groups, edges = _bcc(n) if kind == "bcc" else _kuhn(n)
    tets = np.concatenate([_orient_positive(coords2, group) for group in tet_groups])
    vertices = (coords2.astype(np.float64) / (2 * n) - 0.5).astype(np.float32)
    return {"vertices": vertices, "tets": tets, "edges": _sort_edges(edges, len(coords2))}


def _corner_grid(n: int) -> np.ndarray:
    """Integer corner coordinates (i, j, k) in [0, n], C order; index = (i*(n+1)+j)*(n+1)+k."""
    r = np.arange(n + 1, dtype=np.int64)
    return np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)


def _bcc(n: int) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    m = n + 1
    n_corners = m**3

    def corner(i, j, k):
        return (i * m + j) * m + k

    def centre(i, j, k):
        return n_corners + (i * n + j) * n + k

    def ijk(a: int, ua, ub, uc):
        """Coordinates given along axes (a, a+1, a+2) back in (x, y, z) order."""
        out = [None, None, None]
        out[a], out[(a + 1) % 3], out[(a + 2) % 3] = ua, ub, uc
        return out

    r = np.arange(n, dtype=np.int64)
    tets, edges = [], []
    # Coordinates doubled so cube centres are integers too: corners 2i, centres 2i+1.
    centres = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    coords2 = np.concatenate([2 * _corner_grid(n), 2 * centres + 1])
    for a in range(3):
        # Interior faces at plane a = ua + 1 between cube ua and cube ua + 1: 4 tets each.
        ua, ub, uc = (g.ravel() for g in np.meshgrid(np.arange(n - 1), r, r, indexing="ij"))
        c0, c1 = centre(*ijk(a, ua, ub, uc)), centre(*ijk(a, ua + 1, ub, uc))
        quad = [corner(*ijk(a, ua + 1, ub + db, uc + dc))
                for db, dc in ((0, 0), (1, 0), (1, 1), (0, 1))]
        for q in range(4):
            tets.append(np.stack([c0, c1, quad[q], quad[(q + 1) % 4]], -1))
        edges.append(np.stack([c0, c1], -1))
        # Boundary faces: pyramid (centre + face) split along the diagonal 00-11.
        ub, uc = (g.ravel() for g in np.meshgrid(r, r, indexing="ij"))
        for cube_a, face_a in ((0, 0), (n - 1, n)):
            ca = np.full_like(ub, cube_a)
            fa = np.full_like(ub, face_a)
            c = centre(*ijk(a, ca, ub, uc))
            p00, p10, p11, p01 = (corner(*ijk(a, fa, ub + db, uc + dc))
                                  for db, dc in ((0, 0), (1, 0), (1, 1), (0, 1)))
            tets += [np.stack([c, p00, p10, p11], -1), np.stack([c, p00, p11, p01], -1)]
            edges.append(np.stack([p00, p11], -1))
        # Cube edges along axis a.
        ua, ub, uc = (g.ravel() for g in np.meshgrid(r, np.arange(m), np.arange(m), indexing="ij"))
        edges.append(np.stack([corner(*ijk(a, ua, ub, uc)), corner(*ijk(a, ua + 1, ub, uc))], -1))
    # Centre to its 8 cube corners.
    i, j, k = (g.ravel() for g in np.meshgrid(r, r, r, indexing="ij"))
    c = centre(i, j, k)
    for di in (0, 1):
        for dj in (0, 1):
            for dk in (0, 1):
                edges.append(np.stack([corner(i + di, j + dj, k + dk), c], -1))
    return coords2, tets, np.concatenate(edges)


def _kuhn(n: int) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    m = n + 1
    r = np.arange(n, dtype=np.int64)
    i, j, k = (g.ravel() for g in np.meshgrid(r, r, r, indexing="ij"))
    stride = np.array([m * m, m, 1], dtype=np.int64)
    base = i * stride[0] + j * stride[1] + k * stride[2]
    tets = []
    # Path from the min corner to the max corner, one axis step at a time, in every order.
    for perm in permutations(range(3)):
        s1 = stride[perm[0]]
        s2 = s1 + stride[perm[1]]
        tets.append(np.stack([base, base + s1, base + s2, base + stride.sum()], -1))
    corners = _corner_grid(n)
    edges = []
    for offset in ((1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)):
        off = np.array(offset, dtype=np.int64)
        start = corners[(corners + off <= n).all(-1)]
        a = start @ stride
        edges.append(np.stack([a, a + off @ stride], -1))
    return 2 * corners, tets, np.concatenate(edges)


def _orient_positive(coords2: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Orient a group of tets that are all translates of one another by its first tet.

    Translation keeps orientation, so one exact integer determinant decides the whole group
    (a per-tet determinant costs ~30 s at n = 128). Tests check every volume is positive.
    """
    if len(group) == 0:  # no interior faces when n = 1
        return group
    p = coords2[group[0]]
    det = int(np.linalg.det((p[1:] - p[0]).astype(np.float64)).round())  # exact: small ints
    if det == 0:
        raise AssertionError("degenerate tet in grid construction")  # a construction bug
    return group if det > 0 else group[:, [0, 1, 3, 2]]


def _sort_edges(edges: np.ndarray, n_vertices: int) -> np.ndarray:
    # Every construction above lists an edge as (lower index, higher index) already.
    key = np.sort(edges[:, 0] * n_vertices + edges[:, 1])
    return np.stack([key // n_vertices, key % n_vertices], -1)


# ---------------------------------------------------------------------------- disk cache


def tetgrid_cache_dir() -> Path:
    root = os.environ.get("MAGIC3D_CACHE")
    base = Path(root).expanduser() if root else Path("~/.cache/magic3d").expanduser()
    return base / "tetgrids"


def _cache_path(kind: str, n: int) -> Path:
    return tetgrid_cache_dir() / f"{kind}_{n}.npz"


def _load_cached(kind: str, n: int) -> dict[str, np.ndarray] | None:
    path = _cache_path(kind, n)
    if not path.exists():
        return None
    try:
        with np.load(path) as data:
            if int(data["format"]) != _CACHE_FORMAT:
                return None
            arrays = {key: data[key] for key in ("vertices", "tets", "edges")}
    except (OSError, KeyError, ValueError):  # truncated or foreign file: rebuild it
        return None
    expected = tet_grid_counts(n, kind)  # type: ignore[arg-type]
    if tuple(len(arrays[k]) for k in ("vertices", "tets", "edges")) != expected:
        return None
    return arrays


def _save_cached(kind: str, n: int, arrays: dict[str, np.ndarray]) -> None:
    path = _cache_path(kind, n)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, format=np.int64(_CACHE_FORMAT), **arrays)
            os.replace(tmp, path)  # atomic: readers never see a half-written file
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass  # an unwritable cache only costs a rebuild next time
