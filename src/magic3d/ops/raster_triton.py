"""Triton fast path of the rasteriser's z-buffer fill (``magic3d.ops.raster``).

The torch twin (``raster._fill_zbuffer_torch``) materialises every candidate (face, pixel)
pair with ``repeat_interleave`` and reduces int64 keys ``(depth bits << 32) | face id`` with
``scatter_reduce(amin)``: about 100 bytes of temporaries per pair, which is what makes it slow
on a GPU. This kernel reads the same per-face setup (``raster._FaceSetup``: oriented edge
coefficients, depth coefficients, pixel box, batch index, face id) and keeps the pairs in
registers: one program per tile of ``BLOCK`` consecutive pixels of one face's box (the box
enumerated row-major, exactly as the twin enumerates it), so a face's box of n pixels takes
ceil(n / BLOCK) programs and large faces (the whole screen, for one with a vertex behind the
camera) do not serialise, while a small face wastes at most one partial tile.

Exactness: each pixel repeats the twin's operations in the same order, every product rounded
before its add: ``e_i = (c_i0 * qx + c_i1 * qy) + c_i2``, ``depth = (e0 * dz0 + e1 * dz1) +
e2 * dz2``, the same inclusive inside test, the same clamp and key, then ``tl.atomic_min``
of the key. The min of keys is order-independent, so the atomics add no nondeterminism.

FMA: by default Triton lets the compiler contract a multiply and an add into one FMA (one
rounding instead of two). For this kernel on sm_90 that gives 5 FFMA + 4 FMUL + 4 FADD,
``e_i = fma(c_i0, qx, c_i1 * qy) + c_i2`` and ``depth = fma(e2, dz2, fma(e0, dz0, e1 * dz1))``,
so keys would no longer match the twin's. The kernel is launched with
``enable_fp_fusion=False``: the PTX then holds only ``mul.rn`` / ``add.rn`` (which ptxas may
not contract) and the SASS 9 FMUL + 10 FADD, no FFMA (read from a cross-compile for sm_90).
How much fusion would change, measured by emulating that FMA pattern on CPU (float64 product
and sum, rounded once) at 512^2, batch 8: on the 100k-face UV sphere of
``raster.benchmark_raster`` 13 of 1,038,744 covered pixels change face (none changes
coverage: a shared edge's FMA values stay exact negatives, so meshes stay watertight) and
62% of depth keys move by ulps; on 100k random faces 3 of 2,088,076 pixels change face. Small,
but the twin is meant as an exact oracle, and fusion would save only 6 of 19 float instructions.

Triton is imported only when a kernel is first built: this module imports without it.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

# Pixels per program. Most faces of a 100k-triangle mesh at 512^2 cover a box of a few pixels,
# so a small tile wastes few lanes; 64 lanes fill two warps. Not tuned by measurement yet.
BLOCK = 64
# Launch options; FMA contraction off keeps the keys bit-identical to the twin's (docstring).
LAUNCH_OPTIONS = {"num_warps": 2, "enable_fp_fusion": False}
_TRITON_HINT = (
    "backend='triton' needs the triton package (it ships with CUDA builds of torch; "
    "pip install triton) or use backend='torch'"
)


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` works here (it does with CUDA builds of torch)."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:  # noqa: BLE001 - ImportError, or a broken install failing at import
        return False
    return True


def require_triton() -> None:
    """Raise the one-line install hint when triton does not import."""
    if not triton_available():
        raise ImportError(_TRITON_HINT)


def interpreter_enabled() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET=1``): kernels then run on
    CPU tensors, slowly, for tests without a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# triton.language, bound by _kernel() on first use: the kernel below is a module-level function
# (Triton resolves its names in this module's globals) defined without importing triton.
tl: Any = None


def _zbuffer_kernel(
    zbuf_ptr, data_ptr, ints_ptr, counts_ptr, tile_face_ptr, tile_first_ptr,
    xs_ptr, ys_ptr, h, w, BLOCK: tl.constexpr,
):
    """One program: BLOCK consecutive pixels (row-major in the box) of one face's box."""
    tile = tl.program_id(0)
    face = tl.load(tile_face_ptr + tile).to(tl.int64)  # row of the face setup
    first = tl.load(tile_first_ptr + face)  # this face's first tile
    # Pixel indices within one image fit int32 (fill_zbuffer checks H*W < 2^31): 32-bit
    # division is several times cheaper than 64-bit on the GPU.
    count = tl.load(counts_ptr + face).to(tl.int32)
    local = (tile - first).to(tl.int32) * BLOCK + tl.arange(0, BLOCK)
    valid = local < count

    row = ints_ptr + face * 5
    box_x0 = tl.load(row + 0).to(tl.int32)
    box_y0 = tl.load(row + 1).to(tl.int32)
    box_nx = tl.load(row + 2).to(tl.int32)
    batch = tl.load(row + 3)
    face_id = tl.load(row + 4)
    px = box_x0 + local % box_nx
    py = box_y0 + local // box_nx
    qx = tl.load(xs_ptr + px, mask=valid, other=0.0)
    qy = tl.load(ys_ptr + py, mask=valid, other=0.0)

    d = data_ptr + face * 12
    # Operand order as in raster._rasterize_chunk (see the module docstring on FMA).
    e0 = tl.load(d + 0) * qx + tl.load(d + 1) * qy + tl.load(d + 2)
    e1 = tl.load(d + 3) * qx + tl.load(d + 4) * qy + tl.load(d + 5)
    e2 = tl.load(d + 6) * qx + tl.load(d + 7) * qy + tl.load(d + 8)
    depth = e0 * tl.load(d + 9) + e1 * tl.load(d + 10) + e2 * tl.load(d + 11)
    inside = (
        valid & (e0 >= 0) & (e1 >= 0) & (e2 >= 0) & (e0 + e1 + e2 > 0)
        & (depth >= -1.0) & (depth <= 1.0)
    )
    # raster._depth_key: float32 bits of the clamped depth, made monotone and >= 0.
    bits = tl.minimum(tl.maximum(depth, -1.0), 1.0).to(tl.float32)
    bits = bits.to(tl.int32, bitcast=True).to(tl.int64)
    magnitude = bits & 0x7FFFFFFF
    key = tl.where(bits >= 0, (1 << 30) + magnitude, (1 << 30) - magnitude)
    key = (key << 32) | face_id
    pixel = (batch * h + py) * w + px  # int64 (batch is): B*H*W may pass 2^31
    tl.atomic_min(zbuf_ptr + pixel, key, mask=inside)


@functools.cache
def _kernel(interpret: bool) -> Any:
    """The jitted kernel; ``triton.jit`` reads TRITON_INTERPRET when it decorates, so the
    cache is keyed by that setting (the caller passes ``interpreter_enabled()``)."""
    del interpret  # only the cache key
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_zbuffer_kernel)


def fill_zbuffer(
    zbuf: Int[Tensor, "P"],
    data: Float[Tensor, "N 12"],
    ints: Int[Tensor, "N 5"],
    counts: Int[Tensor, "N"],
    xs_ndc: Float[Tensor, "W"],
    ys_ndc: Float[Tensor, "H"],
    h: int,
    w: int,
    fp_fusion: bool = LAUNCH_OPTIONS["enable_fp_fusion"],
) -> None:
    """Lower ``zbuf`` (int64, B*H*W keys) in place with every covered pixel of every face.

    ``data``, ``ints``, ``counts`` are the fields of ``raster._FaceSetup`` (float32 or float64
    data, int64 ints); the result equals ``raster._fill_zbuffer_torch``'s. ``fp_fusion=True``
    lets the compiler contract multiply-adds into FMAs (faster by a few instructions, no longer
    bit-identical to the twin); it is there to measure that difference, not for use.
    """
    require_triton()
    n = counts.numel()
    if n == 0:
        return
    tiles = (counts + (BLOCK - 1)) // BLOCK
    tile_end = torch.cumsum(tiles, 0)
    n_tiles = int(tile_end[-1])  # one host sync: the grid size
    if h * w >= 2**31 or n_tiles >= 2**31:  # int32 pixel indices in a box; CUDA's grid limit
        raise ValueError(f"backend='triton' handles images under 2^31 pixels and 2^31 tiles "
                         f"({h}x{w}, {n_tiles} tiles here); use backend='torch'")
    # Program -> face row (int32 halves the bytes; the setup never has 2^31 faces).
    tile_face = torch.repeat_interleave(
        torch.arange(n, device=counts.device, dtype=torch.int32), tiles, output_size=n_tiles
    )
    tile_first = tile_end - tiles
    _kernel(interpreter_enabled())[(n_tiles,)](
        zbuf, data.contiguous(), ints.contiguous(), counts.contiguous(), tile_face, tile_first,
        xs_ndc.contiguous(), ys_ndc.contiguous(), h, w,
        BLOCK=BLOCK, num_warps=LAUNCH_OPTIONS["num_warps"], enable_fp_fusion=fp_fusion,
    )
