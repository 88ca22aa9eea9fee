"""A stage against the stage it started from (fine vs coarse): per-metric differences."""

from __future__ import annotations

from dataclasses import dataclass

from magic3d.eval.options import METRIC_KEYS
from magic3d.eval.scene import StageResult


@dataclass
class StageComparison:
    """A stage against the stage it started from (fine vs coarse), at the same cameras and
    resolution: ``difference[key] = stage - baseline`` (None where either value is None)."""

    stage: str
    baseline: str
    difference: dict[str, float | None]


def metric_difference(
    stage: dict[str, float | None], baseline: dict[str, float | None]
) -> dict[str, float | None]:
    """``stage - baseline`` for every metric key (None where either side has no value)."""
    return {
        key: None if stage.get(key) is None or baseline.get(key) is None else float(stage[key]) - float(baseline[key])
        for key in METRIC_KEYS
    }


def compare_stages(results: list[StageResult]) -> list[StageComparison]:
    """One comparison per evaluated stage whose ``started_from`` stage was evaluated too."""
    by_name = {r.stage: r for r in results}
    return [
        StageComparison(r.stage, r.started_from, metric_difference(r.metrics, by_name[r.started_from].metrics))
        for r in results
        if r.started_from is not None and r.started_from in by_name
    ]

