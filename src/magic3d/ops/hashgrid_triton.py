"""Triton kernels for the hash-grid encoding: forward, and backward w.r.t. the table and points.

Same contract as the torch twin (``magic3d.ops.hashgrid._encode_core``, read its module
docstring): per-level float64 scale, one rounding of ``scale * x + 0.5`` (float64 product of
float32 values, which is exact, plus 0.5, rounded once to the input's precision), corner cells
in uint32 arithmetic (wrap-around of the hash products and of the dense index), modulo the
level size, dense or coherent-prime hash per level, linear or smoothstep weights in the
table's dtype, and a level-major output. The gathered entries are bit-identical to the twin's
(``corner_entries``, checked by the tests); values differ only by the order of the float32
sums (and, compiled, their fused multiply-adds).

Work decomposition
------------------
* Forward and table gradient: one program per (block of points, level), the level on grid
  axis 1. CUDA schedules axis 0 fastest, so the programs resident at one time all read (or
  scatter into) the same level's table, at most ``2^T * F * 4`` bytes (4 MiB by default),
  which fits in L2; a program that looped over levels would touch the whole table (50 MB by
  default, the size of an H100/H200's entire L2) at once. (tiny-cuda-nn makes the same
  choice; the effect here is reasoned, not yet measured: ``make bench``.) The 8 corner gathers (or atomics) per level are the cost; the
  position and index math around them is a few dozen integer ops and is recomputed in the
  backward rather than storing 8 indices per point and level (256 MB at 2^20 points).
  The dense/hashed choice is a uniform branch per program, so hashed levels use a mask
  (their size is 2^T) instead of an integer division.
* Point gradient: one program per block of points, looping over levels, because it sums
  over levels. The sum is kept in float64 and rounded once, as the twin's autograd does
  (its ``x.to(float64)`` is broadcast over levels, so the level sum happens in float64);
  no atomics, so it is deterministic. It gathers the corners again (it needs their values).

Determinism: the table gradient is a scatter with ``tl.atomic_add`` (float32, or float64 for
a float64 table; half tables accumulate in float32 and are cast once). On CUDA the order of
the atomic additions varies from run to run, so entries hit by many points differ in the last
bits between runs (a float32 sum of n terms in two orders differs by at most about
``2 (n - 1) eps sum|terms|``). The forward and the point gradient are deterministic.

The backward is not itself differentiable (``once_differentiable``): second derivatives
(e.g. an eikonal loss on d out / d x) need the torch backend.

Triton is imported lazily (the module imports without it). With ``TRITON_INTERPRET=1``
the same kernels run on CPU tensors through Triton's interpreter (tests; very slow).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.autograd.function import once_differentiable


class HashGridSpec(Protocol):
    """What the kernels read of ``magic3d.ops.hashgrid.HashGridSpec`` (a protocol, because
    hashgrid imports this module and the package keeps its import graph acyclic). It must be
    hashable: the per-device level tables are cached on it."""

    n_levels: int
    n_features_per_level: int
    interpolation: str
    level_scales: tuple[float, ...]
    level_resolutions: tuple[int, ...]
    level_sizes: tuple[int, ...]
    level_offsets: tuple[int, ...]
    level_is_hashed: tuple[bool, ...]

    @property
    def n_params(self) -> int: ...

    @property
    def n_output_dims(self) -> int: ...


# Points per program. 128 points x F features is one or a few rows per thread at 4 warps;
# a starting point to tune on the GPU (larger blocks add registers, not reuse: no data is
# shared between the points of a block).
BLOCK_FORWARD = 128
BLOCK_BACKWARD = 128
NUM_WARPS = 4
# Compile options of every launch. Fused multiply-adds in the corner sums, as tiny-cuda-nn's
# compiler contracts them; stated because Triton 3.10 turns the default off. The exactness
# contract is unaffected: the position's float64 product is exact, 2 * frac in smoothstep is
# exact, and the weight products contain no additions to contract.
LAUNCH_OPTIONS = dict(num_warps=NUM_WARPS, enable_fp_fusion=True)

TRITON_INSTALL_HINT = "pip install triton (ships with CUDA builds of torch) or use backend='compiled' / 'torch'"


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    """Whether triton imports here; a broken install (a wheel built for another CUDA or
    Python) counts as absent, so ``auto`` does not pick a backend that cannot load. Imports
    triton the first time it is asked, never when this module is imported."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        importlib.import_module("triton.language")
    except Exception:  # noqa: BLE001 - ImportError, OSError from its native library, ...
        return False
    return True


def interpreter_enabled() -> bool:
    """Whether Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    if not triton_importable():
        return False
    try:
        from triton import knobs  # the flag exactly as triton.jit will read it

        return bool(knobs.runtime.interpret)
    except ImportError:  # older triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_device(device: torch.device) -> None:
    """Raise a one-line ValueError, naming the fix, when the kernels cannot run for tensors on
    ``device``: triton missing, or no CUDA (a CPU device, or a CUDA device that is absent)
    while Triton's interpreter is off."""
    if not triton_importable():
        raise ValueError(f"hash grid backend='triton' but triton does not import here: {TRITON_INSTALL_HINT}")
    if interpreter_enabled():
        return
    if device.type != "cuda":
        raise ValueError(f"hash grid backend='triton' needs CUDA tensors, got {device}: use backend='torch' on CPU, "
                         "or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter (tests, slow)")
    if not torch.cuda.is_available():
        raise ValueError("hash grid backend='triton' needs a CUDA device and none is available: use "
                         "backend='torch', or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter")


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool) -> ModuleType:
    """The kernel module, decorated with Triton's interpreter on or off.

    ``triton.jit`` picks compiled or interpreted when it decorates, so each flag value gets
    its own copy of the module (executed from the same file): CPU tests under
    ``TRITON_INTERPRET=1`` and CUDA runs in one session each get the kind they need."""
    name = "magic3d.ops.hashgrid_triton_kernels" + ("_interpreted" if interpret else "")
    module_spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("hashgrid_triton_kernels.py"))
    module = importlib.util.module_from_spec(module_spec)
    with _interpret_flag(interpret):
        module_spec.loader.exec_module(module)
    sys.modules[name] = module  # for inspect.getsource and Triton's cache keys
    return module


@contextlib.contextmanager
def _interpret_flag(interpret: bool) -> Iterator[None]:
    try:
        from triton import knobs
    except ImportError:  # triton < 3.4 reads the environment variable when it decorates
        previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        try:
            yield
        finally:
            if previous is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = previous
        return
    with knobs.runtime.scope():  # restores the knob (and TRITON_INTERPRET) afterwards
        knobs.runtime.interpret = interpret
        yield


@functools.lru_cache(maxsize=64)
def _device_levels(spec: HashGridSpec, device: torch.device) -> tuple[Tensor, Tensor]:
    # Uploaded once per (spec, device): float64 scales and int64 (res, size, offset, hashed) rows.
    for size, hashed in zip(spec.level_sizes, spec.level_is_hashed):
        # The kernels take a hashed level's modulo as a mask.
        assert not hashed or size & (size - 1) == 0, "hashed level sizes are 2^T"
    scales = torch.tensor(spec.level_scales, dtype=torch.float64, device=device)
    meta = torch.tensor([(r, s, o, int(h)) for r, s, o, h in zip(spec.level_resolutions, spec.level_sizes,
                                                                 spec.level_offsets, spec.level_is_hashed)],
                        dtype=torch.int64, device=device)
    return scales, meta.contiguous()


def _launch_setup(x: Tensor, spec: HashGridSpec) -> tuple[ModuleType, Tensor, Tensor, bool]:
    check_device(x.device)
    kernels = _kernels(interpreter_enabled())
    scales, meta = _device_levels(spec, x.device)
    # int32 offsets when every flat offset fits: half the integer work of int64 on a GPU.
    largest = max(x.shape[0] * spec.n_output_dims, x.shape[0] * spec.n_levels * 8, spec.n_params)
    return kernels, scales, meta, largest >= 2**31


def _device_guard(x: Tensor) -> contextlib.AbstractContextManager:
    # Triton launches on the current CUDA device; make it the tensors' device.
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


class _HashGridTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, params: Tensor, spec: HashGridSpec) -> Tensor:
        x = x.contiguous()
        params = params.contiguous()
        n_points = x.shape[0]
        out = torch.empty(n_points, spec.n_output_dims, dtype=params.dtype, device=x.device)
        ctx.save_for_backward(x, params)
        ctx.spec = spec
        if n_points == 0:
            return out
        kernels, scales, meta, index64 = _launch_setup(x, spec)
        grid = (triton_cdiv(n_points, BLOCK_FORWARD), spec.n_levels)
        with _device_guard(x):
            kernels.forward_kernel[grid](x, params, out, scales, meta, n_points, N_LEVELS=spec.n_levels,
                                         F=spec.n_features_per_level, SMOOTH=spec.interpolation == "smoothstep",
                                         INDEX64=index64, BLOCK=BLOCK_FORWARD, **LAUNCH_OPTIONS)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, params = ctx.saved_tensors
        spec: HashGridSpec = ctx.spec
        need_x, need_params = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if need_x else None  # every row is written
        grad_params = None
        if need_params:
            # Half tables accumulate in float32: thousands of half-precision atomic additions
            # into one coarse entry would lose most of the gradient.
            acc_dtype = torch.float64 if params.dtype == torch.float64 else torch.float32
            grad_params = torch.zeros(params.shape, dtype=acc_dtype, device=params.device)
        n_points = x.shape[0]
        if n_points > 0 and (need_x or need_params):
            kernels, scales, meta, index64 = _launch_setup(x, spec)
            # A strided cotangent (a slice, an expansion) has offsets of its own to bound.
            last = sum((size - 1) * abs(stride) for size, stride in zip(grad_out.shape, grad_out.stride()))
            index64 = index64 or last >= 2**31
            common = dict(N_LEVELS=spec.n_levels, F=spec.n_features_per_level,
                          SMOOTH=spec.interpolation == "smoothstep", INDEX64=index64, **LAUNCH_OPTIONS)
            with _device_guard(x):
                if need_params:
                    grid = (triton_cdiv(n_points, BLOCK_BACKWARD), spec.n_levels)
                    kernels.backward_table_kernel[grid](x, grad_out, grad_params, scales, meta, n_points,
                                                        *grad_out.stride(), BLOCK=BLOCK_BACKWARD, **common)
                if need_x:
                    grid = (triton_cdiv(n_points, BLOCK_BACKWARD),)
                    kernels.backward_points_kernel[grid](x, params, grad_out, grad_x, scales, meta, n_points,
                                                         *grad_out.stride(), BLOCK=BLOCK_BACKWARD, **common)
        if grad_params is not None:
            grad_params = grad_params.to(params.dtype)
        return grad_x, grad_params, None


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def hashgrid_encode_triton(
    x: Float[Tensor, "P 3"], params: Float[Tensor, "N"], spec: HashGridSpec
) -> Float[Tensor, "P C"]:
    """The encoding through the Triton kernels (inputs already validated by ``hashgrid_encode``)."""
    check_device(x.device)
    return _HashGridTriton.apply(x, params, spec)


def corner_entries(
    x: Float[Tensor, "P 3"], spec: HashGridSpec
) -> tuple[Float[Tensor, "P L 3"], Int[Tensor, "P L 8"]]:
    """Debug helper: the kernels' rounded positions ``scale * x + 0.5`` and flat-table entries
    of the 8 corners (corner k = bx + 2 by + 4 bz), from the same jitted code the encode uses."""
    x = x.contiguous()
    n_points = x.shape[0]
    pos = torch.empty(n_points, spec.n_levels, 3, dtype=x.dtype, device=x.device)
    entries = torch.empty(n_points, spec.n_levels, 8, dtype=torch.int64, device=x.device)
    if n_points == 0:
        return pos, entries
    kernels, scales, meta, index64 = _launch_setup(x, spec)
    with _device_guard(x):
        kernels.corners_kernel[(triton_cdiv(n_points, BLOCK_FORWARD), spec.n_levels)](
            x, pos, entries, scales, meta, n_points, N_LEVELS=spec.n_levels, INDEX64=index64,
            BLOCK=BLOCK_FORWARD, **LAUNCH_OPTIONS)
    return pos, entries
