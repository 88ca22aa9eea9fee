"""Hash-grid encoding: tiny-cuda-nn layout, hand-computed lookups, gradients, GPU backends."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from magic3d.ops.hashgrid import HashGrid, HashGridSpec, hashgrid_encode, spatial_hash, tcnn_available
from magic3d.ops.hashgrid_bench import benchmark_hashgrid

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Tiny grid: level 0 dense (3^3 = 27 vertices in a table rounded up to 32, so the +0.5 offset's
# corner at g = 3 wraps modulo 32, not 27), level 1 hashed (6^3 = 216 > 2^5 = 32 entries).
TINY = dict(n_levels=2, n_features_per_level=2, log2_hashmap_size=5, base_resolution=3, per_level_scale=2.0)
# (scale, resolution, table size, entry offset, hashed), worked out by hand from TINY:
# scale_l = 2^l * 3 - 1, res = ceil(scale) + 1, size = min(next multiple of 8 of res^3, 32).
TINY_LEVELS = [(2.0, 3, 32, 0, False), (5.0, 6, 32, 32, True)]


def hand_encode(point: tuple[float, float, float], params: list[float], smoothstep: bool = False,
                levels=TINY_LEVELS, n_features=2) -> list[float]:
    """Independent scalar re-statement of tiny-cuda-nn's lookup (plain Python ints and floats)."""
    out = []
    for scale, res, size, offset, hashed in levels:
        pos = [scale * xd + 0.5 for xd in point]
        cell = [math.floor(p) for p in pos]
        frac = [p - c for p, c in zip(pos, cell)]
        if smoothstep:
            frac = [f * f * (3.0 - 2.0 * f) for f in frac]
        acc = [0.0] * n_features
        for bits in itertools.product((0, 1), repeat=3):
            c = [cell[d] + bits[d] for d in range(3)]
            weight = 1.0
            for d in range(3):
                weight *= frac[d] if bits[d] else 1.0 - frac[d]
            if hashed:
                index = (c[0] * 1) ^ (c[1] * 2654435761) ^ (c[2] * 805459861)
            else:
                index = c[0] + c[1] * res + c[2] * res * res
            index = (index % 2**32) % size
            for f in range(n_features):
                acc[f] += weight * params[(offset + index) * n_features + f]
        out.extend(acc)
    return out


def tiny_grid(**overrides) -> HashGrid:
    return HashGrid(**{**TINY, "backend": "torch", **overrides})


def test_default_config_matches_tcnn_parameter_count():
    spec = HashGridSpec.build()  # 16 levels, F=2, T=19, N0=16, b=1.4473 (REFERENCE.md)
    assert spec.n_entries == 6_299_960
    assert spec.n_params == 12_599_920
    assert spec.n_output_dims == 32
    assert spec.level_resolutions[0] == 16 and spec.level_resolutions[-1] == 4098
    assert spec.level_is_hashed == (False,) * 5 + (True,) * 11
    # float32 derivation puts level 14 at 2829.9988 (float64 would give 2829.9999); both -> 2831
    assert spec.level_resolutions[14] == 2831
    assert HashGrid(backend="torch").params.numel() == 12_599_920


def test_tiny_spec_matches_hand_layout():
    spec = tiny_grid().spec
    assert spec.level_scales == (2.0, 5.0)
    assert spec.level_resolutions == (3, 6)
    assert spec.level_sizes == (32, 32)
    assert spec.level_offsets == (0, 32)
    assert spec.level_is_hashed == (False, True)
    assert spec.n_params == 128


def test_spatial_hash_hand_values():
    coords = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1],
                           [-1, 0, 0], [0, -1, 0], [0, 2, 0], [7, 11, 13]])
    expected = [
        0,
        1,
        2654435761,  # 0x9E3779B1
        805459861,  # 0x30025795
        2922720805,  # 1 ^ 0x9E3779B1 ^ 0x30025795 = 0xAE352E25 (no wrap needed)
        4294967295,  # (uint32)(-1)
        1640531535,  # 2^32 - 2654435761
        1013904226,  # 2 * 2654435761 - 2^32
        3162261517,  # 7 ^ (11 * 2654435761 mod 2^32) ^ (13 * 805459861 mod 2^32)
    ]
    assert spatial_hash(coords).tolist() == expected


def test_lookup_at_origin_worked_by_hand():
    grid = tiny_grid()
    grid.params.data = torch.arange(128, dtype=torch.float64).float()  # entry e, feature f -> 2e + f
    out = grid(torch.zeros(1, 3))
    # Every level: p = 0.5, g = 0, f = 0.5, so all 8 corners weigh 1/8.
    # Level 0 dense corners c0 + 3 c1 + 9 c2: {0, 1, 3, 4, 9, 10, 12, 13}, mean 6.5 -> (13, 14).
    # Level 1 hashed corners, low 5 bits of c0 ^ 17 c1 ^ 21 c2 (2654435761 = 17 mod 32,
    # 805459861 = 21 mod 32): {0, 1, 17, 16, 21, 20, 4, 5}, mean 10.5 -> entry 42.5 -> (85, 86).
    assert out.tolist() == [[13.0, 14.0, 85.0, 86.0]]  # exact: dyadic values in float32


def test_dense_corner_wraps_modulo_table_size():
    grid = tiny_grid()
    grid.params.data = torch.arange(128, dtype=torch.float32)
    out = grid(torch.ones(1, 3))
    # Level 0 at x = 1: p = 2.5, g = 2, corners 2..3 (3 = res is outside the grid): dense
    # indices 26, 27, 29, 30, 35, 36, 38, 39, taken mod 32 -> 26, 27, 29, 30, 3, 4, 6, 7; mean 16.5.
    assert out[0, :2].tolist() == [33.0, 34.0]


@pytest.mark.parametrize("interpolation", ["linear", "smoothstep"])
def test_matches_hand_computation_at_chosen_points(interpolation):
    grid = tiny_grid(interpolation=interpolation).double()
    torch.manual_seed(0)
    grid.params.data = torch.randn(128, dtype=torch.float64)
    points = [(0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (0.3, 0.7, 0.95), (0.123, 0.456, 0.789),
              (0.999, 0.001, 0.5), (-0.2, 1.3, 0.5)]  # the last one is outside [0,1]: no clamping
    out = grid(torch.tensor(points, dtype=torch.float64))
    smooth = interpolation == "smoothstep"
    expected = torch.tensor([hand_encode(p, grid.params.tolist(), smooth) for p in points], dtype=torch.float64)
    # float64 on both sides, sums of 8 products in a different order: agreement to a few ulps
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_output_is_level_major_and_partition_of_unity():
    grid = HashGrid(n_levels=4, n_features_per_level=2, log2_hashmap_size=8, base_resolution=4,
                    per_level_scale=1.5, backend="torch")
    table = grid.params.data.view(-1, 2)
    for level, (offset, size) in enumerate(zip(grid.level_offsets, grid.spec.level_sizes)):
        table[offset:offset + size, 0] = level
        table[offset:offset + size, 1] = 100 + level
    out = grid(torch.rand(64, 3))
    # constant per-level tables: weights sum to 1, so the output is exact up to float32 rounding
    expected = torch.tensor([0, 100, 1, 101, 2, 102, 3, 103], dtype=torch.float32).expand(64, -1)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-5)


def test_default_init_and_state_dict():
    grid = tiny_grid()
    assert grid.params.abs().max() <= 1e-4
    assert list(grid.state_dict()) == ["params"]  # same key and layout as tinycudann.Encoding
    other = tiny_grid()
    other.load_state_dict(grid.state_dict())
    x = torch.rand(16, 3)
    assert torch.equal(other(x), grid(x))
    assert torch.equal(copy.deepcopy(grid)(x), grid(x))


def _interior_points(spec: HashGridSpec, n: int, margin: float, seed: int) -> torch.Tensor:
    """Random points whose fractional cell coordinates keep `margin` from every cell face in
    every level, so finite differences never straddle a kink of the linear interpolation."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(4 * n, 3, generator=generator, dtype=torch.float64)
    keep = torch.ones(4 * n, dtype=torch.bool)
    for scale in spec.level_scales:
        frac = torch.frac(x * scale + 0.5)
        keep &= ((frac > margin) & (frac < 1 - margin)).all(dim=1)
    return x[keep][:n]


@pytest.mark.parametrize("interpolation", ["linear", "smoothstep"])
def test_gradcheck_params_and_points(interpolation):
    grid = tiny_grid(interpolation=interpolation).double()
    with torch.no_grad():
        grid.params.normal_()
    x = _interior_points(grid.spec, 6, margin=1e-3, seed=2).requires_grad_(True)
    assert x.shape[0] == 6
    params = grid.params.detach().clone().requires_grad_(True)
    # float64 with default eps 1e-6: the margin keeps perturbed points inside their cells
    assert torch.autograd.gradcheck(lambda p, q: hashgrid_encode(q, p, grid.spec), (params, x))


def test_gradcheck_for_points_outside_unit_cube():
    grid = tiny_grid().double()
    x = torch.tensor([[-0.31, 1.27, 0.55]], dtype=torch.float64, requires_grad=True)
    params = grid.params.detach().clone().normal_().requires_grad_(True)
    # outside [0,1]^3 the grid still interpolates (negative corners hash as uint32)
    assert torch.autograd.gradcheck(lambda p, q: hashgrid_encode(q, p, grid.spec), (params, x))


def test_continuity_under_tiny_input_changes():
    grid = HashGrid(n_levels=6, log2_hashmap_size=12, base_resolution=8, per_level_scale=1.6, backend="torch")
    with torch.no_grad():
        grid.params.uniform_(-1, 1)
    torch.manual_seed(3)
    x = torch.rand(512, 3, dtype=torch.float64)
    delta = 1e-7 * torch.randn_like(x)
    grid = grid.double()
    change = (grid(x + delta) - grid(x)).abs()
    # Lipschitz bound of trilinear interpolation per level: |dy| <= scale * |dx|_1 * max|v_i - v_j|
    # (<= 2 for params in [-1, 1]); continuity across cell faces is what this checks.
    scales = torch.tensor(grid.level_scales, dtype=torch.float64).repeat_interleave(2)
    bound = 2 * scales * delta.abs().sum(dim=1, keepdim=True) + 1e-12
    assert (change <= bound).all()


def test_compiled_and_tcnn_fall_back_to_torch_on_cpu():
    torch.manual_seed(4)
    grid = tiny_grid(backend="compiled")
    assert grid.resolve_backend(torch.device("cpu")) == "torch"
    x = torch.rand(8, 3)
    assert torch.equal(grid(x), hashgrid_encode(x, grid.params, grid.spec))


def test_input_validation():
    grid = tiny_grid()
    with pytest.raises(ValueError, match=r"\(P, 3\)"):
        grid(torch.rand(4, 2))
    with pytest.raises(ValueError, match=r"\(P, 3\)"):
        grid(torch.rand(3))
    with pytest.raises(ValueError, match="floating-point"):
        grid(torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="backend"):
        HashGrid(backend="cuda")
    with pytest.raises(ValueError, match="interpolation"):
        HashGrid(interpolation="cubic")
    with pytest.raises(ValueError, match="n_features_per_level"):
        HashGrid(n_features_per_level=3)
    with pytest.raises(ValueError, match="params"):
        hashgrid_encode(torch.rand(4, 3), torch.zeros(5), grid.spec)


@pytest.mark.skipif(tcnn_available(), reason="tinycudann is importable here")
def test_tcnn_backend_without_tinycudann_is_a_clear_error():
    with pytest.raises(ValueError, match="tinycudann"):
        HashGrid(backend="tcnn")


def test_benchmark_runs_on_cpu():
    result = benchmark_hashgrid(n_points=256, device="cpu", backend="torch", iters=1, warmup=0,
                                n_levels=2, log2_hashmap_size=10)
    assert result.backend == "torch" and result.n_points == 256 and result.ms > 0


def _forward_backward(grid: HashGrid, x: torch.Tensor, cotangent: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = grid(x)
    d_params, d_x = torch.autograd.grad(out, (grid.params, x), cotangent)
    return out, d_params, d_x


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("interpolation", ["linear", "smoothstep"])
@pytest.mark.parametrize("fast", ["compiled", "tcnn"])
def test_fast_backend_matches_torch_on_gpu(interpolation, fast):
    if fast == "tcnn" and not tcnn_available():
        pytest.skip("tinycudann not importable")
    torch.manual_seed(5)
    reference = HashGrid(interpolation=interpolation, backend="torch").cuda()
    with torch.no_grad():
        reference.params.uniform_(-1, 1)
    candidate = HashGrid(interpolation=interpolation, backend=fast).cuda()
    candidate.load_state_dict(reference.state_dict())
    x = torch.rand(2**16, 3, device="cuda")
    cotangent = torch.randn(2**16, reference.n_output_dims, device="cuda")
    out_ref, dp_ref, dx_ref = _forward_backward(reference, x, cotangent)
    out, dp, dx = _forward_backward(candidate, x, cotangent)
    # Forward: positions round identically on every backend (one rounding of scale*x+0.5), so
    # what differs is the order and contraction of float32 sums of 8 weighted values in
    # [-1, 1]: a few ulps of O(1) values.
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    # Table gradient: atomic scatter-adds in a different order; the densest coarse-level entries
    # sum ~2^16/16^3 * 8 ~ 128 cotangent products, so errors reach ~1e-5 on values of O(10).
    torch.testing.assert_close(dp, dp_ref, rtol=1e-4, atol=1e-4)
    # Point gradient: up to scale ~4096 times differences of interpolated values; float32 error
    # grows with the scale, hence a relative tolerance.
    torch.testing.assert_close(dx, dx_ref, rtol=1e-3, atol=1e-2)
