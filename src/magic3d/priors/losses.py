"""Diffusion and autoencoder objectives of the priors, and the learning-rate schedule.

Pixel prior (DeepFloyd IF stage-I layout): DDPM epsilon (or v) objective on IF's cosine schedule; the
UNet's second three output channels are IF's learned-range variance, which can be trained with
the improved-DDPM hybrid term (per-step KL in bits with the mean's epsilon detached, so it
shapes only the variance). The guidance reads only the first three channels.

Latent prior (Stable Diffusion layout): an AutoencoderKL trained with L1 + L2 reconstruction
and a small KL; the latent UNet trains with the same epsilon objective on scaled latents.

Everything here is a pure function of its tensors (noise and timesteps drawn inside), so the
trainer can hand a whole objective to ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from magic3d.guidance.prediction import eps_from_prediction, prediction_target

Autocast = Callable[[], contextlib.AbstractContextManager]


class NoiseSchedule:
    """Per-timestep coefficients of a discrete DDPM schedule, on the training device."""

    def __init__(self, betas: Tensor, device: torch.device) -> None:
        betas = betas.double()
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, 0)
        previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - previous) / (1.0 - alphas_cumprod)

        def put(x: Tensor) -> Tensor:
            return x.float().to(device)

        self.num_timesteps = betas.shape[0]
        self.alphas_cumprod = put(alphas_cumprod)
        # learned_range bounds exactly as diffusers' DDPMScheduler._get_variance computes them
        self.min_log = put(torch.log(posterior_variance.clamp_min(1e-20)))
        self.max_log = put(torch.log(betas))
        # mu_q - mu_theta = beta_t / (sqrt(alpha_t) sqrt(1 - alpha_bar_t)) (eps_theta - eps)
        self.mean_error_coef = put(betas / (alphas.sqrt() * (1.0 - alphas_cumprod).sqrt()))


def _per_sample(values: Tensor) -> Tensor:
    return values.view(-1, 1, 1, 1)


def learned_variance_kl(
    variance_out: Float[Tensor, "B C H W"],
    eps_pred: Float[Tensor, "B C H W"],
    noise: Float[Tensor, "B C H W"],
    t: Int[Tensor, "B"],
    schedule: NoiseSchedule,
) -> Float[Tensor, ""]:
    """improved-DDPM L_t for IF's learned-range variance: KL(q(x_{t-1}|x_t,x_0) || p), bits/dim.

    ``eps_pred`` must be detached (the mean is trained by the epsilon MSE only). t = 0 (the
    decoder term in iDDPM) is left out, and so is t = T - 1: the cosine schedule clips its beta
    to 0.999, making the mean-error coefficient ~30x larger than at any other step, so one such
    sample per batch would dominate the (globally clipped) gradient early in training.
    """
    # Clamped to the learned range: outside it exp(log_q - log_p) overflows in a few steps.
    frac = ((variance_out + 1.0) / 2.0).clamp(0.0, 1.0)
    log_q = _per_sample(schedule.min_log[t])
    log_p = frac * _per_sample(schedule.max_log[t]) + (1.0 - frac) * log_q
    mean_error = _per_sample(schedule.mean_error_coef[t]) * (eps_pred - noise)
    kl = 0.5 * (-1.0 + log_p - log_q + torch.exp(log_q - log_p) + mean_error.pow(2) * torch.exp(-log_p))
    per_sample = kl.flatten(1).mean(1) / math.log(2.0)
    keep = ((t > 0) & (t < schedule.num_timesteps - 1)).float()
    return (per_sample * keep).sum() / keep.sum().clamp_min(1.0)


def min_snr_weight(alpha_bar: Tensor, gamma: float | None, prediction_type: str = "epsilon") -> Tensor:
    """Min-SNR-gamma weight of the prediction MSE (Hang et al. 2023), so that every timestep's
    x0 error is weighted by min(SNR, gamma): min(SNR, gamma) / SNR for epsilon prediction,
    min(SNR, gamma) / (SNR + 1) for v prediction.

    With epsilon prediction the plain MSE weights every timestep by SNR(t) in x0 terms, so the
    nearly clean steps (SNR up to ~10^4 on IF's cosine schedule) dominate the gradient while
    the noisy steps, where colour and shape are decided, get little. Capping the weight at
    gamma evens that out; ``None`` keeps the plain MSE (weight 1). (The v MSE is the x0 MSE
    times SNR + 1, hence its denominator.)
    """
    if gamma is None:
        return torch.ones_like(alpha_bar)
    snr = alpha_bar / (1.0 - alpha_bar).clamp_min(1e-8)
    if prediction_type == "v_prediction":
        return snr.clamp(max=gamma) / (snr + 1.0)
    if prediction_type != "epsilon":
        raise ValueError(f"min_snr_weight: prediction_type={prediction_type!r} must be 'epsilon' or 'v_prediction'.")
    return snr.clamp(max=gamma) / snr.clamp_min(1e-8)


def denoiser_loss(
    unet: nn.Module,
    x0: Float[Tensor, "B C H W"],
    context: Float[Tensor, "B L D"],
    schedule: NoiseSchedule,
    variance_loss_weight: float,
    autocast: Autocast,
    min_snr_gamma: float | None = None,
    prediction_type: str = "epsilon",
) -> Float[Tensor, "3"]:
    """[total, weighted prediction MSE, variance KL] for one batch; the KL is 0 for UNets
    without variance channels and is computed on the epsilon the output implies.
    ``min_snr_gamma`` weights each sample's MSE by :func:`min_snr_weight`; ``prediction_type``
    ("epsilon" or "v_prediction") is what the UNet's first channels predict."""
    batch, channels = x0.shape[:2]
    t = torch.randint(0, schedule.num_timesteps, (batch,), device=x0.device)
    noise = torch.randn_like(x0)
    alpha_bar = _per_sample(schedule.alphas_cumprod[t])
    x_t = alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise
    if x_t.is_cuda:
        x_t = x_t.contiguous(memory_format=torch.channels_last)
    with autocast():
        out = unet(x_t, t, encoder_hidden_states=context, return_dict=False)[0]
    out = out.float()
    prediction = out[:, :channels]
    target = prediction_target(x0, noise, alpha_bar.flatten(), prediction_type)
    weight = min_snr_weight(alpha_bar.flatten(), min_snr_gamma, prediction_type)
    loss_eps = ((prediction - target).pow(2).flatten(1).mean(1) * weight).mean()
    if out.shape[1] > channels and variance_loss_weight > 0:
        eps = eps_from_prediction(prediction, x_t.float(), alpha_bar.flatten(), prediction_type)
        loss_var = learned_variance_kl(out[:, channels : 2 * channels], eps.detach(), noise, t, schedule)
    else:
        loss_var = torch.zeros((), device=x0.device)
    return torch.stack([loss_eps + variance_loss_weight * loss_var, loss_eps, loss_var])


def vae_loss(vae: nn.Module, x: Float[Tensor, "B 3 H W"], kl_weight: float, autocast: Autocast) -> Float[Tensor, "3"]:
    """[total, L1 + L2 reconstruction, KL per latent element] for one batch."""
    with autocast():
        moments = vae.encode(x).latent_dist
    mean, logvar = moments.mean.float(), moments.logvar.float()
    z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
    with autocast():
        recon = vae.decode(z).sample
    recon = recon.float()
    rec = (recon - x).abs().mean() + (recon - x).pow(2).mean()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    return torch.stack([rec + kl_weight * kl, rec, kl])


def lr_factor(step: int, progress: float, warmup_steps: int, min_fraction: float) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from 1 to ``min_fraction`` over progress."""
    warm = min(1.0, (step + 1) / max(warmup_steps, 1))
    p = min(max(progress, 0.0), 1.0)
    return warm * (min_fraction + (1.0 - min_fraction) * 0.5 * (1.0 + math.cos(math.pi * p)))
