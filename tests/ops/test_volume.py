"""Volume rendering ops: ray-box intersection, occupancy grid, marching, compositing."""

from __future__ import annotations

import math

import pytest
import torch

from magic3d.ops.volume import (
    OccupancyGrid,
    composite,
    composite_reference,
    march_step_size,
    ray_aabb_intersect,
    sample_along_rays,
)

# ----------------------------------------------------------------------------- ray / box


def test_ray_aabb_hand_picked_rays():
    s3 = math.sqrt(3.0)
    origins = torch.tensor(
        [
            [-3.0, 0.0, 0.0],  # straight through along +x
            [0.0, 0.0, 0.0],  # starts inside
            [-3.0, 2.0, 0.0],  # passes beside the box
            [3.0, 0.0, 0.0],  # box is behind the origin
            [-2.0, -2.0, -2.0],  # along the main diagonal
            [0.5, 0.5, 5.0],  # straight down, axis-aligned (two zero components)
        ]
    )
    dirs = torch.tensor(
        [[1.0, 0, 0], [0, 0, 1.0], [1.0, 0, 0], [1.0, 0, 0], [1 / s3, 1 / s3, 1 / s3], [0, 0, -1.0]]
    )
    near, far, hit = ray_aabb_intersect(origins, dirs, radius=1.0)
    assert hit.tolist() == [True, True, False, False, True, True]
    # float32 slab arithmetic on O(1) numbers: a few ulps.
    torch.testing.assert_close(near[hit], torch.tensor([2.0, 0.0, s3, 4.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(far[hit], torch.tensor([4.0, 1.0, 3 * s3, 6.0]), atol=1e-5, rtol=0)
    assert torch.isfinite(near).all()


def test_ray_aabb_respects_radius():
    near, far, hit = ray_aabb_intersect(torch.tensor([[0.0, 0.0, -5.0]]), torch.tensor([[0.0, 0.0, 1.0]]), 0.5)
    assert hit.item() and near.item() == pytest.approx(4.5) and far.item() == pytest.approx(5.5)


# ----------------------------------------------------------------------------- compositing


def _dense_problem(dtype, seed=0, rays=6, samples=9, channels=3):
    """Random dense samples with a random subset dropped (plus one ray with no samples)."""
    g = torch.Generator().manual_seed(seed)
    density = torch.rand(rays, samples, generator=g, dtype=dtype) * 4.0
    delta = torch.rand(rays, samples, generator=g, dtype=dtype) * 0.3 + 0.01
    values = torch.rand(rays, samples, channels, generator=g, dtype=dtype)
    keep = torch.rand(rays, samples, generator=g) > 0.3
    keep[2] = False  # a ray whose every sample was skipped
    return density, delta, values, keep


def _pack(density, delta, values, keep):
    ray, sample = keep.nonzero(as_tuple=True)
    return density[ray, sample], delta[ray, sample], values[ray, sample], ray


def test_composite_matches_dense_reference_forward_and_backward():
    density, delta, values, keep = _dense_problem(torch.float64)
    density.requires_grad_(True)
    values.requires_grad_(True)
    # A skipped sample is a zero-density sample for the reference.
    ref = composite_reference(density * keep, delta, values)
    d, dl, v, ray = _pack(density, delta, values, keep)
    out = composite(d, dl, ray, density.shape[0], values=[v])

    weights_dense = torch.zeros_like(ref.weights).index_put((ray, keep.nonzero()[:, 1]), out.weights)
    # float64 throughout; the two formulas (cumsum in log space vs cumprod) agree to rounding.
    torch.testing.assert_close(weights_dense, ref.weights, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out.opacity, ref.opacity, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out.values[0], ref.values[0], atol=1e-12, rtol=1e-10)
    assert out.opacity[2] == 0 and (out.values[0][2] == 0).all()

    g = torch.Generator().manual_seed(1)
    cot_opacity = torch.randn(ref.opacity.shape, generator=g, dtype=torch.float64)
    cot_values = torch.randn(ref.values[0].shape, generator=g, dtype=torch.float64)
    grads_ref = torch.autograd.grad(
        (ref.opacity * cot_opacity).sum() + (ref.values[0] * cot_values).sum(), (density, values)
    )
    grads = torch.autograd.grad(
        (out.opacity * cot_opacity).sum() + (out.values[0] * cot_values).sum(), (density, values)
    )
    # Only kept samples exist in the packed problem; for them the gradients must agree.
    torch.testing.assert_close(grads[0][keep], grads_ref[0][keep], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grads[1][keep], grads_ref[1][keep], atol=1e-12, rtol=1e-10)
    assert (grads[0][~keep] == 0).all()


def test_composite_reproduces_nerfaccs_documented_example():
    """The example in nerfacc's ``render_weight_from_density`` docstring (nerfstudio-project/
    nerfacc, ``nerfacc/volrend.py``, commit 03a8a78; also on nerfacc.com under
    ``nerfacc.render_weight_from_density``): seven unit-length samples on three rays, with the
    weights, transmittances and alphas it prints. An independent implementation's public
    numbers, not ours: same formula, w_i = T_i (1 - exp(-sigma_i delta_i)),
    T_i = exp(-sum_{j<i} sigma_j delta_j)."""
    t_starts = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    t_ends = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    sigmas = torch.tensor([0.4, 0.8, 0.1, 0.8, 0.1, 0.0, 0.9])
    ray_indices = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    documented_weights = torch.tensor([0.33, 0.37, 0.03, 0.55, 0.04, 0.00, 0.59])
    documented_transmittance = torch.tensor([1.00, 0.67, 0.30, 1.00, 0.45, 1.00, 1.00])
    documented_alphas = torch.tensor([0.33, 0.55, 0.095, 0.55, 0.095, 0.00, 0.59])

    out = composite(sigmas, t_ends - t_starts, ray_indices, 3)
    # nerfacc prints two decimals (three for 0.095): agreement to half the last printed digit.
    torch.testing.assert_close(out.weights, documented_weights, atol=0.005, rtol=0)
    # What ray i has absorbed before sample i is the sum of its earlier weights, so
    # T_i = 1 - that sum, and alpha_i = w_i / T_i.
    transmittance = torch.stack([1.0 - out.weights[:i][ray_indices[:i] == ray_indices[i]].sum() for i in range(7)])
    torch.testing.assert_close(transmittance, documented_transmittance, atol=0.005, rtol=0)
    alphas = out.weights / transmittance
    printed_digits = torch.tensor([2, 2, 3, 2, 3, 2, 2])
    assert ((alphas - documented_alphas).abs() <= 0.5 * 10.0 ** -printed_digits.float()).all(), alphas
    # Opacity is the weights' sum per ray (three rounded weights: 0.015 at most).
    torch.testing.assert_close(out.opacity, torch.stack([documented_weights[:3].sum(), documented_weights[3:5].sum(),
                                                         documented_weights[5:].sum()]), atol=0.015, rtol=0)
    # The dense textbook reference gives the same weights (ray 1 padded with a zero density).
    dense_sigma = torch.tensor([[0.4, 0.8, 0.1], [0.8, 0.1, 0.0], [0.0, 0.9, 0.0]])
    ref = composite_reference(dense_sigma, torch.ones(3, 3), torch.zeros(3, 3, 1))
    keep = torch.tensor([[True, True, True], [True, True, False], [True, True, False]])
    torch.testing.assert_close(out.weights, ref.weights[keep])  # same float32 values, default tolerance


def test_composite_gradcheck_float64():
    density, delta, values, keep = _dense_problem(torch.float64, seed=3, rays=3, samples=5, channels=2)
    d, dl, v, ray = _pack(density, delta, values, keep)
    t = torch.cumsum(dl, 0)

    def fn(d_, v_):
        out = composite(d_, dl, ray, 3, values=[v_], t=t)
        return out.weights, out.opacity, out.values[0], out.depth

    assert torch.autograd.gradcheck(fn, (d.clone().requires_grad_(True), v.clone().requires_grad_(True)))


def test_composite_depth_and_empty_input():
    empty = torch.zeros(0)
    out = composite(empty, empty, torch.zeros(0, dtype=torch.long), 4, values=[torch.zeros(0, 3)], t=empty)
    assert out.opacity.shape == (4,) and (out.opacity == 0).all()
    assert out.values[0].shape == (4, 3) and out.depth.shape == (4,)

    # One opaque sample at t=2: all weight there, depth 2.
    out = composite(torch.tensor([1e4]), torch.tensor([0.1]), torch.tensor([0]), 1, t=torch.tensor([2.0]))
    assert out.opacity.item() == pytest.approx(1.0) and out.depth.item() == pytest.approx(2.0)


def test_composite_float32_stays_accurate_on_long_packed_arrays():
    """The global cumulative sum reaches ~1e6 here; in float32 the per-ray subtraction would
    lose whole units of optical depth. The float64 sum keeps float32 results accurate."""
    rays, samples = 20_000, 100
    g = torch.Generator().manual_seed(0)
    density = torch.rand(rays, samples, generator=g) * 5.0
    delta = torch.full((rays, samples), 0.05)
    values = torch.rand(rays, samples, 1, generator=g)
    ray = torch.arange(rays).repeat_interleave(samples)
    out = composite(density.flatten(), delta.flatten(), ray, rays, values=[values.flatten(0, 1)])
    ref = composite_reference(density.double(), delta.double(), values.double())
    # float32 exp/expm1 of O(1) optical depths: ~1e-7 relative per sample, 100 samples.
    torch.testing.assert_close(out.opacity.double(), ref.opacity, atol=2e-6, rtol=0)
    torch.testing.assert_close(out.values[0].double(), ref.values[0], atol=2e-6, rtol=0)


def test_uniform_medium_opacity_matches_beer_lambert():
    """March + composite a constant density: opacity = 1 - exp(-sigma * chord)."""
    sigma = 0.7
    origins = torch.tensor([[-3.0, 0.0, 0.0], [-3.0, 0.4, 0.2]])
    dirs = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    samples = sample_along_rays(origins, dirs, radius=1.0, n_samples=50, stratified=True,
                                generator=torch.Generator().manual_seed(0))
    out = composite(torch.full((samples.n_samples,), sigma), samples.deltas, samples.ray_indices, 2)
    # Exact up to float32 rounding: the deltas tile the chord of length 2 exactly.
    torch.testing.assert_close(out.opacity, torch.full((2,), 1 - math.exp(-2 * sigma)), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- marching


def _rays(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    origins = torch.randn(n, 3, generator=g) * 0.5 + torch.tensor([0.0, 0.0, 3.0])
    dirs = torch.nn.functional.normalize(-origins + torch.randn(n, 3, generator=g) * 0.4, dim=-1)
    return origins, dirs


def test_samples_tile_each_chord_in_order():
    origins, dirs = _rays(64)
    n_samples = 32
    samples = sample_along_rays(origins, dirs, radius=1.0, n_samples=n_samples)
    near, far, hit = ray_aabb_intersect(origins, dirs, 1.0)
    r = samples.ray_indices
    assert (r[1:] >= r[:-1]).all(), "packed samples must be sorted by ray"
    same_ray = r[1:] == r[:-1]
    assert (samples.t_starts[1:][same_ray] > samples.t_starts[:-1][same_ray]).all()
    assert hit[r].all() and set(r.tolist()) == set(hit.nonzero().squeeze(-1).tolist())
    step = march_step_size(1.0, n_samples)
    assert (samples.deltas > 0).all() and (samples.deltas <= step + 1e-6).all()
    assert torch.bincount(r, minlength=64).max() <= n_samples
    # The steps tile [near, far]; float32 sums of <=32 steps: 1e-5.
    chord = torch.zeros(64).index_add(0, r, samples.deltas)
    torch.testing.assert_close(chord[hit], (far - near)[hit], atol=1e-5, rtol=0)
    midpoints = (samples.t_starts + samples.t_ends) / 2
    torch.testing.assert_close(samples.t, midpoints)
    torch.testing.assert_close(samples.positions, origins[r] + samples.t[:, None] * dirs[r])


def test_stratified_jitter_is_inside_steps_and_reproducible():
    origins, dirs = _rays(16)
    a = sample_along_rays(origins, dirs, 1.0, 16, stratified=True, generator=torch.Generator().manual_seed(5))
    b = sample_along_rays(origins, dirs, 1.0, 16, stratified=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.positions, b.positions)
    assert ((a.t >= a.t_starts) & (a.t <= a.t_ends)).all()
    assert not torch.allclose(a.t, (a.t_starts + a.t_ends) / 2)


def test_chunked_marching_equals_single_pass():
    origins, dirs = _rays(50)
    whole = sample_along_rays(origins, dirs, 1.0, 24)
    chunked = sample_along_rays(origins, dirs, 1.0, 24, max_dense_samples=24 * 7)
    for name in ("ray_indices", "t_starts", "t_ends", "t", "positions"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name)), name


def _sphere_grid(resolution=16, centre=(0.2, 0.0, 0.0), radius=0.35):
    centre_t = torch.tensor(centre)

    def density_fn(points):
        return torch.where((points - centre_t).norm(dim=-1) < radius, 10.0, 0.0)

    return OccupancyGrid(resolution=resolution, radius=1.0), density_fn, centre_t, radius


def test_empty_space_skipping_keeps_exactly_the_occupied_samples():
    grid, density_fn, centre, radius = _sphere_grid()
    for step in range(3):
        grid.update(density_fn, step, generator=torch.Generator().manual_seed(step))
    origins, dirs = _rays(200)
    dense = sample_along_rays(origins, dirs, 1.0, 48)
    skipped = sample_along_rays(origins, dirs, 1.0, 48, grid=grid)
    in_occupied = grid.is_occupied(dense.positions)
    assert 0 < skipped.n_samples < dense.n_samples / 4
    assert torch.equal(skipped.positions, dense.positions[in_occupied])
    assert torch.equal(skipped.ray_indices, dense.ray_indices[in_occupied])
    # Every sample whose whole cell lies inside the sphere survives (cells straddling the
    # surface depend on where the jittered updates landed).
    cell_diagonal = 2.0 * math.sqrt(3.0) / grid.resolution
    deep_inside = (dense.positions - centre).norm(dim=-1) < radius - cell_diagonal
    assert deep_inside.any() and in_occupied[deep_inside].all()


# ----------------------------------------------------------------------------- occupancy grid


def _cell_distance_bounds(grid, centre):
    """Nearest and farthest distance from ``centre`` to each cell's box."""
    res = grid.resolution
    idx = torch.arange(res**3)
    lo = grid.cell_points(idx, jitter=False) - grid.radius / res
    hi = lo + 2 * grid.radius / res
    nearest = (centre.clamp(min=lo, max=hi) - centre).norm(dim=-1)
    farthest = torch.maximum((lo - centre).abs(), (hi - centre).abs()).norm(dim=-1)
    return nearest, farthest


def test_occupancy_grid_marks_only_cells_of_the_sphere():
    grid, density_fn, centre, radius = _sphere_grid()
    assert grid.occupied.all(), "all cells start occupied (Instant-NGP warm-up)"
    generator = torch.Generator().manual_seed(0)
    for step in range(3):
        grid.update(density_fn, step, generator=generator)
    occupied = grid.occupied.flatten()
    nearest, farthest = _cell_distance_bounds(grid, centre)
    assert not occupied[nearest >= radius].any(), "a cell outside the sphere is occupied"
    assert occupied[farthest < radius].all(), "a cell inside the sphere is empty"
    assert grid.n_updates.item() == 3


def test_occupancy_grid_decay_and_threshold():
    grid = OccupancyGrid(resolution=4, radius=1.0, density_threshold=1.0, ema_decay=0.5)
    grid.update(lambda p: torch.full((p.shape[0],), 3.0), step=0)
    assert grid.occupied.all()
    grid.update(lambda p: torch.zeros(p.shape[0]), step=1)
    torch.testing.assert_close(grid.density, torch.full((64,), 1.5))  # max(0.5 * 3, 0)
    grid.update(lambda p: torch.where(p[:, 0] > 0, 1.0, 0.0), step=2)
    # x > 0 (cells 2, 3 along the slowest axis): max(0.75, 1) = 1, not above the threshold 1;
    # x < 0: 0.75. The threshold is min(mean = 0.875, 1): the brighter half stays occupied --
    # Instant-NGP's guard against emptying a faint scene entirely.
    assert grid.occupied[2:].all() and not grid.occupied[:2].any()


def test_occupancy_grid_state_dict_round_trip_and_determinism():
    grid, density_fn, _, _ = _sphere_grid()
    for step in range(2):
        grid.update(density_fn, step, generator=torch.Generator().manual_seed(step))
    restored = OccupancyGrid(resolution=16, radius=1.0)
    restored.load_state_dict(grid.state_dict())
    for name in ("density", "occupied", "n_updates"):
        assert torch.equal(getattr(restored, name), getattr(grid, name)), name

    twin, _, _, _ = _sphere_grid()
    for step in range(2):
        twin.update(density_fn, step, generator=torch.Generator().manual_seed(step))
    assert torch.equal(twin.density, grid.density)


def test_large_grid_updates_a_subset_after_warmup():
    evaluated = []

    def density_fn(points):
        evaluated.append(points.shape[0])
        return torch.where(points.norm(dim=-1) < 0.5, 10.0, 0.0)

    grid = OccupancyGrid(resolution=16, radius=1.0, warmup_steps=2, max_cells_per_update=100, chunk_size=1000)
    generator = torch.Generator().manual_seed(0)
    grid.update(density_fn, step=0, generator=generator)  # warm-up: every cell, chunked
    assert sum(evaluated) == 16**3 and max(evaluated) <= 1000
    occupied_after_warmup = grid.occupied.clone()
    evaluated.clear()
    grid.update(density_fn, step=5, generator=generator)
    # A quarter drawn uniformly plus a quarter among occupied cells, deduplicated.
    assert 0 < sum(evaluated) <= 16**3 // 2
    # Same field: occupied cells stay occupied (max with the decayed value); newly sampled
    # jitter can only add cells straddling the sphere.
    assert (grid.occupied | ~occupied_after_warmup).all()
    centres = grid.cell_points(torch.arange(16**3), jitter=False)
    half_diagonal = math.sqrt(3.0) / 16
    assert not grid.occupied.flatten()[centres.norm(dim=-1) > 0.5 + half_diagonal].any()


@pytest.mark.gpu
def test_volume_ops_on_cuda_match_cpu():
    origins, dirs = _rays(4096)
    grid, density_fn, _, _ = _sphere_grid(resolution=32)
    grid.update(density_fn, 0, generator=torch.Generator().manual_seed(0))
    cpu = sample_along_rays(origins, dirs, 1.0, 128, grid=grid)
    gpu = sample_along_rays(origins.cuda(), dirs.cuda(), 1.0, 128, grid=grid.cuda())
    assert torch.equal(cpu.ray_indices, gpu.ray_indices.cpu())
    density = torch.rand(cpu.n_samples) * 10
    out_cpu = composite(density, cpu.deltas, cpu.ray_indices, 4096, t=cpu.t)
    out_gpu = composite(density.cuda(), gpu.deltas, gpu.ray_indices, 4096, t=gpu.t)
    # Different summation orders of float32 values of order 1: 1e-5.
    torch.testing.assert_close(out_gpu.opacity.cpu(), out_cpu.opacity, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_gpu.depth.cpu(), out_cpu.depth, atol=1e-4, rtol=0)
