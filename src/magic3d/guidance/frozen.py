"""What pixel and latent SDS share: a frozen diffusers pipeline outside nn.Module registration.

The frozen models (UNet, and the VAE for latent priors) live in a plain dict, so they never
enter ``state_dict()`` or checkpoints and a parent's ``.to()`` does not see them. ``setup``
loads them once (from a folder or hub id, or from modules given to ``from_modules``), gets the
prompt's text embeddings through the disk cache and frees the text encoder; calling it again
only re-places the models and, for a new prompt, fetches that prompt's embeddings.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from magic3d.guidance.base import ScoreDistillation
from magic3d.guidance.loading import PipelineSource, canonical_device, half_dtype_for, module_dtype
from magic3d.guidance.prompts import PromptEmbeddings, compute_prompt_embeddings, release_text_encoder

TEXT_MAX_LENGTH = 77  # IF pads T5 prompts and SD pads CLIP prompts to 77 tokens

# Frozen part -> (diffusers class, what the error messages call it).
_PART_CLASSES = {"unet": ("UNet2DConditionModel", "UNet (unet/)"), "vae": ("AutoencoderKL", "VAE (vae/)")}


class FrozenPriorGuidance(ScoreDistillation):
    """Base of the SDS guidance classes; subclasses name their pipeline and frozen parts."""

    PARTS: tuple[str, ...] = ("unet",)  # frozen diffusers models, one sub-folder each
    PIPELINE_NAME = ""  # for error messages, e.g. "Stable Diffusion"
    PIPELINE_LAYOUT = ""  # the sub-folders a local pipeline folder must have
    TEXT_ENCODER_CLASS = ""  # transformers class of text_encoder/

    def _init_frozen(
        self,
        pretrained: str,
        half_precision: bool,
        negative_prompt: str,
        cache_dir: str | None,
        variant: str | None,
        max_batch_per_unet_call: int | None,
    ) -> None:
        if max_batch_per_unet_call is not None and max_batch_per_unet_call < 1:
            raise ValueError(
                f"max_batch_per_unet_call={max_batch_per_unet_call} must be >= 1, or None for one call."
            )
        self.max_batch_per_unet_call = max_batch_per_unet_call
        self.pretrained = pretrained
        self.half_precision = half_precision
        self.negative_prompt = negative_prompt
        self.cache_dir = cache_dir
        self.variant = variant
        self._frozen: dict[str, Any] = {}
        self._embeddings: PromptEmbeddings | None = None

    @classmethod
    def _from_parts(
        cls,
        parts: dict[str, nn.Module],
        scheduler: Any,
        text_embeddings: PromptEmbeddings | None,
        tokenizer: Any,
        text_encoder: nn.Module | None,
        kwargs: dict[str, Any],
    ):
        if text_embeddings is None and (tokenizer is None or text_encoder is None):
            raise ValueError("from_modules needs text_embeddings, or both tokenizer and text_encoder.")
        guidance = cls(pretrained=kwargs.pop("pretrained", "<in-memory>"), **kwargs)
        guidance._frozen["source"] = {
            **parts,
            "scheduler": scheduler,
            "text_embeddings": text_embeddings,
            "tokenizer": tokenizer,
            "text_encoder": text_encoder,
        }
        return guidance

    # ------------------------------------------------------------------ access

    def _require(self, name: str) -> Any:
        if name not in self._frozen:
            raise RuntimeError(f"{type(self).__name__}.setup(prompt, device) must run before the {name} is used.")
        return self._frozen[name]

    @property
    def unet(self) -> nn.Module:
        return self._require("unet")

    @property
    def embeddings(self) -> PromptEmbeddings:
        if self._embeddings is None:
            raise RuntimeError(f"{type(self).__name__}.setup(prompt, device) must run before step().")
        return self._embeddings

    def _needs_placing(self, device: torch.device) -> bool:
        return self._frozen.get("device") != canonical_device(device)

    # ------------------------------------------------------------------ setup

    def setup(self, prompt: str, device: torch.device | str) -> None:
        """Load the frozen models and noise schedule, get the prompt embeddings, free the text
        encoder; again (Lightning runs setup per stage): re-place, new prompt's embeddings."""
        device = torch.device(device)
        dtype = half_dtype_for(device, self.half_precision)
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
            parts = {name: source[name] for name in self.PARTS}
            scheduler, embeddings = source["scheduler"], source["text_embeddings"]
            if embeddings is None:
                text_encoder = source["text_encoder"].to(device)
                embeddings = compute_prompt_embeddings(
                    source["tokenizer"], text_encoder, prompt, self.negative_prompt, TEXT_MAX_LENGTH
                )
                del text_encoder
            source.clear()
            release_text_encoder(device)
        else:
            parts = {name: self._load_part(name, dtype) for name in self.PARTS}
            scheduler = self._pipeline_source().load_scheduler()
            embeddings = self._cached_embeddings(prompt, device, dtype)
        for name, module in parts.items():
            self._frozen[name] = module.requires_grad_(False).eval()
        self._on_loaded(scheduler)
        self.set_alphas_cumprod(torch.as_tensor(scheduler.alphas_cumprod))
        self._embeddings = embeddings
        self._place(device)

    def _on_loaded(self, scheduler: Any) -> None:
        """Hook: read what the subclass needs from the scheduler (before placing)."""

    def _prepare(self, name: str, module: nn.Module, device: torch.device) -> nn.Module:
        """Hook: a placed frozen module's last touch (e.g. channels-last on CUDA)."""
        return module

    def _place(self, device: torch.device) -> None:
        """Move the frozen models and embeddings to ``device`` in the precision used there."""
        dtype = half_dtype_for(device, self.half_precision)
        for name in self.PARTS:
            module = self._require(name)
            if module_dtype(module) != dtype:
                module = module.to(dtype=dtype)
            self._frozen[name] = self._prepare(name, module.to(device=device), device)
        self._frozen["device"] = canonical_device(device)
        self._embeddings = self.embeddings.to(device, dtype)
        self.alphas_cumprod = self.alphas_cumprod.to(device)

    # ------------------------------------------------------------------ loading

    def _pipeline_source(self) -> PipelineSource:
        return PipelineSource(self.pretrained, self.PIPELINE_NAME, self.PIPELINE_LAYOUT, (*self.PARTS, "scheduler"))

    def _load_part(self, name: str, dtype: torch.dtype) -> nn.Module:
        import diffusers

        class_name, label = _PART_CLASSES[name]
        return self._pipeline_source().load_model(
            getattr(diffusers, class_name), name, label, torch_dtype=dtype, variant=self.variant
        )

    def _load_text_encoder(self, device: torch.device, dtype: torch.dtype) -> tuple[Any, nn.Module]:
        """Tokenizer and text encoder on ``device``; only called on an embedding-cache miss."""
        import transformers

        encoder_class = getattr(transformers, self.TEXT_ENCODER_CLASS)
        return self._pipeline_source().load_text_encoder(encoder_class, device, dtype, self.variant)

    def _cached_embeddings(self, prompt: str, device: torch.device, dtype: torch.dtype) -> PromptEmbeddings:
        return self._pipeline_source().cached_embeddings(
            prompt=prompt,
            negative_prompt=self.negative_prompt,
            max_length=TEXT_MAX_LENGTH,
            load_encoder=lambda: self._load_text_encoder(device, dtype),
            device=device,
            cache_dir=self.cache_dir,
        )
