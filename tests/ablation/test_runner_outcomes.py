"""The runner's bookkeeping when runs fail or are stopped, without training anything: the
recipe runner is replaced by stubs that fail or stop the way a stage does."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from magic3d.ablation.runner import run_ablation
from magic3d.ablation.spec import AblationSpec, Variant
from magic3d.recipe import StageFailed, StageInterrupted


def _spec() -> AblationSpec:
    return AblationSpec(name="stubbed", variants=[Variant("a", "coarse_only"), Variant("b", "coarse_to_fine")],
                        baseline="b", prompts=["a red cube", "a blue sphere"], seeds=[0], profile="cpu")


def test_failing_runs_are_recorded_in_one_line_and_the_rest_go_on(tmp_path: Path, random_classifier: Path,
                                                                   capfd: pytest.CaptureFixture) -> None:
    calls = []

    def train(recipe, **kwargs):
        calls.append((recipe, kwargs["prompt"]))
        if recipe == "coarse_only":
            # What a failing stage leaves: its own error in the run's output, then the runner's verdict.
            # (os.write: a stage process writes to the file descriptor; pytest swaps sys.stdout.)
            os.write(1, b"Traceback (most recent call last):\n  ...\nValueError: the blob is\n   not finite\n")
            raise StageFailed("coarse", Path(kwargs["run_dir"]) / "coarse", 1, kept=False)
        raise RuntimeError("a bug\nspread over lines")

    outcome = run_ablation(_spec(), root=tmp_path, classifier=random_classifier, device="cpu", train=train,
                           n_resamples=100)
    assert calls == [("coarse_only", "a red cube"), ("coarse_to_fine", "a red cube"),
                     ("coarse_only", "a blue sphere"), ("coarse_to_fine", "a blue sphere")]
    assert outcome.exit_code == 1 and outcome.interrupted is None and len(outcome.failed) == 4
    state = json.loads((tmp_path / "stubbed" / "ablation.json").read_text())
    errors = {(r["variant"], r["prompt"]): r["error"] for r in state["runs"]}
    assert all(r["status"] == "failed" and "\n" not in r["error"] for r in state["runs"])
    # The stage's own last error line is quoted, with the log to read for the rest.
    assert errors[("a", "a red cube")].startswith("Stage 'coarse' failed before its first checkpoint")
    assert "ValueError: the blob is" in errors[("a", "a red cube")]
    assert errors[("a", "a red cube")].endswith("(log: runs/a/a-red-cube-seed0.log)")
    assert errors[("b", "a red cube")] == "RuntimeError: a bug spread over lines"
    table = (tmp_path / "stubbed" / "table.md").read_text()
    assert "## Failed runs" in table and "- b / a blue sphere / seed 0: RuntimeError: a bug spread over lines" in table
    assert "| a | – | 0 | 2 |" in table  # no run evaluated, both failed
    assert "failed: RuntimeError" in capfd.readouterr().err  # each failure is named on the terminal too

    # A failed run is tried again by the next call, in its recorded folder.
    retried = []
    run_ablation(_spec(), root=tmp_path, classifier=random_classifier, device="cpu", n_resamples=100,
                 train=lambda recipe, **kw: (retried.append(kw["run_dir"]), train(recipe, **kw))[1])
    assert [Path(p).relative_to(tmp_path / "stubbed").as_posix() for p in retried] == [
        "runs/a/a-red-cube-seed0", "runs/b/a-red-cube-seed0", "runs/a/a-blue-sphere-seed0",
        "runs/b/a-blue-sphere-seed0"]


def test_a_stopped_stage_stops_the_ablation_and_keeps_the_run_for_later(tmp_path: Path,
                                                                          random_classifier: Path) -> None:
    calls = []

    def train(recipe, **kwargs):
        calls.append(kwargs["run_dir"])
        raise StageInterrupted("coarse", Path(kwargs["run_dir"]) / "coarse", "SIGTERM")

    outcome = run_ablation(_spec(), root=tmp_path, classifier=random_classifier, device="cpu", train=train,
                           n_resamples=100)
    assert len(calls) == 1, "nothing runs after a stop"
    assert outcome.interrupted == "SIGTERM" and outcome.exit_code == 143
    runs = json.loads((tmp_path / "stubbed" / "ablation.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["interrupted", "pending", "pending", "pending"]
    assert runs[0]["run_dir"] == "runs/a/a-red-cube-seed0" and runs[0]["error"] is None
    assert (tmp_path / "stubbed" / "table.md").is_file()  # the report of what is done is written anyway
