"""Sampling a prior during personalisation: class images and previews.

DDIM with classifier-free guidance (``eps_u + s (eps_c - eps_u)``, the guidance's convention) on
text embeddings computed once, through :class:`~magic3d.dreambooth.prior.PersonalisedPrior`, so
it runs the UNet as it is at the moment: frozen for the class images, with the adapters for the
previews. The evaluator's sampler (``magic3d.priors.sampling``) belongs to prior training, which
the training path does not import; both follow diffusers' ``DDIMScheduler``.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from magic3d.dreambooth.prior import PersonalisedPrior


@torch.no_grad()
def sample_images(
    prior: PersonalisedPrior,
    cond: Float[Tensor, "N L D"],
    uncond: Float[Tensor, "L D"],
    steps: int,
    guidance_scale: float,
    seed: int,
) -> Float[Tensor, "N S S 3"]:
    """DDIM samples for each conditional embedding, as channel-last images in [0, 1] (float32).

    The initial noise is drawn on the CPU from ``seed``, so a sample depends on the seed alone,
    not on the device or the batch it shares.
    """
    from diffusers import DDIMScheduler

    if steps < 1:
        raise ValueError(f"sampling steps={steps} must be >= 1")
    unet = prior.unet
    device = next(unet.parameters()).device
    scheduler = DDIMScheduler.from_config(prior.scheduler_config)
    scheduler.set_timesteps(steps)
    size = int(unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0])
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(cond.shape[0], prior.latent_channels, size, size, generator=generator).to(device)
    x = x * scheduler.init_noise_sigma
    cond = cond.to(device)
    context = torch.cat([cond, uncond.to(device).expand_as(cond)])
    for t in scheduler.timesteps:
        timesteps = torch.full((2 * x.shape[0],), int(t), device=device, dtype=torch.long)
        x_in = torch.cat([x, x])
        eps = prior.noise_estimate(prior.unet_output(x_in, timesteps, context), x_in.float(), timesteps)
        eps_c, eps_u = eps.chunk(2)
        x = scheduler.step(eps_u + guidance_scale * (eps_c - eps_u), t, x).prev_sample
    return prior.decode(x)


def quantise(images: Float[Tensor, "N S S 3"]) -> Float[Tensor, "N S S 3"]:
    """Images as 8-bit PNGs hold them: class images generated now and read back later from
    their PNG files are then the same tensors, so a resumed stage trains on identical data."""
    return (images.clamp(0.0, 1.0) * 255.0).round() / 255.0
