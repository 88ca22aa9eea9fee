"""Running an ablation: every variant x prompt x seed through the recipe runner, each run
evaluated as soon as it finishes, resumable at any point.

Folder ``runs/ablations/<name>/``:
  ablation.json                   the spec and one record per run (:mod:`magic3d.ablation.state`)
  runs/<variant>/<prompt>-seed<N>/   each run's folder (``make run=`` works on it too)
  runs/<variant>/<prompt>-seed<N>.log  its output (stages, evaluation), appended per attempt
  table.md table.csv table.json charts/ sheets/   the report (:mod:`magic3d.ablation.report`)

A run's folder is recorded before it starts, so an interrupted ablation continues each run
from its own folder (the recipe runner resumes the unfinished stage from its last checkpoint
and skips finished ones). Runs go prompt by prompt, every variant of a prompt together, so
the paired comparisons fill in while the ablation is still running.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tqdm.auto import tqdm

from magic3d.ablation.measure import gpus_used, measure_run
from magic3d.ablation.spec import AblationSpec, check_spec
from magic3d.ablation.state import AblationState, RunRecord, merge_state
from magic3d.ablation.stats import DEFAULT_RESAMPLES
from magic3d.ablation.table import count
from magic3d.config import ConfigError
from magic3d.eval.classifier import DEFAULT_FOLDER
from magic3d.recipe import StageFailed, StageInterrupted, run_recipe, slugify

DEFAULT_ROOT = Path("runs/ablations")
ERROR_CHARS = 400  # an error is one line of at most this many characters in table.md and ablation.json

# Same call as magic3d.recipe.run_recipe: (recipe, prompt=, seed=, overrides=, run_dir=, profile=) -> run folder.
Train = Callable[..., Path]


class AblationStopped(Exception):
    """SIGINT / SIGTERM while the ablation itself (not a stage) was working, e.g. evaluating."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


@dataclass
class AblationOutcome:
    folder: Path
    state: AblationState
    interrupted: str | None  # the signal that stopped it, if one did
    report_path: Path | None

    @property
    def failed(self) -> list[RunRecord]:
        return [r for r in self.state.selected(self.state.spec) if r.status == "failed"]

    @property
    def exit_code(self) -> int:
        if self.interrupted is not None:
            return 128 + signal.Signals[self.interrupted].value
        return 1 if self.failed else 0


def ablation_folder(root: Path, name: str) -> Path:
    return Path(root) / name


def stored_spec(root: Path) -> Callable[[str], AblationSpec | None]:
    """For :func:`magic3d.ablation.spec.resolve_spec`: the spec a stored ablation was run with."""
    def lookup(name: str) -> AblationSpec | None:
        state = AblationState.load(ablation_folder(root, name))
        return None if state is None else state.spec
    return lookup


def run_folder_name(record: RunRecord) -> str:
    return f"runs/{record.variant}/{slugify(record.prompt)}-seed{record.seed}"


def one_line(text: str) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= ERROR_CHARS else line[: ERROR_CHARS - 1] + "…"


def log_cause(log: Path) -> str | None:
    """The last line of a run's log that names an error (what the failing stage printed)."""
    if not log.is_file():
        return None
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines[-200:]):
        if "error" in line.lower() and not line.startswith("[magic3d] error: Stage"):
            return line
    return None


@contextmanager
def output_to(log: Path) -> Iterator[None]:
    """Send this process's stdout/stderr, and so the stage processes', to ``log`` (appended),
    so the terminal keeps one progress bar over the whole ablation."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n")
        handle.flush()
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`AblationStopped` between stages (while a stage runs, the
    recipe runner forwards them to it instead), so the state is saved before leaving."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise AblationStopped(signal.Signals(signum).name)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def _open_terminal() -> IO[str]:
    """A stream on the stderr the ablation started with (kept while runs' output goes to logs)."""
    return os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")


def run_ablation(
    spec: AblationSpec,
    root: Path = DEFAULT_ROOT,
    classifier: str | Path = DEFAULT_FOLDER,
    device: str = "auto",
    train: Train = run_recipe,
    n_resamples: int = DEFAULT_RESAMPLES,
) -> AblationOutcome:
    """Run (or continue) every run of ``spec`` not yet done, evaluate each, write the report.

    Everything that can be checked is checked before the first run starts: the spec against
    the stored ablation of the same name, every variant's recipe and overrides, the evaluator.
    A failing run is recorded (``failed``, its error in one line) and the others go on; Ctrl-C
    or SIGTERM stops the current run at a step boundary, records it ``interrupted`` and writes
    the report of what is done (the next call continues it).
    """
    from magic3d.devices import resolve_device
    from magic3d.eval.classifier import load_classifier

    folder = ablation_folder(root, spec.name)
    state = merge_state(AblationState.load(folder), spec)
    check_spec(state.spec)
    if not Path(classifier).is_dir():
        raise ConfigError(f"Evaluator not found: {classifier} (the embedded one is priors/evaluator; "
                          "`make priors` retrains it, or pass --classifier FOLDER).")
    dev = resolve_device(device)
    model = load_classifier(classifier, dev)
    state.save(folder)

    selected = state.selected(spec)
    todo = [r for r in selected if r.status != "done"]
    terminal = _open_terminal()
    interrupted: str | None = None
    print(f"[magic3d] ablation {spec.name}: {len(selected)} runs ({count(len(spec.variants), 'variant')} x "
          f"{count(len(spec.prompts), 'prompt')} x {count(len(spec.seeds), 'seed')}), {len(selected) - len(todo)} done; "
          f"folder {folder}, each run's output in its .log", file=terminal, flush=True)
    bar = tqdm(total=len(selected), initial=len(selected) - len(todo), desc=f"ablation {spec.name}",
               unit="run", file=terminal, dynamic_ncols=True)
    try:
        with stop_on_signals():
            for record in todo:
                bar.set_postfix_str(f"{record.variant} | {record.prompt} | seed {record.seed}")
                interrupted = _run_one(record, state, folder, train, model, dev)
                if record.status == "failed":
                    bar.write(f"[magic3d] {record.variant} / {record.prompt} / seed {record.seed} failed: "
                              f"{record.error}", file=terminal)
                if interrupted is not None:
                    break
                bar.update(1)
    except AblationStopped as stop:  # between two runs
        interrupted = stop.signal_name
    finally:
        bar.close()
        state.save(folder)

    from magic3d.ablation.report import write_report

    report = write_report(folder, state, n_resamples=n_resamples)
    done = sum(r.status == "done" for r in selected)
    failed = sum(r.status == "failed" for r in selected)
    end = f"interrupted ({interrupted}); run the same command again to continue" if interrupted else "finished"
    print(f"[magic3d] ablation {spec.name} {end}: {done} of {len(selected)} runs done, {failed} failed; "
          f"table {report.table_md}", file=terminal, flush=True)
    terminal.close()
    return AblationOutcome(folder, state, interrupted, report.table_md)


def _run_one(record: RunRecord, state: AblationState, folder: Path, train: Train, classifier, device) -> str | None:
    """Train (or continue) and evaluate one run, recording each step; returns the name of the
    signal that interrupted it, else None."""
    spec = state.spec
    variant = spec.variant(record.variant)
    if record.run_dir is None:
        record.run_dir = run_folder_name(record)
    run_dir = folder / record.run_dir
    log = run_dir.with_name(run_dir.name + ".log")
    if record.status != "trained":
        record.status, record.error = "running", None
        state.save(folder)  # the run folder is on record before anything is written into it
        overrides = [*spec.overrides, *variant.overrides,
                     f"run.wandb_group={json.dumps(spec.name)}", f"run.wandb_job_type={json.dumps(variant.name)}"]
        started = time.time()
        try:
            with output_to(log):
                train(variant.recipe, prompt=record.prompt, seed=record.seed, overrides=overrides,
                      run_dir=run_dir, profile=spec.profile)
        except (StageInterrupted, KeyboardInterrupt, AblationStopped) as err:
            _add_time(record, run_dir, time.time() - started)
            record.status, record.error = "interrupted", None
            state.save(folder)
            if isinstance(err, StageInterrupted):
                return signal.Signals(err.code - 128).name
            return err.signal_name if isinstance(err, AblationStopped) else "SIGINT"
        except StageFailed as err:
            _add_time(record, run_dir, time.time() - started)
            cause = log_cause(log)
            headline = str(err).split(". ", 1)[0]
            record.status = "failed"
            record.error = one_line(f"{headline}: {cause}" if cause else headline) + f" (log: {log.relative_to(folder)})"
            state.save(folder)
            return None
        except Exception as err:  # a run's problem (bad config for this prompt, a bug) must not stop the others
            _add_time(record, run_dir, time.time() - started)
            record.status, record.error = "failed", one_line(f"{type(err).__name__}: {err}")
            state.save(folder)
            return None
        _add_time(record, run_dir, time.time() - started)
        record.status = "trained"
        state.save(folder)
    try:
        with output_to(log):
            measured = measure_run(run_dir, classifier, spec.eval_options, device)
    except (KeyboardInterrupt, AblationStopped) as err:
        state.save(folder)
        return err.signal_name if isinstance(err, AblationStopped) else "SIGINT"
    except Exception as err:
        record.status, record.error = "failed", one_line(f"evaluation failed: {type(err).__name__}: {err}")
        state.save(folder)
        return None
    record.metrics = measured.metrics
    record.final_stage = measured.final_stage
    record.views = None if measured.views is None else str(measured.views.relative_to(folder))
    record.ground_truth = None if measured.ground_truth is None else str(measured.ground_truth.relative_to(folder))
    record.status, record.error = "done", None
    state.save(folder)
    return None


def _add_time(record: RunRecord, run_dir: Path, seconds: float) -> None:
    record.wall_s = round(record.wall_s + seconds, 2)
    record.gpu_minutes = round(record.gpu_minutes + seconds / 60 * gpus_used(run_dir), 4)
