"""One training objective per phase as a module: batch draw -> captions -> text encoder ->
noising -> UNet -> losses, so that ``torch.compile`` sees (and fuses) the whole forward pass.

Why this shape (H200 profile of main's trainer, BENCHMARKS.md "Prior training"): the eager
step was GPU-bound, but only ~20 % of its kernel time was convolutions, matmuls and attention;
the rest was dtype casts and layout copies (bf16 autocast runs GroupNorm/LayerNorm in fp32 and
eager GroupNorm converts channels-last activations to contiguous and back), separate
elementwise kernels (SiLU, residual adds, GELU) and the eager text encoder. Compiling the
whole objective fuses casts, norms and activations into a few kernels per block; keeping the
batch draw on the device (the device's global generator, no host round trip) lets the CPU run
ahead of the GPU. The parameters stay fp32 (fused AdamW on fp32 master weights) and the
forward runs under bf16 autocast, as before.

On CPU nothing is compiled: the same modules run eagerly (tests, small runs).
"""

from __future__ import annotations

import contextlib

import torch
from jaxtyping import Float
from torch import Tensor, nn

from magic3d.priors.captions import CaptionTable
from magic3d.priors.configs import PriorConfig
from magic3d.priors.data import ToyImages, to_model_range
from magic3d.priors.losses import NoiseSchedule, denoiser_loss, vae_loss


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; fp32 elsewhere (CPU runs stay bit-reproducible)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class DenoiserObjective(nn.Module):
    """[total, epsilon MSE, variance KL] of one freshly drawn batch (pixels or latents)."""

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module,
        table: CaptionTable,
        schedule: NoiseSchedule,
        data: ToyImages,
        config: PriorConfig,
        latents: tuple[Tensor, Tensor] | None = None,
        scaling_factor: float | None = None,
    ) -> None:
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder
        self.table, self.schedule, self.data, self.config = table, schedule, data, config
        self.latents, self.scaling_factor = latents, scaling_factor
        self.device = data.shape_id.device

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast_for(self.device)

    def forward(self) -> Float[Tensor, "3"]:
        config, data = self.config, self.data
        index = torch.randint(len(data), (config.batch_size,), device=self.device)
        if self.latents is not None:
            mean, std = self.latents[0][index].float(), self.latents[1][index].float()
            x0 = (mean + std * torch.randn_like(mean)) * self.scaling_factor
        else:
            x0 = to_model_range(data.images[index])
        rows = self.table.sample_rows(
            data.shape_id[index], data.colour_id[index], data.view_id[index],
            config.view_suffix_prob, config.cond_drop_prob,
        )
        with self._autocast():
            context = self.table.encode(self.text_encoder, rows)
        return denoiser_loss(self.unet, x0, context, self.schedule, config.variance_loss_weight, self._autocast,
                             config.min_snr_gamma, config.prediction_type)


class VaeObjective(nn.Module):
    """[total, reconstruction, KL] of one batch of training images."""

    def __init__(self, vae: nn.Module, data: ToyImages, config: PriorConfig) -> None:
        super().__init__()
        self.vae, self.data, self.config = vae, data, config
        self.device = data.shape_id.device

    def forward(self) -> Float[Tensor, "3"]:
        x, _ = self.data.sample(self.config.vae_batch_size)
        return vae_loss(self.vae, x, self.config.vae_kl_weight, lambda: autocast_for(self.device))


def maybe_compile(objective: nn.Module, config: PriorConfig, device: torch.device, mode: str | None = None) -> nn.Module:
    """``torch.compile`` on CUDA when ``config.compile``; the module itself otherwise.

    Compilation happens at the first call (about 1-2 minutes for the pixel UNet on an H200,
    counted in the phase's training time, since the budget is wall time); later runs on the
    same machine reuse inductor's on-disk cache. Shapes are static (one batch size per run).
    ``mode`` (default ``config.compile_mode``) is torch.compile's mode; "default" means none.
    """
    if not (config.compile and device.type == "cuda"):
        return objective
    mode = config.compile_mode if mode is None else mode
    return torch.compile(objective, dynamic=False, mode=None if mode == "default" else mode)
