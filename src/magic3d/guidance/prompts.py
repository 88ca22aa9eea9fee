"""Text embeddings for a prompt, its view-dependent variants and the negative prompt.

Text encoders of the priors are large (IF's T5-XXL is ~4.8 B parameters) and a run needs
only six embeddings, so they are computed once, written to a disk cache as safetensors, and
the encoder is released before training starts. A later run with the same model, prompt and
negative prompt reads the file and never loads the encoder.

Cache location: ``cache_dir`` argument, else ``$MAGIC3D_CACHE/text_embeddings``, else
``~/.cache/magic3d/text_embeddings``. Files are named by a hash of (model id or absolute
path, text-encoder fingerprint, prompt, negative prompt, suffixes, max_length); deleting
the folder is always safe.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from magic3d.data.cameras import VIEW_NAMES, view_suffix
from magic3d.distributed import rank_zero_first

VIEW_SUFFIXES: tuple[str, ...] = tuple(view_suffix(i) for i in range(len(VIEW_NAMES)))
_CACHE_FORMAT = "magic3d-text-embeddings-v2"  # v2: CLIP prompts unmasked unless the config asks
# Config keys that change between saves of identical weights; they must not change the key.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype")


@dataclass
class PromptEmbeddings:
    """Conditional embeddings per view suffix plus the unconditional (negative) one.

    ``views`` follows ``magic3d.data.cameras.VIEW_NAMES`` (front, side, back, overhead).
    """

    base: Float[Tensor, "L D"]  # the prompt without a view suffix
    views: Float[Tensor, "4 L D"]  # prompt + ", front view", ", side view", ...
    uncond: Float[Tensor, "L D"]  # the negative prompt ("" by default)

    def embeddings_for(
        self, view_index: Int[Tensor, "B"], view_dependent: bool = True
    ) -> tuple[Float[Tensor, "B L D"], Float[Tensor, "B L D"]]:
        """(cond, uncond) per camera; ``view_dependent=False`` uses the bare prompt for all."""
        batch = view_index.shape[0]
        if view_dependent:
            cond = self.views[view_index.to(self.views.device)]
        else:
            cond = self.base.expand(batch, *self.base.shape)
        return cond, self.uncond.expand(batch, *self.uncond.shape)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "PromptEmbeddings":
        return PromptEmbeddings(
            base=self.base.to(device=device, dtype=dtype),
            views=self.views.to(device=device, dtype=dtype),
            uncond=self.uncond.to(device=device, dtype=dtype),
        )

    @property
    def device(self) -> torch.device:
        return self.base.device


def default_cache_dir() -> Path:
    root = os.environ.get("MAGIC3D_CACHE")
    if root:
        return Path(root).expanduser() / "text_embeddings"
    return Path("~/.cache/magic3d/text_embeddings").expanduser()


def text_encoder_fingerprint(config: dict[str, Any], weight_files: Sequence[Path] = ()) -> str:
    """Stable hash of a text-encoder config (volatile keys dropped) and its weight files' stats.

    Weight-file size and mtime catch a local folder rebuilt with new weights at the same path.
    """
    clean = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weight_files)
    blob = json.dumps({"config": clean, "weights": stats}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_key(
    model_id: str,
    encoder_fingerprint: str,
    prompt: str,
    negative_prompt: str,
    max_length: int,
    suffixes: tuple[str, ...] = VIEW_SUFFIXES,
) -> str:
    blob = json.dumps(
        {
            "format": _CACHE_FORMAT,
            "model": model_id,
            "encoder": encoder_fingerprint,
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "max_length": max_length,
            "suffixes": list(suffixes),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def uses_attention_mask(text_encoder: torch.nn.Module) -> bool:
    """Whether the encoder's own pipelines pass the padding mask: DeepFloyd IF does for T5;
    Stable Diffusion does not for CLIP unless the config sets ``use_attention_mask`` (diffusers'
    rule). It matters: CLIP's causal attention lets padding positions see each other, and the
    UNet attends to all 77 positions."""
    config = getattr(text_encoder, "config", None)
    flag = getattr(config, "use_attention_mask", None)
    if flag is not None:
        return bool(flag)
    return getattr(config, "model_type", "") != "clip_text_model"


def encode_texts(
    tokenizer: Any, text_encoder: torch.nn.Module, texts: list[str], max_length: int
) -> Float[Tensor, "N L D"]:
    """Token embeddings of ``texts`` padded to ``max_length``, masked as the encoder's own
    pipelines do (:func:`uses_attention_mask`)."""
    tokens = tokenizer(
        texts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device
    mask = tokens.attention_mask.to(device) if uses_attention_mask(text_encoder) else None
    with torch.no_grad():
        out = text_encoder(tokens.input_ids.to(device), attention_mask=mask)
    return out[0].float()


@dataclass(frozen=True)
class FittedPrompt:
    """A prompt cut to fit the text encoder with its longest view suffix (or left as it was)."""

    text: str
    n_tokens: int  # of the original prompt with its longest view suffix, special tokens included
    max_length: int

    @property
    def shortened(self) -> bool:
        return self.n_tokens > self.max_length

    def warning(self, original: str) -> str:
        return (f"The prompt has {self.n_tokens} tokens with its view suffix, more than the text encoder's "
                f"{self.max_length}: it is shortened to {self.text!r} so that ', front view' etc. still fit "
                f"(the end, {original[len(self.text):].strip()!r}, is left out).")


def _n_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=True, truncation=False).input_ids)


def fit_prompt(tokenizer: Any, prompt: str, max_length: int) -> FittedPrompt:
    """Shorten ``prompt`` at a token boundary so that prompt + every view suffix fits in
    ``max_length`` tokens. Tokenizers cut from the end, so without this a long prompt loses
    its view suffix and every view gets the same embedding."""
    longest = max(VIEW_SUFFIXES, key=lambda s: _n_tokens(tokenizer, prompt + s))
    n_tokens = _n_tokens(tokenizer, prompt + longest)
    if n_tokens <= max_length:
        return FittedPrompt(prompt, n_tokens, max_length)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    keep = len(ids) - (n_tokens - max_length)
    while keep > 0:
        text = tokenizer.decode(ids[:keep], skip_special_tokens=True).strip()
        if all(_n_tokens(tokenizer, text + s) <= max_length for s in VIEW_SUFFIXES):
            return FittedPrompt(text, n_tokens, max_length)
        keep -= 1  # a cut can merge into a longer token sequence: one fewer and try again
    raise ValueError(f"The view suffixes alone do not fit in {max_length} tokens of this tokenizer.")


def _warn_shortened(message: str) -> None:
    warnings.warn(message, PromptTooLong, stacklevel=3)


class PromptTooLong(UserWarning):
    """A prompt was shortened to fit the text encoder with its view suffix."""


def compute_prompt_embeddings(
    tokenizer: Any,
    text_encoder: torch.nn.Module,
    prompt: str,
    negative_prompt: str,
    max_length: int,
) -> PromptEmbeddings:
    """Embeddings of the prompt, its view-suffixed variants and the negative prompt; a prompt
    too long for the encoder is shortened first (:func:`fit_prompt`, one warning)."""
    fitted = fit_prompt(tokenizer, prompt, max_length)
    if fitted.shortened:
        _warn_shortened(fitted.warning(prompt))
    prompt = fitted.text
    texts = [prompt, *(prompt + s for s in VIEW_SUFFIXES), negative_prompt]
    emb = encode_texts(tokenizer, text_encoder, texts, max_length)
    return PromptEmbeddings(base=emb[0], views=emb[1 : 1 + len(VIEW_SUFFIXES)], uncond=emb[-1])


def release_text_encoder(device: torch.device | str) -> None:
    """Collect the (already dereferenced) encoder and give its GPU memory back."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def load_or_compute_prompt_embeddings(
    *,
    model_id: str,
    encoder_fingerprint: str,
    prompt: str,
    negative_prompt: str,
    max_length: int,
    load_encoder: Callable[[], tuple[Any, torch.nn.Module]],
    device: torch.device | str,
    cache_dir: str | Path | None = None,
) -> PromptEmbeddings:
    """Embeddings from the disk cache, or computed with ``load_encoder()`` and cached.

    ``load_encoder`` returns (tokenizer, text_encoder) already on ``device``; it is called
    only on a cache miss, and the encoder is released before returning. Under DDP, rank 0
    fills the cache while the other ranks wait, so the encoder is loaded once, not per GPU.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key(model_id, encoder_fingerprint, prompt, negative_prompt, max_length)
    path = folder / f"{key}.safetensors"
    with rank_zero_first():
        if not path.is_file():  # on rank 0, or on a node that does not share the cache folder
            tokenizer, text_encoder = load_encoder()
            embeddings = compute_prompt_embeddings(tokenizer, text_encoder, prompt, negative_prompt, max_length)
            fitted = fit_prompt(tokenizer, prompt, max_length)
            del tokenizer, text_encoder
            release_text_encoder(device)
            metadata = {"model": model_id, "prompt": prompt, "negative_prompt": negative_prompt}
            if fitted.shortened:
                metadata["shortened"] = fitted.warning(prompt)
            save_prompt_embeddings(path, embeddings, metadata=metadata)
        else:
            with safe_open(str(path), "pt") as handle:  # a shortened prompt warns on every run
                note = (handle.metadata() or {}).get("shortened")
            if note:
                _warn_shortened(note)
    tensors = load_file(str(path))
    return PromptEmbeddings(tensors["base"], tensors["views"], tensors["uncond"]).to(device)


def save_prompt_embeddings(path: Path, embeddings: PromptEmbeddings, metadata: dict[str, str]) -> None:
    """Write atomically (temp file + rename) so a crashed or parallel run never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    cpu = embeddings.to("cpu", torch.float32)
    save_file(
        {"base": cpu.base.contiguous(), "views": cpu.views.contiguous(), "uncond": cpu.uncond.contiguous()},
        str(tmp),
        metadata={"format": _CACHE_FORMAT, **metadata},
    )
    os.replace(tmp, path)
