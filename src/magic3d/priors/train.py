"""Train the embedded diffusion priors from scratch on the toy world: time-boxed, resumable,
exported as diffusers pipelines that the guidance modules load like real models.

This is the entry point (``train_prior``, used by ``python -m magic3d.priors train`` and
``make priors``). The parts live one purpose per module:

- ``heldout``: the colour-shape pairs no prior trains on;
- ``captions``: the caption table and the caption draw (view suffixes, CFG drop);
- ``data``: bulk rendering of the training images (held-out pairs redrawn);
- ``losses``: noise schedule, epsilon / variance / VAE objectives, learning-rate schedule;
- ``objective``: each phase's whole forward pass as one module, compiled on CUDA;
- ``loop``: EMA, phases and the time-boxed optimisation loop;
- ``sampling``: DDIM sampling and the contact-sheet prompts;
- ``export``: size guard, diffusers folder, load-back verification;
- ``trainer``: ``PriorTrainer``, which ties them together and is resumable;
- ``bench``: throughput and profile of the training step (``python -m magic3d.priors bench``).

Time budget: ``minutes`` is the TOTAL training time of the prior across resumed runs (data
rendering, checkpoints and export are not counted; compilation is), so rerunning ``make
priors`` after a finished run only re-exports when the folder is missing or stale. Raise
``minutes`` and pass ``resume`` to train further. The learning rate warms up, then follows a
cosine over the budget; weights are exported from an exponential moving average.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from magic3d.devices import resolve_device
from magic3d.priors.configs import PriorConfig, default_config
from magic3d.priors.export import check_size
from magic3d.priors.logs import Log, print_line
from magic3d.priors.sampling import ddim_sample  # noqa: F401  (re-exported: magic3d.eval samples with it)
from magic3d.priors.trainer import PriorTrainer, counts_text, load_state
from magic3d.priors.warm_start import read_warm_start

__all__ = ["TrainResult", "default_state_path", "load_state", "train_prior"]


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
    log: Log = print_line,
    init_from: str | Path | None = None,
) -> TrainResult:
    """Train (or continue) a prior for a total of ``minutes`` and export it to ``out``.

    ``resume`` continues from ``state_path`` (default ``<out>/../.prior_ckpt/<kind>/
    train_state.pt``) when it exists, keeping its config, seed, tokenizer and images;
    ``max_steps`` caps each phase's total steps. Without ``resume`` an existing state is
    overwritten. ``config`` replaces the default (or ``smoke``) config of a fresh run.
    ``init_from`` continues from an exported pipeline folder instead (``warm_start``: its
    weights, step counts and configuration; fresh optimiser moments) when there is no state
    to resume; ``minutes`` then counts the folder's training time too.
    """
    out = Path(out)
    state_path = Path(state_path) if state_path is not None else default_state_path(out, kind)
    if smoke and max_steps is None:
        max_steps = 3
    if minutes <= 0:
        raise ValueError(f"minutes={minutes} must be positive (the total training time budget).")
    resolved = resolve_device(device)
    state = None
    warm = None
    if resume and state_path.is_file():
        state = load_state(state_path)
        if state["kind"] != kind:
            raise ValueError(f"{state_path} holds a {state['kind']!r} prior, not {kind!r}: pass the matching --kind or --state.")
        stored = PriorConfig.from_dict(state["config"])
        if config is not None and config.to_dict() != stored.to_dict():
            log("[state] resuming with the stored config: config changes apply to new runs only")
        config = stored
        log(f"[state] resuming from {state_path}")
        if init_from is not None:
            log(f"[state] --init-from {init_from} ignored: the train state is newer and complete")
    elif init_from is not None:
        warm = read_warm_start(init_from, kind)
        if config is not None and config.to_dict() != warm.config.to_dict():
            log(f"[state] continuing with the configuration stored in {init_from}/training.json")
        config = warm.config
    else:
        if resume:
            log(f"[state] no state at {state_path}: starting a new run")
        elif state_path.is_file():
            log(f"[state] {state_path} exists but --resume was not given: starting over (it will be overwritten)")
        config = config if config is not None else default_config(kind, smoke)
    if config.kind != kind:
        raise ValueError(f"config.kind={config.kind!r} does not match kind={kind!r}.")
    max_mb = config.max_mb if max_mb is None else max_mb

    trainer = PriorTrainer(config, resolved, seed, state, log, warm=warm)
    counts = trainer.param_counts()
    size = check_size(trainer.export_modules, max_mb)  # refuse before spending GPU time
    log(f"[{kind}] parameters: {counts_text(counts)}; fp16 pipeline {size:.2f} MB (max {max_mb} MB)")
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
