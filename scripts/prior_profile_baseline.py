"""Profile the prior trainer as it was on main at 6cb29e3 (before the fast path): where one step goes.

The old ``magic3d/priors/train.py`` is loaded from a file so the "before" numbers come from
the same machine and call as the "after" ones (``python -m magic3d.priors bench``):
    git show 6cb29e3:src/magic3d/priors/train.py > .whl/legacy/train_main.py

Runs the production step (``PriorTrainer._fit_unet`` / ``_fit_vae`` -> ``run_phase``) on
random uint8 images (speed does not depend on image content; rendering is timed elsewhere),
times steady-state it/s, and prints a torch.profiler breakdown by region and by op group.
Usage (device): python scripts/prior_profile_baseline.py OUTDIR [LEGACY_TRAIN_PY] [--quick]
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from magic3d.priors.configs import default_config

_LEGACY = next((a for a in sys.argv[2:] if a.endswith(".py")), ".whl/legacy/train_main.py")
_spec = importlib.util.spec_from_file_location("legacy_prior_train", _LEGACY)
T = importlib.util.module_from_spec(_spec)
sys.modules["legacy_prior_train"] = T  # dataclasses look their module up
_spec.loader.exec_module(T)
QUICK = "--quick" in sys.argv

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "out")
OUT.mkdir(parents=True, exist_ok=True)
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMOKE = not torch.cuda.is_available()  # a CPU dry run of this script (tiny configs)
ROWS: list[dict] = []


def quiet(_: str) -> None:
    pass


def fake_data(config, n: int) -> T.ToyImages:
    g = torch.Generator().manual_seed(0)
    s = config.image_size
    return T.ToyImages(
        images=torch.randint(0, 256, (n, s, s, 3), generator=g, dtype=torch.uint8).to(DEV),
        shape_id=torch.randint(0, 14, (n,), generator=g).to(DEV),
        colour_id=torch.randint(0, 10, (n,), generator=g).to(DEV),
        view_id=torch.randint(0, 4, (n,), generator=g).to(DEV),
        render_seconds=0.0,
    )


def make_trainer(kind: str, batch: int, compile_: bool) -> T.PriorTrainer:
    config = default_config(kind, smoke=SMOKE)
    config.batch_size = batch
    config.compile = compile_
    config.log_every = 10_000
    config.checkpoint_minutes = 1e9
    trainer = T.PriorTrainer(config, DEV, 0, None, quiet)
    n = 64 if SMOKE else 4096 if kind == "pixel" else 1024
    trainer.data = fake_data(config, n)
    trainer.n_images = n
    if kind == "latent":
        ls = config.latent_size
        g = torch.Generator().manual_seed(1)
        mean = torch.randn(n, 4, ls, ls, generator=g).half().to(DEV)
        trainer.latents = (mean, (0.1 * torch.ones_like(mean)))
        trainer.scaling_factor = 1.0
    return trainer


def run_steps(trainer: T.PriorTrainer, phase_name: str, n: int) -> float:
    phase = trainer.phases[phase_name]
    target = phase.step + n
    if DEV.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    if phase_name == "unet":
        trainer._fit_unet(1e9, target, lambda: None)
    else:
        trainer._fit_vae(1e9, target, lambda: None)
    if DEV.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def annotate(trainer: T.PriorTrainer, phase_name: str) -> None:
    """Wrap the step's parts in record_function ranges (the step code itself is unchanged)."""
    phase = trainer.phases[phase_name]

    def wrap(obj, attr, label):
        fn = getattr(obj, attr)

        @functools.wraps(fn)
        def inner(*a, **k):
            with record_function(label):
                return fn(*a, **k)

        setattr(obj, attr, inner)

    wrap(trainer.table, "encode", "R:text_encoder")
    wrap(phase.optimizer, "step", "R:optimizer")
    wrap(phase.ema, "update", "R:ema")
    wrap(torch.nn.utils, "clip_grad_norm_", "R:clip_grad")
    wrap(T, "to_model_range", "R:data")


GROUPS = [
    ("norm", ("group_norm", "layer_norm", "native_batch_norm")),
    ("attention", ("scaled_dot_product", "flash", "efficient_attention", "cudnn_attention")),
    ("conv", ("convolution", "cudnn_conv", "conv_depthwise")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul")),
    ("optimizer", ("fused_adam", "_fused_adamw")),
    ("foreach (ema, clip)", ("_foreach",)),
    ("copy/cast/layout", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone")),
    ("gelu/silu/act", ("gelu", "silu", "aten::sigmoid")),
]


def profile_breakdown(trainer: T.PriorTrainer, phase_name: str, steps: int, label: str) -> dict:
    steps = 2 if SMOKE else steps
    annotate(trainer, phase_name)
    run_steps(trainer, phase_name, 3)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = run_steps(trainer, phase_name, steps)
    events = prof.key_averages()
    table = events.table(sort_by="self_cuda_time_total", row_limit=40)
    (OUT / f"profile_{label}.txt").write_text(table)
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    if kernel_us == 0:  # older API: kernels are attributed to their aten op
        kernel_us = sum(e.self_device_time_total for e in events)
    groups = {g: 0.0 for g, _ in GROUPS}
    groups["other"] = 0.0
    for e in events:
        if not e.key.startswith("aten::") and not e.key.startswith("R:"):
            continue
        if e.key.startswith("R:"):
            continue
        us = e.self_device_time_total
        for g, keys in GROUPS:
            if any(k in e.key for k in keys):
                groups[g] += us
                break
        else:
            groups["other"] += us
    regions = {e.key: e.device_time_total / steps / 1e3 for e in events if e.key.startswith("R:")}
    regions_cpu = {e.key: e.cpu_time_total / steps / 1e3 for e in events if e.key.startswith("R:")}
    result = {
        "label": label,
        "wall_ms_per_step": wall / steps * 1e3,
        "gpu_kernel_ms_per_step": kernel_us / steps / 1e3,
        "op_groups_ms_per_step": {k: v / steps / 1e3 for k, v in groups.items()},
        "regions_gpu_ms_per_step": regions,
        "regions_cpu_ms_per_step": regions_cpu,
    }
    (OUT / f"breakdown_{label}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=1), flush=True)
    return result


def bench(kind: str, phase_name: str, batch: int, compile_: bool, steps: int, warm: int) -> dict:
    if SMOKE:
        batch, steps, warm, compile_ = 4, 2, 1, False
    torch.manual_seed(0)
    trainer = make_trainer(kind, batch, compile_)
    t_warm = run_steps(trainer, phase_name, warm)  # includes compile time when compiling
    dt = run_steps(trainer, phase_name, steps)
    mem = torch.cuda.max_memory_allocated() / 2**30 if DEV.type == "cuda" else 0.0
    row = dict(kind=kind, phase=phase_name, batch=batch, compile=compile_, it_s=steps / dt,
               img_s=steps * batch / dt, warm_s=t_warm, mem_gib=mem)
    ROWS.append(row)
    print(row, flush=True)
    del trainer
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return row


def groupnorm_micro() -> None:
    """GroupNorm fwd+bwd at the UNet's first level: memory format x dtype (autocast runs it fp32)."""
    if DEV.type != "cuda":
        return
    from triton.testing import do_bench

    for fmt in (torch.contiguous_format, torch.channels_last):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(256, 64, 64, 64, device=DEV, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
            gn = torch.nn.GroupNorm(16, 64).to(DEV, dtype)
            g = torch.randn_like(x)

            def f():
                y = gn(x)
                y.backward(g)

            ms = do_bench(f, warmup=25, rep=100, return_mode="median")
            gb = x.numel() * x.element_size() * 4 / 1e9  # read x twice, write y, read g, write dx (~4-5)
            print(f"groupnorm {str(fmt):28s} {str(dtype):15s} {ms:7.3f} ms  (~{gb / ms * 1e3:.0f} GB/s)", flush=True)
            ROWS.append(dict(kind="micro", phase=f"gn {fmt} {dtype}", batch=256, compile=False, it_s=1e3 / ms,
                             img_s=256e3 / ms, warm_s=0.0, mem_gib=0.0))


def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name() if DEV.type == "cuda" else "CPU dry run", flush=True)
    if QUICK:  # only the "before" rows of BENCHMARKS.md
        bench("pixel", "unet", 256, False, 40, 5)
        bench("latent", "unet", 128, False, 40, 5)
        bench("latent", "vae", 32, False, 30, 5)
        _table()
        return
    groupnorm_micro()
    # Baseline: the shipped config exactly (eager, bf16 autocast, channels_last, fused AdamW).
    bench("pixel", "unet", 256, False, 40, 5)
    t = make_trainer("pixel", 256, False)
    profile_breakdown(t, "unet", 10, "pixel_b256_eager")
    del t
    bench("pixel", "unet", 1024, False, 15, 3)
    bench("latent", "unet", 128, False, 40, 5)
    bench("latent", "vae", 32, False, 30, 5)
    t = make_trainer("latent", 128, False)
    profile_breakdown(t, "unet", 10, "latent_b128_eager")
    del t
    t = make_trainer("latent", 128, False)
    profile_breakdown(t, "vae", 10, "latent_vae_b32_eager")
    del t
    # torch.compile as main already offers it (--compile): compile time counted in warm_s.
    bench("pixel", "unet", 256, True, 40, 5)
    bench("pixel", "unet", 1024, True, 15, 3)
    _table()


def _table() -> None:
    (OUT / "rows.json").write_text(json.dumps(ROWS, indent=2))
    print("\nkind   phase batch compile   it/s    img/s  warm_s  mem_GiB")
    for r in ROWS:
        print(f"{r['kind']:6s} {r['phase']:5s} {r['batch']:5d} {str(r['compile']):7s} {r['it_s']:6.2f} "
              f"{r['img_s']:8.0f} {r['warm_s']:7.1f} {r['mem_gib']:6.1f}")


if __name__ == "__main__":
    main()
