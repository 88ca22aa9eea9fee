"""Locating and loading the frozen parts of a diffusers pipeline for a guidance.

Shared by ``PixelSDS`` (DeepFloyd IF layout) and ``LatentSDS`` (Stable Diffusion layout):
``pretrained`` is a local pipeline folder or a Hugging Face Hub id, and every failure is
turned into one short ``FileNotFoundError`` that names the path and the fix (no chained
traceback from diffusers/transformers internals).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from magic3d.guidance.prompts import (
    PromptEmbeddings,
    load_or_compute_prompt_embeddings,
    text_encoder_fingerprint,
)


class PipelineSource:
    """Where a pipeline's subfolders come from, and how to report that they are missing.

    Args:
        pretrained: local folder or Hub id, as the user gave it.
        family: human name of the expected layout, e.g. "DeepFloyd IF stage-I".
        layout: the expected subfolders, e.g. "unet/, text_encoder/, tokenizer/, ...".
        required: subfolders a local folder must have before anything is loaded.
    """

    def __init__(self, pretrained: str, family: str, layout: str, required: tuple[str, ...]) -> None:
        self.pretrained = pretrained
        self.family = family
        self.layout = layout
        self.required = required

    def local_folder(self) -> Path | None:
        """The pipeline folder if ``pretrained`` names one; raises if it names a missing path."""
        path = Path(self.pretrained).expanduser()
        if path.is_dir():
            missing = [s for s in self.required if not (path / s).is_dir()]
            if missing:
                raise FileNotFoundError(
                    f"Pipeline folder '{path}' has no {'/, '.join(missing)}/ subfolder: "
                    f"expected the {self.family} layout ({self.layout})."
                )
            return path.resolve()
        looks_like_path = self.pretrained.startswith(("/", ".", "~")) or self.pretrained.count("/") > 1
        if looks_like_path:
            raise FileNotFoundError(
                f"Pipeline folder '{path}' does not exist. Pass `pretrained` as an existing "
                f"folder with {self.layout}, or a Hugging Face Hub id."
            )
        return None

    def source(self) -> str:
        """What ``from_pretrained`` should receive: the resolved folder or the Hub id."""
        folder = self.local_folder()
        return str(folder) if folder is not None else self.pretrained

    def not_found(self, what: str) -> FileNotFoundError:
        from huggingface_hub import constants

        offline = " (HF_HUB_OFFLINE=1, so only the local cache was searched)" if constants.HF_HUB_OFFLINE else ""
        return FileNotFoundError(
            f"Could not load the {what} of '{self.pretrained}': it is not a local folder and "
            f"was not found on the Hugging Face Hub{offline}. Pass `pretrained` as a local "
            f"pipeline folder ({self.layout}), or set HF_HUB_OFFLINE=0 with network "
            f"access (and accept the model's licence on the Hub if it is gated)."
        )

    def load_model(self, model_class: Any, subfolder: str, what: str, **kwargs: Any) -> Any:
        """``model_class.from_pretrained(source, subfolder=...)`` with the short error."""
        source = self.source()
        try:
            return model_class.from_pretrained(source, subfolder=subfolder, **kwargs)
        except (OSError, ValueError):
            raise self.not_found(what) from None

    def load_scheduler(self) -> Any:
        """The noise schedule; only ``alphas_cumprod`` and ``prediction_type`` are read."""
        from diffusers import DDPMScheduler

        return self.load_model(DDPMScheduler, "scheduler", "noise schedule (scheduler/)")

    def text_encoder_fingerprint(self) -> str:
        folder = self.local_folder()
        if folder is not None:
            encoder_dir = folder / "text_encoder"
            config_file = encoder_dir / "config.json"
            if not config_file.is_file():
                raise FileNotFoundError(
                    f"Pipeline folder '{folder}' has no text_encoder/config.json (expected {self.layout})."
                )
            weights = sorted([*encoder_dir.glob("*.safetensors"), *encoder_dir.glob("*.bin")])
        else:
            from huggingface_hub import hf_hub_download

            try:
                config_file = Path(hf_hub_download(self.pretrained, "config.json", subfolder="text_encoder"))
            except (OSError, ValueError):
                raise self.not_found("text encoder config (text_encoder/config.json)") from None
            weights = []
        return text_encoder_fingerprint(json.loads(config_file.read_text()), weights)

    def load_text_encoder(
        self, encoder_class: Any, device: torch.device, dtype: torch.dtype, variant: str | None
    ) -> tuple[Any, nn.Module]:
        """Tokenizer and frozen text encoder on ``device``."""
        from transformers import AutoTokenizer

        source = self.source()
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer")
            encoder = encoder_class.from_pretrained(source, subfolder="text_encoder", dtype=dtype, variant=variant)
        except (OSError, ValueError):
            raise self.not_found("text encoder (text_encoder/, tokenizer/)") from None
        return tokenizer, encoder.requires_grad_(False).eval().to(device)

    def cached_embeddings(
        self,
        *,
        prompt: str,
        negative_prompt: str,
        max_length: int,
        load_encoder: Any,
        device: torch.device,
        cache_dir: str | None,
        encoder_adapter: str = "",
    ) -> PromptEmbeddings:
        """Embeddings from the disk cache, calling ``load_encoder()`` only on a miss.

        ``encoder_adapter`` identifies an adapter loaded onto the text encoder (weights and
        scale; "" for none): it is part of the encoder's fingerprint, so the key changes with it.
        """
        folder = self.local_folder()
        return load_or_compute_prompt_embeddings(
            model_id=str(folder) if folder is not None else self.pretrained,
            encoder_fingerprint=self.text_encoder_fingerprint() + (f"+{encoder_adapter}" if encoder_adapter else ""),
            prompt=prompt,
            negative_prompt=negative_prompt,
            max_length=max_length,
            load_encoder=load_encoder,
            device=device,
            cache_dir=cache_dir,
        )


def canonical_device(device: torch.device | str) -> torch.device:
    """``cuda`` -> ``cuda:<current>`` so it compares equal to a tensor's device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def module_dtype(module: nn.Module) -> torch.dtype:
    param = next(module.parameters(), None)
    return param.dtype if param is not None else torch.float32


def half_dtype_for(device: torch.device, half_precision: bool) -> torch.dtype:
    """bfloat16 on CUDA when asked; CPU always runs float32 (bf16 CPU kernels are slow)."""
    return torch.bfloat16 if (half_precision and device.type == "cuda") else torch.float32


def cfg_unet_outputs(
    unet: nn.Module,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    max_batch: int | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Raw UNet outputs for one classifier-free-guidance batch [cond; uncond] of 2B, without
    gradients, in float32, keeping only the first ``x_t.shape[1]`` channels (IF's learned
    variance is dropped). ``max_batch`` bounds the samples per UNet call (memory)."""
    dtype = module_dtype(unet)
    sample = torch.cat([x_t, x_t]).to(dtype)
    if channels_last and sample.is_cuda:
        sample = sample.contiguous(memory_format=torch.channels_last)
    timesteps = torch.cat([t, t])
    context = torch.cat([cond, uncond]).to(dtype)
    chunk = max_batch or sample.shape[0]
    with torch.no_grad():
        outputs = [
            unet(sample[i: i + chunk], timesteps[i: i + chunk],
                 encoder_hidden_states=context[i: i + chunk], return_dict=False)[0]
            for i in range(0, sample.shape[0], chunk)
        ]
    return torch.cat(outputs)[:, : x_t.shape[1]].float()
