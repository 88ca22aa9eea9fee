"""Train the embedded diffusion priors from scratch on the toy world: time-boxed, resumable,
exported as diffusers pipelines that the guidance modules load like real models.

Pixel prior (DeepFloyd IF stage-I layout, 64x64): DDPM epsilon objective on IF's cosine
schedule; the UNet's second three output channels are IF's learned-range variance, trained
with the improved-DDPM hybrid term (per-step KL in bits with the mean's epsilon detached, so
it shapes only the variance; lambda 0.001 over T = 1000 gives weight 1). The guidance reads
only the first three channels; the variance makes IF-style ancestral sampling work too.

Latent prior (Stable Diffusion layout): an AutoencoderKL (8x, 4 channels) trained first with
L1 + L2 reconstruction and a small KL; then every image is encoded once (latent mean and std
kept on the device), ``scaling_factor`` = 1 / std of sampled latents is stored in the VAE
config, and the latent UNet trains on freshly sampled, scaled latents.

Text encoder: trained jointly with the UNet at ``text_lr_scale`` x the UNet's learning rate,
from random init. A frozen random encoder would already give distinct embeddings per caption,
but ones that are not organised by meaning: "red" contributes a different, arbitrary vector
at each position it can occupy (T5's relative attention mixes neighbours), so the UNet must
learn every (colour, shape, view) combination separately. Training it costs nothing here
(0.5 M parameters, 77 tokens) and the guidance re-encodes prompts with the saved (EMA)
encoder, so train and test embeddings are the same function. The reduced learning rate keeps
the embedding space from drifting faster than the UNet's cross-attention can follow.

Classifier-free guidance: the caption is replaced by "" with ``cond_drop_prob`` (0.1), encoded
by the same encoder, which is exactly the guidance's negative prompt "" (prompts are padded to
77 tokens with an attention mask, as ``magic3d.guidance.prompts.encode_texts`` does). Captions
carry a view suffix (", front view" from ``magic3d.data.cameras.view_suffix``, the guidance's
own suffixes) with ``view_suffix_prob`` and are bare otherwise, because the guidance uses the
bare prompt when view-dependent prompting is off.

Data: all images are rendered in bulk on the training device at the start (sphere tracing is
the slow part of on-the-fly rendering) and held as uint8 on the device. If rendering would
take longer than ``max_render_minutes``, the rendered prefix is kept (the toy-world sampler
makes any prefix cover every view) and its size is recorded so a resumed run re-renders
exactly the same images.

Time budget: ``minutes`` is the TOTAL training time of the prior across resumed runs (data
rendering, checkpoints and export are not counted), so rerunning ``make priors`` after a
finished run only re-exports when the folder is missing or stale. Raise ``minutes`` and pass
``resume`` to train further. The learning rate warms up, then follows a cosine over the
budget; weights are exported from an exponential moving average.

Checkpoints (``train_state.pt``, loaded with ``weights_only=True``): config, tokenizer, every
phase's model/EMA/optimiser state, step, seconds, loss history, RNG states, data seed and
image count. Written every ``checkpoint_minutes``, at the end, and on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int, UInt8
from torch import Tensor, nn

from magic3d.data.cameras import VIEW_NAMES, view_suffix
from magic3d.devices import resolve_device
from magic3d.guidance.pipeline_formats import pipeline_model_index
from magic3d.guidance.prompts import encode_texts
from magic3d.priors.card import (
    CardInfo,
    PhaseSummary,
    save_contact_sheet,
    write_model_card,
)
from magic3d.priors.configs import (
    TEXT_MAX_LENGTH,
    PriorConfig,
    build_text_encoder,
    build_train_scheduler,
    build_unet,
    build_vae,
    count_parameters,
    default_config,
    tokenizer_from_json,
    train_tokenizer_json,
)
from magic3d.toyworld.shapes import COLOUR_NAMES, SHAPE_NAMES, caption

STATE_FORMAT = "magic3d-prior-state-v1"
MB = 1e6  # sizes are in MB of 10^6 bytes (the stricter reading of the repository budget)
NO_SUFFIX = len(VIEW_NAMES)  # caption slot for the bare prompt
Log = Callable[[str], None]


def _print(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------


class CaptionTable:
    """Token ids of every caption a prior trains on, tokenized once.

    Row ``(shape * n_colours + colour) * 5 + slot`` holds ``caption(shape, colour)`` plus the
    suffix of view ``slot`` (``NO_SUFFIX`` = bare); the last row is "" (the CFG null caption).
    """

    def __init__(self, tokenizer: Any, device: torch.device | str = "cpu") -> None:
        slots = len(VIEW_NAMES) + 1
        texts = [
            caption(shape, colour, view_suffix(slot) if slot < NO_SUFFIX else "")
            for shape in SHAPE_NAMES
            for colour in COLOUR_NAMES
            for slot in range(slots)
        ]
        texts.append("")
        # Same call as magic3d.guidance.prompts.encode_texts: train and guidance inputs match.
        tokens = tokenizer(
            texts,
            padding="max_length",
            max_length=TEXT_MAX_LENGTH,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        self.texts = texts
        self.slots = slots
        self.empty_row = len(texts) - 1
        self.input_ids = tokens.input_ids.to(device)
        self.attention_mask = tokens.attention_mask.to(device)

    def rows(self, shape_id: Int[Tensor, "B"], colour_id: Int[Tensor, "B"], slot: Int[Tensor, "B"]) -> Int[Tensor, "B"]:
        return (shape_id * len(COLOUR_NAMES) + colour_id) * self.slots + slot

    def sample_rows(
        self,
        shape_id: Int[Tensor, "B"],
        colour_id: Int[Tensor, "B"],
        view_id: Int[Tensor, "B"],
        view_suffix_prob: float,
        cond_drop_prob: float,
    ) -> Int[Tensor, "B"]:
        """Caption rows for a batch: view suffix with ``view_suffix_prob``, "" with ``cond_drop_prob``."""
        u = torch.rand(shape_id.shape[0], 2, device=shape_id.device)
        slot = torch.where(u[:, 0] < view_suffix_prob, view_id, torch.full_like(view_id, NO_SUFFIX))
        rows = self.rows(shape_id, colour_id, slot)
        return torch.where(u[:, 1] < cond_drop_prob, torch.full_like(rows, self.empty_row), rows)

    def encode(self, text_encoder: nn.Module, rows: Int[Tensor, "B"]) -> Float[Tensor, "B L D"]:
        """Differentiable text embeddings of caption rows (last hidden state, all 77 tokens)."""
        return text_encoder(self.input_ids[rows], attention_mask=self.attention_mask[rows])[0]


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclass
class ToyImages:
    """Rendered training images and labels, on the training device."""

    images: UInt8[Tensor, "N H W 3"]
    shape_id: Int[Tensor, "N"]
    colour_id: Int[Tensor, "N"]
    view_id: Int[Tensor, "N"]
    render_seconds: float

    def __len__(self) -> int:
        return self.images.shape[0]

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Float[Tensor, "B 3 H W"], Tensor]:
        """A random batch in [-1, 1], channel-first, and its indices."""
        index = torch.randint(len(self), (batch_size,), generator=generator).to(self.images.device)
        return to_model_range(self.images[index]), index


def to_model_range(images: UInt8[Tensor, "B H W 3"]) -> Float[Tensor, "B 3 H W"]:
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def render_toy_images(
    config: PriorConfig,
    n_images: int,
    seed: int,
    device: torch.device,
    max_seconds: float | None,
    log: Log = _print,
) -> ToyImages:
    """Render up to ``n_images`` toy-world images (a prefix if ``max_seconds`` runs out)."""
    from magic3d.toyworld.dataset import (
        ToyWorldBatch,
        ToyWorldSpec,
        render_params,
        sample_params,
    )

    spec = ToyWorldSpec(image_size=config.image_size, supersample=config.supersample, view_captions=False)
    params = sample_params(spec, n_images, seed)
    parts: list[ToyWorldBatch] = []
    start = time.perf_counter()
    done = 0
    # Bounded by rays, not images: the renderer allocates per-ray buffers for a whole call.
    chunk = max(1, config.render_chunk_rays // (config.image_size * config.supersample) ** 2)
    for first in range(0, n_images, chunk):
        parts.append(render_params(spec, params[first : first + chunk], device, chunk))
        done += len(parts[-1])
        elapsed = time.perf_counter() - start
        if max_seconds is not None and elapsed > max_seconds and done < n_images:
            log(f"[data] render time cap reached ({elapsed:.0f} s): keeping the first {done} of {n_images} images")
            break
    batch = ToyWorldBatch.concat(parts)
    seconds = time.perf_counter() - start
    log(
        f"[data] rendered {done} images at {config.image_size}px (supersample {config.supersample}) "
        f"in {seconds:.1f} s ({done / max(seconds, 1e-9):.0f} images/s) on {device.type}"
    )
    return ToyImages(
        images=batch.images.to(device),
        shape_id=batch.shape_id.to(device),
        colour_id=batch.colour_id.to(device),
        view_id=batch.view_id.to(device),
        render_seconds=seconds,
    )


# ---------------------------------------------------------------------------------------------
# Diffusion losses
# ---------------------------------------------------------------------------------------------


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


def denoiser_loss(
    unet: nn.Module,
    x0: Float[Tensor, "B C H W"],
    context: Float[Tensor, "B L D"],
    schedule: NoiseSchedule,
    variance_loss_weight: float,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> tuple[Tensor, Tensor, Tensor]:
    """(total, epsilon MSE, variance KL) for one batch; the KL is 0 for epsilon-only UNets."""
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
    eps = out[:, :channels]
    loss_eps = F.mse_loss(eps, noise)
    if out.shape[1] > channels and variance_loss_weight > 0:
        loss_var = learned_variance_kl(out[:, channels : 2 * channels], eps.detach(), noise, t, schedule)
    else:
        loss_var = torch.zeros((), device=x0.device)
    return loss_eps + variance_loss_weight * loss_var, loss_eps, loss_var


def vae_loss(
    vae: nn.Module, x: Float[Tensor, "B 3 H W"], kl_weight: float, autocast: Callable[[], contextlib.AbstractContextManager]
) -> tuple[Tensor, Tensor, Tensor]:
    """(total, L1 + L2 reconstruction, KL per latent element) for one batch."""
    with autocast():
        moments = vae.encode(x).latent_dist
    mean, logvar = moments.mean.float(), moments.logvar.float()
    z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
    with autocast():
        recon = vae.decode(z).sample
    recon = recon.float()
    rec = (recon - x).abs().mean() + (recon - x).pow(2).mean()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    return rec + kl_weight * kl, rec, kl


# ---------------------------------------------------------------------------------------------
# Optimisation state: EMA and phases
# ---------------------------------------------------------------------------------------------


class Ema:
    """Exponential moving average of parameters (fp32), with the usual warm-up of the decay."""

    def __init__(self, modules: dict[str, nn.Module], decay: float) -> None:
        self.decay = decay
        self.params = {
            name: dict(module.named_parameters()) for name, module in modules.items()
        }
        self.shadow = {
            name: {k: p.detach().float().clone() for k, p in params.items()} for name, params in self.params.items()
        }

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1.0 + step) / (10.0 + step))
        for name, params in self.params.items():
            keys = list(params)
            torch._foreach_lerp_([self.shadow[name][k] for k in keys], [params[k].detach().float() for k in keys], 1.0 - decay)

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        return self.shadow

    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        for name, tensors in state.items():
            for k, v in tensors.items():
                self.shadow[name][k].copy_(v)

    @torch.no_grad()
    def copy_to(self, name: str, module: nn.Module) -> nn.Module:
        """Write the averaged parameters of ``name`` into ``module`` (same architecture)."""
        for k, p in module.named_parameters():
            p.copy_(self.shadow[name][k])
        return module


@dataclass
class Phase:
    """One optimisation problem (the VAE, or UNet + text encoder) and its progress."""

    name: str
    modules: dict[str, nn.Module]
    optimizer: torch.optim.Optimizer
    ema: Ema
    step: int = 0
    seconds: float = 0.0
    history: list[list[float]] = field(default_factory=list)  # [step, seconds, mean loss]

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "seconds": self.seconds,
            "history": self.history,
            "models": {n: m.state_dict() for n, m in self.modules.items()},
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.seconds = float(state["seconds"])
        self.history = [list(h) for h in state["history"]]
        for name, module in self.modules.items():
            module.load_state_dict(state["models"][name])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])

    def done(self, budget_s: float, max_steps: int | None) -> bool:
        return self.seconds >= budget_s or (max_steps is not None and self.step >= max_steps)

    def summary(self) -> PhaseSummary:
        return PhaseSummary(self.name, self.step, self.seconds, [tuple(h) for h in self.history])


def make_phase(
    name: str,
    modules: dict[str, nn.Module],
    lr: float,
    lr_scales: dict[str, float],
    weight_decay: float,
    ema_decay: float,
    device: torch.device,
) -> Phase:
    groups = [
        {"params": list(m.parameters()), "lr": lr * lr_scales.get(n, 1.0), "base_lr": lr * lr_scales.get(n, 1.0)}
        for n, m in modules.items()
    ]
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, **fused)
    return Phase(name, modules, optimizer, Ema(modules, ema_decay))


def lr_factor(step: int, progress: float, warmup_steps: int, min_fraction: float) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from 1 to ``min_fraction`` over progress."""
    warm = min(1.0, (step + 1) / max(warmup_steps, 1))
    p = min(max(progress, 0.0), 1.0)
    return warm * (min_fraction + (1.0 - min_fraction) * 0.5 * (1.0 + math.cos(math.pi * p)))


def _format_seconds(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def run_phase(
    phase: Phase,
    loss_fn: Callable[[], tuple[Tensor, ...]],
    budget_s: float,
    max_steps: int | None,
    config: PriorConfig,
    checkpoint: Callable[[], None],
    label: str,
    log: Log = _print,
) -> None:
    """Optimise until the phase's time budget or step cap; checkpoints every few minutes."""
    if phase.done(budget_s, max_steps):
        return
    params = [p for g in phase.optimizer.param_groups for p in g["params"]]
    window: list[Tensor] = []
    skipped = 0
    run_start = time.perf_counter()
    start_seconds, start_step = phase.seconds, phase.step
    last_checkpoint = run_start
    last_log = (run_start, phase.step)
    log(f"[{label}] training from step {phase.step} ({_format_seconds(phase.seconds)} done, budget {_format_seconds(budget_s)})")
    try:
        while not phase.done(budget_s, max_steps):
            progress = phase.seconds / budget_s if math.isfinite(budget_s) and budget_s > 0 else 0.0
            if max_steps is not None:
                progress = max(progress, phase.step / max_steps)
            factor = lr_factor(phase.step, progress, config.warmup_steps, config.min_lr_fraction)
            for group in phase.optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            losses = loss_fn()
            phase.optimizer.zero_grad(set_to_none=True)
            losses[0].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            if not torch.isfinite(grad_norm):  # one host sync per step: cheap next to a lost run
                skipped += 1
                if skipped > 20:
                    raise FloatingPointError(
                        f"[{label}] 20+ non-finite gradients (step {phase.step}): lower the learning rate "
                        f"(lr={config.lr}) and resume from the last checkpoint."
                    )
                continue
            skipped = 0
            phase.optimizer.step()
            phase.ema.update(phase.step)
            phase.step += 1
            window.append(torch.stack([x.detach() for x in losses]))
            now = time.perf_counter()
            phase.seconds = start_seconds + (now - run_start)
            finished = phase.done(budget_s, max_steps)
            if phase.step % config.log_every == 0 or finished:
                means = torch.stack(window).mean(0).tolist()  # one host sync per log line
                window.clear()
                if not all(math.isfinite(m) for m in means):
                    raise FloatingPointError(
                        f"[{label}] loss became {means[0]} at step {phase.step}: lower the learning rate "
                        f"(lr={config.lr}) and resume from the last checkpoint."
                    )
                phase.history.append([phase.step, phase.seconds, means[0]])
                rate = (phase.step - last_log[1]) / max(now - last_log[0], 1e-9)
                last_log = (now, phase.step)
                left = budget_s - phase.seconds
                if max_steps is not None:
                    left = min(left, (max_steps - phase.step) / max(rate, 1e-9))
                parts = " ".join(f"{m:.4f}" for m in means[1:])
                log(
                    f"[{label}] step {phase.step} | loss {means[0]:.4f} ({parts}) | {rate:.1f} it/s | "
                    f"lr {phase.optimizer.param_groups[0]['lr']:.2e} | ETA {_format_seconds(left)}"
                )
            if now - last_checkpoint > config.checkpoint_minutes * 60 and not finished:
                checkpoint()
                last_checkpoint = time.perf_counter()
    except KeyboardInterrupt:
        log(f"[{label}] interrupted at step {phase.step}: saving a checkpoint before exiting")
        checkpoint()
        raise
    done = phase.step - start_step
    log(f"[{label}] {done} steps in {_format_seconds(phase.seconds - start_seconds)} (now step {phase.step})")


# ---------------------------------------------------------------------------------------------
# Sampling (contact sheet)
# ---------------------------------------------------------------------------------------------


def sample_prompts(rows: int, views: tuple[int, ...]) -> list[str]:
    """``rows`` objects (distinct shapes, cycling colours) x (bare prompt, then each view)."""
    prompts = []
    for r in range(rows):
        shape = SHAPE_NAMES[(r * 3) % len(SHAPE_NAMES)]
        colour = COLOUR_NAMES[r % len(COLOUR_NAMES)]
        prompts.append(caption(shape, colour))
        prompts += [caption(shape, colour, view_suffix(v)) for v in views]
    return prompts


@torch.no_grad()
def ddim_sample(
    unet: nn.Module,
    text_encoder: nn.Module,
    tokenizer: Any,
    scheduler_config: dict[str, Any],
    prompts: list[str],
    steps: int,
    guidance_scale: float,
    seed: int = 0,
    vae: nn.Module | None = None,
    scaling_factor: float = 1.0,
) -> UInt8[Tensor, "N H W 3"]:
    """DDIM samples with classifier-free guidance (negative prompt ""), as uint8 images (CPU).

    Uses the guidance's own text path (``encode_texts``) and only the first ``in_channels``
    UNet outputs (IF's variance channels are ignored), then decodes latents with ``vae``.
    """
    from diffusers import DDIMScheduler

    device = next(unet.parameters()).device
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    embeddings = encode_texts(tokenizer, text_encoder, [*prompts, ""], TEXT_MAX_LENGTH)
    dtype = next(unet.parameters()).dtype
    cond = embeddings[:-1].to(dtype)
    uncond = embeddings[-1:].expand_as(cond).to(dtype)
    channels = unet.config.in_channels
    size = unet.config.sample_size
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(len(prompts), channels, size, size, generator=generator).to(device) * scheduler.init_noise_sigma
    context = torch.cat([cond, uncond])
    for t in scheduler.timesteps:
        out = unet(torch.cat([x, x]).to(dtype), t.to(device), encoder_hidden_states=context, return_dict=False)[0]
        eps_c, eps_u = out[:, :channels].float().chunk(2)
        x = scheduler.step(eps_u + guidance_scale * (eps_c - eps_u), t, x).prev_sample
    if vae is not None:
        x = vae.decode((x / scaling_factor).to(next(vae.parameters()).dtype)).sample.float()
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


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


def _replace_folder(tmp: Path, out: Path) -> None:
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


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def default_state_path(out: str | Path, kind: str) -> Path:
    """``<out>/../.prior_ckpt/<kind>/train_state.pt``."""
    return Path(out).parent / ".prior_ckpt" / kind / "train_state.pt"


@dataclass
class TrainResult:
    out: Path
    state_path: Path
    steps: dict[str, int]  # per phase
    train_seconds: float
    exported: bool  # False when the folder was already up to date
    param_counts: dict[str, int]
    fp16_mb: float


class PriorTrainer:
    """Owns one prior's modules, data and phases; ``fit`` trains, ``export`` writes the folder."""

    def __init__(
        self,
        config: PriorConfig,
        device: torch.device,
        seed: int,
        state: dict[str, Any] | None = None,
        log: Log = _print,
    ) -> None:
        self.config = config
        self.device = device
        self.log = log
        self.seed = int(state["seed"]) if state else seed
        self.tokenizer_json = state["tokenizer_json"] if state else train_tokenizer_json()
        self.tokenizer = tokenizer_from_json(self.tokenizer_json)
        self.table = CaptionTable(self.tokenizer, device)
        self.n_images = int(state["n_images"]) if state and state.get("n_images") else None
        self.render_info: dict[str, float] = dict(state.get("render", {})) if state else {}
        self.runs: list[dict[str, Any]] = list(state.get("runs", [])) if state else []
        self.scaling_factor: float | None = state.get("scaling_factor") if state else None
        self.data: ToyImages | None = None
        self.latents: tuple[Tensor, Tensor] | None = None

        torch.manual_seed(self.seed)
        self.data_generator = torch.Generator().manual_seed(self.seed + 1)
        text_encoder = build_text_encoder(config.text, len(self.tokenizer)).to(device)
        unet = build_unet(config).to(device)
        if device.type == "cuda":
            unet = unet.to(memory_format=torch.channels_last)
        self.phases: dict[str, Phase] = {}
        if config.kind == "latent":
            vae = build_vae(config).to(device)
            self.phases["vae"] = make_phase(
                "vae", {"vae": vae}, config.vae_lr, {}, 0.0, config.ema_decay, device
            )
        self.phases["unet"] = make_phase(
            "unet",
            {"unet": unet, "text_encoder": text_encoder},
            config.lr,
            {"text_encoder": config.text_lr_scale},
            config.weight_decay,
            config.ema_decay,
            device,
        )
        self.train_scheduler = build_train_scheduler(config)
        self.schedule = NoiseSchedule(torch.as_tensor(self.train_scheduler.betas), device)
        if state:
            for name, phase in self.phases.items():
                phase.load_state_dict(state["phases"][name])
            self._load_rng(state["rng"])

    # ---------------------------------------------------------------- bookkeeping

    @property
    def export_modules(self) -> dict[str, nn.Module]:
        """The modules saved in the pipeline, by subfolder name (live weights)."""
        modules = dict(self.phases["unet"].modules)
        if "vae" in self.phases:
            modules["vae"] = self.phases["vae"].modules["vae"]
        return modules

    def param_counts(self) -> dict[str, int]:
        return {name: count_parameters(m) for name, m in self.export_modules.items()}

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _rng_state(self) -> dict[str, Any]:
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "data": self.data_generator.get_state(),
        }

    def _load_rng(self, rng: dict[str, Any]) -> None:
        torch.set_rng_state(rng["torch"])
        self.data_generator.set_state(rng["data"])
        if rng.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "kind": self.config.kind,
            "config": self.config.to_dict(),
            "seed": self.seed,
            "tokenizer_json": self.tokenizer_json,
            "n_images": self.n_images,
            "render": self.render_info,
            "scaling_factor": self.scaling_factor,
            "runs": self.runs,
            "phases": {name: phase.state_dict() for name, phase in self.phases.items()},
            "rng": self._rng_state(),
        }

    def save_state(self, path: Path) -> None:
        """Atomic write (temp file + rename): a crash never leaves a torn checkpoint."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        self.log(f"[state] saved {path} ({', '.join(f'{n} step {p.step}' for n, p in self.phases.items())})")

    def finished(self, budget_s: float, max_steps: int | None) -> bool:
        return all(p.done(b, max_steps) for p, b in zip(self.phases.values(), self._budgets(budget_s)))

    def _budgets(self, budget_s: float) -> list[float]:
        """Per-phase time budgets: the VAE gets ``vae_fraction``, the UNet the rest."""
        if "vae" not in self.phases:
            return [budget_s]
        vae, unet = self.phases["vae"], self.phases["unet"]
        # Once the UNet has started, the VAE is frozen: training it further (a resumed run with
        # a larger budget) would move the latents under the UNet.
        vae_budget = vae.seconds if unet.step > 0 else budget_s * self.config.vae_fraction
        used = vae.seconds if vae.done(vae_budget, None) else vae_budget
        return [vae_budget, max(budget_s - used, 0.0)]

    @property
    def train_seconds(self) -> float:
        return sum(p.seconds for p in self.phases.values())

    # ---------------------------------------------------------------- data

    def ensure_data(self) -> ToyImages:
        # Empty images: the latent phase freed the pixels; render again (same seed and count).
        if self.data is None or len(self.data) == 0:
            first = self.n_images is None
            n = self.config.n_images if first else self.n_images
            cap = self.config.max_render_minutes * 60 if first else None
            self.data = render_toy_images(self.config, n, self.seed, self.device, cap, self.log)
            self.n_images = len(self.data)
            if first:
                self.render_info = {
                    "seconds": self.data.render_seconds,
                    "images_per_s": len(self.data) / max(self.data.render_seconds, 1e-9),
                    "device": device_name(self.device),
                }
        return self.data

    # ---------------------------------------------------------------- training

    def fit(self, budget_s: float, max_steps: int | None, state_path: Path) -> None:
        run = {
            "device": device_name(self.device),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "steps_before": {n: p.step for n, p in self.phases.items()},
        }
        seconds_before = self.train_seconds
        if self.finished(budget_s, max_steps):
            return
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.runs.append(run)
        checkpoint = lambda: self.save_state(state_path)  # noqa: E731
        if "vae" in self.phases:
            vae_budget = self._budgets(budget_s)[0]
            self._fit_vae(vae_budget, max_steps, checkpoint)
        unet_budget = self._budgets(budget_s)[-1]
        self._fit_unet(unet_budget, max_steps, checkpoint)
        run["steps_after"] = {n: p.step for n, p in self.phases.items()}
        run["seconds"] = self.train_seconds - seconds_before
        self.save_state(state_path)

    def _fit_vae(self, budget_s: float, max_steps: int | None, checkpoint: Callable[[], None]) -> None:
        phase = self.phases["vae"]
        if phase.done(budget_s, max_steps):
            return
        data = self.ensure_data()
        vae = phase.modules["vae"].train()
        config = self.config

        def loss() -> tuple[Tensor, ...]:
            x, _ = data.sample(config.vae_batch_size, self.data_generator)
            return vae_loss(vae, x, config.vae_kl_weight, self._autocast)

        before = phase.step
        run_phase(phase, loss, budget_s, max_steps, config, checkpoint, f"{config.kind}/vae", self.log)
        if phase.step != before:  # the encoder changed: latents and their scale must be recomputed
            self.latents = None
            self.scaling_factor = None

    @torch.no_grad()
    def _encode_latents(self) -> tuple[Tensor, Tensor]:
        """Latent mean and std of every image from the EMA VAE; sets ``scaling_factor``."""
        data = self.ensure_data()
        vae = self.phases["vae"].ema.copy_to("vae", build_vae(self.config).to(self.device)).eval()
        means, stds = [], []
        chunk = max(1, 4 * self.config.vae_batch_size)
        for first in range(0, len(data), chunk):
            with self._autocast():
                dist = vae.encode(to_model_range(data.images[first : first + chunk])).latent_dist
            means.append(dist.mean.to(torch.float16))
            stds.append(dist.std.to(torch.float16))
        mean, std = torch.cat(means), torch.cat(stds)
        if self.scaling_factor is None:
            count = min(len(mean), self.config.scaling_sample_count)
            generator = torch.Generator().manual_seed(self.seed + 2)
            noise = torch.randn(mean[:count].shape, generator=generator).to(self.device)
            sample = mean[:count].float() + std[:count].float() * noise
            self.scaling_factor = float(1.0 / sample.std())
            self.log(f"[latent] latent std {sample.std().item():.4f} -> scaling_factor {self.scaling_factor:.5f}")
        return mean, std

    def _fit_unet(self, budget_s: float, max_steps: int | None, checkpoint: Callable[[], None]) -> None:
        phase = self.phases["unet"]
        if phase.done(budget_s, max_steps):
            return
        config = self.config
        unet, text_encoder = phase.modules["unet"].train(), phase.modules["text_encoder"].train()
        forward = torch.compile(unet) if config.compile and self.device.type == "cuda" else unet
        data = self.ensure_data()
        if config.kind == "latent":
            if self.latents is None:
                self.latents = self._encode_latents()
            latent_mean, latent_std = self.latents
            self.data.images = self.data.images[:0]  # pixels are no longer needed on the device

        def loss() -> tuple[Tensor, ...]:
            index = torch.randint(len(data.shape_id), (config.batch_size,), generator=self.data_generator)
            index = index.to(self.device)
            if config.kind == "latent":
                mean, std = latent_mean[index].float(), latent_std[index].float()
                x0 = (mean + std * torch.randn_like(mean)) * self.scaling_factor
            else:
                x0 = to_model_range(data.images[index])
            rows = self.table.sample_rows(
                data.shape_id[index], data.colour_id[index], data.view_id[index],
                config.view_suffix_prob, config.cond_drop_prob,
            )
            with self._autocast():
                context = self.table.encode(text_encoder, rows)
            return denoiser_loss(forward, x0, context, self.schedule, config.variance_loss_weight, self._autocast)

        run_phase(phase, loss, budget_s, max_steps, config, checkpoint, f"{config.kind}/unet", self.log)

    # ---------------------------------------------------------------- export

    def ema_modules(self) -> dict[str, nn.Module]:
        """Fresh fp32 copies of the exported modules holding the EMA weights, on the device."""
        modules: dict[str, nn.Module] = {}
        for name, live in self.export_modules.items():
            phase = self.phases["vae" if name == "vae" else "unet"]
            if name == "vae":
                fresh = build_vae(self.config)
            elif name == "unet":
                fresh = build_unet(self.config)
            else:
                fresh = build_text_encoder(self.config.text, len(self.tokenizer))
            fresh.load_state_dict(live.state_dict())  # buffers; parameters are overwritten next
            modules[name] = phase.ema.copy_to(name, fresh.to(self.device)).eval()
        if "vae" in modules:
            if self.scaling_factor is None:
                self.latents = self._encode_latents()
            modules["vae"].register_to_config(scaling_factor=self.scaling_factor)
        return modules

    def export(self, out: Path, max_mb: float, command: str = "") -> float:
        """Write the diffusers folder (fp16), its model card and sample sheet; returns MB."""
        config = self.config
        modules = self.ema_modules()
        size = check_size(modules, max_mb)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            views = (0, 1, 2, 3) if config.kind == "pixel" else (0, 1, 2)
            prompts = sample_prompts(config.sample_rows, views)
            images = ddim_sample(
                modules["unet"], modules["text_encoder"], self.tokenizer, dict(self.train_scheduler.config),
                prompts, config.sample_steps, config.sample_guidance, seed=self.seed,
                vae=modules.get("vae"), scaling_factor=self.scaling_factor or 1.0,
            )
            save_contact_sheet(tmp / "samples.png", images, cols=len(views) + 1, scale=2 if config.kind == "pixel" else 1)
            save_pipeline(tmp, modules, self.tokenizer, self.train_scheduler, config.kind)
            if config.kind == "pixel":
                check = f"PixelSDS on CPU (fp32): finite SDS gradient, mean |grad| {verify_pixel_pipeline(tmp):.3e}"
            else:
                check = f"CPU (fp32) load: VAE latents {verify_latent_pipeline(tmp)}, UNet output finite"
            self.log(f"[export] verified: {check}")
            info = CardInfo(
                kind=config.kind,
                param_counts=self.param_counts(),
                fp16_mb=size,
                max_mb=max_mb,
                phases=[p.summary() for p in self.phases.values()],
                runs=self.runs,
                n_images=self.n_images or 0,
                image_size=config.image_size,
                render=self.render_info,
                seed=self.seed,
                config=config.to_dict(),
                sample_prompts=prompts,
                sample_cols=len(views) + 1,
                scaling_factor=self.scaling_factor,
                verification=check,
                command=command,
            )
            write_model_card(tmp, info)
            _replace_folder(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.log(f"[export] wrote {out} ({size:.2f} MB fp16; {_counts_text(self.param_counts())})")
        return size


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {c / 1e6:.2f} M" for n, c in counts.items()) + f", total {sum(counts.values()) / 1e6:.2f} M"


def load_state(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a prior training state ({STATE_FORMAT}); delete it or pass another --state.")
    return state


def _export_is_current(out: Path, trainer: PriorTrainer) -> bool:
    record = out / "training.json"
    if not (out / "model_index.json").is_file() or not record.is_file():
        return False
    steps = json.loads(record.read_text()).get("steps", {})
    return steps == {n: p.step for n, p in trainer.phases.items()}


def train_prior(
    kind: str,
    out: str | Path,
    minutes: float = 8.0,
    resume: bool = False,
    state_path: str | Path | None = None,
    smoke: bool = False,
    max_steps: int | None = None,
    device: str = "auto",
    max_mb: float | None = None,
    seed: int = 0,
    config: PriorConfig | None = None,
    command: str = "",
    log: Log = _print,
) -> TrainResult:
    """Train (or continue) a prior for a total of ``minutes`` and export it to ``out``.

    ``resume`` continues from ``state_path`` (default ``<out>/../.prior_ckpt/<kind>/
    train_state.pt``) when it exists, keeping its config, seed, tokenizer and images;
    ``max_steps`` caps each phase's total steps. Without ``resume`` an existing state is
    overwritten. ``config`` replaces the default (or ``smoke``) config of a fresh run.
    """
    out = Path(out)
    state_path = Path(state_path) if state_path is not None else default_state_path(out, kind)
    if smoke and max_steps is None:
        max_steps = 3
    if minutes <= 0:
        raise ValueError(f"minutes={minutes} must be positive (the total training time budget).")
    resolved = resolve_device(device)
    state = None
    if resume and state_path.is_file():
        state = load_state(state_path)
        if state["kind"] != kind:
            raise ValueError(f"{state_path} holds a {state['kind']!r} prior, not {kind!r}: pass the matching --kind or --state.")
        stored = PriorConfig.from_dict(state["config"])
        if config is not None and config.to_dict() != stored.to_dict():
            log("[state] resuming with the stored config: config changes apply to new runs only")
        config = stored
        log(f"[state] resuming from {state_path}")
    else:
        if resume:
            log(f"[state] no state at {state_path}: starting a new run")
        elif state_path.is_file():
            log(f"[state] {state_path} exists but --resume was not given: starting over (it will be overwritten)")
        config = config if config is not None else default_config(kind, smoke)
    if config.kind != kind:
        raise ValueError(f"config.kind={config.kind!r} does not match kind={kind!r}.")
    max_mb = config.max_mb if max_mb is None else max_mb

    trainer = PriorTrainer(config, resolved, seed, state, log)
    counts = trainer.param_counts()
    size = check_size(trainer.export_modules, max_mb)  # refuse before spending GPU time
    log(f"[{kind}] parameters: {_counts_text(counts)}; fp16 pipeline {size:.2f} MB (max {max_mb} MB)")
    budget_s = minutes * 60.0
    if trainer.finished(budget_s, max_steps) and _export_is_current(out, trainer):
        log(f"[{kind}] budget already spent and {out} is up to date: nothing to do")
        return TrainResult(out, state_path, {n: p.step for n, p in trainer.phases.items()},
                           trainer.train_seconds, False, counts, size)
    trainer.fit(budget_s, max_steps, state_path)
    if not state_path.is_file():  # a finished state loaded from elsewhere, or zero steps to run
        trainer.save_state(state_path)
    size = trainer.export(out, max_mb, command)
    return TrainResult(out, state_path, {n: p.step for n, p in trainer.phases.items()},
                       trainer.train_seconds, True, counts, size)
