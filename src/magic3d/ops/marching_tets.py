"""Differentiable marching tetrahedra (the surface extraction of DMTet), in plain torch.

Sign convention: ``sdf < 0`` inside, ``sdf > 0`` outside; a vertex with ``sdf > 0`` counts as
outside and every other vertex as inside, so an exact zero never makes a 0/0 crossing. Triangle
normals point from inside to outside (towards positive SDF), which needs positively oriented
tets (``make_tet_grid`` guarantees it).

The crossing point on an edge (v0, v1) with SDF values (s0, s1) of opposite signs is
``(v0 * (-s1) + v1 * s0) / (s0 - s1)``, differentiable in positions and SDF. Crossing points
are computed once per unique grid edge, so neighbouring tets share vertices and the mesh is
watertight wherever the surface does not reach the grid boundary.

The 16-case triangle table is derived in code (``_build_triangle_table``) from the reference
tet rather than typed in, with each triangle's winding checked against the inside→outside
direction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

# Local edges of a tet as vertex pairs, in a fixed order (local edge ids 0..5).
TET_EDGES = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


@dataclass
class Mesh:
    """A triangle mesh; ``vertex_edge[i]`` is the grid edge (a < b) vertex i was cut from."""

    vertices: Float[Tensor, "M 3"]
    faces: Int[Tensor, "F 3"]
    vertex_edge: Int[Tensor, "M 2"] | None = None

    @property
    def is_empty(self) -> bool:
        return self.faces.shape[0] == 0


def _build_triangle_table() -> tuple[list[list[int]], list[int]]:
    """(table[16][6] of local edge ids padded with -1, number of triangles per case).

    Case index = sum over local vertices i of (sdf_i > 0) << i. Windings are fixed on the
    positively oriented reference tet; an orientation-preserving affine map carries them to
    any positive tet, and the sign of each triangle's normal along inside→outside does not
    depend on where on its edges the crossing points lie.
    """
    ref = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    edge_id = {pair: e for e, pair in enumerate(TET_EDGES)}

    def eid(a: int, b: int) -> int:
        return edge_id[(min(a, b), max(a, b))]

    table, counts = [], []
    for case in range(16):
        outside = [i for i in range(4) if case >> i & 1]
        inside = [i for i in range(4) if not case >> i & 1]
        if len(outside) in (0, 4):
            tris = []
        elif len(outside) in (1, 3):
            lone, rest = (outside[0], inside) if len(outside) == 1 else (inside[0], outside)
            tris = [[eid(lone, r) for r in rest]]
        else:
            (a, b), (c, d) = inside, outside
            # Cyclic order around the quad: consecutive crossing edges share a tet vertex.
            quad = [eid(a, c), eid(a, d), eid(b, d), eid(b, c)]
            tris = [[quad[0], quad[1], quad[2]], [quad[0], quad[2], quad[3]]]
        mids = torch.stack([(ref[p] + ref[q]) / 2 for p, q in TET_EDGES])
        direction = ref[outside].mean(0) - ref[inside].mean(0) if tris else None
        for tri in tris:
            p = mids[tri]
            normal = torch.linalg.cross(p[1] - p[0], p[2] - p[0])
            if float(normal @ direction) < 0:
                tri[1], tri[2] = tri[2], tri[1]
        flat = [e for tri in tris for e in tri]
        table.append(flat + [-1] * (6 - len(flat)))
        counts.append(len(tris))
    return table, counts


_TABLE, _COUNTS = _build_triangle_table()
_TABLE_CACHE: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}


def _tables(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    if device not in _TABLE_CACHE:
        _TABLE_CACHE[device] = (
            torch.tensor(_TABLE, dtype=torch.long, device=device),
            torch.tensor(_COUNTS, dtype=torch.long, device=device),
            torch.tensor(TET_EDGES, dtype=torch.long, device=device),
        )
    return _TABLE_CACHE[device]


def marching_tets(
    vertices: Float[Tensor, "V 3"], sdf: Float[Tensor, "V"], tets: Int[Tensor, "T 4"]
) -> Mesh:
    """Extract the zero level set of ``sdf`` on a tet grid; an empty Mesh if nothing crosses."""
    if sdf.ndim != 1 or sdf.shape[0] != vertices.shape[0]:
        raise ValueError(f"sdf has shape {tuple(sdf.shape)}; expected ({vertices.shape[0]},), "
                         "one value per grid vertex")
    device = vertices.device
    table, counts, tet_edges = _tables(device)
    n_vertices = vertices.shape[0]

    with torch.no_grad():  # topology only: which tets, which edges, which case
        outside = sdf > 0
        occ = outside[tets]  # (T, 4)
        n_out = occ.sum(-1)
        active = (n_out > 0) & (n_out < 4)
        act_tets = tets[active]
        act_occ = occ[active]
        # All 6 edges of every active tet, as sorted vertex pairs -> int64 keys.
        ends = act_tets[:, tet_edges]  # (A, 6, 2)
        lo, hi = ends.min(-1).values, ends.max(-1).values
        crossing = outside[lo] != outside[hi]  # (A, 6)
        keys = lo * n_vertices + hi
        unique_keys, inverse = torch.unique(keys[crossing], return_inverse=True)
        local_to_vertex = torch.full_like(keys, -1)
        local_to_vertex[crossing] = inverse
        edge_a, edge_b = unique_keys // n_vertices, unique_keys % n_vertices

        case = (act_occ.long() << torch.arange(4, device=device)).sum(-1)
        n_tris = counts[case]
        tri_edges = table[case]  # (A, 6) local edge ids, -1 padded
        faces = []
        for k in range(2):  # first triangle of every active tet, then the second of quad cases
            rows = n_tris > k
            local = tri_edges[rows, 3 * k: 3 * k + 3]
            faces.append(torch.gather(local_to_vertex[rows], 1, local))
        faces = torch.cat(faces)

    s0, s1 = sdf[edge_a].unsqueeze(-1), sdf[edge_b].unsqueeze(-1)
    points = (vertices[edge_a] * (-s1) + vertices[edge_b] * s0) / (s0 - s1)
    return Mesh(vertices=points, faces=faces, vertex_edge=torch.stack([edge_a, edge_b], -1))


def mesh_area_volume(
    vertices: Float[Tensor, "M 3"], faces: Int[Tensor, "F 3"]
) -> tuple[Float[Tensor, ""], Float[Tensor, ""]]:
    """Surface area and enclosed signed volume (positive for outward winding; divergence theorem).

    The volume is only meaningful for a closed mesh.
    """
    p0, p1, p2 = vertices[faces].unbind(-2)
    cross = torch.linalg.cross(p1 - p0, p2 - p0)
    area = 0.5 * cross.norm(dim=-1).sum()
    volume = (p0 * torch.linalg.cross(p1, p2)).sum() / 6.0
    return area, volume
