"""The program's output has no library banners: its lines are magic3d's.

The output checked is the shared smoke run's (conftest ``smoke_cli``): a short CPU run of the
coarse recipe through the command line (tiny random prior, W&B offline as a user gets it, no
WANDB_* variable set). ``magic3d.cli.main`` calls ``quiet_libraries()`` first in every process
it runs: the command's own and the stage's (``python -m magic3d stage``), so the run shows
whether both are quiet.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import SmokeRun
from magic3d.quiet import finish_wandb, quiet_libraries, wandb_logger, wandb_run_line

# Opening words of each banner seen on today's main, and who prints it.
BANNERS = {
    "💡 Tip:": "Lightning's litlogger / litmodels advertisements",
    "TPU available: False": "Lightning, for hardware that is absent",
    "Tracking run with wandb version": "wandb",
    "W&B syncing is set to": "wandb",
    "Run data is saved locally in": "wandb",
    "wandb leet": "wandb",
    "Run history:": "wandb",
    "`accelerate` was not found": "diffusers",
}


@pytest.fixture(scope="module")
def quiet_run(smoke_cli: SmokeRun) -> list[str]:
    # This file once made a run of its own (2 steps, the same recipe and prior) with a
    # sitecustomize applying quiet_libraries(); cli.main now applies it in every process, so the
    # smoke run's output (6 steps: more lines, no fewer) is the one a user sees.
    assert (smoke_cli.folder / "coarse" / "wandb").is_dir(), "the run must log to W&B for this test to mean anything"
    return smoke_cli.output


@pytest.mark.parametrize("banner", BANNERS)
def test_no_library_banner(quiet_run: list[str], banner: str) -> None:
    assert not [line for line in quiet_run if banner in line], f"{BANNERS[banner]} printed it"


def test_the_first_lines_are_magic3d_ones(quiet_run: list[str]) -> None:
    assert quiet_run[0].startswith("[magic3d] ")
    stage_start = next(i for i, line in enumerate(quiet_run) if line.startswith("[magic3d] stage coarse: starting"))
    # Up to the first training step, the stage prints only magic3d's lines, Lightning's device
    # summary and the text encoder's loading bar (the allow-list below); any other line is new noise.
    allowed = ("[magic3d] ", "GPU available: ", "Loading weights:")
    for line in quiet_run[stage_start:]:
        if line.startswith(("Training:", "Epoch ")) or "Training: " in line:
            break
        assert line == "" or line.startswith(allowed), f"unexpected line before training: {line!r}"


def test_stage_output_once_stage_py_is_wired(quiet_run: list[str]) -> None:
    text = "\n".join(quiet_run)
    assert "`weights_only` was not set" not in text
    assert "tensorboardX" not in text
    assert "The anonymous setting has no effect" not in text
    assert "You can sync this run to the cloud" not in text and "Find logs at" not in text
    assert sum(line.startswith("GPU available: ") for line in quiet_run) == 1, "one Trainer per stage"
    assert any(line.startswith("[magic3d] W&B run (offline): ") for line in quiet_run)


def test_other_messages_of_the_same_loggers_still_show(caplog: pytest.LogCaptureFixture) -> None:
    quiet_libraries()
    quiet_libraries()  # idempotent
    lightning_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    diffusers_log = logging.getLogger("diffusers.models.modeling_utils")
    with caplog.at_level(logging.INFO):
        lightning_log.info("💡 Tip: try our cloud")
        lightning_log.info("TPU available: False, using: 0 TPU cores")
        lightning_log.info("GPU available: True (cuda), used: True")
        diffusers_log.warning("Cannot initialize model with low cpu memory usage because `accelerate` was not found")
        diffusers_log.warning("Some weights of the model checkpoint were not used")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: True (cuda), used: True",
                                                        "Some weights of the model checkpoint were not used"]
    assert len(lightning_log.filters) == 1
    with warnings.catch_warnings(record=True) as caught:  # no warning filter is touched
        warnings.simplefilter("default")
        quiet_libraries()
        warnings.warn("a real warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["a real warning"]


def test_wandb_run_line_says_where_the_run_is() -> None:
    offline = SimpleNamespace(offline=True, settings=SimpleNamespace(sync_dir="runs/x/coarse/wandb/offline-run-1"),
                              url=None)
    assert wandb_run_line(offline) == ("[magic3d] W&B run (offline): runs/x/coarse/wandb/offline-run-1; "
                                       "upload it with `wandb sync runs/x/coarse/wandb/offline-run-1`")
    online = SimpleNamespace(offline=False, url="https://wandb.ai/me/magic3d/runs/abc")
    assert wandb_run_line(online) == "[magic3d] W&B run: https://wandb.ai/me/magic3d/runs/abc"


def test_wandb_logger_does_not_pass_the_deprecated_anonymous_setting(tmp_path: Path) -> None:
    logger = wandb_logger(save_dir=str(tmp_path), project="magic3d", name="x", offline=True, log_model=False)
    assert "anonymous" not in logger._wandb_init
    assert logger._wandb_init["project"] == "magic3d" and logger._wandb_init["name"] == "x"
    assert logger._experiment is None  # no run started yet


def test_finish_wandb_without_a_run_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    finish_wandb()
    assert "wandb" not in sys.modules
