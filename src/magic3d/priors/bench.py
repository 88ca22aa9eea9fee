"""Throughput and profile of the prior training step: ``python -m magic3d.priors bench``.

Each variant builds a ``PriorTrainer`` on random uint8 images (step time does not depend on
image content; rendering is timed by ``train`` itself), runs ``warmup`` steps (compilation
happens there and is reported as ``warm_s``), then times ``steps`` steps through the
production loop (``run_phase`` with the phase's objective), synchronised at both ends.
``--profile`` adds a torch.profiler breakdown of a few steady-state steps: GPU kernel time
per step against wall time (their gap is host overhead), and kernel time by op group.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from magic3d.priors.configs import default_config
from magic3d.priors.data import ToyImages
from magic3d.priors.loop import run_phase
from magic3d.priors.trainer import PriorTrainer, device_name

# Op groups by aten op name (self device time of each op's kernels).
OP_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("norm", ("group_norm", "layer_norm", "native_batch_norm")),
    ("attention", ("scaled_dot_product", "flash", "efficient_attention", "cudnn_attention")),
    ("conv", ("convolution", "cudnn_conv", "conv_depthwise")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul")),
    ("optimizer", ("fused_adam",)),
    ("foreach (ema, clip)", ("_foreach",)),
    ("copy/cast/layout", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone")),
)


@dataclass
class Variant:
    kind: str = "pixel"
    phase: str = "unet"
    batch: int = 256
    compile: bool = True
    mode: str = "default"

    @classmethod
    def parse(cls, text: str) -> "Variant":
        """``kind:phase:batch:compile|eager[:mode]``, e.g. ``pixel:unet:256:compile``."""
        parts = text.split(":")
        if len(parts) not in (4, 5) or parts[3] not in ("compile", "eager"):
            raise ValueError(f"variant {text!r}: use kind:phase:batch:compile|eager[:mode]")
        return cls(parts[0], parts[1], int(parts[2]), parts[3] == "compile", parts[4] if len(parts) == 5 else "default")

    @property
    def label(self) -> str:
        return f"{self.kind}_{self.phase}_b{self.batch}_{'compile' if self.compile else 'eager'}_{self.mode}"


def random_images(config, n: int, device: torch.device) -> ToyImages:
    g = torch.Generator().manual_seed(0)
    size = config.image_size
    return ToyImages(
        images=torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8).to(device),
        shape_id=torch.randint(0, 14, (n,), generator=g).to(device),
        colour_id=torch.randint(0, 10, (n,), generator=g).to(device),
        view_id=torch.randint(0, 4, (n,), generator=g).to(device),
        render_seconds=0.0,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _op_groups(events, steps: int) -> dict[str, float]:
    groups = {name: 0.0 for name, _ in OP_GROUPS} | {"other aten": 0.0}
    for e in events:
        if not e.key.startswith("aten::"):
            continue
        for name, keys in OP_GROUPS:
            if any(k in e.key for k in keys):
                groups[name] += e.self_device_time_total
                break
        else:
            groups["other aten"] += e.self_device_time_total
    return {k: round(v / steps / 1e3, 3) for k, v in groups.items()}


def bench_variant(variant: Variant, steps: int, warmup: int, device: torch.device, smoke: bool,
                  profile_steps: int, out: Path | None) -> dict:
    config = default_config(variant.kind, smoke)
    if variant.phase == "vae":
        config = dataclasses.replace(config, vae_batch_size=variant.batch)
    else:
        config = dataclasses.replace(config, batch_size=variant.batch)
    config = dataclasses.replace(config, compile=variant.compile, compile_mode=variant.mode, log_every=10**9,
                                 checkpoint_minutes=1e9, warmup_steps=10)
    torch.manual_seed(0)
    trainer = PriorTrainer(config, device, 0, None, log=lambda _: None)
    n = 64 if smoke else 4096 if variant.kind == "pixel" else 1024
    trainer.data = random_images(config, n, device)
    trainer.n_images = n
    if variant.kind == "latent" and variant.phase == "unet":
        size = config.latent_size
        mean = torch.randn(n, 4, size, size, generator=torch.Generator().manual_seed(1)).half().to(device)
        trainer.latents, trainer.scaling_factor = (mean, torch.full_like(mean, 0.1)), 1.0
    phase = trainer.phases[variant.phase]
    objective = trainer.objective(variant.phase)

    def run(n_steps: int) -> float:
        _sync(device)
        start = time.perf_counter()
        run_phase(phase, objective, 1e9, phase.step + n_steps, config, lambda: None, variant.label, lambda _: None)
        _sync(device)
        return time.perf_counter() - start

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warm_s = run(warmup)
    seconds = run(steps)
    row = dict(variant=variant.label, kind=variant.kind, phase=variant.phase, batch=variant.batch,
               compile=variant.compile, mode=variant.mode, steps=steps, it_s=steps / seconds,
               images_s=steps * variant.batch / seconds, warm_s=warm_s,
               peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0)
    if profile_steps > 0:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            wall = run(profile_steps)
        events = prof.key_averages()
        kernel_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
        row["profile"] = {
            "wall_ms_per_step": round(wall / profile_steps * 1e3, 3),
            "gpu_kernel_ms_per_step": round(kernel_us / profile_steps / 1e3, 3),
            "op_groups_ms_per_step": _op_groups(events, profile_steps),
        }
        if out is not None:
            sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            (out / f"profile_{variant.label}.txt").write_text(events.table(sort_by=sort, row_limit=40))
    return row


def run_bench(variants: list[Variant], steps: int = 40, warmup: int = 5, device: str = "auto", smoke: bool = False,
              profile_steps: int = 0, out: str | Path | None = None, log=print) -> list[dict]:
    """Time each variant; failures are recorded (``error``) so one variant cannot sink the rest."""
    from magic3d.devices import resolve_device

    dev = resolve_device(device)
    folder = Path(out) if out is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    log(f"[bench] {device_name(dev)}, torch {torch.__version__}")
    rows = []
    for variant in variants:
        try:
            row = bench_variant(variant, steps if not variant.batch > 512 else max(steps // 3, 5), warmup, dev, smoke,
                                profile_steps, folder)
        except Exception as error:  # noqa: BLE001 - reported in the table, the next variant runs
            row = dict(variant=variant.label, error=f"{type(error).__name__}: {error}"[:500])
        rows.append(row)
        log(f"[bench] {json.dumps(row)}")
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if folder is not None:
            (folder / "bench.json").write_text(json.dumps({"device": device_name(dev), "rows": rows}, indent=2))
    log("\nvariant                                   it/s   images/s   warm_s  peak_GiB")
    for r in rows:
        if "error" in r:
            log(f"{r['variant']:40s} ERROR {r['error'][:80]}")
        else:
            log(f"{r['variant']:40s} {r['it_s']:6.2f} {r['images_s']:10.0f} {r['warm_s']:8.1f} {r['peak_gib']:9.1f}")
    return rows
