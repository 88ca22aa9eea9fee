"""Triton hash-grid backend against the torch twin: positions and gathered entries bit for bit,
values and both gradients within bounds derived from float32 summation order.

CPU tests run the kernels through Triton's interpreter (``TRITON_INTERPRET=1``, set per test),
so they use few points and levels; the ``gpu`` tests repeat the comparisons compiled on CUDA at
the default 16 x 2 x 2^19 layout.
"""

from __future__ import annotations

import os

import pytest
import torch

from magic3d.ops import hashgrid_triton
from magic3d.ops.hashgrid import (HashGrid, HashGridSpec, _level_tensors, _positions_and_corners, hashgrid_encode,
                                  resolve_backend)

needs_triton = pytest.mark.skipif(not hashgrid_triton.triton_importable(),
                                  reason="triton is not importable (pip install triton, or the magic3d[triton] extra)")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

EPS32 = torch.finfo(torch.float32).eps

# Two dense levels (4^3 = 64 entries, exactly full; 8^3 = 512 in a table of 512) and two hashed
# ones (13^3 and 23^3 vertices > 2^10 entries): both index paths in one spec.
MIXED = dict(n_levels=4, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4, per_level_scale=1.8)
# The test_hashgrid TINY grid: a dense level whose table (32) is larger than the grid (27), so
# the +0.5 offset's corner at g = res wraps modulo 32, and a hashed level.
TINY = dict(n_levels=2, n_features_per_level=2, log2_hashmap_size=5, base_resolution=3, per_level_scale=2.0)


@pytest.fixture
def interpreter(monkeypatch):
    """Triton's CPU interpreter for this test only (the kernels are decorated per flag value)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _spec(interpolation: str = "linear", **layout) -> HashGridSpec:
    return HashGridSpec.build(**{**MIXED, **layout}, interpolation=interpolation)


def _points(n: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """Points in [-0.3, 1.3]^3 (outside the unit cube the grid index wraps), plus the cube's
    corners and centre, where positions land on cell faces."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, generator=generator) * 1.6 - 0.3
    special = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [1.0, 0.0, 1.0]])
    return torch.cat([x, special]).to(device)


def _table(spec: HashGridSpec, seed: int, device: str = "cpu", dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(spec.n_params, generator=generator, dtype=torch.float64) * 2 - 1).to(device, dtype)


def _reference_corners(x: torch.Tensor, spec: HashGridSpec):
    levels = _level_tensors(spec, x.device)
    pos, _, entries = _positions_and_corners(x, levels.scales, levels.resolutions, levels.sizes, levels.offsets,
                                             levels.is_hashed)
    return pos, entries.reshape(x.shape[0], spec.n_levels, 8)


def _forward_backward(x, params, spec, backend, cotangent):
    x = x.clone().requires_grad_(True)
    params = params.clone().requires_grad_(True)
    out = hashgrid_encode(x, params, spec, backend=backend)
    d_x, d_params = torch.autograd.grad(out, (x, params), cotangent)
    return out, d_params, d_x


def _table_grad_bound(x, params, spec, cotangent) -> torch.Tensor:
    """Table gradient: identical products grad_out * weight scattered into each entry, summed
    in another order (atomics; nondeterministic on CUDA). Entry e receiving n_e terms errs by at
    most (n_e - 1) eps sum|terms| per side; sum|terms| is the twin's gradient for |grad_out|."""
    _, entries = _reference_corners(x, spec)
    counts = torch.bincount(entries.reshape(-1), minlength=spec.n_entries)
    counts = counts.repeat_interleave(spec.n_features_per_level).to(params.dtype)
    probe = params.detach().clone().requires_grad_(True)
    (term_sums,) = torch.autograd.grad(hashgrid_encode(x, probe, spec), probe, cotangent.abs())
    return 2 * counts * torch.finfo(params.dtype).eps * term_sums


def _points_grad_bound(x, params, spec, cotangent) -> torch.Tensor:
    """Point gradient: per level, sums over 8 corners x F features of grad_out * value times
    weight factors (grouped otherwise than the twin's autograd), times the smoothstep slope
    (<= 1.5) and the scale; both sides sum the levels in float64. Each side errs by about
    (F + 3 + 7 + 4) eps relative to sum_l scale_l * sum |grad_out| |value| (weights <= 1), so
    48 eps bounds the difference of the two."""
    n_features = spec.n_features_per_level
    _, entries = _reference_corners(x, spec)
    values = params.view(-1, n_features)[entries].abs()  # (P, L, 8, F)
    per_level = (values * cotangent.reshape(-1, spec.n_levels, 1, n_features).abs()).sum(dim=(2, 3))
    scales = torch.tensor(spec.level_scales, dtype=per_level.dtype, device=x.device)
    return 48 * torch.finfo(params.dtype).eps * (per_level * scales).sum(dim=1, keepdim=True)


def _assert_matches_twin(x: torch.Tensor, params: torch.Tensor, spec: HashGridSpec, seed: int) -> None:
    """Forward, d params and d x of the triton backend against the torch twin, each within a
    bound on the difference of two float32 evaluations of the same sums in other orders."""
    generator = torch.Generator().manual_seed(seed)
    cotangent = torch.randn(x.shape[0], spec.n_output_dims, generator=generator).to(x.device, params.dtype)
    out_ref, dp_ref, dx_ref = _forward_backward(x, params, spec, "torch", cotangent)
    out, dp, dx = _forward_backward(x, params, spec, "triton", cotangent)
    eps = torch.finfo(params.dtype).eps

    # Forward: both sides form the same float products value * weight (the weights are the same
    # bits: same positions, same operation order) and sum 8 of them per level in another order
    # (and, on CUDA, with fused multiply-adds). Each order errs by at most 7 eps sum|terms|,
    # and sum|terms| is the encoding of |table|, since the weights are >= 0.
    magnitude = hashgrid_encode(x, params.abs(), spec)
    assert ((out - out_ref).abs() <= 16 * eps * magnitude).all()

    assert ((dp - dp_ref).abs() <= _table_grad_bound(x, params, spec, cotangent)).all()

    assert ((dx - dx_ref).abs() <= _points_grad_bound(x, params, spec, cotangent)).all()


@needs_triton
@pytest.mark.parametrize("layout", [MIXED, TINY], ids=["mixed", "tiny"])
def test_positions_and_entries_equal_the_twin_bit_for_bit(interpreter, layout):
    spec = HashGridSpec.build(**layout)
    assert False in spec.level_is_hashed and True in spec.level_is_hashed  # both index paths
    x = _points(300, seed=0)
    pos, entries = hashgrid_triton.corner_entries(x, spec)
    pos_ref, entries_ref = _reference_corners(x, spec)
    # The one-rounding rule (float64 product, + 0.5, one rounding) must give the same bits, and
    # then the uint32 hash / dense index, the modulo and the level offsets the same entries.
    assert torch.equal(pos, pos_ref)
    assert torch.equal(entries, entries_ref)


@needs_triton
@pytest.mark.parametrize("base_resolution, extent", [(2, 5.0e9), (4096, 4.0e6)], ids=["dense", "hashed"])
def test_entries_wrap_for_far_points(interpreter, base_resolution, extent):
    # Cells beyond +-2^31: the twin wraps its int64 products and dense sums modulo 2^32; the
    # kernel must wrap its uint32 cells the same way, not saturate a float -> int32 conversion.
    spec = HashGridSpec.build(n_levels=2, log2_hashmap_size=10, base_resolution=base_resolution, per_level_scale=2.0)
    assert all(spec.level_is_hashed) == (base_resolution == 4096) and any(spec.level_is_hashed) == all(spec.level_is_hashed)
    x = extent * torch.tensor([[0.25, -0.25, 0.075], [-0.625, 0.175, -0.225], [1.0, 1.0, -1.0], [0.3, -1.0, 0.9]])
    pos, entries = hashgrid_triton.corner_entries(x, spec)
    pos_ref, entries_ref = _reference_corners(x, spec)
    assert torch.equal(pos, pos_ref)
    assert torch.equal(entries, entries_ref)


@needs_triton
@pytest.mark.parametrize("interpolation", ["linear", "smoothstep"])
@pytest.mark.parametrize("layout", [MIXED, TINY], ids=["mixed", "tiny"])
def test_forward_and_gradients_match_the_twin(interpreter, interpolation, layout):
    spec = HashGridSpec.build(**layout, interpolation=interpolation)
    _assert_matches_twin(_points(200, seed=1), _table(spec, seed=2), spec, seed=3)


@needs_triton
@pytest.mark.parametrize("n_features", [1, 4, 8])
def test_other_feature_counts(interpreter, n_features):
    spec = _spec(n_features_per_level=n_features, n_levels=2)
    _assert_matches_twin(_points(64, seed=4), _table(spec, seed=5), spec, seed=6)


@needs_triton
def test_float64_table_and_points(interpreter):
    # The kernels take their arithmetic types from the pointers, like the twin from its tensors.
    spec = _spec("smoothstep")
    _assert_matches_twin(_points(64, seed=7).double(), _table(spec, seed=8, dtype=torch.float64), spec, seed=9)


@needs_triton
def test_empty_batch(interpreter):
    spec = _spec()
    x = torch.zeros(0, 3, requires_grad=True)
    params = _table(spec, seed=10).requires_grad_(True)
    out = hashgrid_encode(x, params, spec, backend="triton")
    assert out.shape == (0, spec.n_output_dims)
    d_x, d_params = torch.autograd.grad(out.sum(), (x, params))
    assert d_x.shape == (0, 3) and torch.equal(d_params, torch.zeros_like(params))


@needs_triton
def test_only_the_requested_gradient(interpreter):
    spec = _spec()
    params = _table(spec, seed=11).requires_grad_(True)
    x = _points(32, seed=12)
    cotangent = torch.ones(x.shape[0], spec.n_output_dims)
    (d_params,) = torch.autograd.grad(hashgrid_encode(x, params, spec, backend="triton"), params, cotangent)
    reference = params.detach().clone().requires_grad_(True)
    (d_ref,) = torch.autograd.grad(hashgrid_encode(x, reference, spec), reference, cotangent)
    # the kernel for d x is skipped (x needs no gradient); d params as in the full comparison
    assert ((d_params - d_ref).abs() <= _table_grad_bound(x, params, spec, cotangent)).all()


@needs_triton
@pytest.mark.parametrize("layout", ["expanded", "transposed", "sliced"])
def test_strided_cotangents(interpreter, layout):
    # The backward reads the cotangent through its strides (no copy): out.sum() gives an
    # expanded one (strides 0), a consumer of out.t() a transposed one, a split a slice.
    spec = _spec("smoothstep")
    x, params = _points(40, seed=16), _table(spec, seed=17)
    n, c = x.shape[0], spec.n_output_dims
    base = torch.randn(2 * c, n, generator=torch.Generator().manual_seed(18))
    cotangent = {"expanded": torch.ones(1, 1).expand(n, c), "transposed": base[:c].t(),
                 "sliced": base.t()[:, 5:5 + c]}[layout]
    assert not cotangent.is_contiguous()
    out_ref, dp_ref, dx_ref = _forward_backward(x, params, spec, "torch", cotangent.contiguous())
    out, dp, dx = _forward_backward(x, params, spec, "triton", cotangent)
    # as in the full comparison: same products, other summation orders
    assert ((dp - dp_ref).abs() <= _table_grad_bound(x, params, spec, cotangent.contiguous())).all()
    assert ((dx - dx_ref).abs() <= _points_grad_bound(x, params, spec, cotangent.contiguous())).all()


@needs_triton
def test_module_runs_triton_under_the_interpreter(interpreter):
    grid = HashGrid(**MIXED, backend="triton")
    reference = HashGrid(**MIXED, backend="torch")
    reference.load_state_dict(grid.state_dict())
    assert grid.resolve_backend(torch.device("cpu")) == "triton"
    x = _points(50, seed=13)
    # Same weighted sums in another order; init values are <= 1e-4, weights sum to 1 per level
    torch.testing.assert_close(grid(x), reference(x), rtol=0, atol=16 * EPS32 * 1e-4)
    assert HashGrid(**MIXED, backend="auto").resolve_backend(torch.device("cpu")) == "torch"


@needs_triton
def test_triton_on_cpu_without_the_interpreter_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    spec = _spec()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1") as error:
        hashgrid_encode(torch.rand(4, 3), _table(spec, seed=14), spec, backend="triton")
    assert "\n" not in str(error.value)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA device"):
            HashGrid(**MIXED, backend="triton")
    # An explicit triton falls back to torch for CPU inputs of a module, like compiled and tcnn.
    assert resolve_backend("triton", torch.device("cpu")) == "torch"


@needs_triton
def test_kernels_are_decorated_per_interpreter_flag(monkeypatch):
    # One session can hold both kinds (CPU tests interpreted, CUDA compiled); building them
    # leaves the user's flag as it was.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    interpreted, compiled = hashgrid_triton._kernels(True), hashgrid_triton._kernels(False)
    assert type(interpreted.forward_kernel).__name__ == "InterpretedFunction"
    assert type(compiled.forward_kernel).__name__ == "JITFunction"
    assert os.environ["TRITON_INTERPRET"] == "1" and hashgrid_triton.interpreter_enabled()


def _compile_for_h100_class(fn, pointers: dict, scalars: dict, constexprs: dict):
    """Ahead-of-time compile to an sm_90 cubin on this machine (no GPU needed: Triton ships
    ptxas), with the specialisations a launch would get (16-byte aligned pointers, the row
    stride divisible by 16, a unit feature stride)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**pointers, **scalars, **{name: "constexpr" for name in constexprs}}
    aligned = [*pointers, *(name for name in scalars if name == "grad_stride_p")]
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=hashgrid_triton.LAUNCH_OPTIONS)


@needs_triton
@pytest.mark.parametrize("interpolation", ["linear", "smoothstep"])
def test_kernels_compile_for_the_gpu(interpolation, monkeypatch, tmp_path):
    # The interpreter never runs Triton's code generator, so a kernel can pass every CPU test
    # and still fail to compile; this compiles the default layout's kernels for sm_90. An
    # interpreted launch first, and an empty cache, so the compile really happens after the
    # interpreter ran in this process (both kinds must coexist; see hashgrid_triton_kernels).
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    spec = _spec(n_levels=2)
    hashgrid_encode(_points(4, seed=19), _table(spec, seed=19), spec, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    kernels = hashgrid_triton._kernels(False)
    levels = {"scales_ptr": "*fp64", "meta_ptr": "*i64"}
    layout = {"N_LEVELS": 16, "F": 2, "SMOOTH": interpolation == "smoothstep", "INDEX64": False,
              "BLOCK": hashgrid_triton.BLOCK_FORWARD}
    backward = {"n_points": "i32", "grad_stride_p": "i32"}
    forward = _compile_for_h100_class(kernels.forward_kernel, {"x_ptr": "*fp32", "table_ptr": "*fp32",
                                                               "out_ptr": "*fp32", **levels}, {"n_points": "i32"}, layout)
    table = _compile_for_h100_class(kernels.backward_table_kernel, {"x_ptr": "*fp32", "grad_out_ptr": "*fp32",
                                                                    "grad_table_ptr": "*fp32", **levels},
                                    backward, {**layout, "grad_stride_c": 1})
    points = _compile_for_h100_class(kernels.backward_points_kernel, {"x_ptr": "*fp32", "table_ptr": "*fp32",
                                                                      "grad_out_ptr": "*fp32", "grad_x_ptr": "*fp32",
                                                                      **levels}, backward, {**layout, "grad_stride_c": 1})
    # Each corner is one 8-byte gather of both features, and the table gradient a fire-and-
    # forget vector reduction (red, not atom: nothing read back; relaxed: no fences).
    assert "ld.global.v2.b32" in forward.asm["ptx"] and "ld.global.v2.b32" in points.asm["ptx"]
    assert "red.global.gpu.relaxed.add.v2.f32" in table.asm["ptx"] and "atom.global" not in table.asm["ptx"]


@needs_triton
def test_interpreter_works_after_triton_was_imported_compiled():
    # torch's inductor (or anything) may import triton first with the interpreter off; the
    # interpreted kernels must not depend on triton's own @jit library decorated in that mode.
    import subprocess
    import sys

    code = """
import os, torch, triton.language
os.environ["TRITON_INTERPRET"] = "1"
from magic3d.ops.hashgrid import HashGridSpec, hashgrid_encode
spec = HashGridSpec.build(n_levels=2, log2_hashmap_size=6, base_resolution=3, per_level_scale=2.0)
x = torch.rand(5, 3, requires_grad=True)
params = torch.rand(spec.n_params, requires_grad=True)
out = hashgrid_encode(x, params, spec, backend="triton")
torch.autograd.grad(out.sum(), (x, params))
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]


def test_missing_triton_is_a_one_line_error_naming_the_install(monkeypatch):
    monkeypatch.setattr(hashgrid_triton, "triton_importable", lambda: False)
    with pytest.raises(ValueError, match="pip install triton") as error:
        HashGrid(**MIXED, backend="triton")
    assert "\n" not in str(error.value)
    spec = _spec()
    with pytest.raises(ValueError, match="pip install triton"):
        hashgrid_encode(torch.rand(4, 3), _table(spec, seed=15), spec, backend="triton")


def test_auto_precedence_on_cuda(monkeypatch):
    cuda_device = torch.device("cuda", 0)  # only resolved here, no tensor is made on it
    monkeypatch.setattr(hashgrid_triton, "triton_importable", lambda: True)
    assert resolve_backend("auto", cuda_device) == "triton"
    monkeypatch.setattr(hashgrid_triton, "triton_importable", lambda: False)
    assert resolve_backend("auto", cuda_device) == "compiled"
    # tcnn only when asked for, and an explicit choice is kept
    for backend in ("torch", "compiled", "triton", "tcnn"):
        assert resolve_backend(backend, cuda_device) == backend
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_benchmark_times_triton_beside_the_others(monkeypatch):
    from magic3d.ops import hashgrid_bench

    monkeypatch.setattr(hashgrid_bench, "tcnn_available", lambda: False)
    monkeypatch.setattr(hashgrid_bench, "triton_importable", lambda: True)
    assert hashgrid_bench.default_backends("cuda") == ["torch", "compiled", "triton"]
    assert hashgrid_bench.default_backends("cpu") == ["torch"]


def test_module_imports_without_triton_and_defers_it():
    # Importing the backend module must not import triton (CI installs no triton).
    import subprocess
    import sys

    code = ("import sys; import magic3d.ops.hashgrid, magic3d.ops.hashgrid_triton; "
            "print('triton' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# --- on the GPU (make test-gpu) ---


@pytest.mark.gpu
@cuda
@needs_triton
@pytest.mark.parametrize("interpolation", ["linear", "smoothstep"])
def test_matches_the_twin_on_gpu(interpolation):
    spec = HashGridSpec.build(interpolation=interpolation)  # 16 levels x 2 features, 2^19 table
    x = torch.rand(2**16, 3, generator=torch.Generator().manual_seed(20)).cuda()
    x = torch.cat([x, x[:4096] * 1.6 - 0.3])  # some outside the unit cube
    params = _table(spec, seed=21, device="cuda")
    pos, entries = hashgrid_triton.corner_entries(x, spec)
    pos_ref, entries_ref = _reference_corners(x, spec)
    assert torch.equal(pos, pos_ref)  # same one-rounding rule on the GPU
    assert torch.equal(entries, entries_ref)
    _assert_matches_twin(x, params, spec, seed=22)


@pytest.mark.gpu
@cuda
@needs_triton
def test_forward_and_point_gradient_are_deterministic_on_gpu():
    spec = HashGridSpec.build(interpolation="smoothstep")
    x = torch.rand(2**16, 3, device="cuda")
    params = _table(spec, seed=23, device="cuda")
    cotangent = torch.randn(2**16, spec.n_output_dims, device="cuda")
    first = _forward_backward(x, params, spec, "triton", cotangent)
    second = _forward_backward(x, params, spec, "triton", cotangent)
    # No atomics in the forward or the point gradient: bit-identical runs. The table gradient
    # (atomics) may differ in the last bits; its bound is checked against the twin above.
    assert torch.equal(first[0], second[0]) and torch.equal(first[2], second[2])


@pytest.mark.gpu
@cuda
@needs_triton
def test_module_auto_picks_triton_on_gpu():
    grid = HashGrid(backend="auto").cuda()
    assert grid.resolve_backend(torch.device("cuda")) == "triton"
    out = grid(torch.rand(1000, 3, device="cuda"))
    assert out.shape == (1000, 32) and torch.isfinite(out).all()
