"""Reading finished (or running) runs: for notebooks and scripts."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from magic3d.config import ConfigError


def latest_run(root: Path | str = "runs") -> Path:
    """The most recently modified run folder under ``root`` (runs/<recipe>/<name>)."""
    runs = [p for p in Path(root).glob("*/*") if p.is_dir()]
    if not runs:
        raise ConfigError(f"No runs under {Path(root).resolve()}: start one with `make`.")
    return max(runs, key=lambda p: p.stat().st_mtime)


def stages(run_dir: Path | str) -> list[Path]:
    """Stage folders of a run, in the order they were started."""
    found = [p.parent for p in Path(run_dir).glob("*/config.yaml")]
    return sorted(found, key=lambda p: p.joinpath("config.yaml").stat().st_mtime)


def is_stage_dir(path: Path | str) -> bool:
    return (Path(path) / "config.yaml").is_file()


def final_stage_dir(path: Path | str) -> Path:
    """``path`` itself if it is a stage folder; for a run folder, its last finished stage."""
    path = Path(path)
    if is_stage_dir(path):
        return path
    if not path.is_dir():
        raise ConfigError(f"{path} is not a folder: pass a run folder (runs/<recipe>/<name>) or one of its stages.")
    found = stages(path)
    if not found:
        raise ConfigError(f"{path} is neither a run folder nor a stage folder (no */config.yaml inside).")
    finished = [p for p in found if stage_summary(p) is not None]
    if not finished:
        raise ConfigError(f"{path} has no finished stage yet ({', '.join(p.name for p in found)} unfinished): "
                          "continue the run first, or pass a stage folder.")
    return finished[-1]


def stage_summary(stage_dir: Path | str) -> dict | None:
    done = Path(stage_dir) / "DONE.json"
    return json.loads(done.read_text()) if done.is_file() else None


def stage_metrics(stage_dir: Path | str) -> pd.DataFrame:
    """All attempts' metrics.csv joined, one row per logged step (a resumed step keeps its latest value)."""
    files = sorted((Path(stage_dir) / "logs").glob("version_*/metrics.csv"),
                   key=lambda p: int(p.parent.name.split("_")[-1]))
    if not files:
        return pd.DataFrame()
    frames = [pd.read_csv(f).assign(attempt=i) for i, f in enumerate(files)]
    metrics = pd.concat(frames, ignore_index=True)
    return metrics.groupby("step", as_index=False).last()


def load_stage_scene(stage_dir: Path | str, device: str | torch.device = "cpu"):
    """The trained scene of a stage (or of a run's last finished stage), rebuilt from its
    last checkpoint."""
    from magic3d.checkpoints import load_scene

    stage_dir = final_stage_dir(stage_dir)
    scene = load_scene(stage_dir / "checkpoints" / "last.ckpt")
    return scene.to(device).eval()
