"""W&B for a stage: its logger among the trainer's, media from the stage's own files, and the
record that lets a later process (``make eval``) write into the same W&B run.

Each training attempt of a stage is one W&B run (offline unless the user is logged in, see
``magic3d.stage``). When the run starts, rank 0 writes ``<stage>/wandb/magic3d-run.json``
(:class:`WandbRunRecord`: id, project, mode, group, job type); when the stage finishes it adds
the run's last W&B step. An evaluation then resumes that run by id and logs its table one step
later: wandb starts ``_step`` at 0 again when an offline run is resumed (the server only knows
better online), so the explicit step keeps the synced history in order either way. Offline,
the resumed run is a second folder with the same id; ``wandb sync`` (0.24 and later) given both
folders uploads them in order of their start into one run.

Media are logged from the files the stage writes anyway (the preview PNGs, ``turntable.mp4``),
so W&B shows exactly what is on disk and nothing is encoded twice. A failure to log media never
stops training: it is a warning (Python shows each distinct one once).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning.pytorch.loggers import Logger, WandbLogger

RECORD_FILE = "magic3d-run.json"  # inside <stage>/wandb/, beside wandb's own run folders
WANDB_DIR = "wandb"


@dataclass
class WandbRunRecord:
    """Which W&B run holds a stage's logs (``<stage>/wandb/magic3d-run.json``).

    Args:
        id: W&B run id (resume it with ``wandb.init(id=..., resume="allow")``).
        project: W&B project.
        name: display name (``<run folder>/<stage>``).
        mode: "online" or "offline", as the stage ran.
        group: W&B group (``run.wandb_group``), None when ungrouped.
        job_type: W&B job type (``run.wandb_job_type``).
        sync_dir: the run's local folder (``wandb sync`` it when offline).
        last_step: wandb's step after the stage's last log, written when the stage finished
            (None while it runs or after an interrupted attempt).
    """

    id: str
    project: str
    name: str
    mode: str
    group: str | None = None
    job_type: str | None = None
    sync_dir: str | None = None
    last_step: int | None = None

    @staticmethod
    def path(stage_dir: Path | str) -> Path:
        return Path(stage_dir) / WANDB_DIR / RECORD_FILE

    def save(self, stage_dir: Path | str) -> Path:
        path = self.path(stage_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)  # a crash mid-write leaves the previous record, never half of one
        return path

    @classmethod
    def load(cls, stage_dir: Path | str) -> WandbRunRecord | None:
        path = cls.path(stage_dir)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(**{k: data[k] for k in data if k in cls.__dataclass_fields__})
        except (ValueError, TypeError, KeyError) as err:
            warnings.warn(f"{path} is unreadable ({err}); its W&B run cannot be resumed", stacklevel=2)
            return None


def wandb_logger_of(loggers: Iterable[Logger]) -> WandbLogger | None:
    """The trainer's W&B logger, if it has one (``trainer.loggers``; W&B may be off)."""
    from lightning.pytorch.loggers import WandbLogger

    return next((logger for logger in loggers if isinstance(logger, WandbLogger)), None)


def record_run(logger: WandbLogger, stage_dir: Path | str, group: str | None, job_type: str | None) -> WandbRunRecord:
    """Write the record of the logger's (started) run; returns it."""
    run = logger.experiment
    record = WandbRunRecord(id=run.id, project=run.project, name=run.name,
                            mode="offline" if run.offline else "online", group=group, job_type=job_type,
                            sync_dir=str(run.settings.sync_dir))
    record.save(stage_dir)
    return record


def record_finished(logger: WandbLogger, stage_dir: Path | str, summary: dict[str, Any]) -> None:
    """At the end of a stage: ``summary`` (DONE.json's entries) into the run's summary, and the
    run's last step into the record."""
    run = logger.experiment
    for key, value in summary.items():
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            run.summary[f"stage/{key}"] = value
    record = WandbRunRecord.load(stage_dir)
    if record is not None and record.id == run.id:
        record.last_step = int(run.step)
        record.save(stage_dir)


def _warn_not_logged(what: str, err: Exception) -> None:
    warnings.warn(f"W&B: could not log {what} ({type(err).__name__}: {err}); training goes on", stacklevel=3)


def log_image_file(logger: WandbLogger | None, key: str, image: Path | Any, step: int) -> None:
    """One image (a PNG path, or an HxWx3 uint8 array) under ``key`` at trainer step ``step``."""
    if logger is None:
        return
    try:
        logger.log_image(key=key, images=[str(image) if isinstance(image, Path) else image], step=step)
    except Exception as err:  # noqa: BLE001 - an upload problem must never stop training
        _warn_not_logged(f"image {key}", err)


def log_video_file(logger: WandbLogger | None, key: str, path: Path, step: int) -> None:
    """An mp4 file as ``wandb.Video`` under ``key``: the file's own frame rate plays (wandb
    takes no ``fps`` for a file, and warns if given one)."""
    if logger is None:
        return
    try:
        logger.log_video(key=key, videos=[str(path)], step=step)
    except Exception as err:  # noqa: BLE001 - the video is on disk either way
        _warn_not_logged(f"video {key}", err)


def wandb_disabled_by_environment() -> bool:
    return os.environ.get("WANDB_MODE") == "disabled"


def log_to_stage_run(
    stage_dir: Path | str,
    tables: dict[str, tuple[Sequence[str], Sequence[Sequence[Any]]]],
    summary: dict[str, Any],
    images: dict[str, Path] | None = None,
) -> WandbRunRecord | None:
    """Resume the W&B run a stage trained in and log ``tables`` (key -> (columns, rows)) and
    ``images`` (key -> PNG file) one step after its last, and ``summary`` into its summary;
    returns the record used.

    Nothing is logged (None) when the stage has no W&B run or W&B is disabled now
    (``WANDB_MODE=disabled``). The run is resumed in the mode it trained in: an offline run
    gets a new offline folder with the same id, which ``wandb sync`` uploads into the same run.
    """
    if wandb_disabled_by_environment():
        return None
    record = WandbRunRecord.load(stage_dir)
    if record is None:
        return None
    import wandb

    from magic3d.quiet import quiet_libraries

    quiet_libraries()
    # console="off": the evaluation's terminal output is not the training's output.log.
    run = wandb.init(project=record.project, id=record.id, name=record.name, resume="allow", mode=record.mode,
                     dir=str(stage_dir), group=record.group, job_type=record.job_type,
                     settings=wandb.Settings(console="off"))
    try:
        step = max(int(run.step), (record.last_step if record.last_step is not None else -1) + 1)
        logged: dict[str, Any] = {key: wandb.Table(columns=list(columns), data=[list(row) for row in rows])
                                  for key, (columns, rows) in tables.items()}
        logged.update({key: wandb.Image(str(path)) for key, path in (images or {}).items()})
        run.log(logged, step=step)
        for key, value in summary.items():
            run.summary[key] = value
        record.last_step = step
        record.sync_dir = str(run.settings.sync_dir)
        record.save(stage_dir)
    finally:
        run.finish()
    return record
