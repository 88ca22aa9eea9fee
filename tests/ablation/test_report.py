"""The report made from a hand-written ablation.json: known numbers in the table, columns only
for what was measured (runs on real priors have no ground-truth metrics), charts and sheets
for whatever exists, failures listed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from magic3d.ablation.report import write_report
from magic3d.ablation.spec import AblationSpec, Variant
from magic3d.ablation.state import AblationState, RunRecord
from magic3d.eval.options import METRIC_KEYS

PROMPTS = ["a red car", "a blue sphere", "a pink mug"]


def _metrics(**values: float) -> dict[str, float | None]:
    return {key: values.get(key) for key in METRIC_KEYS}


def _state(ground_truth: bool) -> AblationState:
    """Variant ``better`` scores exactly 0.1 more R-precision than the baseline on every prompt;
    ``broken`` failed everywhere. Without ``ground_truth`` only the classifier's metrics exist,
    as with a prompt outside the toy world or real priors."""
    spec = AblationSpec(name="known", variants=[Variant("base", "coarse_only"), Variant("better", "coarse_to_fine"),
                                                Variant("broken", "coarse_only", ("trainer.max_steps=1",))],
                        baseline="base", prompts=PROMPTS, seeds=[0])
    runs = []
    for i, prompt in enumerate(PROMPTS):
        for variant, shift in (("base", 0.0), ("better", 0.1)):
            extra = dict(silhouette_iou=0.5 + shift, chamfer=0.2) if ground_truth else {}
            stage = "coarse" if variant == "base" else "fine"
            runs.append(RunRecord(variant, "r", prompt, 0, run_dir=f"runs/{variant}/{i}", status="done",
                                  wall_s=10.0 + 10 * shift, final_stage=stage,
                                  metrics={stage: _metrics(r_precision=0.2 * i + shift, **extra)}))
        runs.append(RunRecord("broken", "coarse_only", prompt, 0, status="failed", error="StageFailed: boom"))
    return AblationState(spec, runs)


@pytest.mark.parametrize("ground_truth", [True, False], ids=["toy_world", "no_ground_truth"])
def test_report_of_known_numbers(tmp_path: Path, ground_truth: bool) -> None:
    report = write_report(tmp_path, _state(ground_truth), n_resamples=200)
    with open(report.table_csv, newline="") as handle:
        rows = {r["variant"]: r for r in csv.DictReader(handle) if r["final"] == "True"}
    better, base, broken = rows["better"], rows["base"], rows["broken"]
    # Means of 0, 0.2, 0.4 (+0.1): exact up to float round-off.
    assert float(base["r_precision_mean"]) == pytest.approx(0.2, abs=1e-12)
    assert float(better["r_precision_mean"]) == pytest.approx(0.3, abs=1e-12)
    # A paired shift of exactly 0.1 on every prompt: difference 0.1 with a zero-width interval,
    # although the prompts spread the means over 0.4 (round-off of 0.2 i + 0.1 - 0.2 i only).
    assert float(better["r_precision_diff_mean"]) == pytest.approx(0.1, abs=1e-12)
    assert float(better["r_precision_diff_high"]) - float(better["r_precision_diff_low"]) < 1e-12
    assert float(base["r_precision_high"]) - float(base["r_precision_low"]) > 0.1
    assert (broken["runs"], broken["failed"], broken["r_precision_mean"]) == ("0", "3", "")
    assert float(better["wall_s_diff_mean"]) == pytest.approx(1.0)

    table = report.table_md.read_text()
    header = next(line for line in table.splitlines() if line.startswith("| variant | stage |"))
    assert "R-precision" in header and "view acc" not in header  # never measured: no column
    assert ("silhouette IoU" in header) is ground_truth and ("Chamfer" in header) is ground_truth
    assert "- broken / a pink mug / seed 0: StageFailed: boom" in table
    data = json.loads(report.table_json.read_text())
    assert ("silhouette_iou" in data["quantities"]) is ground_truth and "janus_rate" not in data["quantities"]

    charts = sorted(p.stem for p in report.charts)
    assert charts == (["chamfer", "r_precision", "silhouette_iou", "wall_s"] if ground_truth else ["r_precision", "wall_s"])
    # No run has a picture here: each sheet still names every run, and says why it is empty.
    assert sorted(p.name for p in report.sheets) == ["a-blue-sphere.png", "a-pink-mug.png", "a-red-car.png"]
