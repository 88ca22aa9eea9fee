"""Perp-Neg (Armandpour et al. 2023, "Re-imagine the Negative Prompt Algorithm"): a Janus fix.

View-dependent prompts alone ("..., back view") are weak: the prior keeps drawing the object's
front from behind. Perp-Neg adds the *other* views as negative prompts, but only the part of
each negative's guidance that is perpendicular to the positive one, so removing "front view"
never removes the object itself:

    e_pos = eps(positive) - eps_u
    e_i   = eps(negative_i) - eps_u
    eps_hat = eps_u + s * (e_pos - sum_i w_i * perp(e_i, e_pos)),   perp(x, y) = x - <x,y>/<y,y> y

(inner products per sample, over all of C, H, W). The positive embedding is interpolated by
azimuth between the view embeddings of :class:`~magic3d.guidance.prompts.PromptEmbeddings`, and
the weights ``w_i`` fall off where the view is a pure one, as threestudio implements the paper
(its ``get_text_embeddings_perp_neg``), in this toolkit's conventions (azimuth 0 = front,
radians; ``VIEW_NAMES`` order front, side, back, overhead):

- |azimuth| < 90 deg: ``r = 1 - |az| / 90`` (1 front, 0 side); positive ``r front + (1-r) side``;
  negatives front with ``w = f_fs(r)`` and side with ``w = f_sf(1 - r)``;
- otherwise: ``r = 2 - |az| / 90`` (1 side, 0 back); positive ``r side + (1-r) back``;
  negatives side with ``w = f_sb(r)`` and front with ``w = f_fsb(r)``;
- overhead views (the view index says so): the overhead embedding, no negative (weights 0).

Each ``f`` is ``a exp(-b r) + c``. ``f_fs(1) = f_sb(1) ~ 0``: a pure view is not pushed from its
own name, and ``f_fs(0) ~ f_fsb(1)``: the front negative's weight is continuous across the side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from magic3d.data.cameras import VIEW_NAMES, view_index, wrap_angle
from magic3d.guidance.prompts import PromptEmbeddings

FRONT, SIDE, BACK, OVERHEAD = (VIEW_NAMES.index(name) for name in ("front", "side", "back", "overhead"))


@dataclass(frozen=True)
class ExponentialDecay:
    """``a exp(-b r) + c``: a negative prompt's weight as a function of the view blend ``r``."""

    a: float
    b: float
    c: float

    def __call__(self, r: Float[Tensor, "B"]) -> Float[Tensor, "B"]:
        return self.a * torch.exp(-self.b * r) + self.c


# threestudio's defaults for the paper's weight functions (c chosen so that f(1) ~ 0, a, b > 0).
FRONT_IN_FRONT_SIDE = ExponentialDecay(4.0, 0.5, -2.426)  # f_fs: "front" as a negative, front-side segment
SIDE_IN_FRONT_SIDE = ExponentialDecay(4.0, 0.5, -2.426)  # f_sf: "side" as a negative, front-side segment
SIDE_IN_SIDE_BACK = ExponentialDecay(1.0, 0.5, -0.606)  # f_sb: "side" as a negative, side-back segment
FRONT_IN_SIDE_BACK = ExponentialDecay(1.0, 0.5, 0.967)  # f_fsb: "front" as a negative, side-back segment


@dataclass
class PerpNegPrompts:
    """Per camera: the azimuth-interpolated positive embedding, the negative views' embeddings
    and their weights (>= 0, subtracted; 0 where a camera has no negative)."""

    positive: Float[Tensor, "B L D"]
    negatives: Float[Tensor, "B K L D"]
    weights: Float[Tensor, "B K"]


def perp_neg_prompts(
    embeddings: PromptEmbeddings, elevation: Float[Tensor, "B"], azimuth: Float[Tensor, "B"]
) -> PerpNegPrompts:
    """Interpolated positive prompts and weighted negative views for each camera (radians in)."""
    views = embeddings.views
    device, dtype = views.device, views.dtype
    elevation, azimuth = elevation.to(device), azimuth.to(device)
    abs_deg = wrap_angle(azimuth).abs().float() * (180.0 / math.pi)
    front_side = abs_deg < 90.0
    # r: share of the segment's first view (front in front-side, side in side-back), in [0, 1].
    r = torch.where(front_side, 1.0 - abs_deg / 90.0, 2.0 - abs_deg / 90.0).clamp(0.0, 1.0)
    first = torch.where(front_side, FRONT, SIDE)
    second = torch.where(front_side, SIDE, BACK)
    blend = r.to(dtype)[:, None, None]
    positive = blend * views[first] + (1.0 - blend) * views[second]
    negative_views = torch.stack([torch.where(front_side, FRONT, SIDE), torch.where(front_side, SIDE, FRONT)], 1)
    weights = torch.stack([
        torch.where(front_side, FRONT_IN_FRONT_SIDE(r), SIDE_IN_SIDE_BACK(r)),
        torch.where(front_side, SIDE_IN_FRONT_SIDE(1.0 - r), FRONT_IN_SIDE_BACK(r)),
    ], 1)
    negatives = views[negative_views]

    overhead = view_index(elevation, azimuth) == OVERHEAD
    if bool(overhead.any()):
        positive = torch.where(overhead[:, None, None], views[OVERHEAD], positive)
        uncond = embeddings.uncond.to(dtype).expand_as(negatives)
        negatives = torch.where(overhead[:, None, None, None], uncond, negatives)  # unused: weight 0
        weights = torch.where(overhead[:, None], torch.zeros_like(weights), weights)
    return PerpNegPrompts(positive=positive, negatives=negatives, weights=weights.float())


def perpendicular_component(
    x: Float[Tensor, "B ..."], y: Float[Tensor, "B ..."], eps: float = 1e-6
) -> Float[Tensor, "B ..."]:
    """The part of each sample of ``x`` perpendicular to the same sample of ``y``:
    ``x - <x, y> / max(<y, y>, eps) y``; ``x`` itself where ``y`` is (nearly) zero."""
    dims = tuple(range(1, x.ndim))
    dot = (x * y).sum(dim=dims, keepdim=True)
    norm = (y * y).sum(dim=dims, keepdim=True).clamp_min(eps)
    return x - dot / norm * y


def perp_neg_noise(
    eps_positive: Float[Tensor, "B C H W"],
    eps_uncond: Float[Tensor, "B C H W"],
    eps_negatives: Float[Tensor, "B K C H W"],
    weights: Float[Tensor, "B K"],
) -> Float[Tensor, "B C H W"]:
    """The conditional noise whose classifier-free guidance is Perp-Neg's:
    ``eps_u + e_pos - sum_i w_i perp(e_i, e_pos)``, so that ``eps_u + s (result - eps_u)`` is
    the module docstring's ``eps_hat``."""
    e_pos = eps_positive - eps_uncond
    direction = e_pos
    for i in range(eps_negatives.shape[1]):
        e_neg = eps_negatives[:, i] - eps_uncond
        w = weights[:, i].to(e_pos.dtype).reshape(-1, *([1] * (e_pos.ndim - 1)))
        direction = direction - w * perpendicular_component(e_neg, e_pos)
    return eps_uncond + direction
