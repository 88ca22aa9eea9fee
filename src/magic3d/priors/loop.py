"""Optimisation state and the time-boxed loop: EMA of weights, one ``Phase`` per optimisation
problem (the VAE, or UNet + text encoder), and ``run_phase``, which trains a phase until its
time budget or step cap, logging and checkpointing as it goes.

No host sync per step on CUDA: a non-finite gradient norm is turned into fused AdamW's
``found_inf`` flag on the device (the update is skipped there, as GradScaler does), and the
count of skipped steps is read only at logging time. On CPU the check stays a plain ``if``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from magic3d.priors.card import PhaseSummary
from magic3d.priors.configs import PriorConfig
from magic3d.priors.logs import Log, print_line
from magic3d.priors.losses import lr_factor

MAX_SKIPPED = 20  # non-finite gradients tolerated per logging window (CPU: in a row)


class Ema:
    """Exponential moving average of parameters (fp32), with the usual warm-up of the decay."""

    def __init__(self, modules: dict[str, nn.Module], decay: float) -> None:
        self.decay = decay
        self.params = {name: dict(module.named_parameters()) for name, module in modules.items()}
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
    """One optimisation problem and its progress."""

    name: str
    modules: dict[str, nn.Module]
    optimizer: torch.optim.Optimizer
    ema: Ema
    step: int = 0
    seconds: float = 0.0
    history: list[list[float]] = field(default_factory=list)  # [step, seconds, mean loss]
    # Step at which the current optimiser state began (a warm start resets the AdamW moments):
    # the learning-rate warm-up counts from here.
    warmup_from: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "seconds": self.seconds,
            "history": self.history,
            "warmup_from": self.warmup_from,
            "models": {n: m.state_dict() for n, m in self.modules.items()},
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.seconds = float(state["seconds"])
        self.history = [list(h) for h in state["history"]]
        self.warmup_from = int(state.get("warmup_from", 0))  # states before warm starts: 0
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


def format_seconds(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _device_skip(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer can skip a step from a device flag (fused AdamW on CUDA)."""
    group = optimizer.param_groups[0]
    return bool(group.get("fused")) and group["params"][0].is_cuda


def run_phase(
    phase: Phase,
    loss_fn: Callable[[], Float[Tensor, "K"]],
    budget_s: float,
    max_steps: int | None,
    config: PriorConfig,
    checkpoint: Callable[[], None],
    label: str,
    log: Log = print_line,
) -> None:
    """Optimise until the phase's time budget or step cap; checkpoints every few minutes.

    ``loss_fn`` returns a vector whose first entry is the loss to minimise (the rest are its
    parts, logged). Training time is wall time, compilation included.
    """
    if phase.done(budget_s, max_steps):
        return
    params = [p for g in phase.optimizer.param_groups for p in g["params"]]
    device_skip = _device_skip(phase.optimizer)
    window: list[Tensor] = []
    skipped_cpu = 0
    skipped = torch.zeros((), device=params[0].device)  # device-side count in this log window
    run_start = time.perf_counter()
    start_seconds, start_step = phase.seconds, phase.step
    last_checkpoint = run_start
    last_log = (run_start, phase.step)
    log(f"[{label}] training from step {phase.step} ({format_seconds(phase.seconds)} done, budget {format_seconds(budget_s)})")
    try:
        while not phase.done(budget_s, max_steps):
            progress = phase.seconds / budget_s if math.isfinite(budget_s) and budget_s > 0 else 0.0
            if max_steps is not None:
                progress = max(progress, phase.step / max_steps)
            factor = lr_factor(phase.step - phase.warmup_from, progress, config.warmup_steps, config.min_lr_fraction)
            for group in phase.optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            if params[0].is_cuda:
                # A new iteration for CUDA-graph trees (compile_mode="reduce-overhead"): the
                # previous replay's outputs may be overwritten from here on. No-op otherwise.
                torch.compiler.cudagraph_mark_step_begin()
            losses = loss_fn()
            phase.optimizer.zero_grad(set_to_none=True)
            losses[0].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip, foreach=True)
            if device_skip:
                found_inf = (~torch.isfinite(grad_norm)).float()
                phase.optimizer.found_inf = found_inf  # read by fused AdamW: the update is skipped
                skipped += found_inf
            elif not torch.isfinite(grad_norm):
                skipped_cpu += 1
                if skipped_cpu > MAX_SKIPPED:
                    raise FloatingPointError(
                        f"[{label}] {MAX_SKIPPED}+ non-finite gradients (step {phase.step}): lower the learning rate "
                        f"(lr={config.lr}) and resume from the last checkpoint."
                    )
                continue
            else:
                skipped_cpu = 0
            phase.optimizer.step()
            phase.ema.update(phase.step)
            phase.step += 1
            window.append(losses.detach().clone())  # a CUDA-graph output is overwritten by the next replay
            now = time.perf_counter()
            phase.seconds = start_seconds + (now - run_start)
            finished = phase.done(budget_s, max_steps)
            if phase.step % config.log_every == 0 or finished:
                means = torch.stack(window).mean(0).tolist()  # one host sync per log line
                n_skipped = int(skipped.item())
                skipped.zero_()
                window.clear()
                if n_skipped > MAX_SKIPPED:
                    raise FloatingPointError(
                        f"[{label}] {n_skipped} non-finite gradients before step {phase.step}: lower the learning "
                        f"rate (lr={config.lr}) and resume from the last checkpoint."
                    )
                if not all(math.isfinite(m) for m in means):
                    raise FloatingPointError(
                        f"[{label}] loss became {means[0]} at step {phase.step}: lower the learning rate "
                        f"(lr={config.lr}) and resume from the last checkpoint."
                    )
                phase.history.append([phase.step, phase.seconds, means[0]])
                now = time.perf_counter()  # after the sync: the rate covers finished GPU work
                rate = (phase.step - last_log[1]) / max(now - last_log[0], 1e-9)
                last_log = (now, phase.step)
                left = budget_s - phase.seconds
                if max_steps is not None:
                    left = min(left, (max_steps - phase.step) / max(rate, 1e-9))
                parts = " ".join(f"{m:.4f}" for m in means[1:])
                skip_text = f" | {n_skipped} skipped" if n_skipped else ""
                log(
                    f"[{label}] step {phase.step} | loss {means[0]:.4f} ({parts}) | {rate:.1f} it/s | "
                    f"lr {phase.optimizer.param_groups[0]['lr']:.2e} | ETA {format_seconds(left)}{skip_text}"
                )
            if now - last_checkpoint > config.checkpoint_minutes * 60 and not finished:
                checkpoint()
                last_checkpoint = time.perf_counter()
    except KeyboardInterrupt:
        log(f"[{label}] interrupted at step {phase.step}: saving a checkpoint before exiting")
        checkpoint()
        raise
    finally:
        if hasattr(phase.optimizer, "found_inf"):
            del phase.optimizer.found_inf  # a later eager step (export, resume) must not see it
    if params[0].is_cuda:
        torch.cuda.synchronize(params[0].device)  # the phase's seconds include its queued GPU work
        phase.seconds = start_seconds + (time.perf_counter() - run_start)
    done = phase.step - start_step
    log(f"[{label}] {done} steps in {format_seconds(phase.seconds - start_seconds)} (now step {phase.step})")
