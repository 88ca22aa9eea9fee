"""The frozen diffusers pipeline behind an SDS guidance: loaded lazily, kept out of checkpoints.

``FrozenPipeline`` is a plain object (not an ``nn.Module``) that the guidance holds, so its
models never enter ``state_dict()`` or checkpoints and a parent's ``.to()`` does not see
them. ``setup`` loads them once (from a folder or hub id, or from modules given in memory),
gets the prompt's text embeddings through the disk cache and frees the text encoder; calling
it again only re-places the models and, for a new prompt, fetches that prompt's embeddings.
Pixel and latent guidance share it by composition and differ only in their
:class:`PipelineLayout` (which parts, which text encoder).

With ``lora`` (a DreamBooth adapter folder, :mod:`magic3d.guidance.lora`) the adapter is read and
checked against the prior at the first ``setup``, loaded onto the frozen UNet (and onto the text
encoder, when the adapter tuned it, before the embeddings are computed), frozen like the rest.
The embedding cache is keyed by such a text-encoder adapter and its scale; a UNet-only adapter
leaves the text path untouched, so its embeddings are the base model's and share its cache.
Modules handed over in memory (``from_modules``) get the adapter in place, unchecked (they have
no folder to compare the adapter's base model with).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from magic3d.guidance.lora import LoraAdapter, read_lora
from magic3d.guidance.loading import (
    PipelineSource,
    canonical_device,
    half_dtype_for,
    module_dtype,
)
from magic3d.guidance.prompts import (
    PromptEmbeddings,
    compute_prompt_embeddings,
    release_text_encoder,
)

TEXT_MAX_LENGTH = 77  # IF pads T5 prompts and SD pads CLIP prompts to 77 tokens

# Frozen part -> (diffusers class, what the error messages call it).
_PART_CLASSES = {"unet": ("UNet2DConditionModel", "UNet (unet/)"), "vae": ("AutoencoderKL", "VAE (vae/)")}


@dataclass(frozen=True)
class PipelineLayout:
    """A diffusers pipeline family as the guidance needs it.

    Args:
        name: for error messages, e.g. "Stable Diffusion".
        parts: the frozen diffusers models, one sub-folder each ("unet", "vae").
        text_encoder_class: transformers class of ``text_encoder/``.
    """

    name: str
    parts: tuple[str, ...]
    text_encoder_class: str

    @property
    def folders(self) -> str:
        listed = ", ".join(f"{p}/" for p in (*self.parts, "text_encoder", "tokenizer", "scheduler"))
        return f"{listed} and model_index.json"


@dataclass
class InMemoryParts:
    """Modules handed over by ``from_modules`` (tests, benchmarks) instead of a folder."""

    models: dict[str, nn.Module]
    scheduler: Any
    text_embeddings: PromptEmbeddings | None
    tokenizer: Any
    text_encoder: nn.Module | None


class FrozenPipeline:
    """The frozen models, noise schedule and prompt embeddings of one guidance."""

    def __init__(
        self,
        layout: PipelineLayout,
        pretrained: str,
        half_precision: bool = True,
        negative_prompt: str = "",
        cache_dir: str | None = None,
        variant: str | None = None,
        lora: str | None = None,
        lora_scale: float = 1.0,
    ) -> None:
        self.layout = layout
        self.pretrained = pretrained
        self.half_precision = half_precision
        self.negative_prompt = negative_prompt
        self.cache_dir = cache_dir
        self.variant = variant
        self.lora = lora
        self.lora_scale = float(lora_scale)
        self.adapter: LoraAdapter | None = None  # read in setup()
        self._in_memory: InMemoryParts | None = None
        self._from_memory = False
        self.models: dict[str, nn.Module] = {}
        self.scheduler: Any = None
        self.prompt: str | None = None
        self.device: torch.device | None = None
        self._embeddings: PromptEmbeddings | None = None

    def use_in_memory(self, parts: InMemoryParts) -> None:
        """Take the models from memory instead of ``pretrained``; their embeddings are never
        cached (the modules' weights have no stable identity)."""
        if parts.text_embeddings is None and (parts.tokenizer is None or parts.text_encoder is None):
            raise ValueError("from_modules needs text_embeddings, or both tokenizer and text_encoder.")
        self._in_memory, self._from_memory = parts, True

    @property
    def loaded(self) -> bool:
        return bool(self.models)

    def part(self, name: str, owner: str = "guidance") -> nn.Module:
        if name not in self.models:
            raise RuntimeError(f"{owner}.setup(prompt, device) must run before the {name} is used.")
        return self.models[name]

    def embeddings(self, owner: str = "guidance") -> PromptEmbeddings:
        if self._embeddings is None:
            raise RuntimeError(f"{owner}.setup(prompt, device) must run before step().")
        return self._embeddings

    def needs_placing(self, device: torch.device) -> bool:
        return self.device != canonical_device(device)

    # ------------------------------------------------------------------ setup

    def setup(self, prompt: str, device: torch.device | str, prepare=None) -> None:
        """Load (first call) or re-place (later calls) on ``device``; ``prepare(name, module,
        device)`` gives each placed model its last touch (e.g. channels-last)."""
        device = torch.device(device)
        dtype = half_dtype_for(device, self.half_precision)
        if self.loaded:
            if prompt != self.prompt and not self._from_memory:
                self._embeddings = self._cached_embeddings(prompt, device, dtype)
                self.prompt = prompt
            self.place(device, prepare)
            return
        self.prompt = prompt
        if self.lora is not None:
            self.adapter = read_lora(self.lora)
            if not self._from_memory:  # in-memory modules have no name or files to compare
                self.adapter.check_base(self.pretrained, self.layout.name)
        if self._in_memory is not None:
            source, self._in_memory = self._in_memory, None
            models, self.scheduler, embeddings = source.models, source.scheduler, source.text_embeddings
            self._apply_adapter(models["unet"], "unet")
            if embeddings is None:
                text_encoder = source.text_encoder.to(device)
                self._apply_adapter(text_encoder, "text_encoder")
                embeddings = compute_prompt_embeddings(
                    source.tokenizer, text_encoder, prompt, self.negative_prompt, TEXT_MAX_LENGTH)
                del text_encoder
            release_text_encoder(device)
        else:
            models = {name: self._load_part(name, dtype) for name in self.layout.parts}
            self._apply_adapter(models["unet"], "unet")
            self.scheduler = self.source().load_scheduler()
            embeddings = self._cached_embeddings(prompt, device, dtype)
        self.models = {name: module.requires_grad_(False).eval() for name, module in models.items()}
        self._embeddings = embeddings
        self.place(device, prepare)

    def place(self, device: torch.device, prepare=None) -> None:
        """Move the frozen models and embeddings to ``device`` in the precision used there."""
        dtype = half_dtype_for(device, self.half_precision)
        for name, module in self.models.items():
            if module_dtype(module) != dtype:
                module = module.to(dtype=dtype)
            module = module.to(device=device)
            self.models[name] = prepare(name, module, device) if prepare is not None else module
        self.device = canonical_device(device)
        self._embeddings = self.embeddings().to(device, dtype)

    # ------------------------------------------------------------------ loading

    def source(self) -> PipelineSource:
        return PipelineSource(self.pretrained, self.layout.name, self.layout.folders, (*self.layout.parts, "scheduler"))

    def _load_part(self, name: str, dtype: torch.dtype) -> nn.Module:
        import diffusers

        class_name, label = _PART_CLASSES[name]
        return self.source().load_model(getattr(diffusers, class_name), name, label, torch_dtype=dtype,
                                        variant=self.variant)

    def _load_text_encoder(self, device: torch.device, dtype: torch.dtype) -> tuple[Any, nn.Module]:
        """Tokenizer and text encoder on ``device``; only called on an embedding-cache miss."""
        import transformers

        encoder_class = getattr(transformers, self.layout.text_encoder_class)
        tokenizer, encoder = self.source().load_text_encoder(encoder_class, device, dtype, self.variant)
        self._apply_adapter(encoder, "text_encoder")
        return tokenizer, encoder.to(device)

    def _apply_adapter(self, module: nn.Module, part: str) -> None:
        if self.adapter is not None:
            self.adapter.apply(module, part, self.lora_scale)

    def _cached_embeddings(self, prompt: str, device: torch.device, dtype: torch.dtype) -> PromptEmbeddings:
        return self.source().cached_embeddings(
            prompt=prompt,
            negative_prompt=self.negative_prompt,
            max_length=TEXT_MAX_LENGTH,
            load_encoder=lambda: self._load_text_encoder(device, dtype),
            device=device,
            cache_dir=self.cache_dir,
            encoder_adapter=(self.adapter.text_encoder_fingerprint(self.lora_scale)
                             if self.adapter is not None and self.adapter.adapts_text_encoder else ""),
        )
