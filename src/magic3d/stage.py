"""One stage in one process: parse the resolved config, build the parts, fit, make the video.

The stage config has five top-level keys:
  seed: int
  model: TextTo3D init args (scene and guidance as class_path/init_args)
  data: RandomCameraDataModule init args
  trainer: lightning.Trainer keyword arguments
  run: checkpoint/video cadence (RunOptions)
and, when the recipe starts this stage from an earlier one, ``start`` (filled in by the
recipe runner: checkpoint path, mode, converter).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from magic3d.config import ConfigError, load_yaml

# use_distributed_sampler is ours too: under DDP every rank steps through all validation views
# (rank 0 writes the sheet); training cameras are already drawn per rank.
TRAINER_KEYS_WE_OWN = ("logger", "callbacks", "default_root_dir", "enable_checkpointing",
                       "use_distributed_sampler")

# Known-harmless library notices that would otherwise bury the run's own output:
# our camera iterable defines __len__ on purpose (epochs have a length; num_workers is 0).
warnings.filterwarnings("ignore", message=r".*IterableDataset.*has `__len__` defined")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


@dataclass
class RunOptions:
    """Cadence of what a stage writes to its folder.

    Args:
        checkpoint_every: keep a periodic checkpoint every N steps (last.ckpt is refreshed too).
        video_fps: frames per second of the turntable video.
        video_views: frames of the turntable (one full orbit).
        wandb: "auto" (online when logged in, else offline), "offline", "online" or "off".
    """

    checkpoint_every: int = 100
    video_fps: int = 30
    video_views: int = 60
    wandb: str = "auto"


def build_parser():
    from jsonargparse import ArgumentParser

    import lightning as L

    from magic3d.data.datamodule import RandomCameraDataModule
    from magic3d.system import TextTo3D

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_class_arguments(TextTo3D, "model", fail_untyped=True)
    parser.add_class_arguments(RandomCameraDataModule, "data")
    parser.add_class_arguments(L.Trainer, "trainer", skip=set(TRAINER_KEYS_WE_OWN))
    parser.add_dataclass_arguments(RunOptions, "run")
    parser.add_argument("--start", type=dict | None, default=None)
    return parser


def _short_error(err: Exception) -> str:
    """jsonargparse errors list every union branch; keep the lines that name the problem."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    keep = [line for line in lines if "not expected" in line or "does not" in line
            or "Problem with" in line or "Expected" in line or "No module" in line
            or "not accepted" in line or "Import path" in line]
    return "; ".join(keep[:4] or lines[:3])


def validate_stage_config(config: dict, where: str = "stage"):
    parser = build_parser()
    try:
        return parser, parser.parse_object(config)
    except Exception as err:  # jsonargparse raises ArgumentError subclasses
        raise ConfigError(f"Invalid config for {where}: {_short_error(err)}") from None


def _wandb_mode(option: str) -> str | None:
    if option == "off" or os.environ.get("WANDB_MODE") == "disabled":
        return None
    if option in ("online", "offline"):
        return option
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def _loggers(stage_dir: Path, run: RunOptions, name: str) -> list:
    from lightning.pytorch.loggers import CSVLogger

    loggers = [CSVLogger(save_dir=str(stage_dir), name="logs", flush_logs_every_n_steps=50)]
    mode = _wandb_mode(run.wandb)
    if mode is not None:
        try:
            from lightning.pytorch.loggers import WandbLogger

            loggers.append(WandbLogger(save_dir=str(stage_dir), project="magic3d", name=name,
                                       offline=(mode == "offline"), log_model=False))
        except (ImportError, ModuleNotFoundError):
            warnings.warn("wandb is not installed: logging to CSV only", stacklevel=1)
    return loggers


def check_checkpoint(path: Path) -> dict:
    """Load a checkpoint safely, or raise a ConfigError that names the file and the problem."""
    if not path.is_file():
        raise ConfigError(f"Checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means unusable
        raise ConfigError(
            f"Checkpoint {path} is corrupt or was not written by magic3d ({type(err).__name__}). "
            "Move it away to restart the stage from the previous periodic checkpoint."
        ) from None
    if "state_dict" not in checkpoint or "magic3d" not in checkpoint:
        raise ConfigError(f"Checkpoint {path} was not written by a magic3d stage (no state_dict/magic3d keys)")
    return checkpoint


def _latest_valid_checkpoint(ckpt_dir: Path) -> Path | None:
    """last.ckpt if readable, else the newest readable periodic checkpoint.

    An unreadable last.ckpt is renamed (never deleted; by rank 0 only) so the next save cannot
    overwrite it; with no readable checkpoint at all the stage stops instead of silently starting over.
    """
    from lightning.pytorch.utilities import rank_zero_only

    last = ckpt_dir / "last.ckpt"
    candidates = [last] + sorted(ckpt_dir.glob("step*.ckpt"), reverse=True)
    problems = []
    for path in candidates:
        if not path.is_file():
            continue
        try:
            check_checkpoint(path)
        except ConfigError as err:
            problems.append(str(err))
            continue
        if path != last and last.is_file() and rank_zero_only.rank == 0:
            kept = last.with_name(f"last.unreadable-{time.strftime('%Y%m%d-%H%M%S')}.ckpt")
            last.rename(kept)
            print(f"[magic3d] {last.name} is unreadable (kept as {kept.name}); resuming from {path.name}",
                  flush=True)
        return path
    if problems:
        raise ConfigError(problems[0])
    return None


def check_compatible(model, checkpoint_path: Path) -> None:
    """Fail early, naming the first mismatching tensor, instead of deep inside Lightning."""
    state = check_checkpoint(checkpoint_path)["state_dict"]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"{mismatched[0]} has shape {tuple(state[mismatched[0]].shape)}, the config "
                       f"gives {tuple(expected[mismatched[0]].shape)}")
        raise ConfigError(
            f"Checkpoint {checkpoint_path} does not fit this stage's config ({detail}). "
            "It was written with other scene settings: start a new run folder."
        )


def run_stage(config_path: Path, stage_dir: Path) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

    from magic3d.distributed import per_rank_batch_size, resolve_strategy
    from magic3d.interrupt import StopOnInterrupt
    from magic3d.scenes.checkpoint import start_from_checkpoint
    from magic3d.video import render_turntable

    config = load_yaml(config_path)
    parser, cfg = validate_stage_config(config, where=str(config_path))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    init = parser.instantiate_classes(cfg)
    model, datamodule = init.model, init.data
    run = RunOptions(**vars(cfg.run)) if not isinstance(cfg.run, RunOptions) else cfg.run
    model.stage_config = config
    model.output_dir = stage_dir

    ckpt_dir = stage_dir / "checkpoints"
    resume_from = _latest_valid_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else None
    start = config.get("start")
    if resume_from is None and start and start.get("checkpoint"):
        source = Path(start["checkpoint"])
        check_checkpoint(source)
        if start["mode"] == "resume":
            resume_from = source
        else:
            start_from_checkpoint(model.scene, source, start["mode"], start.get("converter"),
                                  start.get("converter_args") or {})

    periodic = ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:06d}", auto_insert_metric_name=False,
                               every_n_train_steps=run.checkpoint_every, save_top_k=-1, save_last=True)
    trainer_kwargs = {k: v for k, v in vars(cfg.trainer).items()}
    trainer_kwargs["strategy"] = resolve_strategy(trainer_kwargs.get("strategy", "auto"),
                                                  trainer_kwargs.get("devices", "auto"),
                                                  trainer_kwargs.get("accelerator", "auto"))
    trainer = L.Trainer(
        **trainer_kwargs,
        default_root_dir=str(stage_dir),
        logger=_loggers(stage_dir, run, name=f"{stage_dir.parent.name}/{stage_dir.name}"),
        callbacks=[periodic, StopOnInterrupt(ckpt_dir / "last.ckpt"), TQDMProgressBar(refresh_rate=10)],
        enable_checkpointing=True,
        use_distributed_sampler=False,
    )
    per_rank_batch_size(datamodule.batch_size, trainer.world_size)  # fail before any process starts
    if resume_from is not None:
        check_compatible(model, resume_from)
        if trainer.is_global_zero:
            print(f"[magic3d] resuming from {resume_from}", flush=True)
    start_step = torch.load(resume_from, map_location="cpu", weights_only=True)["global_step"] if resume_from else 0
    started = time.time()
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None,
                weights_only=True)
    fit_seconds = time.time() - started
    if trainer.interrupted or trainer.global_step < (trainer.max_steps or 0):
        # Ctrl-C (StopOnInterrupt) already saved last.ckpt at a step boundary.
        raise SystemExit(f"[magic3d] stage stopped at step {trainer.global_step}; rerun to continue")
    trainer.save_checkpoint(ckpt_dir / "last.ckpt")

    if trainer.is_global_zero:
        # Lightning's teardown moved the module back to the CPU; render where it trained.
        model.to(trainer.strategy.root_device)
        video = stage_dir / "turntable.mp4"
        render_turntable(model, datamodule, video, fps=run.video_fps, n_views=run.video_views)
        summary = {
            "steps": trainer.global_step,
            "seconds_this_attempt": round(fit_seconds, 1),
            "skipped_steps": int(model.skipped_steps),
            "checkpoint": str(ckpt_dir / "last.ckpt"),
            "video": str(video),
            "prompt": model.prompt,
            "seconds_per_step": round(fit_seconds / max(1, trainer.global_step - start_step), 4),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        }
        (stage_dir / "DONE.json").write_text(json.dumps(summary, indent=2))
        print(f"[magic3d] stage finished: {stage_dir}", flush=True)
