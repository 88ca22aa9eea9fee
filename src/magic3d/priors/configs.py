"""Sizes and builders of the embedded priors: UNets, VAE, text encoders, tokenizer, schedules.

Size budget: both priors must fit in 24 MB of fp16 safetensors in the repository, so the
pixel prior gets ~6.5 M parameters (13 MB) and the latent prior ~5 M (10 MB):

- pixel (IF stage-I folder layout, 64x64, 6 output channels like IF): Stable Diffusion's
  transformer cross-attention blocks at 64/112/128 channels (attention at 32x32 and 16x16),
  one layer per block: 6.1 M; a 2-layer T5 encoder with d_model 128: ~0.5 M.
  IF's own block types (simple added-KV attention, a text-pooled addition embedding) at
  64/128/128 (6.0 M) did not learn the caption in 2,100 steps (H100, batch 256): DDIM
  samples at guidance 5 had colour accuracy 0.17 and shape accuracy 0.25, and the pooled
  text embedding differed by ~1 % between "a red cube" and "a blue cube" (the pooling's
  query is the mean over 77 tokens, 70 of them padding), while the latent prior with SD's
  blocks learned colours in 2,700 steps. The guidance loads either: it only needs
  UNet2DConditionModel with 3 input channels.
- latent (Stable Diffusion layout): AutoencoderKL with four 32/64/64/64 blocks (three 2x
  downsamplings: 256 px -> 32x32x4 latents), 1.25 M; SD block types at 32/64/128: 3.2 M; a
  2-layer CLIP text transformer (SD's encoder class) with width 128: ~0.5 M.

The tokenizer is a byte-level BPE (T5 special ids: pad 0, eos 1, unk 2, eos appended) whose
merges are trained on the toy-world caption vocabulary, so "a red cube, front view" is 7
tokens (one per word) while unknown words (a DreamBooth "sks") still tokenize into bytes.
One token per word makes the tiny text encoder's job easy: it must tell words apart and mix
them, not spell them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch

from magic3d.data.cameras import VIEW_NAMES, view_suffix
from magic3d.guidance.pipeline_formats import IF_SCHEDULER, SD_SCHEDULER
from magic3d.priors.heldout import is_held_out_pair
from magic3d.toyworld.shapes import COLOUR_NAMES, SHAPE_NAMES, caption

PriorKind = Literal["pixel", "latent"]
PRIOR_KINDS: tuple[str, ...] = ("pixel", "latent")
TEXT_MAX_LENGTH = 77  # the guidance pads prompts to 77 tokens (IF and SD convention)

def _pixel_unet(sample_size: int, channels: tuple[int, ...], heads: int, text_dim: int, groups: int) -> dict[str, Any]:
    """SD's transformer blocks on pixels with IF's outputs (epsilon + variance); no attention
    at full resolution (4096 tokens would cost more than the rest of the UNet)."""
    levels = len(channels)
    return dict(
        _sd_unet(sample_size, channels, heads, text_dim, groups),
        in_channels=3,
        out_channels=6,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
    )


def _sd_unet(sample_size: int, channels: tuple[int, ...], heads: int, text_dim: int, groups: int) -> dict[str, Any]:
    """Stable Diffusion 2 block types (cross-attention transformers, linear projections)."""
    levels = len(channels)
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=text_dim,
        attention_head_dim=heads,  # diffusers' legacy name: number of heads in SD configs
        use_linear_projection=True,
        norm_num_groups=groups,
    )


def _vae(sample_size: int, channels: tuple[int, ...], groups: int) -> dict[str, Any]:
    if len(channels) != 4:
        raise ValueError(f"vae channels {channels} must have 4 entries (three 2x downsamplings = 8x).")
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=groups,
        sample_size=sample_size,
    )


@dataclass
class TextEncoderConfig:
    """A tiny transformer text encoder; ``kind`` follows the layout (IF: T5, SD: CLIP)."""

    kind: Literal["t5", "clip"] = "t5"
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    d_ff: int = 512


@dataclass
class PriorConfig:
    """Everything that defines a prior and its training run (stored in the train state).

    Shared fields drive the denoiser phase; ``vae_*`` fields are used by the latent prior only.
    """

    kind: PriorKind = "pixel"
    image_size: int = 64
    unet: dict[str, Any] = field(default_factory=dict)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vae: dict[str, Any] = field(default_factory=dict)  # empty for the pixel prior
    # data
    n_images: int = 100_000
    supersample: int = 2
    max_render_minutes: float = 3.0  # bulk rendering stops early (keeping a prefix) past this
    render_chunk_rays: int = 1 << 25  # rays per renderer call (~3 GB of transient buffers)
    view_suffix_prob: float = 0.75  # share of captions with ", front view" etc.
    cond_drop_prob: float = 0.1  # caption -> "" for classifier-free guidance
    # denoiser optimisation
    batch_size: int = 256
    lr: float = 3e-4
    text_lr_scale: float = 0.5
    weight_decay: float = 0.01
    warmup_steps: int = 250
    min_lr_fraction: float = 0.1  # cosine decay (over the time budget) ends at lr * this
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    # 0: the variance channels stay untrained (SDS and DDIM use only epsilon). The iDDPM hybrid
    # weight 1.0 (lambda=0.001 x T) went non-finite within 50 bf16 steps on an H100.
    variance_loss_weight: float = 0.0
    # Min-SNR-gamma loss weighting (losses.min_snr_weight); None = plain epsilon MSE, which
    # the shipped priors of 2026-11 were trained with. Hang et al. 2023 report ~3x faster
    # convergence with gamma 5 on ImageNet 64/256.
    min_snr_gamma: float | None = None
    # What the UNet predicts (diffusers' names; saved in scheduler/ so that the guidance, DDIM
    # and DreamBooth read it). "epsilon" as in IF and SD 2.1-base, and in every prior shipped
    # before 2026-12-04; "v_prediction" keeps the x0 estimate well conditioned at high noise,
    # where an epsilon model's error is multiplied by 1/sqrt(alpha_bar) (34x at t = 980 on IF's
    # cosine schedule: the pixel prior's samples are torn there, BENCHMARKS.md "Embedded priors").
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    # latent prior: autoencoder phase
    vae_fraction: float = 0.35  # share of the time budget for the VAE
    vae_batch_size: int = 32
    vae_lr: float = 5e-4
    vae_kl_weight: float = 1e-5  # per-element mean KL vs per-pixel mean L1 + L2
    scaling_sample_count: int = 4096
    # bookkeeping
    log_every: int = 50
    checkpoint_minutes: float = 2.0
    sample_steps: int = 50
    sample_guidance: float = 5.0
    sample_rows: int = 8  # objects in the contact sheet (each with the bare prompt and views)
    max_mb: float = 14.0
    # torch.compile each phase's objective on CUDA (never on CPU), ~1.5-2 min of compilation
    # per process, counted in the budget. H200, 6cb29e3 eager -> compiled (BENCHMARKS.md "Prior
    # training"): pixel UNet b256 1522 -> 3195 images/s, latent UNet b128 1191 -> 7783, VAE
    # b32 499 -> 866.
    compile: bool = True
    # The denoiser phase's torch.compile mode. "reduce-overhead" (CUDA graphs) removes the
    # host's launch overhead, which bounded the compiled latent UNet (63 ms wall vs 17 ms of
    # kernels per step; 2015 -> 7783 images/s) and costs nothing on the GPU-bound pixel UNet
    # (3111 -> 3195). The VAE phase always compiles in the default mode (CUDA graphs there are
    # unmeasured).
    compile_mode: str = "reduce-overhead"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PriorConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown prior config keys {unknown}; known: {sorted(known)}")
        values = dict(values)
        if isinstance(values.get("text"), dict):
            values["text"] = TextEncoderConfig(**values["text"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def latent_size(self) -> int:
        return self.image_size // 8


def default_config(kind: str, smoke: bool = False) -> PriorConfig:
    """The shipped configuration of a prior, or a tiny CPU one with ``smoke=True`` (tests)."""
    if kind not in PRIOR_KINDS:
        raise ValueError(f"kind={kind!r} is unknown: use one of {PRIOR_KINDS}.")
    if kind == "pixel":
        if smoke:
            return PriorConfig(
                kind="pixel",
                image_size=16,  # 2-core CPU tests: a 32 px forward + backward is ~4x slower
                unet=_pixel_unet(16, (32, 64), heads=2, text_dim=32, groups=8),
                text=TextEncoderConfig("t5", d_model=32, num_layers=1, num_heads=2, d_ff=64),
                n_images=64, supersample=1, batch_size=4, warmup_steps=2,
                log_every=1, sample_steps=2, sample_rows=1, max_mb=14.0,
            )
        return PriorConfig(
            kind="pixel",
            image_size=64,
            unet=_pixel_unet(64, (64, 112, 128), heads=4, text_dim=128, groups=16),
            text=TextEncoderConfig("t5", d_model=128, num_layers=2, num_heads=4, d_ff=512),
            min_snr_gamma=5.0,
            max_mb=14.0,
        )
    if smoke:
        return PriorConfig(
            kind="latent",
            image_size=64,
            unet=_sd_unet(8, (16, 32), heads=2, text_dim=32, groups=8),
            text=TextEncoderConfig("clip", d_model=32, num_layers=1, num_heads=2, d_ff=64),
            vae=_vae(64, (8, 16, 16, 16), groups=8),
            n_images=16,  # 64 px sphere tracing is the slowest part of the smoke run on CPU
            supersample=1, batch_size=4, vae_batch_size=4, warmup_steps=2,
            scaling_sample_count=64, log_every=1, sample_steps=2, sample_rows=1, max_mb=10.0,
        )
    return PriorConfig(
        kind="latent",
        image_size=256,
        unet=_sd_unet(32, (32, 64, 128), heads=4, text_dim=128, groups=16),
        text=TextEncoderConfig("clip", d_model=128, num_layers=2, num_heads=4, d_ff=512),
        vae=_vae(256, (32, 64, 64, 64), groups=16),
        n_images=20_000,
        supersample=1,  # 256 px is sharp enough; supersampling would quadruple the render time
        batch_size=128,
        min_snr_gamma=5.0,
        sample_rows=4,
        max_mb=10.0,
    )


def with_image_size(config: PriorConfig, image_size: int) -> PriorConfig:
    """A copy of ``config`` training at ``image_size`` px (latent: 8x smaller latents)."""
    if config.kind == "latent" and image_size % 8:
        raise ValueError(f"image_size={image_size} must be a multiple of 8 for the latent prior (8x VAE).")
    values = config.to_dict()
    values["image_size"] = image_size
    if config.kind == "latent":
        values["vae"] = {**config.vae, "sample_size": image_size}
        values["unet"] = {**config.unet, "sample_size": image_size // 8}
    else:
        values["unet"] = {**config.unet, "sample_size": image_size}
    return PriorConfig.from_dict(values)


# ---------------------------------------------------------------------------------------------
# Captions and tokenizer
# ---------------------------------------------------------------------------------------------

_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # T5's ids: pad 0, eos 1, unk 2


def caption_vocabulary_corpus() -> list[str]:
    """Every trained toy-world caption (with and without view suffix) and each word on its own.

    Held-out pairs are left out (their words occur in other captions, so they still tokenize
    one token per word).
    """
    corpus = []
    for shape in SHAPE_NAMES:
        for colour in COLOUR_NAMES:
            if is_held_out_pair(shape, colour):
                continue
            corpus.append(caption(shape, colour))
            corpus += [caption(shape, colour, view_suffix(v)) for v in range(len(VIEW_NAMES))]
    words = sorted({w for text in corpus for w in text.replace(",", " ").split()})
    return corpus + words


def train_tokenizer_json() -> str:
    """Byte-level BPE with merges for the toy-world words, serialised (tokenizers JSON).

    Deterministic for a fixed corpus; the train state stores the JSON anyway so a resumed run
    never depends on it.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,  # an upper bound: training stops once every word is one token
        min_frequency=1,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(caption_vocabulary_corpus(), trainer)
    eos = tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
    )
    return tokenizer.to_str()


def tokenizer_from_json(tokenizer_json: str):
    """A transformers fast tokenizer (``AutoTokenizer`` loads its saved folder offline)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json),
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=TEXT_MAX_LENGTH,
        padding_side="right",
    )


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


def build_text_encoder(config: TextEncoderConfig, vocab_size: int) -> torch.nn.Module:
    """T5 encoder (IF layout) or CLIP text transformer (SD layout), random init."""
    if config.d_model % config.num_heads:
        raise ValueError(f"text d_model={config.d_model} must be divisible by num_heads={config.num_heads}.")
    if config.kind == "t5":
        from transformers import T5Config, T5EncoderModel

        t5 = T5Config(
            vocab_size=vocab_size,
            d_model=config.d_model,
            d_kv=config.d_model // config.num_heads,
            d_ff=config.d_ff,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            feed_forward_proj="gated-gelu",  # T5 v1.1, as IF's T5-XXL
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
            is_encoder_decoder=False,
            use_cache=False,
            tie_word_embeddings=False,
        )
        return T5EncoderModel(t5)
    if config.kind == "clip":
        from transformers import CLIPTextConfig, CLIPTextModel

        clip = CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=config.d_model,
            intermediate_size=config.d_ff,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            max_position_embeddings=TEXT_MAX_LENGTH,
            hidden_act="gelu",  # SD 2's OpenCLIP text tower
            pad_token_id=0,
            bos_token_id=1,  # no BOS in this tokenizer; only used for the (unused) pooled output
            eos_token_id=1,
            use_attention_mask=True,  # trained with the padding mask: the guidance must pass it too
        )
        return CLIPTextModel(clip)
    raise ValueError(f"text encoder kind={config.kind!r} is unknown: use 't5' or 'clip'.")


def build_unet(config: PriorConfig) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**config.unet)


def build_vae(config: PriorConfig) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    if not config.vae:
        raise ValueError(f"the {config.kind} prior has no VAE config.")
    return AutoencoderKL(**config.vae)


def build_train_scheduler(config: PriorConfig):
    """The noise schedule saved with the prior: IF's cosine for pixel, SD's for latent, with
    the UNet's ``prediction_type``."""
    from diffusers import DDPMScheduler, PNDMScheduler

    if config.kind == "pixel":
        return DDPMScheduler(**{**IF_SCHEDULER, "prediction_type": config.prediction_type})
    # from_config keeps SD's extra key (clip_sample) that PNDM's __init__ does not take.
    return PNDMScheduler.from_config({**SD_SCHEDULER, "prediction_type": config.prediction_type})


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
