"""Sampling the priors: the contact-sheet prompts and a DDIM sampler with classifier-free
guidance that uses the guidance's own text path (``encode_texts``). The evaluator samples
priors through ``ddim_sample`` too, so the card's samples and the measured ones agree.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import UInt8
from torch import Tensor, nn

from magic3d.data.cameras import view_suffix
from magic3d.guidance.prompts import encode_texts
from magic3d.priors.configs import TEXT_MAX_LENGTH
from magic3d.priors.heldout import HELD_OUT_PAIRS
from magic3d.toyworld.shapes import COLOUR_NAMES, SHAPE_NAMES, caption


def sample_prompts(rows: int, views: tuple[int, ...], held_out_rows: int = 0) -> list[str]:
    """``rows`` trained objects (distinct shapes, cycling colours), then ``held_out_rows`` of the
    held-out pairs, each as (bare prompt, then each view)."""
    pairs = []
    for r in range(rows):
        shape = SHAPE_NAMES[(r * 3) % len(SHAPE_NAMES)]
        k = r
        while (shape, COLOUR_NAMES[k % len(COLOUR_NAMES)]) in HELD_OUT_PAIRS:
            k += 1
        pairs.append((shape, COLOUR_NAMES[k % len(COLOUR_NAMES)]))
    pairs += list(HELD_OUT_PAIRS[:held_out_rows])
    prompts = []
    for shape, colour in pairs:
        prompts.append(caption(shape, colour))
        prompts += [caption(shape, colour, view_suffix(v)) for v in views]
    return prompts


@torch.no_grad()
def ddim_sample(
    unet: nn.Module,
    text_encoder: nn.Module,
    tokenizer: Any,
    scheduler_config: dict[str, Any],
    prompts: list[str],
    steps: int,
    guidance_scale: float,
    seed: int = 0,
    vae: nn.Module | None = None,
    scaling_factor: float = 1.0,
) -> UInt8[Tensor, "N H W 3"]:
    """DDIM samples with classifier-free guidance (negative prompt ""), as uint8 images (CPU).

    Uses the guidance's own text path (``encode_texts``) and only the first ``in_channels``
    UNet outputs (IF's variance channels are ignored), then decodes latents with ``vae``.
    """
    from diffusers import DDIMScheduler

    device = next(unet.parameters()).device
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    embeddings = encode_texts(tokenizer, text_encoder, [*prompts, ""], TEXT_MAX_LENGTH)
    dtype = next(unet.parameters()).dtype
    cond = embeddings[:-1].to(dtype)
    uncond = embeddings[-1:].expand_as(cond).to(dtype)
    channels = unet.config.in_channels
    size = unet.config.sample_size
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(len(prompts), channels, size, size, generator=generator).to(device) * scheduler.init_noise_sigma
    context = torch.cat([cond, uncond])
    for t in scheduler.timesteps:
        out = unet(torch.cat([x, x]).to(dtype), t.to(device), encoder_hidden_states=context, return_dict=False)[0]
        eps_c, eps_u = out[:, :channels].float().chunk(2)
        x = scheduler.step(eps_u + guidance_scale * (eps_c - eps_u), t, x).prev_sample
    if vae is not None:
        x = vae.decode((x / scaling_factor).to(next(vae.parameters()).dtype)).sample.float()
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
