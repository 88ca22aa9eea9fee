"""Pixel-space SDS with a DeepFloyd IF stage-I style prior (64x64 RGB diffusion).

Renders are resized to the UNet's resolution and mapped to [-1, 1]; everything else (the
frozen pipeline, CFG, weighting, the surrogate loss) is :class:`ScoreDistillation`'s.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from magic3d.guidance.base import ScoreDistillation
from magic3d.guidance.frozen import TEXT_MAX_LENGTH, PipelineLayout
from magic3d.guidance.prompts import PromptEmbeddings

__all__ = ["TEXT_MAX_LENGTH", "PixelSDS"]


class PixelSDS(ScoreDistillation):
    """Score distillation from a pixel-space prior (IF stage I layout).

    Args:
        pretrained: local diffusers pipeline folder or Hugging Face Hub id (e.g.
            "DeepFloyd/IF-I-XL-v1.0"; gated: accept its licence on the Hub first).
        guidance_scale: CFG scale in ``eps_u + s (eps_c - eps_u)`` (threestudio's IF scale
            20 is 21 here).
        Other arguments: see :class:`~magic3d.guidance.base.ScoreDistillation`.
    """

    LAYOUT = PipelineLayout(name="DeepFloyd IF stage-I", parts=("unet",), text_encoder_class="T5EncoderModel")

    def __init__(self, pretrained: str, guidance_scale: float = 20.0, **kwargs: Any) -> None:
        super().__init__(pretrained, guidance_scale=guidance_scale, **kwargs)

    @classmethod
    def from_modules(
        cls,
        unet: nn.Module,
        scheduler: Any,
        text_embeddings: PromptEmbeddings | None = None,
        tokenizer: Any = None,
        text_encoder: nn.Module | None = None,
        **kwargs: Any,
    ) -> "PixelSDS":
        """Build from in-memory modules (tests, benchmarks); ``setup`` still places them.

        Give either ``text_embeddings`` (``setup``'s prompt is then ignored) or
        ``tokenizer`` + ``text_encoder`` (embeddings computed in ``setup``, never cached: the
        modules' weights have no stable identity). ``scheduler`` needs ``alphas_cumprod``.
        """
        return cls._from_parts({"unet": unet}, scheduler, text_embeddings, tokenizer, text_encoder, kwargs)

    def to_model_space(self, rgb: Float[Tensor, "B H W 3"]) -> Float[Tensor, "B 3 S S"]:
        """Channel-last [0, 1] renders -> channel-first [-1, 1] at the UNet's resolution."""
        x = rgb.permute(0, 3, 1, 2).float()
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        if tuple(x.shape[-2:]) != size:
            # antialias matters when renders are larger than the prior (e.g. 128 -> 64).
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return x * 2.0 - 1.0

