"""Diffusion pipelines made in code, with random weights and no download: for tests and
benchmarks only (this module is not imported by the training path).

Pixel (IF stage-I layout):
- ``"tiny"``: a 2-level IF-style UNet (out_channels 6) small enough for CPU tests.
- ``"if-i-xl"``: the DeepFloyd IF-I-XL-v1.0 UNet architecture (4.3 B parameters, random
  weights) for benchmarks: same FLOPs and memory traffic as the real prior.

Latent (Stable Diffusion layout, ``build_latent_pipeline``): ``"tiny"`` (8x VAE at 64 px, a
2-level SD UNet on 8x8 latents) and ``"sd-2.1-base"`` (the real UNet and VAE architectures,
random weights, with a one-layer CLIP text encoder of width 1024).

The text encoder is always a tiny T5 (one layer): SDS speed does not depend on it because
embeddings are computed once and cached; for "if-i-xl" its width is 4096 so the UNet's
``encoder_hid_dim`` matches T5-XXL. The tokenizer is a byte-level BPE with no merges (every
prompt maps to distinct tokens) built with ``tokenizers`` and saved so that
``AutoTokenizer.from_pretrained`` loads it back offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from magic3d.guidance.frozen import TEXT_MAX_LENGTH
from magic3d.guidance.pipeline_formats import IF_SCHEDULER, SD_SCHEDULER, write_model_index

PixelSize = Literal["tiny", "if-i-xl"]

# DeepFloyd/IF-I-XL-v1.0 unet/config.json (architecture keys; the rest are diffusers defaults).
IF_I_XL_UNET: dict[str, Any] = dict(
    sample_size=64,
    in_channels=3,
    out_channels=6,  # epsilon and learned variance
    block_out_channels=(704, 1408, 2112, 2816),
    layers_per_block=3,
    down_block_types=(
        "ResnetDownsampleBlock2D",
        "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D",
    ),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=(
        "SimpleCrossAttnUpBlock2D",
        "SimpleCrossAttnUpBlock2D",
        "SimpleCrossAttnUpBlock2D",
        "ResnetUpsampleBlock2D",
    ),
    act_fn="gelu",
    attention_head_dim=64,
    cross_attention_dim=2816,
    cross_attention_norm="group_norm",
    encoder_hid_dim=4096,
    encoder_hid_dim_type="text_proj",
    addition_embed_type="text",
    addition_embed_type_num_heads=64,
    resnet_time_scale_shift="scale_shift",
    norm_num_groups=32,
    flip_sin_to_cos=True,
    freq_shift=0,
)

# Same block types as IF, two levels of 32/64 channels (~0.85 M parameters), at 32x32 so a
# CPU forward takes tens of milliseconds (64x64 is ~15x slower on 2 cores).
TINY_UNET: dict[str, Any] = dict(
    sample_size=32,
    in_channels=3,
    out_channels=6,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    act_fn="gelu",
    attention_head_dim=8,
    cross_attention_dim=32,
    cross_attention_norm="group_norm",
    encoder_hid_dim=32,
    encoder_hid_dim_type="text_proj",
    addition_embed_type="text",
    addition_embed_type_num_heads=2,
    resnet_time_scale_shift="scale_shift",
    norm_num_groups=8,
)



def _check_size(size: str) -> None:
    if size not in ("tiny", "if-i-xl"):
        raise ValueError(f"size={size!r} is unknown: use 'tiny' or 'if-i-xl'.")


def unet_config(size: PixelSize) -> dict[str, Any]:
    _check_size(size)
    return dict(TINY_UNET if size == "tiny" else IF_I_XL_UNET)


def build_pixel_unet(
    size: PixelSize,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """A random-weight IF-style ``UNet2DConditionModel``, allocated directly on ``device``.

    Parameters are created in ``dtype`` on ``device`` (no fp32 CPU copy of the 4.3 B-parameter
    model). Random weights give the real compute cost, not meaningful predictions.
    """
    from diffusers import UNet2DConditionModel

    config = unet_config(size)
    return _allocate(lambda: UNet2DConditionModel(**config), device, dtype, seed)


def build_text_encoder(size: PixelSize, seed: int = 0):
    """A one-layer random T5 encoder; ``d_model`` matches the UNet's ``encoder_hid_dim``."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(_byte_vocab()),
        d_model=unet_config(size)["encoder_hid_dim"],
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_heads=2,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        is_encoder_decoder=False,
        use_cache=False,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def _byte_vocab() -> dict[str, int]:
    from tokenizers import pre_tokenizers

    specials = ["<pad>", "</s>", "<unk>"]  # T5's ids: pad 0, eos 1, unk 2
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return {tok: i for i, tok in enumerate(specials + alphabet)}


def build_tokenizer(max_length: int = TEXT_MAX_LENGTH):
    """Byte-level tokenizer (T5 special-token ids, eos appended), built without downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = _byte_vocab()
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
        padding_side="right",
    )


def build_scheduler(prediction_type: str = "epsilon"):
    """IF stage I's noise schedule; ``prediction_type`` is overridable (the embedded pixel prior
    may be trained with v)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**{**IF_SCHEDULER, "prediction_type": prediction_type})


def build_pixel_pipeline(
    path: str | Path,
    size: PixelSize = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write an IF stage-I style pipeline folder (unet/, text_encoder/, tokenizer/,
    scheduler/, model_index.json) with random weights; returns the folder.

    "if-i-xl" writes ~8.6 GB in bfloat16 (17 GB in float32): benchmarks should prefer
    ``build_pixel_unet`` + ``PixelSDS.from_modules``.
    """
    _check_size(size)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    unet = build_pixel_unet(size, "cpu", dtype, seed)
    unet.save_pretrained(path / "unet", safe_serialization=True)
    del unet
    build_text_encoder(size, seed).save_pretrained(path / "text_encoder", safe_serialization=True)
    build_tokenizer().save_pretrained(path / "tokenizer")
    build_scheduler().save_pretrained(path / "scheduler")
    write_model_index(path, "pixel")
    return path


# ---------------------------------------------------------------------------------------------
# Latent (Stable Diffusion layout) pipelines
# ---------------------------------------------------------------------------------------------

LatentSize = Literal["tiny", "sd-2.1-base"]

# stabilityai/stable-diffusion-2-1-base unet/config.json (architecture keys).
SD_2_1_BASE_UNET: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(5, 10, 20, 20),  # diffusers' legacy name: heads per level (64-dim heads)
    cross_attention_dim=1024,  # OpenCLIP ViT-H text width
    use_linear_projection=True,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    center_input_sample=False,
)

# stabilityai/stable-diffusion-2-1-base vae/config.json. Its sample_size says 768 (copied from
# the 768 px model); the guidance derives the input size from the UNet instead (64 x 8 = 512).
SD_2_1_BASE_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=768,
    scaling_factor=0.18215,
)

# SD block types at 16/32 channels on 8x8 latents, and an 8x VAE (three 2x downsamplings) at
# 64 px: one CPU step with gradients through the VAE takes well under a second on 2 cores.
TINY_LATENT_UNET: dict[str, Any] = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2,
    cross_attention_dim=32,
    use_linear_projection=True,
    norm_num_groups=8,
)

TINY_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.18215,
)


def _check_latent_size(size: str) -> None:
    if size not in ("tiny", "sd-2.1-base"):
        raise ValueError(f"size={size!r} is unknown: use 'tiny' or 'sd-2.1-base'.")


def latent_unet_config(size: LatentSize) -> dict[str, Any]:
    _check_latent_size(size)
    return dict(TINY_LATENT_UNET if size == "tiny" else SD_2_1_BASE_UNET)


def vae_config(size: LatentSize) -> dict[str, Any]:
    _check_latent_size(size)
    return dict(TINY_VAE if size == "tiny" else SD_2_1_BASE_VAE)


def _allocate(factory, device: torch.device | str, dtype: torch.dtype, seed: int):
    """Run ``factory()`` with parameters created in ``dtype`` directly on ``device``."""
    previous_dtype = torch.get_default_dtype()
    torch.manual_seed(seed)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            module = factory()
    finally:
        torch.set_default_dtype(previous_dtype)
    return module.eval()


def build_latent_unet(
    size: LatentSize, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
):
    """A random-weight SD-style ``UNet2DConditionModel`` ("sd-2.1-base": 866 M parameters)."""
    from diffusers import UNet2DConditionModel

    config = latent_unet_config(size)
    return _allocate(lambda: UNet2DConditionModel(**config), device, dtype, seed)


def build_vae(
    size: LatentSize, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
):
    """A random-weight ``AutoencoderKL`` ("sd-2.1-base": 84 M parameters, 8x, 4 channels)."""
    from diffusers import AutoencoderKL

    config = vae_config(size)
    return _allocate(lambda: AutoencoderKL(**config), device, dtype, seed)


def build_clip_text_encoder(size: LatentSize, seed: int = 0):
    """A one-layer random CLIP text transformer; width matches the UNet's cross-attention."""
    from transformers import CLIPTextConfig, CLIPTextModel

    width = latent_unet_config(size)["cross_attention_dim"]
    config = CLIPTextConfig(
        vocab_size=len(_byte_vocab()),
        hidden_size=width,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=TEXT_MAX_LENGTH,
        hidden_act="gelu",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,  # the byte tokenizer appends T5's eos (id 1)
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def build_latent_scheduler(prediction_type: str = "epsilon"):
    """SD 2.1-base's noise schedule (scaled linear betas); ``prediction_type`` is overridable."""
    from diffusers import PNDMScheduler

    # from_config keeps SD's extra key (clip_sample) that PNDM's __init__ does not take.
    return PNDMScheduler.from_config({**SD_SCHEDULER, "prediction_type": prediction_type})


def build_latent_pipeline(
    path: str | Path,
    size: LatentSize = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    prediction_type: str = "epsilon",
) -> Path:
    """Write a Stable Diffusion style pipeline folder (vae/, unet/, text_encoder/,
    tokenizer/, scheduler/, model_index.json) with random weights; returns the folder.

    "sd-2.1-base" writes ~1.9 GB in float32: benchmarks should prefer ``build_latent_unet``
    + ``build_vae`` + ``LatentSDS.from_modules``.
    """
    _check_latent_size(size)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_vae(size, "cpu", dtype, seed).save_pretrained(path / "vae", safe_serialization=True)
    unet = build_latent_unet(size, "cpu", dtype, seed)
    unet.save_pretrained(path / "unet", safe_serialization=True)
    del unet
    build_clip_text_encoder(size, seed).save_pretrained(path / "text_encoder", safe_serialization=True)
    build_tokenizer().save_pretrained(path / "tokenizer")
    build_latent_scheduler(prediction_type).save_pretrained(path / "scheduler")
    write_model_index(path, "latent")
    return path

