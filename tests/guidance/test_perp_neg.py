"""Perp-Neg (guidance/perp_neg.py): exact values of its pure helpers on known tensors, and the
guidance step with perp_neg on (changes the gradient, by the formula) and off (bit-identical)."""

from __future__ import annotations

import math

import pytest
import torch

from magic3d.data.cameras import orbit_cameras
from magic3d.guidance.perp_neg import (
    FRONT_IN_FRONT_SIDE,
    FRONT_IN_SIDE_BACK,
    SIDE_IN_FRONT_SIDE,
    SIDE_IN_SIDE_BACK,
    perp_neg_noise,
    perp_neg_prompts,
    perpendicular_component,
)
from magic3d.guidance.prompts import PromptEmbeddings
from magic3d.types import CameraBatch

L, D = 3, 4


def view_embeddings() -> PromptEmbeddings:
    """views[i] = i + 1 everywhere (front 1, side 2, back 3, overhead 4), uncond -1, base 10:
    an interpolated embedding's value says the blend."""
    views = torch.arange(1, 5, dtype=torch.float32).view(4, 1, 1).expand(4, L, D).clone()
    return PromptEmbeddings(base=torch.full((L, D), 10.0), views=views, uncond=torch.full((L, D), -1.0))


def radians(values: list[float]) -> torch.Tensor:
    return torch.tensor([math.radians(v) for v in values])


# ------------------------------------------------------------------------------- pure helpers

def test_perpendicular_component_known_vectors() -> None:
    x = torch.tensor([[3.0, 4.0], [1.0, 1.0], [2.0, -5.0]]).view(3, 2, 1, 1)
    y = torch.tensor([[1.0, 0.0], [2.0, 2.0], [0.0, 0.0]]).view(3, 2, 1, 1)
    got = perpendicular_component(x, y).view(3, 2)
    # (3,4) minus its projection on the x axis; (1,1) is parallel to (2,2); a zero y leaves x whole.
    assert torch.equal(got, torch.tensor([[0.0, 4.0], [0.0, 0.0], [2.0, -5.0]]))


def test_perpendicular_component_is_orthogonal_per_sample() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, 5, 5, generator=g,
                                                                                  dtype=torch.float64)
    perp = perpendicular_component(x, y)
    dots = (perp * y).sum(dim=(1, 2, 3))
    # float64 sums of 75 products of unit-size values: rounding ~1e-15
    torch.testing.assert_close(dots, torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)
    # and what was removed is parallel to y: x = perp + k y
    k = (x - perp).flatten(1) / y.flatten(1)
    torch.testing.assert_close(k, k[:, :1].expand_as(k), atol=1e-9, rtol=1e-9)


def test_weight_functions_known_values() -> None:
    r = torch.tensor([0.0, 1.0])
    # a e^{-b r} + c with threestudio's (a, b, c); 4 e^{-0.5} = 2.42612, e^{-0.5} = 0.60653
    torch.testing.assert_close(FRONT_IN_FRONT_SIDE(r), torch.tensor([1.574, 4 * math.exp(-0.5) - 2.426]))
    torch.testing.assert_close(SIDE_IN_SIDE_BACK(r), torch.tensor([0.394, math.exp(-0.5) - 0.606]))
    torch.testing.assert_close(FRONT_IN_SIDE_BACK(r), torch.tensor([1.967, math.exp(-0.5) + 0.967]))
    assert torch.equal(SIDE_IN_FRONT_SIDE(r), FRONT_IN_FRONT_SIDE(r))
    # A pure view is (almost) not pushed from its own name: the constants are rounded to 1e-3.
    assert abs(float(FRONT_IN_FRONT_SIDE(torch.tensor(1.0)))) < 1e-3
    assert abs(float(SIDE_IN_SIDE_BACK(torch.tensor(1.0)))) < 1e-3


def test_prompts_interpolate_by_azimuth() -> None:
    azimuth = [0.0, 45.0, -90.0, 135.0, 180.0, -180.0]
    prompts = perp_neg_prompts(view_embeddings(), radians([0.0] * 6), radians(azimuth))
    # front 1, side 2, back 3: 0 deg front; 45 halfway front-side; 90 side; 135 halfway side-back; 180 back
    expected = torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0, 3.0])
    torch.testing.assert_close(prompts.positive[:, 0, 0], expected, atol=1e-6, rtol=0)  # float32 blends
    assert torch.equal(prompts.positive, prompts.positive[:, :1, :1].expand(6, L, D))
    # Negatives: front and side in the front-side segment, side and front behind it.
    assert prompts.negatives[:, :, 0, 0].tolist() == [[1, 2], [1, 2], [2, 1], [2, 1], [2, 1], [2, 1]]
    # r: the share of the segment's first view (front, then side): 90 deg is all side.
    r = torch.tensor([1.0, 0.5, 1.0, 0.5, 0.0, 0.0])
    expected_weights = torch.stack([
        torch.cat([FRONT_IN_FRONT_SIDE(r[:2]), SIDE_IN_SIDE_BACK(r[2:])]),
        torch.cat([SIDE_IN_FRONT_SIDE(1 - r[:2]), FRONT_IN_SIDE_BACK(r[2:])]),
    ], 1)
    torch.testing.assert_close(prompts.weights, expected_weights, atol=1e-6, rtol=0)  # r from float32 angles
    # Back view: pushed hard from "front" (1.967), little from "side" (0.394).
    torch.testing.assert_close(prompts.weights[4], torch.tensor([0.394, 1.967]), atol=1e-6, rtol=0)


def test_front_weight_is_continuous_across_the_side() -> None:
    """Just before and after 90 deg the cameras lie in different segments; the front
    negative's weight (f_fs(0) there, f_fsb(1) here) must nearly agree."""
    prompts = perp_neg_prompts(view_embeddings(), radians([0.0, 0.0]), radians([89.999, 90.001]))
    front_before, front_after = float(prompts.weights[0, 0]), float(prompts.weights[1, 1])
    assert front_before == pytest.approx(front_after, abs=2e-3)  # the rounded constants: 1.574 vs 1.5735
    torch.testing.assert_close(prompts.positive[0], prompts.positive[1], atol=1e-4, rtol=0)


def test_overhead_views_take_the_overhead_prompt_without_negatives() -> None:
    prompts = perp_neg_prompts(view_embeddings(), radians([70.0, 20.0]), radians([180.0, 180.0]))
    assert torch.equal(prompts.positive[0], torch.full((L, D), 4.0))
    assert torch.equal(prompts.weights[0], torch.zeros(2))
    assert torch.equal(prompts.positive[1], torch.full((L, D), 3.0))  # 20 deg up: still the back view


def test_noise_with_parallel_and_orthogonal_negatives() -> None:
    uncond = torch.zeros(2, 2, 1, 1)
    positive = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).view(2, 2, 1, 1)
    # sample 0: negative parallel to e_pos (no perpendicular part: nothing removed);
    # sample 1: negatives orthogonal to e_pos, removed with their weights.
    negatives = torch.tensor([[[3.0, 0.0], [-1.0, 0.0]], [[1.0, 0.0], [5.0, 0.0]]]).view(2, 2, 2, 1, 1)
    weights = torch.tensor([[0.5, 2.0], [0.5, 0.25]])
    got = perp_neg_noise(positive, uncond, negatives, weights).view(2, 2)
    assert torch.equal(got, torch.tensor([[1.0, 0.0], [-0.5 - 1.25, 2.0]]))


def test_noise_with_zero_weights_is_the_positive_noise() -> None:
    g = torch.Generator().manual_seed(1)
    pos, unc = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    negs = torch.randn(3, 2, 4, 8, 8, generator=g)
    got = perp_neg_noise(pos, unc, negs, torch.zeros(3, 2))
    torch.testing.assert_close(got, pos, atol=1e-6, rtol=0)  # (unc + (pos - unc)) in float32


# ------------------------------------------------------------------------------ the guidance

S = 8  # stub UNet resolution


class ContextUNet(torch.nn.Module):
    """eps = 0.5 x_t + (mean token of the context) @ P: each prompt gets its own, non-parallel
    noise direction, so Perp-Neg's negatives have a perpendicular part to remove."""

    def __init__(self) -> None:
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(sample_size=S)
        self.projection = torch.randn(D, 3, S, S, generator=torch.Generator().manual_seed(7))

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=False):
        context = encoder_hidden_states.float().mean(dim=1)
        return (0.5 * sample + torch.einsum("bd,dchw->bchw", context, self.projection).to(sample),)


def distinct_view_embeddings() -> PromptEmbeddings:
    g = torch.Generator().manual_seed(3)
    return PromptEmbeddings(base=torch.randn(L, D, generator=g), views=torch.randn(4, L, D, generator=g),
                            uncond=torch.randn(L, D, generator=g))


def pixel_guidance(**kwargs):
    from magic3d.guidance.pixel_sds import PixelSDS
    from magic3d.testing.random_pipelines import build_scheduler

    guidance = PixelSDS.from_modules(ContextUNet(), build_scheduler(), text_embeddings=distinct_view_embeddings(),
                                     guidance_scale=7.5, **kwargs)
    guidance.setup("ignored: embeddings given", "cpu")
    return guidance


def cameras(azimuth_deg: list[float]) -> CameraBatch:
    cams = orbit_cameras(len(azimuth_deg), 10.0, 2.0, 50.0, S, S)
    cams.azimuth = radians(azimuth_deg)
    return cams


def rgb_gradient(guidance, cams: CameraBatch, seed: int = 0) -> torch.Tensor:
    rgb = torch.rand(cams.batch_size, S, S, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    torch.manual_seed(seed)  # timesteps and noise
    guidance.step(rgb, cams, progress=0.0).loss.backward()
    return rgb.grad


def test_perp_neg_false_is_bit_identical_to_the_plain_step() -> None:
    cams = cameras([0.0, 60.0, 150.0, -120.0])
    default = rgb_gradient(pixel_guidance(), cams)
    off = rgb_gradient(pixel_guidance(perp_neg=False), cams)
    assert torch.equal(off, default)


def test_perp_neg_gradient_follows_the_formula() -> None:
    """The step's gradient equals w(t) (eps_hat - eps) through the pixel preprocessing, with
    eps_hat assembled here from the UNet's outputs for the positive, negative and unconditional
    prompts by the module docstring's formula."""
    from magic3d.guidance.base import add_noise, sds_weight

    cams = cameras([0.0, 60.0, 150.0, -120.0])
    guidance = pixel_guidance(perp_neg=True)
    plain = rgb_gradient(pixel_guidance(), cams)
    got = rgb_gradient(guidance, cams)
    assert not torch.allclose(got, plain, atol=1e-4)  # the negatives change the direction

    # Replay the step's draws (same seed, same order: timesteps, then noise).
    torch.manual_seed(0)
    t = guidance.schedule.sample(4, 0.0)
    rgb = torch.rand(4, S, S, 3, generator=torch.Generator().manual_seed(1))
    x = rgb.permute(0, 3, 1, 2) * 2 - 1
    noise = torch.randn_like(x)  # like the step's: randn_like keeps the permuted strides
    alpha_bar = guidance.alphas_cumprod[t]
    x_t = add_noise(x, noise, alpha_bar)
    prompts = perp_neg_prompts(guidance.embeddings, cams.elevation, cams.azimuth)
    unet = guidance.unet

    def eps(context: torch.Tensor) -> torch.Tensor:
        return unet(x_t, t, context)[0]

    e_u = eps(guidance.embeddings.uncond.expand(4, L, D))
    e_pos = eps(prompts.positive) - e_u
    direction = e_pos.clone()
    for i in range(2):
        e_neg = eps(prompts.negatives[:, i]) - e_u
        direction -= prompts.weights[:, i].view(4, 1, 1, 1) * perpendicular_component(e_neg, e_pos)
    eps_hat = e_u + guidance.guidance_scale * direction
    grad_x = sds_weight(alpha_bar, "sds").view(4, 1, 1, 1) * (eps_hat - noise)
    # d loss / d rgb = (grad_x / B) * 2 (the [-1, 1] map), channel-last
    expected = (grad_x / 4 * 2).permute(0, 2, 3, 1)
    # float32 throughout; the step adds and subtracts eps_u once more (perp_neg_noise), ~1e-6
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_perp_neg_needs_view_dependent_prompts() -> None:
    with pytest.raises(ValueError, match="view_dependent_prompting"):
        pixel_guidance(perp_neg=True, view_dependent_prompting=False)


@pytest.mark.parametrize("kind", ["pixel", "latent"])
def test_perp_neg_reaches_both_priors(kind: str, tiny_pixel_pipeline, tiny_latent_pipeline) -> None:
    """Through a real (tiny, random) pipeline loaded from disk, for PixelSDS and LatentSDS:
    perp_neg changes the rendered image's gradient; false is bit-identical to the default."""
    from magic3d.guidance.latent_sds import LatentSDS
    from magic3d.guidance.pixel_sds import PixelSDS

    cls, folder = (PixelSDS, tiny_pixel_pipeline) if kind == "pixel" else (LatentSDS, tiny_latent_pipeline)
    cams = cameras([10.0, 100.0, 170.0])
    grads = {}
    for name, kwargs in {"default": {}, "off": {"perp_neg": False}, "on": {"perp_neg": True}}.items():
        guidance = cls(pretrained=str(folder), half_precision=False, **kwargs)
        guidance.setup("a red cube", "cpu")
        grads[name] = rgb_gradient(guidance, cams)
    assert torch.equal(grads["off"], grads["default"])
    assert not torch.allclose(grads["on"], grads["default"])
    assert torch.isfinite(grads["on"]).all()
