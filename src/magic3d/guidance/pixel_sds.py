"""Pixel-space SDS with a DeepFloyd IF stage-I style prior (64x64 RGB diffusion).

The frozen UNet is loaded in ``setup`` and held outside ``nn.Module`` registration, so it
never enters ``state_dict()`` or checkpoints and parent ``.to()`` calls do not see it;
``step`` moves it (once) to the device of the renders it receives, which covers Lightning
moving the system after ``setup``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from magic3d.data.cameras import view_index
from magic3d.guidance.base import Weighting
from magic3d.guidance.frozen import TEXT_MAX_LENGTH, FrozenPriorGuidance
from magic3d.guidance.loading import cfg_unet_outputs
from magic3d.guidance.prompts import PromptEmbeddings
from magic3d.types import CameraBatch, GuidanceOutput

__all__ = ["TEXT_MAX_LENGTH", "PixelSDS"]


class PixelSDS(FrozenPriorGuidance):
    """Score distillation from a pixel-space prior (IF stage I layout).

    Args:
        pretrained: local diffusers pipeline folder or Hugging Face Hub id (e.g.
            "DeepFloyd/IF-I-XL-v1.0"; gated: accept its licence on the Hub first).
        guidance_scale: CFG scale in ``eps_u + s (eps_c - eps_u)`` (threestudio's IF scale
            20 is 21 here).
        half_precision: bfloat16 UNet and embeddings on CUDA; CPU always runs float32.
        negative_prompt: text for the unconditional branch.
        cache_dir: text-embedding cache folder (default: ``$MAGIC3D_CACHE/text_embeddings``
            or ``~/.cache/magic3d/text_embeddings``).
        enable_channels_last: channels-last UNet on CUDA (faster convolutions on tensor cores).
        max_batch_per_unet_call: split the 2B-sample CFG forward into chunks of at most this
            many samples to bound activation memory; None runs it in one call.
        variant: weight-file variant to load, e.g. "fp16" (half the download of IF's fp32 files).
        Other arguments: see ``ScoreDistillation``.
    """

    PARTS = ("unet",)
    PIPELINE_NAME = "DeepFloyd IF stage-I"
    PIPELINE_LAYOUT = "unet/, text_encoder/, tokenizer/, scheduler/ and model_index.json"
    TEXT_ENCODER_CLASS = "T5EncoderModel"

    def __init__(
        self,
        pretrained: str,
        guidance_scale: float = 20.0,
        min_step_percent: float = 0.02,
        max_step_percent: float = 0.98,
        anneal_to: tuple[float, float] | None = None,
        weighting: Weighting = "sds",
        grad_clip: float | None = None,
        view_dependent_prompting: bool = True,
        half_precision: bool = True,
        negative_prompt: str = "",
        cache_dir: str | None = None,
        enable_channels_last: bool = False,
        max_batch_per_unet_call: int | None = None,
        variant: str | None = None,
    ) -> None:
        super().__init__(
            guidance_scale=guidance_scale,
            min_step_percent=min_step_percent,
            max_step_percent=max_step_percent,
            anneal_to=anneal_to,
            weighting=weighting,
            grad_clip=grad_clip,
            view_dependent_prompting=view_dependent_prompting,
        )
        self._init_frozen(pretrained, half_precision, negative_prompt, cache_dir, variant, max_batch_per_unet_call)
        self.enable_channels_last = enable_channels_last

    # ------------------------------------------------------------------ construction

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

    def _prepare(self, name: str, module: nn.Module, device: torch.device) -> nn.Module:
        if self.enable_channels_last and device.type == "cuda":
            return module.to(memory_format=torch.channels_last)
        return module

    # ------------------------------------------------------------------ the step

    def preprocess(self, rgb: Float[Tensor, "B H W 3"]) -> Float[Tensor, "B 3 S S"]:
        """Channel-last [0, 1] renders -> channel-first [-1, 1] at the UNet's resolution."""
        x = rgb.permute(0, 3, 1, 2).float()
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        if tuple(x.shape[-2:]) != size:
            # antialias matters when renders are larger than the prior (e.g. 128 -> 64).
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return x * 2.0 - 1.0

    def step(
        self, rgb: Float[Tensor, "B H W 3"], cameras: CameraBatch, progress: float
    ) -> GuidanceOutput:
        """SDS loss for a batch of renders; its gradient reaches ``rgb`` only."""
        if rgb.ndim != 4 or rgb.shape[-1] != 3:
            raise ValueError(f"rgb must be (B, H, W, 3) channel-last, got {tuple(rgb.shape)}.")
        if self._needs_placing(rgb.device):
            self._place(rgb.device)
        x = self.preprocess(rgb)
        views = view_index(cameras.elevation, cameras.azimuth)
        cond, uncond = self.embeddings.embeddings_for(views, self.view_dependent_prompting)
        return self.distill(x, lambda x_t, t: self.predict_noise(x_t, t, cond, uncond), progress)

    def predict_noise(
        self,
        x_t: Float[Tensor, "B C H W"],
        t: Tensor,
        cond: Float[Tensor, "B L D"],
        uncond: Float[Tensor, "B L D"],
    ) -> tuple[Float[Tensor, "B C H W"], Float[Tensor, "B C H W"]]:
        """(eps_cond, eps_uncond) from one CFG batch of 2B through the frozen UNet.

        Extra output channels (IF's learned variance) are dropped: only epsilon is used.
        """
        eps = cfg_unet_outputs(self.unet, x_t, t, cond, uncond, self.max_batch_per_unet_call,
                               channels_last=self.enable_channels_last)
        eps_cond, eps_uncond = eps.chunk(2)
        return eps_cond, eps_uncond

