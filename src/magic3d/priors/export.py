"""Export of a trained prior: the size guard, the diffusers folder (fp16 safetensors), its
verification by loading it the way the guidance does, and the atomic folder swap.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from magic3d.guidance.pipeline_formats import pipeline_model_index
from magic3d.guidance.prompts import encode_texts
from magic3d.priors.configs import TEXT_MAX_LENGTH, count_parameters

MB = 1e6  # sizes are in MB of 10^6 bytes (the stricter reading of the repository budget)


def fp16_megabytes(modules: dict[str, nn.Module]) -> float:
    """Size of the modules' floating-point parameters and buffers saved as fp16, in MB."""
    total = 0
    for module in modules.values():
        for tensor in module.state_dict().values():
            total += tensor.numel() * (2 if tensor.is_floating_point() else tensor.element_size())
    return total / MB


def check_size(modules: dict[str, nn.Module], max_mb: float) -> float:
    """Raise ValueError if the fp16 pipeline would exceed ``max_mb``; returns its size in MB."""
    size = fp16_megabytes(modules)
    if size > max_mb:
        counts = ", ".join(f"{n} {count_parameters(m) / 1e6:.2f} M" for n, m in modules.items())
        raise ValueError(
            f"the prior would take {size:.2f} MB as fp16 safetensors ({counts} parameters), more than "
            f"max_mb={max_mb}: shrink the model in magic3d/priors/configs.py or raise --max-mb."
        )
    return size


def save_pipeline(
    folder: Path, modules: dict[str, nn.Module], tokenizer: Any, scheduler: Any, kind: str
) -> None:
    """Write diffusers/transformers subfolders with fp16 safetensors weights (no variant)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, module in modules.items():
        module.half().cpu().save_pretrained(folder / name, safe_serialization=True)
    tokenizer.save_pretrained(folder / "tokenizer")
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(pipeline_model_index(kind), indent=2) + "\n")


def verify_pixel_pipeline(folder: Path) -> float:
    """Load ``folder`` on CPU in fp32 the way the guidance does and run one SDS step.

    Returns the mean |d loss / d rgb|; raises if loading fails or the gradient is not finite.
    """
    from diffusers import UNet2DConditionModel

    from magic3d.data.cameras import orbit_cameras
    from magic3d.guidance.pixel_sds import PixelSDS

    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32)
    if next(unet.parameters()).dtype != torch.float32:
        raise RuntimeError(f"{folder / 'unet'} did not load in float32")
    size = unet.config.sample_size
    with tempfile.TemporaryDirectory() as cache:
        guidance = PixelSDS(pretrained=str(folder), guidance_scale=5.0, half_precision=False, cache_dir=cache)
        guidance.setup("a red cube", "cpu")
        rgb = torch.rand(2, size, size, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
        guidance.step(rgb, orbit_cameras(2, 20.0, 2.0, 50.0, size, size), progress=0.5).loss.backward()
    grad = rgb.grad
    if grad is None or not torch.isfinite(grad).all():
        raise RuntimeError(f"PixelSDS on {folder} gave a non-finite gradient")
    return float(grad.abs().mean())


def verify_latent_pipeline(folder: Path) -> tuple[int, ...]:
    """Load ``folder`` on CPU in fp32: VAE encode -> UNet with the saved text encoder.

    Returns the latent shape of one image at the VAE's sample size.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32)
    size = vae.config.sample_size
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(image).latent_dist.mean * vae.config.scaling_factor
        context = encode_texts(tokenizer, text_encoder, ["a red cube"], TEXT_MAX_LENGTH)
        eps = unet(latents, torch.tensor([500]), encoder_hidden_states=context).sample
    if not torch.isfinite(eps).all():
        raise RuntimeError(f"the latent prior in {folder} predicted non-finite noise")
    return tuple(latents.shape)


def replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished export into place; the previous export is removed only afterwards."""
    old = out.with_name(out.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)
    # mkdtemp and safetensors create owner-only files; give the export the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    for path in [out, *out.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
