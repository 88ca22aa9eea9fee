"""Multiresolution hash-grid encoding (Instant-NGP), weight-compatible with tiny-cuda-nn.

The flat parameter vector, the per-level table sizes, the hash, the dense indexing and the
output order follow tiny-cuda-nn's ``HashGrid`` encoding (3-D input, coherent-prime hash), so a
``params`` tensor trained here loads into ``tinycudann.Encoding`` and back unchanged.

Per level ``l`` (all derived in float32, exactly as tiny-cuda-nn's host code does)::

    scale_l = exp2(l * log2(b)) * N0 - 1        res_l = ceil(scale_l) + 1
    size_l  = min(next_multiple_of_8(res_l^3), 2^T)   hashed iff res_l^3 > size_l
    p = scale_l * x + 0.5,  g = floor(p),  f = p - g   (no clamping)
    corner index = (g0 + g1*res + g2*res^2)  or  (g0*1 ^ g1*2654435761 ^ g2*805459861),
                   both in uint32 arithmetic, then modulo size_l

The +0.5 offset puts corners at ``res_l`` (or -1 outside [0, 1]); tiny-cuda-nn lets the dense
index wrap through the modulo and so do we. tiny-cuda-nn rounds ``scale * x + 0.5`` once (a
fused multiply-add); we evaluate it in float64, where the product of two float32 values is
exact, and round to the input's precision, which gives the same float32 position (barring
double-rounding ties) on every backend. A separate float32 multiply and add would move
positions by up to an ulp, about 5e-4 of a cell at the finest default level.

Backends: ``torch`` (readable, the oracle, any device and dtype), ``compiled`` (the same math
under ``torch.compile``, CUDA only), ``triton`` (hand-written kernels for the forward and both
gradients, ``magic3d.ops.hashgrid_triton``; needs the ``triton`` package, which CUDA builds of
torch ship) and ``tcnn`` (the fused CUDA kernel, optional). ``auto`` resolves, for CUDA
inputs, to ``triton`` when triton imports, else ``compiled``; ``tcnn`` is never chosen
automatically (it must be asked for). CPU inputs always take the torch path, except an
explicit ``triton`` under Triton's interpreter (``TRITON_INTERPRET=1``, for tests).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

Interpolation = Literal["linear", "smoothstep"]
Backend = Literal["auto", "torch", "compiled", "triton", "tcnn"]

# tiny-cuda-nn's "coherent prime" hash factors for x, y, z (1 keeps x-neighbours adjacent).
HASH_PRIMES: tuple[int, int, int] = (1, 2654435761, 805459861)
_UINT32_MASK = 0xFFFFFFFF
_BACKENDS = ("auto", "torch", "compiled", "triton", "tcnn")
_INTERPOLATIONS = ("linear", "smoothstep")
_TCNN_INSTALL_HINT = (
    "install tiny-cuda-nn's torch bindings (pip install "
    "git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch, needs a CUDA "
    "toolkit) or use backend='torch' / 'compiled'"
)


@dataclass(frozen=True)
class HashGridSpec:
    """Configuration plus the per-level layout derived from it (hashable, device-free)."""

    n_levels: int
    n_features_per_level: int
    log2_hashmap_size: int
    base_resolution: int
    per_level_scale: float
    interpolation: Interpolation
    level_scales: tuple[float, ...]  # float32 values, as tiny-cuda-nn computes them
    level_resolutions: tuple[int, ...]  # grid vertices per axis
    level_sizes: tuple[int, ...]  # table entries per level
    level_offsets: tuple[int, ...]  # first entry of each level in the flat table
    level_is_hashed: tuple[bool, ...]

    @classmethod
    def build(
        cls,
        n_levels: int = 16,
        n_features_per_level: int = 2,
        log2_hashmap_size: int = 19,
        base_resolution: int = 16,
        per_level_scale: float = 1.4473,
        interpolation: Interpolation = "linear",
    ) -> "HashGridSpec":
        _validate_config(n_levels, n_features_per_level, log2_hashmap_size, base_resolution,
                         per_level_scale, interpolation)
        # float32 throughout, like tiny-cuda-nn: near-integer scales (e.g. level 14 of the
        # default config, 2829.9988) must round to the same resolution.
        log2_scale = np.log2(np.float32(per_level_scale))
        max_table = 1 << log2_hashmap_size
        scales, resolutions, sizes, offsets, hashed = [], [], [], [], []
        offset = 0
        for level in range(n_levels):
            scale = np.exp2(np.float32(level) * log2_scale) * np.float32(base_resolution) - np.float32(1.0)
            resolution = int(np.ceil(scale)) + 1
            dense_entries = resolution**3
            size = min(-(-dense_entries // 8) * 8, max_table)
            scales.append(float(scale))
            resolutions.append(resolution)
            sizes.append(size)
            offsets.append(offset)
            hashed.append(dense_entries > size)
            offset += size
        return cls(n_levels, n_features_per_level, log2_hashmap_size, base_resolution,
                   float(per_level_scale), interpolation, tuple(scales), tuple(resolutions),
                   tuple(sizes), tuple(offsets), tuple(hashed))

    @property
    def n_entries(self) -> int:
        return self.level_offsets[-1] + self.level_sizes[-1]

    @property
    def n_params(self) -> int:
        return self.n_entries * self.n_features_per_level

    @property
    def n_output_dims(self) -> int:
        return self.n_levels * self.n_features_per_level

    def tcnn_config(self) -> dict[str, Any]:
        """Encoding config for ``tinycudann.Encoding(3, config)`` with this exact layout."""
        return {
            "otype": "HashGrid",
            "n_levels": self.n_levels,
            "n_features_per_level": self.n_features_per_level,
            "log2_hashmap_size": self.log2_hashmap_size,
            "base_resolution": self.base_resolution,
            "per_level_scale": self.per_level_scale,
            "interpolation": "Linear" if self.interpolation == "linear" else "Smoothstep",
        }


def _validate_config(n_levels: int, n_features_per_level: int, log2_hashmap_size: int,
                     base_resolution: int, per_level_scale: float, interpolation: str) -> None:
    if not 1 <= n_levels <= 32:  # tiny-cuda-nn's offset table holds at most 32 levels
        raise ValueError(f"n_levels={n_levels} must be in [1, 32]")
    if n_features_per_level not in (1, 2, 4, 8):
        raise ValueError(f"n_features_per_level={n_features_per_level} must be 1, 2, 4 or 8 "
                         "(the sizes tiny-cuda-nn supports)")
    if not 3 <= log2_hashmap_size <= 30:  # keeps every level's table a multiple of 8 and < 2^31
        raise ValueError(f"log2_hashmap_size={log2_hashmap_size} must be in [3, 30]")
    if base_resolution < 1:
        raise ValueError(f"base_resolution={base_resolution} must be >= 1")
    if not per_level_scale >= 1.0:
        raise ValueError(f"per_level_scale={per_level_scale} must be >= 1")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r} must be one of {_INTERPOLATIONS}")


def spatial_hash(coords: Int[Tensor, "... 3"]) -> Int[Tensor, "..."]:
    """tiny-cuda-nn's coherent prime hash of integer grid coordinates, as uint32 in int64.

    Negative coordinates behave like tiny-cuda-nn's ``(uint32_t)(int)g``: multiplying the
    signed int64 value and keeping the low 32 bits gives the same bits (two's complement),
    without overflowing int64 for |g| < 2^31.
    """
    h = (coords[..., 0] * HASH_PRIMES[0]) ^ (coords[..., 1] * HASH_PRIMES[1]) ^ (coords[..., 2] * HASH_PRIMES[2])
    return h & _UINT32_MASK


@dataclass(frozen=True)
class _LevelTensors:
    scales: Tensor  # (L,) float64 holding the float32 scales exactly
    resolutions: Tensor  # (L,) int64
    sizes: Tensor  # (L,) int64
    offsets: Tensor  # (L,) int64
    is_hashed: Tensor  # (L,) bool


@functools.lru_cache(maxsize=64)
def _level_tensors(spec: HashGridSpec, device: torch.device) -> _LevelTensors:
    # Cached so the per-level constants are uploaded once per device, not on every call.
    def as_tensor(values: tuple, tensor_dtype: torch.dtype) -> Tensor:
        return torch.tensor(values, dtype=tensor_dtype, device=device)

    return _LevelTensors(
        scales=as_tensor(spec.level_scales, torch.float64),
        resolutions=as_tensor(spec.level_resolutions, torch.int64),
        sizes=as_tensor(spec.level_sizes, torch.int64),
        offsets=as_tensor(spec.level_offsets, torch.int64),
        is_hashed=as_tensor(spec.level_is_hashed, torch.bool),
    )


def _positions_and_corners(
    x: Tensor,
    scales: Tensor,
    resolutions: Tensor,
    sizes: Tensor,
    offsets: Tensor,
    is_hashed: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Scaled positions (P, L, 3), their fractional parts (P, L, 3) and the flat-table entries
    of the 8 corners (P, L, 2z, 2y, 2x) int64, so corner k = bx + 2*by + 4*bz.

    Corners are built per axis as (P, L, 2) terms and combined by broadcasting. Separate from
    the gather so that other backends can be checked index for index against this one."""
    # One rounding, like tiny-cuda-nn's fmaf: the float64 product of float32 values is exact.
    pos = (x.to(torch.float64)[:, None, :] * scales[None, :, None] + 0.5).to(x.dtype)  # (P, L, 3)
    cell_f = torch.floor(pos)
    frac = pos - cell_f  # floor carries no gradient: d frac / d x = scale
    cell = cell_f.to(torch.int64)
    step = torch.arange(2, device=x.device, dtype=torch.int64)
    gx, gy, gz = (cell[..., d, None] + step for d in range(3))  # each (P, L, 2)

    res = resolutions[None, :, None]
    dense = (gz * (res * res))[..., :, None, None] + (gy * res)[..., None, :, None] + gx[..., None, None, :]
    hashed = ((gz * HASH_PRIMES[2])[..., :, None, None] ^ (gy * HASH_PRIMES[1])[..., None, :, None]
              ^ (gx * HASH_PRIMES[0])[..., None, None, :])
    index = torch.where(is_hashed[None, :, None, None, None], hashed, dense) & _UINT32_MASK
    index = index % sizes[None, :, None, None, None] + offsets[None, :, None, None, None]
    return pos, frac, index


def _encode_core(
    x: Tensor,
    params: Tensor,
    scales: Tensor,
    resolutions: Tensor,
    sizes: Tensor,
    offsets: Tensor,
    is_hashed: Tensor,
    n_features: int,
    smoothstep: bool,
    int32_index: bool,
) -> Tensor:
    """All levels and all 8 corners at once (see ``_positions_and_corners``)."""
    n_points, n_levels = x.shape[0], scales.shape[0]
    _, frac, index = _positions_and_corners(x, scales, resolutions, sizes, offsets, is_hashed)

    # int32 halves the index tensor kept for backward (measured 5.3 -> 4.8 ms under compile).
    flat_index = index.reshape(-1).to(torch.int32) if int32_index else index.reshape(-1)
    table = params.view(-1, n_features)
    corners = table.index_select(0, flat_index).view(n_points, n_levels, 8, n_features)

    w = frac * frac * (3.0 - 2.0 * frac) if smoothstep else frac
    w = w.to(params.dtype)
    wx, wy, wz = (torch.stack((1.0 - w[..., d], w[..., d]), dim=-1) for d in range(3))  # (P, L, 2)
    weights = wz[..., :, None, None] * wy[..., None, :, None] * wx[..., None, None, :]
    out = (corners * weights.reshape(n_points, n_levels, 8, 1)).sum(dim=2)  # (P, L, F)
    return out.reshape(n_points, n_levels * n_features)


_compiled_core: Callable[..., Tensor] | None = None


def _get_compiled_core() -> Callable[..., Tensor]:
    global _compiled_core
    if _compiled_core is None:
        # dynamic=True: the number of points changes every step (occupancy pruning); compiling
        # for a static size first would only force a second, dynamic compile.
        _compiled_core = torch.compile(_encode_core, dynamic=True)
    return _compiled_core


def _positions(x: Tensor) -> Tensor:
    if x.ndim != 2 or x.shape[-1] != 3:
        raise ValueError(f"hash grid expects points of shape (P, 3) in [0, 1]^3, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"hash grid expects floating-point points, got {x.dtype}")
    # Half precision cannot resolve fine levels (scale ~4096): positions are float32 at least.
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def triton_available(device: torch.device | str = "cuda") -> bool:
    """Whether the triton backend can run for tensors on ``device``: triton imports and the
    device is CUDA (any device under Triton's interpreter)."""
    from magic3d.ops import hashgrid_triton

    try:
        hashgrid_triton.check_device(torch.device(device))
    except ValueError:
        return False
    return True


def resolve_backend(backend: Backend, device: torch.device) -> Literal["torch", "compiled", "triton", "tcnn"]:
    """The backend that runs for inputs on ``device`` when ``backend`` is asked for.

    Fast paths only for CUDA inputs (an explicit triton also under Triton's interpreter);
    ``auto`` on CUDA prefers triton, then compiled, and never picks tcnn by itself."""
    if device.type != "cuda":
        return "triton" if backend == "triton" and triton_available(device) else "torch"
    if backend == "auto":
        from magic3d.ops.hashgrid_triton import triton_importable

        # tiny-cuda-nn builds but crashes on its first forward with torch 2.11 + CUDA 13
        # (REFERENCE.md): tcnn only when asked for. Without triton, compiled is next (its
        # CUDA code generation needs triton too, so it reports the missing install).
        return "triton" if triton_importable() else "compiled"
    return backend


def hashgrid_encode(
    x: Float[Tensor, "P 3"],
    params: Float[Tensor, "N"],
    spec: HashGridSpec,
    backend: Literal["auto", "torch", "compiled", "triton"] = "torch",
) -> Float[Tensor, "P C"]:
    """Functional hash-grid encoding of points in [0, 1]^3; output is level-major
    ``[l0f0, l0f1, l1f0, ...]`` with the dtype of ``params``.

    ``triton`` raises (naming the fix) without triton or for CPU tensors outside Triton's
    interpreter; ``auto`` resolves as ``resolve_backend`` says (torch on CPU)."""
    x = _positions(x)
    if params.shape != (spec.n_params,):
        raise ValueError(f"params must be a flat vector of {spec.n_params} values for this spec, "
                         f"got shape {tuple(params.shape)}")
    if params.device != x.device:
        raise ValueError(f"points are on {x.device} but params are on {params.device}")
    if backend == "auto":
        backend = resolve_backend("auto", x.device)
    if backend == "triton":
        from magic3d.ops.hashgrid_triton import hashgrid_encode_triton

        return hashgrid_encode_triton(x, params, spec)
    levels = _level_tensors(spec, x.device)
    args = (x, params, levels.scales, levels.resolutions, levels.sizes, levels.offsets,
            levels.is_hashed, spec.n_features_per_level, spec.interpolation == "smoothstep",
            spec.n_entries < 2**31)
    if backend == "torch":
        return _encode_core(*args)
    if backend != "compiled":
        raise ValueError(f"hashgrid_encode backend={backend!r} must be 'auto', 'torch', 'compiled' or 'triton'")
    try:
        return _get_compiled_core()(*args)
    except torch.OutOfMemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - any compiler failure gets one clear message
        raise RuntimeError(
            f"torch.compile of the hash-grid encoding failed ({type(error).__name__}: {error}); "
            "use backend='torch' (slower, no compiler needed) or fix the Triton/compiler install"
        ) from error


def tcnn_available() -> bool:
    """Whether tiny-cuda-nn's torch bindings import (they raise without a CUDA device)."""
    try:
        importlib.import_module("tinycudann")
    except Exception:  # noqa: BLE001 - ImportError, EnvironmentError (no GPU), build mismatch
        return False
    return True


class HashGrid(nn.Module):
    """Multiresolution hash-grid encoding of points in [0, 1]^3 (see module docstring).

    ``params`` is one flat vector in tiny-cuda-nn's layout (entry-major within a level, levels
    concatenated), so ``state_dict()`` holds only ``params`` and is interchangeable with a
    ``tinycudann.Encoding`` built from ``spec.tcnn_config()``.
    """

    def __init__(
        self,
        n_levels: int = 16,
        n_features_per_level: int = 2,
        log2_hashmap_size: int = 19,
        base_resolution: int = 16,
        per_level_scale: float = 1.4473,
        interpolation: Interpolation = "linear",
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        if backend not in _BACKENDS:
            raise ValueError(f"backend={backend!r} must be one of {_BACKENDS}")
        if backend == "tcnn" and not tcnn_available():
            raise ValueError(f"backend='tcnn' but tinycudann does not import here: {_TCNN_INSTALL_HINT}")
        if backend == "triton" and not triton_available():
            from magic3d.ops import hashgrid_triton

            hashgrid_triton.check_device(torch.device("cuda"))  # raises, naming what is missing
        self.spec = HashGridSpec.build(n_levels, n_features_per_level, log2_hashmap_size,
                                       base_resolution, per_level_scale, interpolation)
        self.backend = backend
        self.n_output_dims = self.spec.n_output_dims
        self.params = nn.Parameter(torch.empty(self.spec.n_params).uniform_(-1e-4, 1e-4))
        # tcnn modules per CUDA device, kept out of the module tree so state_dict stays {params}.
        self._tcnn_encodings: dict[torch.device, Any] = {}

    level_offsets = property(lambda self: self.spec.level_offsets)
    level_resolutions = property(lambda self: self.spec.level_resolutions)
    level_scales = property(lambda self: self.spec.level_scales)
    level_sizes = property(lambda self: self.spec.level_sizes)
    level_is_hashed = property(lambda self: self.spec.level_is_hashed)

    def resolve_backend(self, device: torch.device) -> Literal["torch", "compiled", "triton", "tcnn"]:
        """The backend a forward on ``device`` uses (module-level ``resolve_backend``)."""
        return resolve_backend(self.backend, device)

    def forward(self, x: Float[Tensor, "P 3"]) -> Float[Tensor, "P C"]:
        x = _positions(x)
        backend = self.resolve_backend(x.device)
        if backend == "tcnn":
            return self._tcnn_forward(x)
        return hashgrid_encode(x, self.params, self.spec, backend=backend)

    def _tcnn_forward(self, x: Tensor) -> Tensor:
        encoding = self._tcnn_encodings.get(x.device)
        if encoding is None:
            import tinycudann

            with torch.cuda.device(x.device):
                encoding = tinycudann.Encoding(3, self.spec.tcnn_config(), dtype=torch.float32)
            if encoding.params.numel() != self.spec.n_params:
                raise RuntimeError(
                    f"tinycudann allocated {encoding.params.numel()} parameters where this layout "
                    f"has {self.spec.n_params}; its HashGrid semantics differ, use backend='compiled'"
                )
            self._tcnn_encodings[x.device] = encoding
        encoding.params = self.params  # share ours; tcnn casts to fp32 and makes it contiguous
        return encoding(x.float()).to(self.params.dtype)

    def __getstate__(self) -> dict[str, Any]:
        # Native tcnn objects do not pickle or deepcopy; they are rebuilt lazily.
        state = self.__dict__.copy()
        state["_tcnn_encodings"] = {}
        return state

    def extra_repr(self) -> str:
        s = self.spec
        return (f"n_levels={s.n_levels}, n_features_per_level={s.n_features_per_level}, "
                f"log2_hashmap_size={s.log2_hashmap_size}, base_resolution={s.base_resolution}, "
                f"per_level_scale={s.per_level_scale}, interpolation={s.interpolation!r}, "
                f"backend={self.backend!r}, n_params={s.n_params}")
