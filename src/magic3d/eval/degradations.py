"""How text-to-3D renders differ from the toy world's ground truth, as image operations.

A NeRF is blurred and translucent at its border, carries floaters and colour noise, and its
silhouette is soft. The same functions serve two purposes: ``magic3d.eval.robustness``
applies each at a fixed strength to report how much the evaluator's accuracy depends on them,
and ``magic3d.eval.train_classifier`` applies them at random strengths as training
augmentations (``random_render_degradations``) so that the evaluator learns to name the
object, not the render's crispness.

Images are channel-first in [0, 1] with their coverage mask and background colour, so
translucency is exact on plain backdrops (the object blended over its own backdrop). A
strength may be a float or a per-image tensor of shape (B, 1, 1, 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

Images = Float[Tensor, "B 3 H W"]
Masks = Float[Tensor, "B 1 H W"]
Strength = float | Float[Tensor, "B 1 1 1"]


def gaussian_blur(x: Float[Tensor, "B C H W"], sigma: Float[Tensor, "B"], radius: int = 3) -> Float[Tensor, "B C H W"]:
    """Separable Gaussian blur with one sigma per image (sigma 0 leaves the image unchanged)."""
    b, c, h, w = x.shape
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x).clamp_min(1e-3)[:, None]
    kernel = torch.exp(-0.5 * (offsets[None] / s) ** 2)
    kernel = kernel / kernel.sum(-1, keepdim=True)  # sigma -> 0 gives a delta
    kernel = kernel.repeat_interleave(c, dim=0)  # (B*C, k)
    flat = F.pad(x.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="replicate")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=b * c)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


def _per_image(value: Strength, x: Tensor) -> Tensor:
    """A strength as a (B,) tensor (for the blur's sigma)."""
    if isinstance(value, Tensor):
        return value.reshape(-1).to(x)
    return torch.full((x.shape[0],), float(value), device=x.device, dtype=x.dtype)


def blur(x: Images, mask: Masks, background: Images, g: torch.Generator, sigma: Strength = 1.5) -> Images:
    """A render at lower effective resolution (a coarse NeRF at 64², upsampled renders)."""
    return gaussian_blur(x, _per_image(sigma, x))


def translucent(x: Images, mask: Masks, background: Images, g: torch.Generator, alpha: Strength = 0.6) -> Images:
    """The object at opacity ``alpha`` over its background: a NeRF that never became opaque."""
    # x = m obj + (1 - m) backdrop, so the object at opacity alpha is x - (1 - alpha) m (x - backdrop):
    # uncovered pixels (m = 0) keep whatever backdrop they show, plain or not.
    return x - (1.0 - alpha) * mask * (x - background)


def soft_silhouette(x: Images, mask: Masks, background: Images, g: torch.Generator, sigma: Strength = 2.0) -> Images:
    """A fuzzy border: coverage blurred, the object's colour kept inside."""
    soft = gaussian_blur(mask, _per_image(sigma, mask)).clamp(0.0, 1.0)
    return background + soft * (x - background)


def speckle(x: Images, mask: Masks, background: Images, g: torch.Generator, fraction: Strength = 0.03) -> Images:
    """Floaters: a share of pixels replaced by random colours."""
    b, _, h, w = x.shape
    hit = torch.rand(b, 1, h, w, generator=g, device=x.device) < fraction
    colours = torch.rand(b, 3, h, w, generator=g, device=x.device)
    return torch.where(hit, colours, x)


def nerf_noise(x: Images, mask: Masks, background: Images, g: torch.Generator, strength: Strength = 0.15) -> Images:
    """Low-frequency colour noise on the object (an under-trained hash grid): an 8x8 field of
    per-channel gains in 1 ± ``strength``, upsampled smoothly, plus fine noise of std 0.02."""
    b, _, h, w = x.shape
    coarse = torch.rand(b, 3, 8, 8, generator=g, device=x.device) * 2.0 - 1.0
    gains = 1.0 + strength * F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    fine = 0.02 * torch.randn(x.shape, generator=g, device=x.device)
    return x + mask * (x * (gains - 1.0) + fine)


def combined(x: Images, mask: Masks, background: Images, g: torch.Generator) -> Images:
    """Everything at once, milder each: what a typical coarse render looks like."""
    x = nerf_noise(x, mask, background, g, strength=0.1)
    x = soft_silhouette(x, mask, background, g, sigma=1.0)
    x = translucent(x, mask, background, g, alpha=0.8)
    x = speckle(x, mask, background, g, fraction=0.01)
    return blur(x, mask, background, g, sigma=1.0)


def backdrop_colour(images: Images, masks: Masks) -> Images:
    """Each image's mean uncovered colour, broadcast over the image: exact for plain
    backdrops, the backdrop's average for gradients and noise."""
    empty = (masks < 0.5).float()
    colour = (images * empty).sum(dim=(2, 3)) / empty.sum(dim=(2, 3)).clamp_min(1.0)
    return colour[:, :, None, None].expand_as(images)


# Training-time ranges (upper ends = the robustness report's fixed strengths or a bit beyond,
# so the report measures inside the trained range): alpha down to 0.55, speckle up to 4 % of
# pixels, silhouettes blurred up to 2 px, colour gains up to ±20 %.
ALPHA_RANGE = (0.55, 1.0)
SPECKLE_RANGE = (0.0, 0.04)
SILHOUETTE_SIGMA_RANGE = (0.0, 2.0)
NERF_NOISE_RANGE = (0.0, 0.2)


def random_render_degradations(
    x: Images, mask: Masks, generator: torch.Generator, probability: float
) -> Images:
    """Each image independently gets each render degradation with ``probability``, at a
    uniformly drawn strength; labels are unchanged (a translucent red cube is a red cube).
    ``probability`` 0 returns ``x`` itself."""
    if probability <= 0:
        return x
    b, device = x.shape[0], x.device

    def strength(low: float, high: float, off: float) -> Tensor:
        on = torch.rand(b, generator=generator, device=device) < probability
        value = low + (high - low) * torch.rand(b, generator=generator, device=device)
        return torch.where(on, value, torch.full_like(value, off)).view(b, 1, 1, 1)

    background = backdrop_colour(x, mask)
    x = nerf_noise(x, mask, background, generator, strength(*NERF_NOISE_RANGE, off=0.0))
    x = soft_silhouette(x, mask, background, generator, strength(*SILHOUETTE_SIGMA_RANGE, off=0.0))
    x = translucent(x, mask, background, generator, strength(*ALPHA_RANGE, off=1.0))
    x = speckle(x, mask, background, generator, strength(*SPECKLE_RANGE, off=0.0))
    return x.clamp(0.0, 1.0)
