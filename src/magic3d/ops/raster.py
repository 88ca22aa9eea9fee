"""Differentiable triangle rasteriser with nvdiffrast semantics, in pure torch (CPU and GPU).

Three ops, as in nvdiffrast (``rasterize``, ``interpolate``, ``antialias``), plus a small
``Rasterizer`` that can route them to nvdiffrast when it is installed and asked for. The
z-buffer fill, the slow part on a GPU, has a Triton fast path (``magic3d.ops.raster_triton``)
that gives bit-identical face ids and depths; the torch code here is its readable twin.

Conventions (and how they differ from nvdiffrast):

- Clip-space positions ``(B, V, 4)`` (or ``(V, 4)``, treated as ``B = 1``), e.g.
  ``magic3d.data.cameras.mvp(cameras) @ [xyz, 1]``. Pixel centres sample the image; NDC
  x = -1 is the left edge and NDC y = +1 the TOP edge: row 0 is the top of the image, so
  images line up with ``magic3d.data.rays.camera_rays``. nvdiffrast's row 0 is NDC y = -1
  (bottom-up images); ``Rasterized.to_nvdiffrast()`` converts.
- ``face_id`` is the triangle index with -1 for empty pixels (nvdiffrast stores id + 1 with
  0 = empty, as a float).
- Barycentrics are perspective-correct: ``uv[..., 0]`` weights vertex 0, ``uv[..., 1]``
  vertex 1, ``1 - u - v`` vertex 2. ``depth`` is z/w in NDC and carries no gradient; gradients
  reach positions only through ``uv`` (and through ``antialias``), as in nvdiffrast.
- Both faces of a triangle are rasterised (no back-face culling). Triangles are clipped to
  the view frustum implicitly: coverage is tested in homogeneous 2-D coordinates (Olano and
  Greer), which is exact for vertices behind the camera, and fragments with NDC z outside
  [-1, 1] are dropped.

How it works (no Python loop over faces or pixels):

1. Per (batch, face): homogeneous edge functions and a screen bounding box; faces fully
   outside one frustum plane or with zero area are culled.
2. Candidate (face, pixel) pairs inside the boxes are enumerated in memory-bounded chunks
   (``repeat_interleave`` over box sizes), tested against the edge functions, and written
   into a per-pixel z-buffer by ``scatter_reduce(amin)`` of int64 keys
   ``(depth bits << 32) | face id``: the nearest fragment wins, ties go to the lower face id.
   The Triton backend runs this step as one kernel (same arithmetic, ``atomic_min`` of the
   same keys) without materialising the pairs; steps 1 and 3 are shared.
3. For each covered pixel, barycentrics are recomputed differentiably from the winning
   face's clip positions.

Fill rule: a pixel centre exactly on an edge counts as inside both triangles (inclusive test;
the z-buffer then picks one). Edge functions of a shared edge are computed with bit-identical
arithmetic from both sides, so meshes are watertight. nvdiffrast uses a top-left rule, so
pixels whose centre lies exactly on an edge may differ.
"""

from __future__ import annotations

import importlib
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from magic3d.ops import raster_triton  # imports no triton until a kernel is built

Backend = Literal["auto", "torch", "triton", "nvdiffrast"]
_BACKENDS = ("auto", "torch", "triton", "nvdiffrast")
# Backends of the z-buffer fill alone (what ``rasterize`` takes).
ZBufferBackend = Literal["auto", "torch", "triton"]
_ZBUFFER_BACKENDS = ("auto", "torch", "triton")
# The Triton kernel repeats the twin's arithmetic in the input dtype; half precision is left to
# the twin (Triton's half arithmetic is not promised to round like torch's).
_TRITON_DTYPES = (torch.float32, torch.float64)
_EMPTY_KEY = torch.iinfo(torch.int64).max
_FACE_MASK = 0xFFFFFFFF
# nvdiffrast's antialias accepts an edge crossing up to 1/16 pixel outside the segment
# between the two pixel centres (rounding slack), then clamps it onto the segment.
_AA_EPS = 0.0625
_NVDIFFRAST_HINT = (
    "nvdiffrast is not installed: install it (pip install git+https://github.com/NVlabs/"
    "nvdiffrast, needs a CUDA toolkit; non-commercial licence) or use backend='torch'"
)


@dataclass
class Rasterized:
    """Per-pixel output of ``rasterize`` (row 0 = top of the image)."""

    uv: Float[Tensor, "B H W 2"]  # perspective-correct barycentrics of vertices 0 and 1
    depth: Float[Tensor, "B H W"]  # NDC z/w of the visible surface, 0 where empty; no gradient
    face_id: Int[Tensor, "B H W"]  # int64 triangle index, -1 where empty
    # nvdiffrast's raw (bottom-up) output when the nvdiffrast backend produced this; its
    # antialias needs exactly that tensor.
    native: Tensor | None = None

    @property
    def mask(self) -> Float[Tensor, "B H W 1"]:
        """1 where a triangle covers the pixel centre (hard mask: antialias it for gradients)."""
        return (self.face_id >= 0).to(self.uv.dtype)[..., None]

    def to_nvdiffrast(self) -> Float[Tensor, "B H W 4"]:
        """nvdiffrast's layout: (u, v, z/w, id + 1), rows bottom-up."""
        packed = torch.cat(
            [self.uv, self.depth[..., None], (self.face_id + 1).to(self.uv.dtype)[..., None]],
            dim=-1,
        )
        return packed.flip(1)


# ----------------------------------------------------------------------------- helpers


def _batched_positions(clip_pos: Tensor) -> Tensor:
    if clip_pos.ndim == 2:
        clip_pos = clip_pos[None]
    if clip_pos.ndim != 3 or clip_pos.shape[-1] != 4:
        raise ValueError(
            f"clip_pos must have shape (B, V, 4) or (V, 4) (homogeneous clip space), "
            f"got {tuple(clip_pos.shape)}"
        )
    if not clip_pos.is_floating_point():
        raise ValueError(f"clip_pos must be floating point, got {clip_pos.dtype}")
    return clip_pos


def _check_faces(faces: Tensor, n_vertices: int) -> Tensor:
    if faces.ndim != 2 or faces.shape[-1] != 3:
        raise ValueError(f"faces must have shape (F, 3), got {tuple(faces.shape)}")
    if faces.is_floating_point():
        raise ValueError(f"faces must be an integer tensor, got {faces.dtype}")
    faces = faces.long()
    if faces.numel() and bool(((faces < 0) | (faces >= n_vertices)).any()):  # one host sync
        raise ValueError(
            f"faces index vertices outside [0, {n_vertices}): got range "
            f"[{int(faces.min())}, {int(faces.max())}]"
        )
    return faces


def _check_resolution(resolution: tuple[int, int]) -> tuple[int, int]:
    h, w = (int(r) for r in resolution)
    if h < 1 or w < 1:
        raise ValueError(f"resolution={resolution!r} must be (H, W) with H, W >= 1")
    return h, w


def _pixel_ndc(h: int, w: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """NDC coordinates of pixel centres: columns left to right, rows top (+1) to bottom."""
    xs = (torch.arange(w, device=device, dtype=torch.float64) + 0.5) * (2.0 / w) - 1.0
    ys = 1.0 - (torch.arange(h, device=device, dtype=torch.float64) + 0.5) * (2.0 / h)
    return xs.to(dtype), ys.to(dtype)


def _to_screen(clip: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
    """Pixel-space (x right, y down) position of clip-space points; pixel centres at +0.5."""
    inv_w = 1.0 / clip[..., 3]
    sx = (clip[..., 0] * inv_w + 1.0) * (0.5 * w)
    sy = (1.0 - clip[..., 1] * inv_w) * (0.5 * h)
    return sx, sy


def _edge_coefficients(p: Tensor) -> Tensor:
    """Rows c_i = p_j x p_k of the homogeneous 2-D vertices p = (x, y, w), shape (..., 3, 3).

    For a pixel q = (x_ndc, y_ndc, 1), ``c_i . q`` is proportional to the perspective-correct
    barycentric of vertex i (the common factor is 1 / det[p0 p1 p2]).
    """
    p0, p1, p2 = p.unbind(-2)
    return torch.stack(
        [torch.linalg.cross(p1, p2), torch.linalg.cross(p2, p0), torch.linalg.cross(p0, p1)],
        dim=-2,
    )


def _depth_key(depth: Tensor) -> Tensor:
    """Monotone non-negative int64 (< 2^31) from float32 NDC depth in [-1, 1]."""
    bits = depth.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    magnitude = bits & 0x7FFFFFFF  # |depth| <= 1 so magnitude < 2^30
    return torch.where(bits >= 0, (1 << 30) + magnitude, (1 << 30) - magnitude)


def _default_chunk_pairs(device: torch.device) -> int:
    # About 100 bytes of temporaries per candidate pair: 400 MB per chunk on a GPU, 25 MB on CPU.
    return 1 << 22 if device.type == "cuda" else 1 << 18


# ----------------------------------------------------------------------------- rasterize


def rasterize(
    clip_pos: Float[Tensor, "B V 4"] | Float[Tensor, "V 4"],
    faces: Int[Tensor, "F 3"],
    resolution: tuple[int, int],
    chunk_pairs: int | None = None,
    backend: ZBufferBackend = "auto",
) -> Rasterized:
    """Rasterise triangles at pixel centres (see the module docstring for conventions).

    ``backend`` runs the z-buffer fill: "torch" (this file, any device), "triton" (one kernel;
    CUDA tensors, or CPU ones under Triton's interpreter ``TRITON_INTERPRET=1``, float32 or
    float64) or "auto" (triton for float32/float64 CUDA inputs when triton imports, torch
    otherwise). Both give the same face ids and depths bit for bit, and the barycentrics and
    their gradients are computed by the same torch code afterwards.

    ``chunk_pairs`` bounds how many candidate (face, pixel) pairs the torch backend tests at
    once (memory); it never changes the result.
    """
    pos = _batched_positions(clip_pos)
    h, w = _check_resolution(resolution)
    faces = _check_faces(faces, pos.shape[1])
    b, n_faces = pos.shape[0], faces.shape[0]
    device = pos.device
    zbuffer_backend = _zbuffer_backend(backend, device, pos.dtype)
    chunk_pairs = max(int(chunk_pairs or _default_chunk_pairs(device)), h * w)

    zbuf = torch.full((b * h * w,), _EMPTY_KEY, dtype=torch.int64, device=device)
    if n_faces > 0:
        with torch.no_grad():
            _fill_zbuffer(pos.detach(), faces, h, w, zbuf, chunk_pairs, zbuffer_backend)
    face_id = torch.where(zbuf == _EMPTY_KEY, -1, zbuf & _FACE_MASK).view(b, h, w)
    uv, depth = _barycentrics(pos, faces, face_id, h, w)
    return Rasterized(uv=uv, depth=depth, face_id=face_id)


@dataclass
class _FaceSetup:
    """Per-(batch, face) data of the faces whose bounding box holds a pixel centre.

    Computed once by ``_face_setup``; both z-buffer backends (the torch twin and the Triton
    kernel) read exactly these tensors, so they can differ only in the per-pixel stage.
    """

    data: Float[Tensor, "N 12"]  # oriented edge coefficients c_ij (row-major), then z_i / |det|
    ints: Int[Tensor, "N 5"]  # box x0, box y0, box width nx, batch index, face id (int64)
    counts: Int[Tensor, "N"]  # nx * ny >= 1 pixel centres in the box


def _face_setup(pos: Tensor, faces: Tensor, h: int, w: int) -> _FaceSetup | None:
    """Edge functions, depth coefficients and pixel boxes of every face that may cover a pixel
    centre (None when none does)."""
    b, n_faces = pos.shape[0], faces.shape[0]
    tri = pos[:, faces]  # (B, F, 3, 4)
    tri = tri.reshape(b * n_faces, 3, 4)
    x, y, z, wc = tri.unbind(-1)

    # Cull faces entirely outside one frustum plane (this also removes faces fully behind).
    outside = (
        (x > wc).all(-1) | (x < -wc).all(-1) | (y > wc).all(-1) | (y < -wc).all(-1)
        | (z > wc).all(-1) | (z < -wc).all(-1) | (wc <= 0).all(-1)
    )
    homog = torch.stack([x, y, wc], dim=-1)  # (N, 3, 3)
    coeff = _edge_coefficients(homog)  # (N, 3, 3)
    det = (homog[:, 0] * coeff[:, 0]).sum(-1)
    keep = ~outside & (det != 0) & torch.isfinite(det)

    # Screen bounding boxes; a face with a vertex behind the eye (w <= 0) may cover anything.
    sx, sy = _to_screen(tri, h, w)
    sx, sy = torch.nan_to_num(sx), torch.nan_to_num(sy)
    behind = (wc <= 0).any(-1)
    big = float(max(h, w) + 2)
    min_x = torch.where(behind, -1.0, sx.amin(-1)).clamp(-1.0, big)
    max_x = torch.where(behind, big, sx.amax(-1)).clamp(-1.0, big)
    min_y = torch.where(behind, -1.0, sy.amin(-1)).clamp(-1.0, big)
    max_y = torch.where(behind, big, sy.amax(-1)).clamp(-1.0, big)
    x0 = torch.ceil(min_x - 0.5).long().clamp(0, w)
    x1 = torch.floor(max_x - 0.5).long().clamp(-1, w - 1)
    y0 = torch.ceil(min_y - 0.5).long().clamp(0, h)
    y1 = torch.floor(max_y - 0.5).long().clamp(-1, h - 1)
    nx = (x1 - x0 + 1).clamp(min=0)
    ny = (y1 - y0 + 1).clamp(min=0)
    counts = torch.where(keep, nx * ny, 0)

    active = torch.nonzero(counts > 0).squeeze(1)
    if active.numel() == 0:
        return None
    # Orient edge functions so that inside means all >= 0, and fold 1/|det| into depth.
    sign = torch.sign(det[active])[:, None, None]
    data = torch.cat(
        [(coeff[active] * sign).reshape(-1, 9), z[active] / det[active].abs()[:, None]], dim=-1
    )
    ints = torch.stack(
        [x0[active], y0[active], nx[active], active // n_faces, active % n_faces], dim=-1
    )
    return _FaceSetup(data=data.contiguous(), ints=ints, counts=counts[active])


def _zbuffer_backend(
    backend: str, device: torch.device, dtype: torch.dtype
) -> Literal["torch", "triton"]:
    """The z-buffer fill that runs for ``backend`` on ``device``, or a one-line error."""
    if backend not in _ZBUFFER_BACKENDS:
        hint = (" (nvdiffrast runs through Rasterizer(backend='nvdiffrast'))"
                if backend == "nvdiffrast" else "")
        raise ValueError(f"rasterize backend={backend!r}: use one of {_ZBUFFER_BACKENDS}{hint}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        fast = device.type == "cuda" and dtype in _TRITON_DTYPES and raster_triton.triton_available()
        return "triton" if fast else "torch"
    raster_triton.require_triton()
    if device.type != "cuda" and not raster_triton.interpreter_enabled():
        raise ValueError(f"backend='triton' needs CUDA tensors, got {device}; use backend='torch' "
                         "or 'auto' (or set TRITON_INTERPRET=1 for Triton's slow CPU interpreter)")
    if dtype not in _TRITON_DTYPES:
        raise ValueError(f"backend='triton' takes float32 or float64 clip positions, got {dtype}; "
                         "use backend='torch'")
    return "triton"


def _fill_zbuffer(
    pos: Tensor, faces: Tensor, h: int, w: int, zbuf: Tensor, chunk_pairs: int,
    backend: Literal["torch", "triton"] = "torch",
) -> None:
    setup = _face_setup(pos, faces, h, w)
    if setup is None:
        return
    xs_ndc, ys_ndc = _pixel_ndc(h, w, pos.device, pos.dtype)
    if backend == "triton":
        raster_triton.fill_zbuffer(zbuf, setup.data, setup.ints, setup.counts, xs_ndc, ys_ndc, h, w)
    else:
        _fill_zbuffer_torch(setup, xs_ndc, ys_ndc, h, w, zbuf, chunk_pairs)


def _fill_zbuffer_torch(
    setup: _FaceSetup, xs_ndc: Tensor, ys_ndc: Tensor, h: int, w: int, zbuf: Tensor,
    chunk_pairs: int,
) -> None:
    """The readable twin (and oracle) of ``raster_triton.fill_zbuffer``: every candidate
    (face, pixel) pair materialised, in memory-bounded chunks."""
    face_data, face_int, counts = setup.data, setup.ints, setup.counts
    ends = torch.cumsum(counts, 0)
    starts = ends - counts

    # Chunk boundaries: chunk k holds the faces whose pairs end in (k*P, (k+1)*P], so a chunk
    # has at most P + (largest box) <= 2P pairs; one host sync for all boundaries.
    total = int(ends[-1])
    n_chunks = -(-total // chunk_pairs)
    marks = torch.arange(1, n_chunks + 1, device=counts.device, dtype=torch.int64) * chunk_pairs
    bounds = torch.searchsorted(ends, marks, right=True).tolist()

    lo = 0
    for hi in bounds:
        hi = min(max(hi, lo), counts.numel())
        if hi == lo:
            continue
        _rasterize_chunk(
            face_data[lo:hi], face_int[lo:hi], counts[lo:hi], starts[lo:hi] - starts[lo],
            xs_ndc, ys_ndc, h, w, zbuf,
        )
        lo = hi
    if lo < counts.numel():  # the last boundary is always the end; this is a safety net
        _rasterize_chunk(
            face_data[lo:], face_int[lo:], counts[lo:], starts[lo:] - starts[lo],
            xs_ndc, ys_ndc, h, w, zbuf,
        )


def _rasterize_chunk(
    face_data: Tensor, face_int: Tensor, counts: Tensor, starts: Tensor,
    xs_ndc: Tensor, ys_ndc: Tensor, h: int, w: int, zbuf: Tensor,
) -> None:
    n_pairs = int(starts[-1] + counts[-1])
    owner = torch.repeat_interleave(
        torch.arange(counts.shape[0], device=counts.device), counts, output_size=n_pairs
    )
    local = torch.arange(n_pairs, device=counts.device) - starts[owner]
    ints = face_int[owner]
    nx = ints[:, 2]
    px = ints[:, 0] + local % nx
    py = ints[:, 1] + local // nx
    data = face_data[owner]
    coeff = data[:, :9].view(-1, 3, 3)
    qx, qy = xs_ndc[px], ys_ndc[py]
    # Same arithmetic for every face, so a shared edge gives exactly opposite values. Every
    # sum is written out left to right (no .sum(), whose order is the library's choice) and
    # each product is rounded before the add: raster_triton repeats exactly these operations.
    edge = coeff[..., 0] * qx[:, None] + coeff[..., 1] * qy[:, None] + coeff[..., 2]
    e0, e1, e2 = edge.unbind(-1)
    dz = data[:, 9:12]
    depth = e0 * dz[:, 0] + e1 * dz[:, 1] + e2 * dz[:, 2]
    inside = (
        (edge >= 0).all(-1) & (e0 + e1 + e2 > 0) & (depth >= -1.0) & (depth <= 1.0)
    )
    key = (_depth_key(depth.clamp(-1.0, 1.0)) << 32) | ints[:, 4]
    key = torch.where(inside, key, _EMPTY_KEY)
    pixel = (ints[:, 3] * h + py) * w + px
    zbuf.scatter_reduce_(0, pixel, key, reduce="amin")


def _barycentrics(
    pos: Tensor, faces: Tensor, face_id: Tensor, h: int, w: int
) -> tuple[Tensor, Tensor]:
    """Differentiable (u, v) and detached depth of the winning face at each covered pixel."""
    b = pos.shape[0]
    flat_id = face_id.reshape(-1)
    covered = torch.nonzero(flat_id >= 0).squeeze(1)
    batch = covered // (h * w)
    row = (covered // w) % h
    col = covered % w
    tri = pos[batch[:, None], faces[flat_id[covered]]]  # (N, 3, 4)
    xs_ndc, ys_ndc = _pixel_ndc(h, w, pos.device, pos.dtype)
    homog = tri[..., [0, 1, 3]]
    coeff = _edge_coefficients(homog)
    q = torch.stack([xs_ndc[col], ys_ndc[row], torch.ones_like(xs_ndc[col])], dim=-1)
    edge = (coeff * q[:, None, :]).sum(-1)  # (N, 3), proportional to barycentrics
    bary = edge / edge.sum(-1, keepdim=True)
    with torch.no_grad():
        det = (homog[:, 0] * coeff[:, 0]).sum(-1)
        depth_val = (edge * tri[..., 2]).sum(-1) / det
    uv = torch.zeros(b * h * w, 2, dtype=pos.dtype, device=pos.device)
    uv = uv.index_put((covered,), bary[:, :2])
    depth = torch.zeros(b * h * w, dtype=pos.dtype, device=pos.device)
    depth[covered] = depth_val.to(pos.dtype)
    return uv.view(b, h, w, 2), depth.view(b, h, w)


# ----------------------------------------------------------------------------- interpolate


def interpolate(
    attributes: Float[Tensor, "B V C"] | Float[Tensor, "V C"],
    rast: Rasterized,
    faces: Int[Tensor, "F 3"],
) -> Float[Tensor, "B H W C"]:
    """u*a0 + v*a1 + (1-u-v)*a2 of the visible face per pixel, 0 where empty.

    Differentiable w.r.t. ``attributes`` and, through ``rast.uv``, the clip positions.
    Unbatched attributes ``(V, C)`` are shared by every image.
    """
    b, h, w = rast.face_id.shape
    batch_ok = attributes.ndim == 2 or attributes.ndim == 3 and attributes.shape[0] in (1, b)
    if not batch_ok:
        raise ValueError(
            f"attributes must have shape (V, C) or (B={b}, V, C), got {tuple(attributes.shape)}"
        )
    faces = _check_faces(faces, attributes.shape[-2])
    flat_id = rast.face_id.reshape(-1)
    covered = torch.nonzero(flat_id >= 0).squeeze(1)
    verts = faces[flat_id[covered]]  # (N, 3)
    if attributes.ndim == 3 and attributes.shape[0] == b and b > 1:
        corner = attributes[(covered // (h * w))[:, None], verts]  # (N, 3, C)
    else:
        corner = attributes.reshape(-1, attributes.shape[-1])[verts]
    uv = rast.uv.reshape(-1, 2)[covered]
    weights = torch.cat([uv, 1.0 - uv.sum(-1, keepdim=True)], dim=-1)
    values = (weights[..., None] * corner).sum(-2)
    out = torch.zeros(b * h * w, attributes.shape[-1], dtype=values.dtype, device=values.device)
    out = out.index_put((covered,), values)
    return out.view(b, h, w, -1)


# ----------------------------------------------------------------------------- antialias


def edge_opposites(faces: Int[Tensor, "F 3"], n_vertices: int | None = None) -> Int[Tensor, "F 3"]:
    """For edge i of each face (the edge opposite vertex i), the vertex opposite it in the
    neighbouring face that shares the edge, or -1 on a boundary.

    ``n_vertices`` (any bound above the largest index) keys the edges without reading
    ``faces.max()`` back from the GPU, which would sync on every render of a changing mesh.

    nvdiffrast's topology hash. Non-manifold edges (3+ faces) pair faces arbitrarily, where
    nvdiffrast keeps the first two it inserted; both are heuristics for such meshes.
    """
    faces = faces.long()
    n = faces.shape[0]
    a = faces[:, [1, 2, 0]].reshape(-1)
    b = faces[:, [2, 0, 1]].reshape(-1)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    if n_vertices is None:
        n_vertices = int(faces.max()) + 1 if n else 1
    key = lo * n_vertices + hi
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    same_next = torch.zeros_like(sorted_key, dtype=torch.bool)
    same_next[:-1] = sorted_key[1:] == sorted_key[:-1]
    same_prev = torch.zeros_like(same_next)
    same_prev[1:] = same_next[:-1]
    slot = torch.arange(sorted_key.numel(), device=faces.device)
    partner = torch.where(same_next, slot + 1, torch.where(same_prev, slot - 1, -1))
    partner_slot = torch.where(partner >= 0, order[partner.clamp(min=0)], -1)
    partner_vertex = faces.reshape(-1)[partner_slot.clamp(min=0)]
    opposite_sorted = torch.where(partner_slot >= 0, partner_vertex, -1)
    opposite = torch.empty_like(opposite_sorted)
    opposite[order] = opposite_sorted
    opposite = torch.where(a == b, -1, opposite)  # degenerate edges have no neighbour
    return opposite.view(n, 3)


def antialias(
    colour: Float[Tensor, "B H W C"],
    rast: Rasterized,
    clip_pos: Float[Tensor, "B V 4"] | Float[Tensor, "V 4"],
    faces: Int[Tensor, "F 3"],
    opposites: Int[Tensor, "F 3"] | None = None,
) -> Float[Tensor, "B H W C"]:
    """nvdiffrast's analytic antialiasing: the source of silhouette (visibility) gradients.

    For every horizontal and vertical pair of neighbouring pixels with different face ids,
    the nearer face (or the only one) is taken; of its edges crossing the line through the
    two pixel centres, the farthest crossing is used if it is a silhouette edge (a boundary
    edge, or one whose neighbour face folds to the same side in screen space) steeper than
    45 degrees to the segment and crosses within the segment (1/16 px slack). With ``t`` the
    crossing position measured from the face's pixel, the pixel on the far side of the
    crossing's midpoint is blended: alpha = 0.5 - t of the other pixel's colour. The blend is
    written with torch ops on the edge's screen-space endpoints, so autograd gives the
    vertex gradients (and colour gradients) that nvdiffrast computes by hand.

    Differences from nvdiffrast: its backward divides by (dy + 1e-3 px) where we use the exact
    derivative (only differs for sub-1e-3 px edges); ties in depth between the two pixels
    pick the second pixel of the pair in both, but our vertical pairs run top to bottom and
    nvdiffrast's bottom to top. ``opposites`` (from ``edge_opposites``) may be passed to
    reuse the topology across calls, like nvdiffrast's ``topology_hash``.
    """
    pos = _batched_positions(clip_pos)
    b, h, w = rast.face_id.shape
    if colour.shape[:3] != (b, h, w):
        raise ValueError(
            f"colour must have shape (B, H, W, C) = ({b}, {h}, {w}, C) like the rasterised "
            f"image, got {tuple(colour.shape)}"
        )
    if pos.shape[0] not in (1, b):
        raise ValueError(f"clip_pos batch {pos.shape[0]} does not match the image batch {b}")
    faces = _check_faces(faces, pos.shape[1])
    if opposites is None:
        opposites = edge_opposites(faces, pos.shape[1])
    c = colour.shape[-1]
    colour_flat = colour.reshape(-1, c)
    pixel = torch.arange(b * h * w, device=colour.device).view(b, h, w)
    fid, depth = rast.face_id, rast.depth

    blends = []
    for horizontal in (True, False):
        if horizontal:
            first, second = pixel[:, :, :-1], pixel[:, :, 1:]
        else:
            first, second = pixel[:, :-1, :], pixel[:, 1:, :]
        differ = fid.reshape(-1)[first] != fid.reshape(-1)[second]
        pix0 = first[differ]
        pix1 = second[differ]
        if pix0.numel() == 0:
            continue
        blends.append(_pair_blend(pix0, pix1, horizontal, fid.reshape(-1), depth.reshape(-1),
                                  colour_flat, pos, faces, opposites, h, w))
    if not blends:
        return colour.clone()
    target = torch.cat([t for t, _ in blends])
    delta = torch.cat([d for _, d in blends])
    return colour_flat.index_add(0, target, delta).view(b, h, w, c)


def _pair_blend(
    pix0: Tensor, pix1: Tensor, horizontal: bool, fid: Tensor, depth: Tensor, colour: Tensor,
    pos: Tensor, faces: Tensor, opposites: Tensor, h: int, w: int,
) -> tuple[Tensor, Tensor]:
    """Target pixel and colour increment of every pixel pair with different face ids."""
    id0, id1 = fid[pix0], fid[pix1]
    use1 = (id0 < 0) | ((id1 >= 0) & ~(depth[pix0] < depth[pix1]))
    tri = torch.where(use1, id1, id0)
    origin = torch.where(use1, pix1, pix0)
    ds = torch.where(use1, -1.0, 1.0).to(pos.dtype)  # direction from the face's pixel to the other
    batch = origin // (h * w) if pos.shape[0] > 1 else torch.zeros_like(origin)
    centre_x = (origin % w).to(pos.dtype) + 0.5
    centre_y = ((origin // w) % h).to(pos.dtype) + 0.5

    verts = faces[tri]  # (N, 3)
    sx, sy = _to_screen(pos[batch[:, None], verts], h, w)  # differentiable, (N, 3)
    vx, vy = sx - centre_x[:, None], sy - centre_y[:, None]
    with torch.no_grad():
        opp = opposites[tri]
        opp_clip = pos[batch[:, None], opp.clamp(min=0)].detach()
        ox, oy = _to_screen(opp_clip, h, w)
        ox, oy = ox - centre_x[:, None], oy - centre_y[:, None]
        x, y = vx.detach(), vy.detach()
        ox = torch.where(opp >= 0, ox, x)  # no neighbour: the vertex itself (always silhouette)
        oy = torch.where(opp >= 0, oy, y)
        j, k = [1, 2, 0], [2, 0, 1]
        own_area = ((x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0])
                    - (x[:, 2] - x[:, 0]) * (y[:, 1] - y[:, 0]))
        # Signed area of (opposite vertex, edge): same sign as the face's own area means the
        # neighbour folds onto the same side, i.e. the edge is a silhouette.
        wing = (x[:, j] - ox) * (y[:, k] - oy) - (x[:, k] - ox) * (y[:, j] - oy)
        silhouette = torch.signbit(wing) == torch.signbit(own_area)[:, None]

    # Along = coordinate along the pixel pair's axis, across = perpendicular to it.
    along, across = (vx, vy) if horizontal else (vy, vx)
    a_j, a_k, b_j, b_k = along[:, j], along[:, k], across[:, j], across[:, k]
    d_along, d_across = a_k - a_j, b_k - b_j
    crosses = torch.signbit(b_j) != torch.signbit(b_k)
    safe = torch.where(crosses & (d_across != 0), d_across, torch.ones_like(d_across))
    crossing = ds[:, None] * (a_j * b_k - b_j * a_k) / safe  # distance from the face's pixel
    crossing = torch.where(crosses, crossing, torch.full_like(crossing, -math.inf))
    edge = crossing.detach().argmax(-1, keepdim=True)
    t = crossing.gather(-1, edge).squeeze(-1)
    steep = (d_across.abs() >= d_along.abs()).gather(-1, edge).squeeze(-1)
    valid = (
        silhouette.gather(-1, edge).squeeze(-1) & crosses.gather(-1, edge).squeeze(-1) & steep
        & (t.detach() > -_AA_EPS) & (t.detach() < 1.0 + _AA_EPS)
    )
    t = torch.where(valid, t, torch.zeros_like(t))
    alpha = ds * (0.5 - t.clamp(0.0, 1.0))
    alpha = torch.where(valid, alpha, torch.zeros_like(alpha))
    target = torch.where(alpha.detach() > 0, pix0, pix1)
    delta = alpha[:, None] * (colour[pix1] - colour[pix0])
    return target, delta


# ----------------------------------------------------------------------------- backends


class Rasterizer:
    """The three ops behind one backend switch.

    backend:

    - "torch": this file, any device.
    - "triton": the z-buffer fill as a Triton kernel (``rasterize(backend="triton")``: CUDA
      inputs, or CPU ones under ``TRITON_INTERPRET=1``); interpolate and antialias in torch.
    - "nvdiffrast": NVIDIA's CUDA rasteriser for all three ops (must be installed, CUDA inputs
      only; top-left fill rule, see the module docstring).
    - "auto", for CUDA inputs, in this order: nvdiffrast when it is importable (an optional
      extra, so installing it opts in, as before the Triton path existed), else triton when it
      is importable (it ships with CUDA builds of torch) and the positions are float32 or
      float64, else torch. CPU inputs always take torch.

    Outputs follow this module's conventions whichever backend runs; torch and triton give the
    same face ids bit for bit, hence the same outputs and gradients (on CUDA up to the order of
    the atomic adds in the torch ops that follow, which varies from run to run anyway).
    """

    def __init__(self, backend: Backend = "auto", chunk_pairs: int = 0) -> None:
        if backend not in _BACKENDS:
            raise ValueError(f"backend={backend!r}: use one of {_BACKENDS}")
        if backend == "nvdiffrast" and _import_nvdiffrast() is None:
            raise ImportError(_NVDIFFRAST_HINT)
        if backend == "triton":
            raster_triton.require_triton()
        self.backend = backend
        self.chunk_pairs = chunk_pairs
        self._context: Any = None
        self._topology: tuple[Tensor, int, Tensor] | None = None

    def _opposites(self, faces: Tensor, n_vertices: int) -> Tensor:
        # Meshes are often re-rendered unchanged: reuse the topology while the very same faces
        # tensor comes back unmodified (DMTet extracts new faces every step, so it never hits). Holding a reference (not a data pointer) means a new
        # tensor that happens to reuse the old storage can never hit a stale entry.
        cached = self._topology
        if cached is None or cached[0] is not faces or cached[1] != faces._version:
            cached = self._topology = (faces, faces._version, edge_opposites(faces, n_vertices))
        return cached[2]

    def _use_nvdiffrast(self, device: torch.device) -> bool:
        if self.backend in ("torch", "triton"):
            return False
        if self.backend == "nvdiffrast":
            if device.type != "cuda":
                raise ValueError(f"backend='nvdiffrast' needs CUDA tensors, got {device}; "
                                 "use backend='torch' or 'auto' on CPU")
            return True
        return device.type == "cuda" and _import_nvdiffrast() is not None

    def resolve_backend(
        self, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> Literal["torch", "triton", "nvdiffrast"]:
        """The backend ``rasterize`` runs for positions on ``device`` of ``dtype`` (the
        precedence in the class docstring), or the one-line error it would raise."""
        if self._use_nvdiffrast(device):
            return "nvdiffrast"
        return _zbuffer_backend(self._zbuffer_choice(), device, dtype)

    def _zbuffer_choice(self) -> ZBufferBackend:
        return "torch" if self.backend == "torch" else "triton" if self.backend == "triton" else "auto"

    def rasterize(
        self, clip_pos: Float[Tensor, "B V 4"], faces: Int[Tensor, "F 3"],
        resolution: tuple[int, int],
    ) -> Rasterized:
        if not self._use_nvdiffrast(clip_pos.device):
            return rasterize(clip_pos, faces, resolution, self.chunk_pairs or None,
                             self._zbuffer_choice())
        dr = _import_nvdiffrast()
        if self._context is None:
            self._context = dr.RasterizeCudaContext(device=clip_pos.device)
        pos = _batched_positions(clip_pos).float().contiguous()
        native, _ = dr.rasterize(self._context, pos, faces.int().contiguous(),
                                 resolution=list(_check_resolution(resolution)))
        top_down = native.flip(1)
        return Rasterized(uv=top_down[..., :2], depth=top_down[..., 2].detach(),
                          face_id=top_down[..., 3].detach().long() - 1, native=native)

    def interpolate(
        self, attributes: Float[Tensor, "B V C"], rast: Rasterized, faces: Int[Tensor, "F 3"]
    ) -> Float[Tensor, "B H W C"]:
        if rast.native is None or not self._use_nvdiffrast(attributes.device):
            return interpolate(attributes, rast, faces)
        dr = _import_nvdiffrast()
        attr = attributes[None] if attributes.ndim == 2 else attributes
        out, _ = dr.interpolate(attr.float().contiguous(), rast.native, faces.int().contiguous())
        return out.flip(1)

    def antialias(
        self, colour: Float[Tensor, "B H W C"], rast: Rasterized,
        clip_pos: Float[Tensor, "B V 4"], faces: Int[Tensor, "F 3"],
    ) -> Float[Tensor, "B H W C"]:
        if rast.native is None or not self._use_nvdiffrast(colour.device):
            return antialias(colour, rast, clip_pos, faces, self._opposites(faces, clip_pos.shape[-2]))
        dr = _import_nvdiffrast()
        pos = _batched_positions(clip_pos).float().contiguous()
        out = dr.antialias(colour.flip(1).float().contiguous(), rast.native, pos,
                           faces.int().contiguous())
        return out.flip(1)


def _import_nvdiffrast() -> Any:
    try:
        return importlib.import_module("nvdiffrast.torch")
    except ImportError:
        return None


# ----------------------------------------------------------------------------- benchmark


def _uv_sphere(n_faces: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """A UV sphere of radius 0.5 with about ``n_faces`` triangles."""
    rows = max(2, int(math.sqrt(n_faces / 4)))
    cols = max(3, n_faces // (2 * rows))
    theta = torch.linspace(0, math.pi, rows + 1, device=device)
    phi = torch.arange(cols, device=device) * (2 * math.pi / cols)
    t, p = torch.meshgrid(theta, phi, indexing="ij")
    verts = 0.5 * torch.stack([t.sin() * p.cos(), t.sin() * p.sin(), t.cos()], -1).view(-1, 3)
    r = torch.arange(rows, device=device)[:, None]
    c = torch.arange(cols, device=device)[None, :]
    a, b_ = r * cols + c, r * cols + (c + 1) % cols
    d, e = a + cols, b_ + cols
    lower = torch.stack([a, d, b_], -1).view(-1, 3)
    upper = torch.stack([b_, d, e], -1).view(-1, 3)
    faces = torch.cat([lower, upper])
    return verts, faces


@dataclass
class RasterTiming:
    """One backend's forward + backward time in ``benchmark_raster``."""

    backend: str
    ms_forward_backward: float  # nan when it failed
    n_faces: int
    resolution: int
    batch: int
    error: str = ""  # the exception's type and first line when it failed


def benchmark_raster(
    n_faces: int = 100_000,
    resolution: int = 512,
    batch: int = 8,
    device: str | torch.device = "cuda",
    backends: tuple[Backend, ...] | None = None,
    repeats: int = 10,
) -> list[RasterTiming]:
    """Forward + backward time (ms) of rasterize + interpolate + antialias (colour and mask),
    for each backend on the same scene.

    A UV sphere of ``n_faces`` triangles seen by ``batch`` orbit cameras; the loss reaches the
    vertex positions through uv and antialias. CUDA events on GPU, wall clock on CPU.
    ``backends`` defaults to torch, then triton and nvdiffrast where they can run (CUDA and
    importable); a backend that fails gets its error in its row, the others still run.
    """
    from magic3d.data.cameras import mvp, orbit_cameras

    device = torch.device(device)
    if backends is None:
        backends = ("torch",)
        if device.type == "cuda" and raster_triton.triton_available():
            backends += ("triton",)
        if device.type == "cuda" and _import_nvdiffrast() is not None:
            backends += ("nvdiffrast",)
    verts, faces = _uv_sphere(n_faces, device)
    cams = orbit_cameras(batch, 20.0, 1.6, 45.0, resolution, resolution).to(device)
    matrices = mvp(cams)
    colours = torch.rand(verts.shape[0], 3, device=device)
    rows = []
    for backend in backends:
        try:
            ms = _time_raster(Rasterizer(backend), verts, faces, matrices, colours, resolution,
                              repeats)
            error = ""
        except Exception as exc:  # noqa: BLE001 - one failing backend must not lose the others
            ms, error = math.nan, f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
        rows.append(RasterTiming(backend=backend, ms_forward_backward=ms,
                                 n_faces=int(faces.shape[0]), resolution=resolution, batch=batch,
                                 error=error))
    return rows


def _time_raster(
    raster: Rasterizer, verts: Tensor, faces: Tensor, matrices: Tensor, colours: Tensor,
    resolution: int, repeats: int,
) -> float:
    device = verts.device

    def step() -> None:
        v = verts.clone().requires_grad_(True)
        homog = torch.cat([v, torch.ones_like(v[:, :1])], -1)
        clip = torch.einsum("bij,vj->bvi", matrices, homog)
        rast = raster.rasterize(clip, faces, (resolution, resolution))
        rgb = raster.interpolate(colours, rast, faces)
        rgb = raster.antialias(rgb, rast, clip, faces)
        mask = raster.antialias(rast.mask, rast, clip, faces)
        (rgb.sum() + mask.sum()).backward()

    for _ in range(2):  # warm-up (the first Triton call compiles its kernel)
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            step()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / repeats
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - t0) * 1000.0 / repeats
