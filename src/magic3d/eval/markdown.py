"""Markdown of the evaluator's reports: metric tables, the settings line, a run's eval.md."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from magic3d.eval.compare import compare_stages
from magic3d.eval.options import METRIC_KEYS, EvalOptions
from magic3d.eval.scene import StageResult

METRIC_TITLES = {  # arrows say which way is better
    "r_precision": "R-precision ↑",
    "colour_accuracy": "colour acc ↑",
    "shape_accuracy": "shape acc ↑",
    "view_accuracy": "view acc ↑",
    "janus_rate": "Janus rate ↓",
    "silhouette_iou": "silhouette IoU ↑",
    "chamfer": "Chamfer ↓",
    "gt_r_precision": "R-precision of GT (ceiling)",
}


def format_value(value: float | None, digits: int = 3) -> str:
    """A table cell: ``digits`` decimals, a dash for a missing (None or NaN) value."""
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_signed(value: float | None, digits: int = 3) -> str:
    """A difference cell: always signed, a dash for a missing value."""
    return "–" if value is None or math.isnan(value) else f"{value:+.{digits}f}"


def metrics_table(
    rows: list[tuple[str, dict[str, float | None]]], first: str, extra: list[str] | None = None, signed: bool = False
) -> str:
    """Rows of (name, values) under the metric titles, with ``extra`` value columns after the name."""
    extra = extra or []
    header = [first, *extra, *(METRIC_TITLES[k] for k in METRIC_KEYS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    fmt = format_signed if signed else format_value
    for name, values in rows:
        cells = [name, *(str(values.get(e, "")) for e in extra), *(fmt(values.get(k)) for k in METRIC_KEYS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def settings_line(options: EvalOptions) -> str:
    """One sentence saying how the figures below it were measured."""
    if options.resolution is None:
        pixels = f"classifier at {options.classify_size}px, IoU at {options.iou_size}px"
    else:
        pixels = (f"rendered at {options.resolution}² (IoU and sheet), classifier on those renders "
                  f"area-averaged to {options.classify_size}px")
    return (
        f"{options.views} orbit views, elevation {options.elevation_deg:g}°, distance {options.distance:g}, "
        f"fovy {options.fovy_deg:g}°; {pixels}; Chamfer (scene units) on area samples of the extracted mesh "
        f"(mesh scenes) or on the visible surface of a {options.chamfer_resolution}³ density grid (density scenes)."
    )


def comparison_table(
    stage: str, baseline: str, stage_metrics: dict[str, Any], baseline_metrics: dict[str, Any],
    difference: dict[str, float | None],
) -> str:
    """Metric rows, columns baseline | stage | stage − baseline (arrows in the titles say
    which sign is an improvement)."""
    lines = [f"| metric | {baseline} | {stage} | {stage} − {baseline} |", "|---|---|---|---|"]
    for key in METRIC_KEYS:
        lines.append(f"| {METRIC_TITLES[key]} | {format_value(baseline_metrics.get(key))} "
                     f"| {format_value(stage_metrics.get(key))} | {format_signed(difference.get(key))} |")
    return "\n".join(lines) + "\n"


def run_markdown(
    run_dir: Path, results: list[StageResult], options: EvalOptions, classifier: dict[str, Any] | None = None
) -> str:
    """A run's eval.md: the stage table, each stage against its source stage, the notes."""
    rows = [(r.stage, {**r.metrics, "prompt": r.prompt, "steps": r.steps, "scene": r.scene or ""}) for r in results]
    accuracy = (classifier or {}).get("heldout_accuracy") or {}
    reference = (
        f" Classifier held-out accuracy on toy renders: shape {accuracy['shape']:.1%}, colour {accuracy['colour']:.1%}."
        if "shape" in accuracy and "colour" in accuracy else ""
    )
    text = [
        f"# Evaluation of `{run_dir}`\n",
        f"{settings_line(options)}{reference}\n",
        metrics_table(rows, "stage", ["prompt", "steps", "scene"]),
    ]
    by_name = {r.stage: r for r in results}
    for comparison in compare_stages(results):
        stage, baseline = by_name[comparison.stage], by_name[comparison.baseline]
        text += [
            f"\n## {comparison.stage} vs {comparison.baseline}\n",
            f"`{comparison.stage}` started from `{comparison.baseline}`; both rendered with the cameras and "
            f"resolution above ({options.render_size}²).\n",
            comparison_table(comparison.stage, comparison.baseline, stage.metrics, baseline.metrics,
                             comparison.difference),
        ]
    notes = [f"- **{r.stage}**: {note}" for r in results for note in r.notes]
    if notes:
        text += ["\n## Notes\n", "\n".join(notes) + "\n"]
    return "\n".join(text)
