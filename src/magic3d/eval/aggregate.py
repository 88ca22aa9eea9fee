"""Evaluate (or reuse the reports of) every run under a folder and average per stage over
prompts, and the paired differences (e.g. fine - coarse) over runs: eval_summary.json / .md."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from magic3d.devices import resolve_device
from magic3d.eval.classifier import DEFAULT_FOLDER, ToyWorldClassifier, load_classifier
from magic3d.eval.markdown import metrics_table, settings_line
from magic3d.eval.options import METRIC_KEYS, REPORT_VERSION, EvalOptions
from magic3d.eval.run import EVAL_DIR, evaluate_run


@dataclass
class AggregateEval:
    runs: list[str]
    per_stage: dict[str, dict[str, float | int | None]]
    json_path: Path
    markdown_path: Path
    # "fine - coarse": mean over runs of the paired per-run differences (and counts "<key>_n").
    per_comparison: dict[str, dict[str, float | int | None]] = field(default_factory=dict)


def find_runs(folder: Path) -> list[Path]:
    """Run folders under ``folder``: parents of stage folders (``<run>/<stage>/config.yaml``)."""
    runs = {p.parent.parent for p in folder.rglob("config.yaml")}
    return sorted(r for r in runs if (r / EVAL_DIR / "eval.json").is_file() or any(r.glob("*/DONE.json")))


def aggregate_runs(
    folder: str | Path,
    options: EvalOptions = EvalOptions(),
    classifier: str | Path | ToyWorldClassifier = DEFAULT_FOLDER,
    device: str | torch.device = "auto",
    reevaluate: bool = False,
) -> AggregateEval:
    """Evaluate each run under ``folder`` and average every metric per stage over prompts;
    writes eval_summary.json / .md in ``folder``.

    A run's eval.json is reused unless ``reevaluate`` or it was made with other options (for
    example at another ``resolution``): averages never mix settings. Runs whose report compares
    a stage with the stage it started from (fine vs coarse) also give the mean of the paired
    differences, per comparison."""
    folder = Path(folder)
    runs = find_runs(folder)
    if not runs:
        raise FileNotFoundError(f"no runs with a finished stage under {folder}")
    dev = resolve_device(device)
    model = None
    per_run: list[tuple[Path, dict[str, Any]]] = []
    for run in tqdm(runs, desc="runs", unit="run"):
        report_file = run / EVAL_DIR / "eval.json"
        if reevaluate or not _reusable(report_file, options):
            if not reevaluate and report_file.is_file():
                tqdm.write(f"{run}: eval.json was made with other options or by another version; evaluating again")
            model = model or load_classifier(classifier, dev)
            evaluate_run(run, options, classifier=model, device=dev)
        per_run.append((run, json.loads(report_file.read_text())))

    grouped: dict[str, list[dict[str, Any]]] = {}
    for _, report in per_run:
        for stage in report["stages"]:
            grouped.setdefault(stage["stage"], []).append(stage)
    per_stage = {name: _mean_metrics([e["metrics"] for e in entries], "prompts") for name, entries in grouped.items()}

    paired: dict[str, list[dict[str, Any]]] = {}
    for _, report in per_run:
        for comparison in report.get("comparisons") or []:  # absent in reports of older versions
            paired.setdefault(f"{comparison['stage']} - {comparison['baseline']}", []).append(comparison["difference"])
    per_comparison = {name: _mean_metrics(diffs, "runs") for name, diffs in paired.items()}

    rows = [
        (f"{Path(run).relative_to(folder) if Path(run) != folder else run.name} / {s['stage']}",
         {**s["metrics"], "prompt": s["prompt"]})
        for run, report in per_run
        for s in report["stages"]
    ]
    summary_rows = [(name, {**values}) for name, values in per_stage.items()]
    md = [
        f"# Evaluation summary of `{folder}` ({len(per_run)} runs)\n",
        f"{settings_line(options)}\n",
        "Means over prompts per stage (Janus rate over asymmetric objects only; `prompts` = runs with the stage).\n",
        metrics_table(summary_rows, "stage", ["prompts"]),
    ]
    if per_comparison:
        md += [
            "\n## Stage differences (paired per run)\n",
            "Mean over runs of `stage − the stage it started from`, each run compared with itself "
            "(same prompt, cameras and resolution); `runs` = runs with both stages.\n",
            metrics_table([(name, {**values}) for name, values in per_comparison.items()], "difference", ["runs"],
                          signed=True),
        ]
    md += ["\n## Per run\n", metrics_table(rows, "run / stage", ["prompt"])]
    json_path = folder / "eval_summary.json"
    md_path = folder / "eval_summary.md"
    json_path.write_text(json.dumps({
        "folder": str(folder),
        "options": asdict(options),
        "runs": [str(r) for r, _ in per_run],
        "per_stage": per_stage,
        "per_comparison": per_comparison,
        "per_run": [{"run": str(r), "stages": [
            {"stage": s["stage"], "prompt": s["prompt"], "metrics": s["metrics"]} for s in rep["stages"]
        ], "comparisons": rep.get("comparisons") or []} for r, rep in per_run],
    }, indent=2) + "\n")
    md_path.write_text("\n".join(md))
    return AggregateEval([str(r) for r, _ in per_run], per_stage, json_path, md_path, per_comparison)


def _reusable(report_file: Path, options: EvalOptions) -> bool:
    """An eval.json of this version exists and was made with ``options`` (missing keys = defaults)."""
    if not report_file.is_file():
        return False
    try:
        report = json.loads(report_file.read_text())
        stored = EvalOptions.from_json(report.get("options") or {})
    except (ValueError, TypeError):
        return False
    if report.get("version") != REPORT_VERSION:
        return False
    return _effective_settings(stored) == _effective_settings(options)


def _effective_settings(options: EvalOptions) -> dict[str, Any]:
    """The options that shape the results (``iou_size`` is unused once ``resolution`` is set)."""
    settings = asdict(options)
    if options.resolution is not None:
        settings.pop("iou_size")
    return settings


def _mean_metrics(entries: list[dict[str, Any]], count_key: str) -> dict[str, float | int | None]:
    """Mean per metric key over the entries that have a value, with ``<key>_n`` counts."""
    summary: dict[str, float | int | None] = {count_key: len(entries)}
    for key in METRIC_KEYS:
        values = [e[key] for e in entries if e.get(key) is not None]
        summary[key] = float(np.mean(values)) if values else None
        summary[f"{key}_n"] = len(values)
    return summary
