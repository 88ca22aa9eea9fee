"""Measuring one finished run of an ablation: the toy-world evaluation of every stage
(``magic3d.eval.run.evaluate_run``, which writes ``<run>/eval/``), the orbit strips the
contact sheets show, and the GPUs the run held."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from magic3d.eval.classifier import ToyWorldClassifier
from magic3d.eval.options import EvalOptions
from magic3d.eval.run import evaluate_run

VIEWS_FILE = "ablation_views.png"  # in the run folder: the final stage's orbit strip
GROUND_TRUTH_FILE = "ablation_ground_truth.png"  # the toy world's object at the same cameras
STRIP_VIEWS = 4  # azimuths 0, 90, 180, 270 of a 16-view orbit: front, sides and back


@dataclass
class RunMeasurement:
    metrics: dict[str, dict[str, float | None]]  # stage -> metric -> value
    final_stage: str
    views: Path | None
    ground_truth: Path | None


def strip_indices(n_views: int, n_strip: int = STRIP_VIEWS) -> list[int]:
    """Evenly spaced views of an orbit, starting at the front (azimuth 0)."""
    n = min(n_strip, n_views)
    return [round(i * n_views / n) for i in range(n)]


def save_strip(images: Float[Tensor, "B H W 3"], path: Path) -> Path:
    """A few evenly spaced views side by side, as one PNG."""
    from PIL import Image

    chosen = images[strip_indices(images.shape[0])].clamp(0, 1)
    strip = torch.cat(list(chosen), dim=1).cpu().numpy()  # (H, n W, 3)
    Image.fromarray(np.round(strip * 255).astype(np.uint8)).save(path)
    return path


def measure_run(
    run_dir: Path, classifier: ToyWorldClassifier, options: EvalOptions, device: torch.device
) -> RunMeasurement:
    """Evaluate every finished stage of ``run_dir``; the last one stands for the variant."""
    result = evaluate_run(run_dir, options, classifier=classifier, device=device)
    final = result.stages[-1]
    views = save_strip(final.renders, run_dir / VIEWS_FILE) if final.renders is not None else None
    truth = save_strip(final.ground_truth, run_dir / GROUND_TRUTH_FILE) if final.ground_truth is not None else None
    return RunMeasurement({s.stage: dict(s.metrics) for s in result.stages}, final.stage, views, truth)


def gpus_used(run_dir: Path) -> int:
    """GPUs the run's stages were given (the most of any stage): 0 without CUDA or on the CPU
    accelerator; ``trainer.devices`` otherwise (``auto`` / -1: every visible GPU)."""
    from magic3d.config import load_yaml

    if not torch.cuda.is_available():
        return 0
    visible = torch.cuda.device_count()
    most = 0
    for config_file in Path(run_dir).glob("*/config.yaml"):
        trainer = load_yaml(config_file).get("trainer") or {}
        if str(trainer.get("accelerator", "auto")) == "cpu":
            continue
        devices = trainer.get("devices", "auto")
        if isinstance(devices, (list, tuple)):
            count = len(devices)
        elif isinstance(devices, int) or (isinstance(devices, str) and devices.lstrip("-").isdigit()):
            count = visible if int(devices) == -1 else int(devices)
        else:  # "auto"
            count = visible
        most = max(most, count)
    return most
