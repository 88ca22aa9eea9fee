"""Latent-space SDS with a Stable Diffusion style prior (Magic3D's fine stage, §4.2).

Renders (512x512 for SD) are encoded by the frozen VAE encoder *with* gradients, scaled by
``scaling_factor``, and SDS runs on the latents (``ScoreDistillation.distill``). The decoder
is never run in the training step (threestudio decodes every step and throws the result away).

Design choices:

- Latents are the posterior mean by default (deterministic, so CPU runs are reproducible
  and the gradient carries no VAE sampling noise). ``sample_latents=True`` draws
  ``mean + std * n`` as threestudio does; SD's posterior std is small, so the two differ little.
- The VAE encoder runs in chunks of ``vae_chunk_size`` images. Chunking alone does not bound
  memory (autograd keeps every chunk's activations until backward), so with
  ``vae_recompute=True`` each chunk is checkpointed: only its input is kept and its forward is
  re-run chunk by chunk during backward. Peak activation memory is one chunk (~1.6 GB per
  512² image in SD's VAE) at the cost of one extra encoder forward per step.
- The UNet may predict epsilon, v or x0 (``prediction_type``, read from the scheduler config
  by default); outputs are converted to epsilon before classifier-free guidance.
- Frozen VAE and UNet live in the guidance's ``FrozenPipeline`` (as in ``PixelSDS``): not in
  ``state_dict()``, untouched by a parent's ``.to()``; ``step`` moves them to the renders' device.
- Text embeddings go through the shared disk cache (``magic3d.guidance.prompts``) with the
  pipeline's own tokenizer and CLIP text encoder, padded to 77 tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from magic3d.guidance.base import ScoreDistillation
from magic3d.guidance.frozen import PipelineLayout
from magic3d.guidance.loading import module_dtype
from magic3d.guidance.prompts import PromptEmbeddings

def vae_input_size(unet: nn.Module, vae: nn.Module) -> tuple[int, int]:
    """Image size the VAE must see so its latents match the UNet: latent size x 2^(levels-1).

    Derived from the UNet, not the VAE's ``sample_size`` (SD 2.1-base's VAE config says 768
    although its UNet works on 64x64 latents of 512 px images), as diffusers' pipelines do.
    """
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return size[0] * factor, size[1] * factor


class LatentSDS(ScoreDistillation):
    """Score distillation from a latent prior (Stable Diffusion layout), gradient through the VAE.

    Args:
        pretrained: local diffusers pipeline folder or Hub id (e.g.
            "stabilityai/stable-diffusion-2-1-base").
        guidance_scale: CFG scale in ``eps_u + s (eps_c - eps_u)``; 100 as in DreamFusion and
            Magic3D (threestudio's SD scale 100 is 101 here).
        max_step_percent: the fine stage's range ends at 0.5 of T by default.
        vae_chunk_size: images per VAE-encoder call (bounds activation memory, see module doc).
        vae_recompute: checkpoint each chunk (recompute in backward) so only one chunk's
            activations are alive; False keeps all of them (faster, more memory).
        sample_latents: sample the VAE posterior instead of using its mean.
        Other arguments: see :class:`~magic3d.guidance.base.ScoreDistillation`.
    """

    LAYOUT = PipelineLayout(name="Stable Diffusion", parts=("vae", "unet"), text_encoder_class="CLIPTextModel")

    def __init__(
        self,
        pretrained: str,
        guidance_scale: float = 100.0,
        max_step_percent: float = 0.5,
        vae_chunk_size: int = 4,
        vae_recompute: bool = True,
        sample_latents: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(pretrained, guidance_scale=guidance_scale, max_step_percent=max_step_percent, **kwargs)
        if vae_chunk_size < 1:
            raise ValueError(f"vae_chunk_size={vae_chunk_size} must be >= 1 (images per VAE-encoder call).")
        self.vae_chunk_size = vae_chunk_size
        self.vae_recompute = vae_recompute
        self.sample_latents = sample_latents

    @classmethod
    def from_modules(
        cls,
        unet: nn.Module,
        vae: nn.Module,
        scheduler: Any,
        text_embeddings: PromptEmbeddings | None = None,
        tokenizer: Any = None,
        text_encoder: nn.Module | None = None,
        **kwargs: Any,
    ) -> "LatentSDS":
        """Build from in-memory modules (tests, benchmarks); ``setup`` still places them.

        Give either ``text_embeddings`` (``setup``'s prompt is then ignored) or
        ``tokenizer`` + ``text_encoder`` (embeddings computed in ``setup``, never cached).
        ``scheduler`` needs ``alphas_cumprod`` (and ``config.prediction_type`` for "auto").
        """
        return cls._from_parts({"unet": unet, "vae": vae}, scheduler, text_embeddings, tokenizer, text_encoder,
                               kwargs)

    @property
    def vae(self) -> nn.Module:
        return self.frozen.part("vae", type(self).__name__)

    # ------------------------------------------------------------------ the step

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) the renders are resized to before encoding (512x512 for SD 2.1-base)."""
        return vae_input_size(self.unet, self.vae)

    def to_model_space(self, rgb: Float[Tensor, "B H W 3"]) -> Float[Tensor, "B 4 s s"]:
        """Scaled VAE latents of channel-last [0, 1] renders (no decoder call)."""
        return self.encode(self.to_vae_input(rgb))

    def to_vae_input(self, rgb: Float[Tensor, "B H W 3"]) -> Float[Tensor, "B 3 S S"]:
        """Channel-last [0, 1] renders -> channel-first [-1, 1] at the VAE's input size."""
        x = rgb.permute(0, 3, 1, 2).float()
        size = self.image_size
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return x * 2.0 - 1.0

    def encode(self, x: Float[Tensor, "B 3 S S"]) -> Float[Tensor, "B 4 s s"]:
        """Scaled VAE latents of images in [-1, 1], differentiable w.r.t. ``x`` (float32)."""
        chunks = x.split(self.vae_chunk_size)
        recompute = self.vae_recompute and len(chunks) > 1 and x.requires_grad and torch.is_grad_enabled()
        means, stds = [], []
        for chunk in chunks:
            if recompute:
                mean, std = checkpoint(self._posterior, chunk, use_reentrant=False)
            else:
                mean, std = self._posterior(chunk)
            means.append(mean)
            stds.append(std)
        z = torch.cat(means).float()
        if self.sample_latents:
            # One draw for the whole batch: the same seed gives the same latents in any chunking.
            std = torch.cat(stds).float()
            # randn (not randn_like): the draw must not depend on the strides of ``std``.
            z = z + std * torch.randn(std.shape, device=std.device, dtype=std.dtype)
        config = self.vae.config
        shift = getattr(config, "shift_factor", None)
        if shift is not None:
            z = z - shift
        return z * config.scaling_factor

    def _posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        vae = self.vae
        dist = vae.encode(x.to(module_dtype(vae))).latent_dist
        return dist.mean, dist.std
