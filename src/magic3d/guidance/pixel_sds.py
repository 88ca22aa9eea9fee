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
from magic3d.guidance.base import ScoreDistillation, Weighting
from magic3d.guidance.loading import PipelineSource, cfg_unet_outputs, half_dtype_for
from magic3d.guidance.loading import canonical_device as _canonical
from magic3d.guidance.loading import module_dtype as _module_dtype
from magic3d.guidance.prompts import PromptEmbeddings, compute_prompt_embeddings, release_text_encoder
from magic3d.types import CameraBatch, GuidanceOutput

TEXT_MAX_LENGTH = 77  # IF pads T5 prompts to 77 tokens
_PIPELINE_LAYOUT = "unet/, text_encoder/, tokenizer/, scheduler/ and model_index.json"


class PixelSDS(ScoreDistillation):
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
        if max_batch_per_unet_call is not None and max_batch_per_unet_call < 1:
            raise ValueError(
                f"max_batch_per_unet_call={max_batch_per_unet_call} must be >= 1, or None for one call."
            )
        self.pretrained = pretrained
        self.half_precision = half_precision
        self.negative_prompt = negative_prompt
        self.cache_dir = cache_dir
        self.enable_channels_last = enable_channels_last
        self.max_batch_per_unet_call = max_batch_per_unet_call
        self.variant = variant
        # Frozen parts live in a plain dict: nn.Module does not register (or save) them.
        self._frozen: dict[str, Any] = {}
        self._embeddings: PromptEmbeddings | None = None

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
        if text_embeddings is None and (tokenizer is None or text_encoder is None):
            raise ValueError("from_modules needs text_embeddings, or both tokenizer and text_encoder.")
        guidance = cls(pretrained=kwargs.pop("pretrained", "<in-memory>"), **kwargs)
        guidance._frozen["source"] = {
            "unet": unet,
            "scheduler": scheduler,
            "text_embeddings": text_embeddings,
            "tokenizer": tokenizer,
            "text_encoder": text_encoder,
        }
        return guidance

    @property
    def unet(self) -> nn.Module:
        if "unet" not in self._frozen:
            raise RuntimeError("PixelSDS.setup(prompt, device) must run before the UNet is used.")
        return self._frozen["unet"]

    @property
    def embeddings(self) -> PromptEmbeddings:
        if self._embeddings is None:
            raise RuntimeError("PixelSDS.setup(prompt, device) must run before step().")
        return self._embeddings

    def _dtype_for(self, device: torch.device) -> torch.dtype:
        return half_dtype_for(device, self.half_precision)

    def setup(self, prompt: str, device: torch.device | str) -> None:
        """Load the UNet and noise schedule, get the prompt embeddings, free the text encoder.

        Calling it again (Lightning runs setup per stage) keeps the loaded UNet, only
        re-placing it and, for a new prompt, fetching that prompt's embeddings.
        """
        device = torch.device(device)
        dtype = self._dtype_for(device)
        if "unet" in self._frozen:
            if prompt != self._frozen["prompt"] and not self._frozen["in_memory"]:
                self._embeddings = self._cached_embeddings(prompt, device, dtype)
                self._frozen["prompt"] = prompt
            self._place(device)
            return
        source = self._frozen.pop("source", None)
        self._frozen["in_memory"] = source is not None
        self._frozen["prompt"] = prompt
        if source is not None:
            unet, scheduler = source["unet"], source["scheduler"]
            embeddings = source["text_embeddings"]
            if embeddings is None:
                text_encoder = source["text_encoder"].to(device)
                embeddings = compute_prompt_embeddings(
                    source["tokenizer"], text_encoder, prompt, self.negative_prompt, TEXT_MAX_LENGTH
                )
                del text_encoder
            source.clear()
            release_text_encoder(device)
        else:
            unet, scheduler = self._load_unet(dtype), self._load_scheduler()
            embeddings = self._cached_embeddings(prompt, device, dtype)

        unet.requires_grad_(False).eval()
        self._frozen["unet"] = unet
        self.set_alphas_cumprod(torch.as_tensor(scheduler.alphas_cumprod))
        self._embeddings = embeddings
        self._place(device)

    def _place(self, device: torch.device) -> None:
        """Move the frozen UNet and embeddings to ``device`` in the precision used there."""
        dtype = self._dtype_for(device)
        unet = self.unet
        if _module_dtype(unet) != dtype:
            unet = unet.to(dtype=dtype)
        unet = unet.to(device=device)
        if self.enable_channels_last and device.type == "cuda":
            unet = unet.to(memory_format=torch.channels_last)
        self._frozen["unet"] = unet
        self._frozen["device"] = _canonical(device)
        self._embeddings = self.embeddings.to(device, dtype)
        self.alphas_cumprod = self.alphas_cumprod.to(device)

    # ------------------------------------------------------------------ loading

    def _pipeline_source(self) -> PipelineSource:
        return PipelineSource(self.pretrained, "DeepFloyd IF stage-I", _PIPELINE_LAYOUT, ("unet", "scheduler"))

    def _load_unet(self, dtype: torch.dtype) -> nn.Module:
        from diffusers import UNet2DConditionModel

        return self._pipeline_source().load_model(
            UNet2DConditionModel, "unet", "UNet (unet/)", torch_dtype=dtype, variant=self.variant
        )

    def _load_scheduler(self) -> Any:
        return self._pipeline_source().load_scheduler()

    def _load_text_encoder(self, device: torch.device, dtype: torch.dtype) -> tuple[Any, nn.Module]:
        """Tokenizer and T5 encoder, on ``device``; only called on an embedding-cache miss."""
        from transformers import T5EncoderModel

        return self._pipeline_source().load_text_encoder(T5EncoderModel, device, dtype, self.variant)

    def _cached_embeddings(self, prompt: str, device: torch.device, dtype: torch.dtype) -> PromptEmbeddings:
        return self._pipeline_source().cached_embeddings(
            prompt=prompt,
            negative_prompt=self.negative_prompt,
            max_length=TEXT_MAX_LENGTH,
            load_encoder=lambda: self._load_text_encoder(device, dtype),
            device=device,
            cache_dir=self.cache_dir,
        )

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
        if self._frozen.get("device") != _canonical(rgb.device):
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

