"""A run's evaluation into the W&B runs its stages trained in: a metrics table (every evaluated
stage of the run, so the fine stage's dashboard shows the coarse one beside it), the
``stage - source`` differences, the contact sheet, and ``eval/<metric>`` in each run's summary
(what W&B's run table and parallel-coordinates panels compare across an ablation group).

W&B is best effort here: the report files are already written, so a W&B problem is one warning.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from magic3d.eval.compare import StageComparison
from magic3d.eval.options import METRIC_KEYS
from magic3d.eval.scene import StageResult
from magic3d.tracking import WandbRunRecord, log_to_stage_run

METRICS_TABLE = "eval/metrics"
DIFFERENCE_TABLE = "eval/vs_source"
METRICS_COLUMNS = ("stage", "prompt", "steps", "scene", *METRIC_KEYS)
DIFFERENCE_COLUMNS = ("stage", "baseline", *(f"{key}_difference" for key in METRIC_KEYS))


def metrics_rows(results: list[StageResult]) -> list[list]:
    return [[r.stage, r.prompt, r.steps, r.scene, *(r.metrics.get(key) for key in METRIC_KEYS)] for r in results]


def difference_rows(comparisons: list[StageComparison]) -> list[list]:
    return [[c.stage, c.baseline, *(c.difference.get(key) for key in METRIC_KEYS)] for c in comparisons]


def log_run_eval(
    run_dir: Path, results: list[StageResult], comparisons: list[StageComparison], sheet: Path | None
) -> list[WandbRunRecord]:
    """Log the evaluation into every evaluated stage's W&B run; returns the runs written to
    (none when the stages trained without W&B or ``WANDB_MODE=disabled``)."""
    tables = {METRICS_TABLE: (METRICS_COLUMNS, metrics_rows(results))}
    if comparisons:
        tables[DIFFERENCE_TABLE] = (DIFFERENCE_COLUMNS, difference_rows(comparisons))
    images = {"eval/contact_sheet": sheet} if sheet is not None and sheet.is_file() else {}
    written = []
    for result in results:
        summary = {f"eval/{key}": result.metrics.get(key) for key in METRIC_KEYS}
        try:
            record = log_to_stage_run(run_dir / result.stage, tables, summary, images)
        except Exception as err:  # noqa: BLE001 - eval.json / eval.md are written either way
            warnings.warn(f"W&B: the evaluation of {result.stage} was not logged ({type(err).__name__}: {err}); "
                          "the report files are complete", stacklevel=2)
            continue
        if record is not None:
            written.append(record)
    return written
