"""Reports of a prior evaluation: prior_eval.json / .md, a sheet of samples, and the model
card's Quality section."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from magic3d.data.cameras import VIEW_NAMES
from magic3d.eval.markdown import format_value
from magic3d.eval.prior import PriorEval


def accuracy_table(data: dict[str, Any]) -> list[str]:
    """Trained captions and, apart, the held-out pairs (never in the prior's training data)."""
    rows = ["| captions | samples | shape acc | colour acc | caption acc | view acc (asymmetric) |",
            "|---|---|---|---|---|---|"]

    def row(name: str, d: dict[str, Any]) -> str:
        return (f"| {name} | {d['n_images']} | {format_value(d['shape_accuracy'])} | {format_value(d['colour_accuracy'])} "
                f"| {format_value(d['caption_accuracy'])} | {format_value(d['view_accuracy_asymmetric'])} |")

    rows.append(row("trained", data))
    if data.get("held_out"):
        rows.append(row("held out (" + ", ".join(data.get("held_out_captions", [])) + ")", data["held_out"]))
    return rows


def prior_quality_markdown(result: PriorEval | dict[str, Any], report: Path | str | None = None) -> str:
    """The model card's Quality section from a prior evaluation (object or its JSON)."""
    data = result.to_json() if isinstance(result, PriorEval) else result
    s = data["settings"]
    held = s.get("classifier", {}).get("heldout_accuracy", {})
    ceiling = f" (the evaluator's own held-out accuracy: shape {held['shape']:.3f}, colour {held['colour']:.3f})" if held else ""
    worst = sorted(data["per_shape_accuracy"].items(), key=lambda kv: kv[1])[:3]
    lines = [
        f"Toy-world evaluator on {data['n_images']} DDIM samples ({s['steps']} steps, guidance "
        f"{s['guidance_scale']:g}, {s['n_per_caption']} per caption over every shape and colour, view "
        f"suffixes cycling {', '.join(VIEW_NAMES)}){ceiling}. Targets (issue 10): shape and colour "
        "accuracy >= 0.95, view >= 0.85 on asymmetric objects (held-out pairs reported apart).",
        "",
        *accuracy_table(data),
        "",
        "Per colour: " + ", ".join(f"{k} {v:.2f}" for k, v in data["per_colour_accuracy"].items()) + ".",
        "Hardest shapes: " + ", ".join(f"{k} {v:.2f}" for k, v in worst) + ".",
    ]
    if report is not None:
        lines += ["", f"Report: `{report}` (reproduce with `python -m magic3d.eval prior <this folder>`)."]
    return "\n".join(lines)


def guidance_sweep_markdown(results: list[PriorEval | dict[str, Any]]) -> str:
    """One row per guidance scale: the same samples' seeds and captions, graded the same way.

    Why a sweep: a prior's best classifier-free guidance scale moves as it trains (the embedded
    pixel prior's shape accuracy at guidance 5 fell from 0.495 to 0.455 between 3,721 and 6,725
    steps while at guidance 3 it rose from 0.706 to 0.744, BENCHMARKS.md), so one scale alone
    can read progress as regress."""
    rows = ["| guidance | samples | shape acc | colour acc | caption acc | view acc (asymmetric) "
            "| held-out shape | held-out colour |", "|---|---|---|---|---|---|---|---|"]
    for result in results:
        d = result.to_json() if isinstance(result, PriorEval) else result
        held = d.get("held_out") or {}
        rows.append(
            f"| {d['settings']['guidance_scale']:g} | {d['n_images']} | {format_value(d['shape_accuracy'])} "
            f"| {format_value(d['colour_accuracy'])} | {format_value(d['caption_accuracy'])} "
            f"| {format_value(d['view_accuracy_asymmetric'])} | {format_value(held.get('shape_accuracy'))} "
            f"| {format_value(held.get('colour_accuracy'))} |"
        )
    steps = (results[0].to_json() if isinstance(results[0], PriorEval) else results[0])["settings"]["steps"]
    return "\n".join([f"Guidance sweep (DDIM {steps} steps, same seeds and captions at every scale):", "", *rows])


def write_guidance_sweep(results: list[PriorEval], out: str | Path) -> tuple[Path, Path]:
    """guidance_sweep.json (every scale's full evaluation) and guidance_sweep.md in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "guidance_sweep.json", out / "guidance_sweep.md"
    json_path.write_text(json.dumps([r.to_json() for r in results], indent=2) + "\n")
    md_path.write_text(guidance_sweep_markdown(results) + "\n")
    return json_path, md_path


def write_prior_report(result: PriorEval, out: str | Path, max_images: int = 64) -> tuple[Path, Path, Path]:
    """prior_eval.json, prior_eval.md and a sheet of the first ``max_images`` samples in ``out``."""
    from magic3d.visuals import save_png

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "prior_eval.json"
    json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    md_path = out / "prior_eval.md"
    s = result.settings
    md_path.write_text(
        f"# Prior evaluation of `{result.pipeline}`\n\n"
        f"{result.n_images} DDIM samples ({s['steps']} steps, guidance {s['guidance_scale']:g}, "
        f"{s['n_per_caption']} per caption, view suffixes cycling {', '.join(VIEW_NAMES)}).\n\n"
        + "\n".join(accuracy_table(result.to_json())) + "\n"
    )
    sheet_path = out / "prior_samples.png"
    if result.samples is not None and result.samples.shape[0] > 0:
        images = result.samples[:max_images]
        n, h, w, _ = images.shape
        cols = min(n, 16)
        rows = math.ceil(n / cols)
        grid = torch.ones(rows * h, cols * w, 3)
        for i in range(n):
            r, c = divmod(i, cols)
            grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = images[i]
        save_png(grid, sheet_path)
    return json_path, md_path, sheet_path
