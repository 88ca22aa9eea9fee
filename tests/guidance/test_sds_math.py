"""SDS math in guidance/base.py: exact gradients with stub noise predictors, CFG, weighting,
NaN guard, clipping and timestep schedules. Pure torch, no diffusion model."""

from __future__ import annotations

import math

import pytest
import torch

from magic3d.guidance.frozen import PipelineLayout
from magic3d.guidance.base import (
    WEIGHTINGS,
    ScoreDistillation,
    TimestepSchedule,
    add_noise,
    classifier_free_guidance,
    clip_gradient_norm,
    sds_surrogate_loss,
    sds_weight,
)

B, C, H, W = 3, 3, 8, 8


def cosine_alphas_cumprod(steps: int = 1000) -> torch.Tensor:
    """Squared-cosine alpha_bar (IF's "squaredcos_cap_v2"), in float32 like a real scheduler."""
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0).float()


class Distiller(ScoreDistillation):
    """Smallest concrete guidance: only the shared distill() is exercised (no pipeline is loaded)."""

    LAYOUT = PipelineLayout(name="none", parts=("unet",), text_encoder_class="none")


def make_distiller(**kwargs) -> Distiller:
    guidance = Distiller("<no pipeline>", **kwargs)
    guidance.set_alphas_cumprod(cosine_alphas_cumprod())
    return guidance


def fixed_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # float64 x: the surrogate's backward computes x - (x - grad); in float64 that round trip
    # loses ~1e-16 relative, so the comparison below measures the SDS formula, not rounding.
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).requires_grad_(True)
    noise = torch.randn(B, C, H, W, generator=g)
    eps_c = torch.randn(B, C, H, W, generator=g)
    eps_u = torch.randn(B, C, H, W, generator=g)
    t = torch.tensor([20, 500, 970])
    return x, noise, eps_c, eps_u, t


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_gradient_equals_weighted_residual(weighting: str) -> None:
    guidance = make_distiller(guidance_scale=7.5, weighting=weighting)
    x, noise, eps_c, eps_u, t = fixed_inputs()
    seen = {}

    def predict(x_t, timesteps):
        seen["x_t"], seen["t"] = x_t, timesteps
        return eps_c, eps_u

    out = guidance.distill(x, predict, progress=0.0, timesteps=t, noise=noise)
    out.loss.backward()

    ab = guidance.alphas_cumprod[t]
    w = sds_weight(ab, weighting).view(B, 1, 1, 1)
    expected = w * (eps_u + 7.5 * (eps_c - eps_u) - noise)
    # The surrogate's gradient is the batch mean, so B * dL/dx is the per-sample gradient.
    # Both sides do the same float32 ops; 1e-6 covers reordering in the float64 round trip.
    torch.testing.assert_close(x.grad * B, expected.double(), rtol=1e-6, atol=1e-6)
    # The predictor saw x_t = sqrt(ab) x + sqrt(1 - ab) eps at the requested timesteps.
    ab4 = ab.view(B, 1, 1, 1)
    torch.testing.assert_close(seen["x_t"], ab4.sqrt() * x.detach().float() + (1 - ab4).sqrt() * noise)
    assert torch.equal(seen["t"], t) and torch.equal(out.timesteps, t)
    assert not out.skipped
    expected_norm = expected.flatten(1).norm(dim=1).mean()
    torch.testing.assert_close(out.grad_norm, expected_norm)  # same float32 values and ops


def test_sds_weights_values() -> None:
    ab = torch.tensor([0.0, 0.25, 1.0])
    assert torch.equal(sds_weight(ab, "sds"), torch.tensor([1.0, 0.75, 0.0]))
    assert torch.equal(sds_weight(ab, "uniform"), torch.ones(3))
    assert torch.equal(sds_weight(ab, "sqrt_alpha_one_minus"), torch.tensor([0.0, 0.375, 0.0]))
    with pytest.raises(ValueError, match="weighting"):
        sds_weight(ab, "snr")
    with pytest.raises(ValueError, match="weighting"):
        Distiller("<no pipeline>", weighting="snr")


def test_perfect_predictor_gives_zero_gradient() -> None:
    guidance = make_distiller(guidance_scale=100.0)
    x, noise, *_ = fixed_inputs()
    out = guidance.distill(x, lambda x_t, t: (noise, noise), progress=0.0, noise=noise)
    out.loss.backward()
    assert torch.count_nonzero(x.grad) == 0  # eps_hat == eps exactly, whatever the scale
    assert out.loss.item() == 0.0 and out.grad_norm.item() == 0.0


def test_predictor_recovering_noise_from_x_t_gives_near_zero_gradient() -> None:
    guidance = make_distiller(guidance_scale=30.0, min_step_percent=0.1, max_step_percent=0.9)
    x, noise, *_ = fixed_inputs()
    x0 = x.detach().float()

    def recover(x_t, t):
        ab = guidance.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        return eps, eps

    out = guidance.distill(x, recover, progress=0.0, noise=noise)
    out.loss.backward()
    # Inverting x_t in float32 for t in [100, 900] (1 - ab >= 0.02) amplifies rounding by at
    # most 1/sqrt(0.02) ~ 7: errors stay below 1e-5.
    assert x.grad.abs().max().item() < 1e-5


def test_classifier_free_guidance_formula() -> None:
    eps_c, eps_u = torch.randn(2, 4, 3, 5, 5).unbind(0)
    assert torch.equal(classifier_free_guidance(eps_c, eps_u, 0.0), eps_u)
    assert torch.equal(classifier_free_guidance(eps_c, eps_u, 1.0), eps_u + (eps_c - eps_u))
    torch.testing.assert_close(classifier_free_guidance(eps_c, eps_u, 1.0), eps_c)  # 1 ulp
    assert torch.equal(classifier_free_guidance(eps_c, eps_u, 20.0), eps_u + 20.0 * (eps_c - eps_u))


def test_cfg_uses_cond_and_uncond_in_the_right_roles() -> None:
    guidance = make_distiller(guidance_scale=3.0, weighting="uniform")
    x, noise, *_ = fixed_inputs()
    zeros = torch.zeros_like(noise)
    ones = torch.ones_like(noise)
    out = guidance.distill(x, lambda x_t, t: (ones, zeros), progress=0.0, noise=zeros)
    out.loss.backward()
    # eps_hat = 0 + 3 * (1 - 0) = 3 everywhere (w = 1, eps = 0); the float64 round trip
    # x - (x - 3) is off by at most a few 1e-16.
    torch.testing.assert_close(x.grad * B, torch.full_like(x.grad, 3.0), rtol=0, atol=1e-12)


def test_nan_guard_zeroes_bad_samples_and_reports_skip() -> None:
    guidance = make_distiller()
    x, noise, eps_c, eps_u, t = fixed_inputs()
    bad = eps_c.clone()
    bad[1, 0, 2, 3] = float("nan")
    bad[2, 1, 0, 0] = float("inf")
    out = guidance.distill(x, lambda x_t, tt: (bad, eps_u), progress=0.0, timesteps=t, noise=noise)
    out.loss.backward()
    assert out.skipped
    assert torch.isfinite(out.loss) and torch.isfinite(out.grad_norm)
    assert torch.count_nonzero(x.grad[1:]) == 0
    assert torch.count_nonzero(x.grad[0]) > 0  # the healthy sample still trains

    nan_everywhere = torch.full_like(eps_c, float("nan"))
    x.grad = None
    out = guidance.distill(x, lambda x_t, tt: (nan_everywhere, eps_u), progress=0.0)
    out.loss.backward()
    assert out.skipped and out.loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0


def test_gradient_clipping_bounds_per_sample_norm() -> None:
    x, noise, eps_c, eps_u, t = fixed_inputs()
    unclipped = make_distiller(guidance_scale=50.0)
    out = unclipped.distill(x, lambda a, b: (eps_c, eps_u), progress=0.0, timesteps=t, noise=noise)
    out.loss.backward()
    raw_norms = (x.grad * B).flatten(1).norm(dim=1)
    limit = float(raw_norms.median())  # one sample above, one at, one below the bound

    x.grad = None
    clipped = make_distiller(guidance_scale=50.0, grad_clip=limit)
    out = clipped.distill(x, lambda a, b: (eps_c, eps_u), progress=0.0, timesteps=t, noise=noise)
    out.loss.backward()
    norms = (x.grad * B).flatten(1).norm(dim=1)
    # Rescaling by limit / norm in float32 lands within a few ulps of the limit.
    assert (norms <= limit * (1 + 1e-5)).all()
    below = raw_norms < limit
    torch.testing.assert_close(norms[below], raw_norms[below])  # untouched samples
    above = raw_norms > limit
    torch.testing.assert_close(norms[above], torch.full_like(norms[above], limit))

    g = torch.randn(4, 3, 2, 2)
    assert torch.equal(clip_gradient_norm(torch.zeros_like(g), 1.0), torch.zeros_like(g))
    with pytest.raises(ValueError, match="grad_clip"):
        Distiller("<no pipeline>", grad_clip=0.0)


def test_surrogate_loss_gradient_is_batch_mean_of_grad() -> None:
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    loss = sds_surrogate_loss(x, grad)
    loss.backward()
    # float64 x - (x - grad): ~1e-16 relative error.
    torch.testing.assert_close(x.grad, grad / 4, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, 0.5 * grad.pow(2).sum() / 4)


def test_add_noise_matches_forward_diffusion() -> None:
    x, noise = torch.randn(2, 2, 3, 4, 4).unbind(0)
    ab = torch.tensor([1.0, 0.0])
    x_t = add_noise(x, noise, ab)
    assert torch.equal(x_t[0], x[0]) and torch.equal(x_t[1], noise[1])


def test_timestep_samples_stay_in_range() -> None:
    schedule = TimestepSchedule(0.02, 0.98, num_train_timesteps=1000)
    assert schedule.bounds(0.0) == (20, 980)
    t = schedule.sample(20000, 0.0, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() >= 20 and t.max() <= 980
    # 20000 uniform draws over 961 values: both ends appear with probability ~1 - 2e-9.
    assert t.min() == 20 and t.max() == 980

    narrow = TimestepSchedule(0.5, 0.5)
    assert torch.equal(narrow.sample(5, 0.0), torch.full((5,), 500))


def test_timestep_annealing_endpoints() -> None:
    schedule = TimestepSchedule(0.02, 0.98, anneal_to=(0.02, 0.5), num_train_timesteps=1000)
    assert schedule.bounds(0.0) == (20, 980)
    assert schedule.bounds(1.0) == (20, 500)
    assert schedule.bounds(0.5) == (20, 740)
    assert schedule.bounds(-1.0) == schedule.bounds(0.0)  # progress is clamped to [0, 1]
    assert schedule.bounds(2.0) == schedule.bounds(1.0)
    late = schedule.sample(5000, 1.0, generator=torch.Generator().manual_seed(1))
    assert late.max() <= 500

    guidance = make_distiller(min_step_percent=0.2, max_step_percent=0.6, anneal_to=(0.1, 0.3))
    assert guidance.schedule.num_train_timesteps == 1000
    assert guidance.schedule.bounds(1.0) == (100, 300)


def test_invalid_timestep_ranges_raise() -> None:
    with pytest.raises(ValueError, match="min_step_percent"):
        TimestepSchedule(0.9, 0.1)
    with pytest.raises(ValueError, match="anneal_to"):
        TimestepSchedule(0.1, 0.9, anneal_to=(0.2, 1.5))


def test_distill_before_setup_raises() -> None:
    with pytest.raises(RuntimeError, match="setup"):
        Distiller("<no pipeline>").distill(torch.zeros(1, 3, 2, 2), lambda a, b: (a, a), 0.0)
