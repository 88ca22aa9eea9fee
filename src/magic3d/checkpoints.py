"""Stage checkpoints, in one place: write, verify, find the latest valid one, check that it
fits, and start a stage from another stage's checkpoint (resume, warm start, convert).

Why each rule exists:

- **Checksums.** A torch checkpoint is a zip of uncompressed tensor records: 4 KB of garbage
  in its middle loads without complaint and turns weights into nonsense. Every checkpoint is
  written with a ``<name>.sha256`` sidecar and verified against it when read; a checkpoint
  without a sidecar (written by an older magic3d) is read unverified.
- **Finite state only.** A checkpoint whose weights or optimiser moments hold a NaN/Inf would
  poison every run resumed from it, so :func:`save_stage_checkpoint` refuses to write one,
  and :func:`read_checkpoint` treats one as corrupt.
- **Corrupt files are kept.** A checkpoint that fails verification is renamed
  ``<name>.corrupt`` (never deleted, never overwritten) and the next older valid one is used.
- **One read.** The checkpoint found at start is read once; Lightning's own load goes through
  :class:`StageCheckpointIO`, which hands back that same dictionary.
- **No copies.** Periodic checkpoints are ``stepNNNNNN.ckpt``; ``last.ckpt`` is a hard link to
  the newest one (no extra disk) until an interrupt or the stage's end writes it afresh. Only
  ``keep`` periodic files are kept; there are never ``-v1``/``-v2`` versions.
- Every ``torch.load`` passes ``weights_only=True``.

Three ways a stage starts from an earlier one (``StageStart.mode``): ``resume`` (same stage,
full trainer state), ``warm_start`` (scene weights into an identical scene), ``convert`` (a
pure function rebuilds the source scene's content in another representation).
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import CheckpointIO
from torch import nn

from magic3d.config import ConfigError

StartMode = Literal["resume", "warm_start", "convert"]
START_MODES: tuple[str, ...] = ("resume", "warm_start", "convert")
CHECKSUM_SUFFIX = ".sha256"
CORRUPT_SUFFIX = ".corrupt"
LAST = "last.ckpt"


@dataclass
class StageStart:
    """Where a stage's weights come from when it has no checkpoint of its own.

    Args:
        checkpoint: the source checkpoint (another stage's ``last.ckpt``); None: from scratch.
        mode: "resume" (full trainer state), "warm_start" (scene weights) or "convert".
        converter: import path ``package.module.function(source_scene, target_scene, **args)``
            for mode "convert".
        converter_args: keyword arguments for the converter.
    """

    checkpoint: str | None = None
    mode: StartMode = "warm_start"
    converter: str | None = None
    converter_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in START_MODES:
            raise ConfigError(f"start.mode={self.mode!r} is unknown: use one of {', '.join(START_MODES)}")
        if self.mode == "convert" and self.checkpoint and not self.converter:
            raise ConfigError("start.mode=convert needs start.converter (package.module.function)")


class CorruptCheckpoint(ConfigError):
    """A checkpoint that cannot be trusted: unreadable, checksum mismatch, or non-finite."""


class NonFiniteStateError(RuntimeError):
    """The weights or optimiser state turned non-finite; no checkpoint of them is written."""


# ------------------------------------------------------------------------------- files


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _tensors(value)


def first_non_finite(checkpoint: dict) -> str | None:
    """Where the first NaN/Inf sits in the weights or optimiser state, or None.

    One device sync per tensor group, not per tensor: the flags are stacked first.
    """
    groups = {"weights": checkpoint.get("state_dict", {}), "optimiser state": checkpoint.get("optimizer_states", [])}
    for what, tree in groups.items():
        floats = [t for t in _tensors(tree) if t.is_floating_point() and t.numel() > 0]
        if not floats:
            continue
        # Optimiser state mixes devices (Adam's `step` counters stay on the CPU beside CUDA
        # moments): the flags gather on one device before the stack, copies of scalars only.
        device = next((t.device for t in floats if t.device.type != "cpu"), floats[0].device)
        finite = torch.stack([torch.isfinite(t).all().to(device, non_blocking=True) for t in floats])
        if not bool(finite.all()):
            if what == "weights":
                names = [k for k, v in tree.items() if v.is_floating_point() and v.numel() > 0]
                return f"weights ({names[int((~finite).nonzero()[0])]})"
            return what
    return None


def write_checkpoint(checkpoint: dict, path: Path) -> None:
    """Atomic write (temp file, checksum, rename) of a checkpoint and its ``.sha256`` sidecar."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(checkpoint, tmp)
    digest = file_sha256(tmp)
    sidecar_tmp = checksum_path(tmp)
    sidecar_tmp.write_text(digest + "\n")
    os.replace(tmp, path)
    os.replace(sidecar_tmp, checksum_path(path))


def read_checkpoint(path: Path) -> dict:
    """Load a checkpoint that passes every check, or raise :class:`CorruptCheckpoint`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Checkpoint not found: {path}")
    data = path.read_bytes()  # one read serves the checksum and the load
    sidecar = checksum_path(path)
    verified = sidecar.is_file()
    if verified and hashlib.sha256(data).hexdigest() != sidecar.read_text().strip():
        raise CorruptCheckpoint(f"Checkpoint {path} is corrupt: its contents do not match {sidecar.name}")
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means unusable
        if verified:  # intact bytes: a reader problem, not damage; the file must not be moved away
            raise ConfigError(f"Checkpoint {path} is intact but cannot be loaded with weights_only=True "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
        raise CorruptCheckpoint(
            f"Checkpoint {path} is corrupt or was not written by magic3d ({type(err).__name__})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "magic3d" not in checkpoint:
        raise CorruptCheckpoint(f"Checkpoint {path} was not written by a magic3d stage (no state_dict/magic3d keys)")
    bad = first_non_finite(checkpoint)
    if bad is not None:
        raise CorruptCheckpoint(f"Checkpoint {path} holds non-finite {bad}")
    return checkpoint


def quarantine(path: Path) -> Path:
    """Rename a corrupt checkpoint (and its sidecar) out of the way; never overwrites."""
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    if target.exists():
        target = path.with_name(f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}{CORRUPT_SUFFIX}")
    path.rename(target)
    sidecar = checksum_path(path)
    if sidecar.is_file():
        sidecar.rename(checksum_path(target))
    return target


def remove_checkpoint(path: Path) -> None:
    for file in (path, checksum_path(path)):
        file.unlink(missing_ok=True)


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` becomes the same file as ``source`` (hard link; a copy where links fail)."""
    if target.exists() and os.path.samefile(source, target):
        return  # rename() of two links to one file does nothing and would leave the temp link
    tmp = target.with_name(f".{target.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        import shutil

        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


# ------------------------------------------------------------------------------ finding


@dataclass
class FoundCheckpoint:
    path: Path
    checkpoint: dict

    @property
    def step(self) -> int:
        return int(self.checkpoint.get("global_step", 0))


def periodic_checkpoints(ckpt_dir: Path) -> list[Path]:
    """``stepNNNNNN.ckpt`` files, newest step first."""
    return sorted(ckpt_dir.glob("step*.ckpt"), reverse=True)


def latest_valid_checkpoint(ckpt_dir: Path, is_rank_zero: bool = True,
                            log: Callable[[str], None] = print) -> FoundCheckpoint | None:
    """``last.ckpt`` if valid, else the newest valid periodic checkpoint; None if there are none.

    Corrupt files are quarantined (by rank 0; other ranks reach the same verdicts and skip
    them). When every checkpoint is corrupt the stage stops rather than silently start over.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    candidates = [p for p in [ckpt_dir / LAST, *periodic_checkpoints(ckpt_dir)] if p.is_file()]
    problems = []
    for path in candidates:
        try:
            return FoundCheckpoint(path, read_checkpoint(path))
        except CorruptCheckpoint as err:
            problems.append(str(err))
            if is_rank_zero and path.is_file():
                kept = quarantine(path)
                log(f"[magic3d] {err}; kept as {kept.name}, trying the previous checkpoint")
    if problems:
        raise CorruptCheckpoint(
            f"Every checkpoint in {ckpt_dir} is corrupt (kept as *{CORRUPT_SUFFIX}): {problems[0]}. "
            "Rerun to start the stage over from scratch.")
    return None


def check_compatible(model: nn.Module, found: FoundCheckpoint) -> None:
    """Fail early, naming the first mismatching tensor, instead of deep inside Lightning."""
    state = found.checkpoint["state_dict"]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"{mismatched[0]} has shape {tuple(state[mismatched[0]].shape)}, the config "
                       f"gives {tuple(expected[mismatched[0]].shape)}")
        raise ConfigError(
            f"Checkpoint {found.path} does not fit this stage's config ({detail}). "
            "It was written with other settings: start a new run folder.")


# ------------------------------------------------------------------------------ writing


def save_stage_checkpoint(trainer, path: Path) -> None:
    """Write the trainer's state to ``path`` unless it holds a NaN/Inf (then raise).

    Every rank checks its own (identical, DDP-synchronised) weights, so all of them raise
    together instead of leaving the others waiting in the save's barrier.
    """
    module = trainer.lightning_module
    probe = {"state_dict": module.state_dict(),
             "optimizer_states": [opt.state_dict()["state"] for opt in trainer.optimizers]}
    bad = first_non_finite(probe)
    if bad is not None:
        raise NonFiniteStateError(
            f"The stage's {bad} became non-finite at step {trainer.global_step}: no checkpoint of it "
            "is written and the earlier ones are kept. Lower the learning rate or guidance scale, then "
            "rerun to continue from the last good checkpoint.")
    trainer.save_checkpoint(path, weights_only=False)  # the full trainer state, optimiser included


class StageCheckpointIO(CheckpointIO):
    """Lightning's checkpoint reader/writer for stages: checksummed writes, verified reads,
    and the one checkpoint already read at start handed back instead of read again."""

    def __init__(self) -> None:
        self._preloaded: dict[Path, dict] = {}

    def preload(self, found: FoundCheckpoint) -> None:
        self._preloaded[found.path.resolve()] = found.checkpoint

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any = None) -> None:
        write_checkpoint(checkpoint, Path(path))

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        preloaded = self._preloaded.pop(Path(path).resolve(), None)
        return preloaded if preloaded is not None else read_checkpoint(Path(path))

    def remove_checkpoint(self, path) -> None:
        remove_checkpoint(Path(path))


class PeriodicCheckpoints(Callback):
    """``stepNNNNNN.ckpt`` every ``every`` steps, ``last.ckpt`` linked to it, ``keep`` kept."""

    def __init__(self, ckpt_dir: Path, every: int, keep: int) -> None:
        if every < 1:
            raise ConfigError(f"run.checkpoint_every={every} is out of range: use an integer >= 1")
        if keep < 0:
            raise ConfigError(f"run.keep_checkpoints={keep} is out of range: use an integer >= 0")
        self.ckpt_dir = Path(ckpt_dir)
        self.every = every
        self.keep = keep
        self._saved_step: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every == 0:
            self.save_periodic(trainer)

    def save_periodic(self, trainer) -> Path:
        path = self.ckpt_dir / f"step{trainer.global_step:06d}.ckpt"
        save_stage_checkpoint(trainer, path)
        self._saved_step = trainer.global_step
        self.save_last(trainer)
        if trainer.is_global_zero:
            for old in periodic_checkpoints(self.ckpt_dir)[self.keep:]:
                remove_checkpoint(old)
        return path

    def save_last(self, trainer) -> None:
        """``last.ckpt`` of the current step: a link to this step's periodic file when there
        is one (same weights, no second copy on disk), else a fresh write."""
        periodic = self.ckpt_dir / f"step{trainer.global_step:06d}.ckpt"
        # Decided from this process's memory, not the file system, so every DDP rank takes the
        # same branch (a fresh write is collective).
        if self._saved_step == trainer.global_step:
            if trainer.is_global_zero:
                _link_or_copy(periodic, self.ckpt_dir / LAST)
                _link_or_copy(checksum_path(periodic), checksum_path(self.ckpt_dir / LAST))
            return
        save_stage_checkpoint(trainer, self.ckpt_dir / LAST)


# ----------------------------------------------------------------------- starting scenes


def scene_spec(checkpoint: dict) -> dict:
    """The ``{class_path, init_args}`` of the scene a checkpoint holds (self-description)."""
    info = checkpoint.get("magic3d") or {}
    spec = info.get("scene")
    if spec is None:  # checkpoints written before the scene was recorded on its own
        model = (info.get("stage_config") or {}).get("model", {})
        spec = model.get("init_args", model).get("scene")
    if spec is None:
        raise ConfigError("The checkpoint does not record its scene config; cannot rebuild its scene")
    return spec


def scene_state(checkpoint: dict) -> dict[str, torch.Tensor]:
    prefix = "scene."
    return {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}


def build_scene(spec: dict) -> nn.Module:
    """Instantiate a scene from a ``{class_path, init_args}`` mapping."""
    from jsonargparse import ArgumentParser

    from magic3d.scenes.base import Scene

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--scene", type=Scene)
    try:
        cfg = parser.parse_object({"scene": spec})
    except Exception as err:  # noqa: BLE001 - jsonargparse raises several error types
        raise ConfigError(f"Cannot rebuild scene {spec.get('class_path')}: {err}") from None
    return parser.instantiate(cfg).scene


def scene_from_checkpoint(checkpoint: dict) -> nn.Module:
    scene = build_scene(scene_spec(checkpoint))
    scene.load_state_dict(scene_state(checkpoint))
    return scene


def load_scene(path: Path) -> nn.Module:
    """The scene stored in a stage checkpoint file, rebuilt from its own description."""
    return scene_from_checkpoint(read_checkpoint(Path(path)))


def import_function(path: str) -> Callable:
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"Converter '{path}' not found (expected package.module.function)") from None


def warm_start_scene(scene: nn.Module, checkpoint: dict, source: str) -> None:
    """Copy the checkpoint's scene weights into an identical scene."""
    state = scene_state(checkpoint)
    expected = scene.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        raise ConfigError(
            f"Warm start from {source}: the checkpoint's scene does not match this stage's scene "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {reshaped[:3]}). "
            "Use mode convert.")
    scene.load_state_dict(state)


def convert_scene(scene: nn.Module, checkpoint: dict, converter: str | None,
                  converter_args: dict[str, Any] | None = None) -> None:
    """Rebuild the checkpoint's scene and let ``converter`` fill ``scene`` from it."""
    if converter is None:
        raise ConfigError("Start mode 'convert' needs a converter import path")
    convert = import_function(converter)
    source = scene_from_checkpoint(checkpoint)
    try:
        convert(source, scene, **(converter_args or {}))
    except TypeError as err:
        if converter_args and "unexpected keyword" in str(err):
            raise ConfigError(f"Converter {converter} does not accept {sorted(converter_args)}: {err}") from None
        raise


def start_scene(scene: nn.Module, checkpoint: dict, start: StageStart) -> None:
    """Fill ``scene`` from another stage's checkpoint by ``start.mode`` (not "resume")."""
    if start.mode == "warm_start":
        warm_start_scene(scene, checkpoint, str(start.checkpoint))
    elif start.mode == "convert":
        convert_scene(scene, checkpoint, start.converter, start.converter_args)
    else:
        raise ConfigError(f"start.mode={start.mode!r} does not fill a scene (resume restores the whole trainer)")
