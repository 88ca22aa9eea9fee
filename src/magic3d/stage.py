"""One stage in one process: parse the resolved config, build the parts, fit, finish.

The stage config has these top-level keys:
  seed: int in [0, 2^32 - 1]
  model: {class_path, init_args} of the stage's LightningModule (default magic3d.system.TextTo3D)
  data: {class_path, init_args} of its LightningDataModule (default RandomCameraDataModule)
  trainer: lightning.Trainer keyword arguments
  run: checkpoint/video cadence (RunOptions)
  start: where its weights come from when it has no checkpoint of its own
         (magic3d.checkpoints.StageStart, filled in by the recipe runner)
A ``model`` or ``data`` mapping without ``class_path`` is the default class's init args, so
the text-to-3D stage files stay short. Any LightningModule that satisfies :class:`StageModule`
runs through the same runner, checkpoints, resume and DDP paths.
"""

from __future__ import annotations

import copy
import json
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt  # checked when the config is parsed

from magic3d.checkpoints import (
    PeriodicCheckpoints,
    StageCheckpointIO,
    StageStart,
    check_compatible,
    latest_valid_checkpoint,
    read_checkpoint,
)
from magic3d.config import ConfigError, load_yaml

DEFAULT_MODEL = "magic3d.system.TextTo3D"
DEFAULT_DATA = "magic3d.data.datamodule.RandomCameraDataModule"
SEED_RANGE = (0, 2**32 - 1)  # what Lightning's seed_everything accepts

# use_distributed_sampler is ours too: under DDP every rank steps through all validation views
# (rank 0 writes the sheet); training cameras are already drawn per rank.
TRAINER_KEYS_WE_OWN = ("logger", "callbacks", "default_root_dir", "enable_checkpointing",
                       "use_distributed_sampler", "plugins")

# Known-harmless library notices that would otherwise bury the run's own output:
# our camera iterable defines __len__ on purpose (epochs have a length; num_workers is 0).
warnings.filterwarnings("ignore", message=r".*IterableDataset.*has `__len__` defined")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


@dataclass
class RunOptions:
    """Cadence of what a stage writes to its folder.

    Args:
        checkpoint_every: write a periodic checkpoint every N steps (last.ckpt follows it).
        keep_checkpoints: periodic checkpoints kept besides last.ckpt (older ones are deleted).
        video_fps: frames per second of the turntable video.
        video_views: frames of the turntable (one full orbit).
        wandb: "auto" (online when logged in, else offline), "offline", "online" or "off".
        wandb_group: W&B run group, so the runs of one study appear together (the ablation
            runner sets it to the ablation's name).
        wandb_job_type: W&B job type within the group (the ablation runner sets the variant).
    """

    checkpoint_every: PositiveInt = 100
    keep_checkpoints: NonNegativeInt = 2
    video_fps: PositiveInt = 30
    video_views: PositiveInt = 60
    wandb: str = "auto"
    wandb_group: str | None = None
    wandb_job_type: str | None = None


@runtime_checkable
class StageModule(Protocol):
    """What the stage runner needs from a stage's LightningModule besides Lightning's API.

    ``stage_config`` and ``output_dir`` are set by the runner before fitting (the config is
    stored in every checkpoint, so a later stage can rebuild what this one trained).
    """

    stage_config: dict | None
    output_dir: Path | None

    def start_from(self, checkpoint: dict, start: StageStart) -> None:
        """Take weights from another stage's checkpoint (warm start or convert)."""

    def finish_stage(self, datamodule: Any, video_fps: int, video_views: int) -> dict[str, Any]:
        """After the last step, on rank 0: write the stage's products; return DONE.json entries."""

    # Optional: ``check_resumable(found: FoundCheckpoint) -> None`` replaces the runner's
    # tensor-by-tensor check_compatible() for a module whose state_dict is only complete after
    # setup() (e.g. magic3d.dreambooth.module.DreamBooth: its adapters sit on a prior loaded there).


def with_default_classes(config: dict) -> dict:
    """``model``/``data`` given as bare init args get the default class path."""
    config = copy.deepcopy(config)
    for key, class_path in (("model", DEFAULT_MODEL), ("data", DEFAULT_DATA)):
        section = config.get(key)
        if section is None:
            config[key] = {"class_path": class_path}
        elif "class_path" not in section:
            config[key] = {"class_path": class_path, "init_args": section}
    return config


def build_parser():
    from jsonargparse import ArgumentParser
    from jsonargparse.typing import restricted_number_type

    import lightning as L

    seed_type = restricted_number_type("Seed", int, [(">=", SEED_RANGE[0]), ("<=", SEED_RANGE[1])])
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--seed", type=seed_type, default=0)
    parser.add_subclass_arguments(L.LightningModule, "model", fail_untyped=True, required=True)
    parser.add_subclass_arguments(L.LightningDataModule, "data", required=True)
    # instantiate=False: the stage builds its Trainer itself; a parsed one would be a second,
    # throwaway Trainer that prints Lightning's and tensorboardX's banners.
    parser.add_class_arguments(L.Trainer, "trainer", skip=set(TRAINER_KEYS_WE_OWN), instantiate=False)
    parser.add_dataclass_arguments(RunOptions, "run")
    parser.add_dataclass_arguments(StageStart, "start")
    return parser


_RESTRICTION = re.compile(r"Not of type \w+: (?P<value>.+?) does not conform to restriction (?P<rule>.+)")
_PARSER_KEY = re.compile(r'Parser key "(?P<key>[^"]+)"')


def _restricted_value(text: str) -> str | None:
    """``data.batch_size=0 is out of range: it must be > 0`` from jsonargparse's nested report
    (each nesting level names its own key, indented one step further)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        found = _RESTRICTION.search(line)
        if not found:
            continue
        keys, indent = [], len(line) - len(line.lstrip())
        for previous in reversed(lines[: i + 1]):
            key = _PARSER_KEY.search(previous)
            depth = len(previous) - len(previous.lstrip())
            if key and (depth < indent or previous is line):
                keys.append(key["key"])
                indent = depth
        key = ".".join(reversed(keys)).replace(".init_args", "")
        rule = re.sub(r"(>=|<=|>|<)\s*", r"\1 ", re.sub(r"\bv\s*", "", found["rule"].strip()))
        return f"{key}={found['value']} is out of range: it must be {rule}"
    return None


def _short_error(err: Exception) -> str:
    """One line that names the problem: an out-of-range value with its valid range, or the
    lines of jsonargparse's report (which lists every union branch) that name the key."""
    text = str(err)
    restricted = _restricted_value(text)
    if restricted is not None:
        return restricted
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    keep = [line for line in lines if "not expected" in line or "does not" in line
            or "Problem with" in line or "Expected" in line or "No module" in line
            or "not accepted" in line or "Import path" in line]
    return "; ".join(keep[:4] or lines[:3])


def validate_stage_config(config: dict, where: str = "stage"):
    """Parse (not instantiate) a stage config; a ConfigError names the first problem."""
    parser = build_parser()
    try:
        return parser, parser.parse_object(with_default_classes(config))
    except Exception as err:  # jsonargparse raises ArgumentError subclasses
        raise ConfigError(f"Invalid config for {where}: {_short_error(err)}") from None


def _instantiate(parser, cfg):
    """Build the stage's parts; a ConfigError raised by one of them (a bad input it names) comes
    out as itself, not inside jsonargparse's report of every union subtype it tried."""
    try:
        return parser.instantiate(cfg)
    except Exception as err:  # noqa: BLE001 - jsonargparse wraps whatever __init__ raised
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


def _wandb_mode(option: str) -> str | None:
    import os

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


def _loggers(stage_dir: Path, run: RunOptions, name: str, config: dict) -> list:
    """CSV always; W&B unless it is off, with the stage's resolved ``config`` as the run config
    and the ablation's group and job type."""
    from lightning.pytorch.loggers import CSVLogger

    loggers = [CSVLogger(save_dir=str(stage_dir), name="logs", flush_logs_every_n_steps=50)]
    mode = _wandb_mode(run.wandb)
    if mode is not None:
        try:
            from magic3d.quiet import wandb_logger

            loggers.append(wandb_logger(save_dir=str(stage_dir), project="magic3d", name=name,
                                       offline=(mode == "offline"), log_model=False, config=config,
                                       group=run.wandb_group, job_type=run.wandb_job_type))
        except (ImportError, ModuleNotFoundError):
            warnings.warn("wandb is not installed: logging to CSV only", stacklevel=1)
    return loggers


def _is_rank_zero() -> bool:
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only.rank == 0


def _source_checkpoint(start: StageStart):
    """The earlier stage's checkpoint this stage starts from, read (and verified) once."""
    from magic3d.checkpoints import CorruptCheckpoint, FoundCheckpoint

    path = Path(start.checkpoint)
    try:
        return FoundCheckpoint(path, read_checkpoint(path))
    except CorruptCheckpoint as err:
        raise ConfigError(f"{err}. It is the earlier stage's result: rerun that stage (delete its "
                          "DONE.json) or start a new run folder.") from None


def run_stage(config_path: Path, stage_dir: Path) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import TQDMProgressBar

    from magic3d.distributed import per_rank_batch_size, resolve_strategy
    from magic3d.interrupt import StopOnInterrupt
    from magic3d.quiet import finish_wandb, wandb_run_line
    from magic3d.tracking import record_finished, record_run, wandb_logger_of

    config = with_default_classes(load_yaml(config_path))
    parser, cfg = validate_stage_config(config, where=str(config_path))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    init = _instantiate(parser, cfg)
    model, datamodule = init.model, init.data
    if not isinstance(model, StageModule):
        raise ConfigError(f"model.class_path {type(model).__name__} is not a stage module: it needs "
                          "stage_config, output_dir, start_from() and finish_stage() (magic3d.stage.StageModule)")
    run = RunOptions(**vars(cfg.run)) if not isinstance(cfg.run, RunOptions) else cfg.run
    start = cfg.start if isinstance(cfg.start, StageStart) else StageStart(**vars(cfg.start))
    model.stage_config = config
    model.output_dir = stage_dir

    ckpt_dir = stage_dir / "checkpoints"
    found = latest_valid_checkpoint(ckpt_dir, is_rank_zero=_is_rank_zero())
    if found is None and start.checkpoint:
        source = _source_checkpoint(start)
        if start.mode == "resume":
            found = source
        else:
            model.start_from(source.checkpoint, start)
    if found is not None:
        # A stage whose weights exist only after setup() (adapters on a prior loaded there)
        # says itself whether a checkpoint fits; Lightning then checks the tensors on restore.
        if hasattr(model, "check_resumable"):
            model.check_resumable(found)
        else:
            check_compatible(model, found)

    checkpoint_io = StageCheckpointIO()
    periodic = PeriodicCheckpoints(ckpt_dir, int(run.checkpoint_every), int(run.keep_checkpoints))
    trainer_kwargs = dict(vars(cfg.trainer))
    trainer_kwargs["strategy"] = resolve_strategy(trainer_kwargs.get("strategy", "auto"),
                                                  trainer_kwargs.get("devices", "auto"),
                                                  trainer_kwargs.get("accelerator", "auto"))
    stop = StopOnInterrupt(periodic.save_last)
    trainer = L.Trainer(
        **trainer_kwargs,
        default_root_dir=str(stage_dir),
        logger=_loggers(stage_dir, run, name=f"{stage_dir.parent.name}/{stage_dir.name}", config=config),
        callbacks=[periodic, stop, TQDMProgressBar(refresh_rate=10)],
        plugins=[checkpoint_io],
        enable_checkpointing=False,  # PeriodicCheckpoints writes them (no -v1 copies, checksums)
        use_distributed_sampler=False,
    )
    batch_size = getattr(datamodule, "batch_size", None)
    if batch_size is not None:
        per_rank_batch_size(batch_size, trainer.world_size)  # fail before any process starts
    if found is not None:
        checkpoint_io.preload(found)
        if trainer.is_global_zero:
            print(f"[magic3d] resuming from {found.path} (step {found.step})", flush=True)
    start_step = found.step if found is not None else 0
    wandb_run = wandb_logger_of(trainer.loggers)
    if trainer.is_global_zero and wandb_run is not None:
        print(wandb_run_line(wandb_run.experiment), flush=True)
        record_run(wandb_run, stage_dir, group=run.wandb_group, job_type=run.wandb_job_type)
    started = time.time()
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(found.path) if found else None, weights_only=True)
    fit_seconds = time.time() - started
    if stop.received is not None:  # StopOnInterrupt already saved last.ckpt at a step boundary
        finish_wandb(exit_code=128 + stop.received)
        print(f"[magic3d] stage stopped at step {trainer.global_step} ({stop.received.name}); "
              "last.ckpt is saved, rerun to continue", file=sys.stderr, flush=True)
        raise SystemExit(128 + stop.received)
    if trainer.interrupted or trainer.global_step < (trainer.max_steps or 0):
        finish_wandb(exit_code=1)
        raise SystemExit(f"[magic3d] stage stopped at step {trainer.global_step}; rerun to continue")
    periodic.save_last(trainer)

    if trainer.is_global_zero:
        # Lightning's teardown moved the module back to the CPU; finish where it trained.
        model.to(trainer.strategy.root_device)
        summary = {
            "steps": trainer.global_step,
            "seconds_this_attempt": round(fit_seconds, 1),
            "checkpoint": str(ckpt_dir / "last.ckpt"),
            "seconds_per_step": round(fit_seconds / max(1, trainer.global_step - start_step), 4),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        }
        summary.update(model.finish_stage(datamodule, run.video_fps, run.video_views))
        (stage_dir / "DONE.json").write_text(json.dumps(summary, indent=2))
        if wandb_run is not None:
            record_finished(wandb_run, stage_dir, summary)
        finish_wandb()
        print(f"[magic3d] stage finished: {stage_dir}", flush=True)
