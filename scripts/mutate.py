"""Mutation testing of magic3d's core: ``make mutate`` (a developer command, not part of CI).

For each curated mutant in ``scripts/mutants.py`` (one exact one-line source replacement), run
the fast test files that cover its module against a mutated *copy* of ``src/`` and record
whether a test failed (killed) or everything passed (survived). Writes a markdown table to
``mutation_report.md`` (gitignored) and prints a summary line.

Safety: the working tree is never written. Each worker owns a temporary copy of ``src/``
(``PYTHONPATH`` points the tests at it; no bytecode is written, so a mutated file is always
recompiled); a mutant is applied to that copy and undone after its run. Ctrl-C (or SIGTERM)
stops the test processes this tool started, by their process-group id, and deletes the
copies.

Before any mutant, every covering test group must pass on the unmutated copy (else a "kill"
would mean nothing), and the copy must be what the tests import.

Usage: python scripts/mutate.py [--jobs N] [--only REGEX] [--report PATH] [--list] [--fail-under PCT]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path("src") / "magic3d"
PYTEST_ARGS = ("-x", "-q", "-p", "no:cacheprovider", "-m", "not gpu and not slow", "-rfE", "--no-header",
               "-W", "ignore")


class MutantError(ValueError):
    """A mutant that cannot be applied as written (the tool stops before running anything)."""


@dataclass(frozen=True)
class Mutant:
    index: int
    module: str  # path under src/magic3d
    old: str
    new: str
    bug: str
    tests: tuple[str, ...]


@dataclass
class Outcome:
    mutant: Mutant
    killed: bool
    by: str  # the first failing test, "timeout", "collection error", or "" for a survivor
    seconds: float


def load_mutants(path: Path) -> list[Mutant]:
    spec = importlib.util.spec_from_file_location("magic3d_mutants", path)
    data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(data)
    mutants, problems = [], []
    for i, entry in enumerate(data.MUTANTS):
        module, old, new, bug, *rest = entry
        tests = tuple(rest[0]) if rest else tuple(data.COVERING_TESTS.get(module, ()))
        where = f"mutant {i} ({module}: {old!r})"
        file = ROOT / PACKAGE / module
        if not file.is_file():
            problems.append(f"{where}: no file {file.relative_to(ROOT)}")
            continue
        count = file.read_text(encoding="utf-8").count(old)
        if count != 1:
            problems.append(f"{where}: the old text occurs {count} times in {module}, must be exactly once")
        if "\n" in old or "\n" in new:
            problems.append(f"{where}: a mutant is a one-line replacement (no newlines)")
        if old == new:
            problems.append(f"{where}: new text equals old text")
        if not tests:
            problems.append(f"{where}: no covering tests (add the module to COVERING_TESTS)")
        for test in tests:
            if not (ROOT / test.split("::")[0]).is_file():
                problems.append(f"{where}: test file {test} does not exist")
        mutants.append(Mutant(i, module, old, new, bug, tests))
    if problems:
        raise MutantError("\n".join(problems))
    return mutants


class Worker:
    """A private copy of src/ and the pytest processes run against it (one at a time)."""

    def __init__(self, root: Path, threads: int) -> None:
        self.root = root
        shutil.copytree(ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        self.env = dict(os.environ)
        self.env.update({
            "PYTHONPATH": str(root / "src"), "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false",
        })
        self.process: subprocess.Popen | None = None
        self.lock = threading.Lock()
        self.stopped = False

    def check_import(self) -> None:
        out = subprocess.run([sys.executable, "-c", "import magic3d; print(magic3d.__file__)"], cwd=ROOT,
                             env=self.env, capture_output=True, text=True, timeout=120)
        where = Path(out.stdout.strip() or "?").resolve()
        if self.root.resolve() not in where.parents:
            raise RuntimeError(f"the tests would import magic3d from {where}, not from the copy in {self.root}: "
                               f"{out.stderr[-500:]}")

    def run_tests(self, tests: tuple[str, ...], timeout: float) -> tuple[int | None, str, float]:
        """(pytest exit code or None on timeout, its output, seconds)."""
        basetemp = self.root / "pytest-tmp"
        command = [sys.executable, "-m", "pytest", *PYTEST_ARGS, f"--basetemp={basetemp}", *tests]
        start = time.monotonic()
        with self.lock:
            if self.stopped:
                raise KeyboardInterrupt
            # Its own process group, so the tool alone decides when it (and its children) stop.
            self.process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = self.process.communicate(timeout=timeout)
            code: int | None = self.process.returncode
        except subprocess.TimeoutExpired:
            self.kill()
            output, _ = self.process.communicate()
            code = None
        finally:
            with self.lock:
                self.process = None
        if self.stopped:
            raise KeyboardInterrupt
        return code, output, time.monotonic() - start

    def kill(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the group this worker started
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            self.kill()

    def apply(self, mutant: Mutant) -> tuple[Path, str]:
        file = self.root / PACKAGE / mutant.module
        original = file.read_text(encoding="utf-8")
        file.write_text(original.replace(mutant.old, mutant.new, 1), encoding="utf-8")
        return file, original


_FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)


def first_failure(code: int | None, output: str) -> str:
    if code is None:
        return "timeout"
    match = _FAILED.search(output)
    if match:
        return match.group(1)
    return "collection error" if code == 2 else f"pytest exit {code}"


def run_mutant(worker: Worker, mutant: Mutant, timeout: float) -> Outcome:
    file, original = worker.apply(mutant)
    try:
        code, output, seconds = worker.run_tests(mutant.tests, timeout)
    finally:
        file.write_text(original, encoding="utf-8")
    if code not in (None, 0, 1, 2):
        raise RuntimeError(f"pytest could not run mutant {mutant.index} (exit {code}):\n{output[-2000:]}")
    return Outcome(mutant, killed=code != 0, by="" if code == 0 else first_failure(code, output), seconds=seconds)


def escape(text: str) -> str:
    return text.replace("|", "\\|")


def write_report(path: Path, outcomes: list[Outcome], summary: str) -> None:
    lines = ["# Mutation testing of the core", "", summary, "",
             "Generated by `make mutate` (`scripts/mutate.py`, mutants in `scripts/mutants.py`).", "",
             "| # | module | mutant | result | killed by |", "|---|---|---|---|---|"]
    for o in sorted(outcomes, key=lambda o: o.mutant.index):
        m = o.mutant
        change = f"{escape(m.bug)}: `{escape(m.old)}` → `{escape(m.new)}`"
        result = "killed" if o.killed else "**survived**"
        lines.append(f"| {m.index} | {m.module} | {change} | {result} | {escape(o.by) or '—'} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def progress(total: int):
    try:
        from tqdm import tqdm

        return tqdm(total=total, unit="mutant", dynamic_ncols=True, file=sys.stderr)
    except ImportError:  # a plain counter
        class Counter:
            n = 0

            def update(self, k: int = 1) -> None:
                self.n += k
                print(f"[{self.n}/{total}]", file=sys.stderr, flush=True)

            def set_postfix_str(self, text: str) -> None:
                pass

            def close(self) -> None:
                pass

        return Counter()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel workers (default 2)")
    parser.add_argument("--only", default=None, help="run the mutants whose 'module: bug' matches this regex")
    parser.add_argument("--report", type=Path, default=ROOT / "mutation_report.md")
    parser.add_argument("--mutants", type=Path, default=ROOT / "scripts" / "mutants.py")
    parser.add_argument("--list", action="store_true", help="check and list the mutants, run nothing")
    parser.add_argument("--fail-under", type=float, default=0.0, help="exit 1 when fewer than this %% are killed")
    args = parser.parse_args(argv)

    try:
        mutants = load_mutants(args.mutants)
    except MutantError as err:
        print(f"mutate: mutants that cannot be applied:\n{err}", file=sys.stderr)
        return 2
    if args.only:
        mutants = [m for m in mutants if re.search(args.only, f"{m.module}: {m.bug}")]
    if args.list:
        for m in mutants:
            print(f"{m.index:3d} {m.module:22s} {m.bug}  [{', '.join(m.tests)}]")
        print(f"{len(mutants)} mutants, all applicable")
        return 0
    if not mutants:
        print("mutate: no mutant matches", file=sys.stderr)
        return 2

    jobs = max(1, min(args.jobs, len(mutants)))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    scratch = Path(tempfile.mkdtemp(prefix="magic3d-mutate-"))
    workers: list[Worker] = []
    started = time.monotonic()

    def on_sigterm(signum, frame):  # noqa: ARG001 - clean up as for Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    outcomes: list[Outcome] = []
    bar = None
    try:
        workers = [Worker(scratch / f"worker{i}", threads) for i in range(jobs)]
        for worker in workers:
            worker.check_import()
        idle: list[Worker] = list(workers)
        idle_lock = threading.Lock()

        def with_worker(fn, *a):
            with idle_lock:
                worker = idle.pop()
            try:
                return fn(worker, *a)
            finally:
                with idle_lock:
                    idle.append(worker)

        def parallel(calls):
            """Run (fn, *args) calls on the workers; yields (call, result) as they finish. On any
            exception (Ctrl-C included) the running tests are killed before the threads are joined."""
            pool = ThreadPoolExecutor(jobs)
            try:
                futures = {pool.submit(with_worker, *call): call for call in calls}
                for future in as_completed(futures):
                    yield futures[future], future.result()
            except BaseException:
                for worker in workers:
                    worker.stop()
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)

        groups = sorted({m.tests for m in mutants})
        print(f"mutate: {len(mutants)} mutants, {len(groups)} test groups, {jobs} workers; baseline first",
              file=sys.stderr, flush=True)
        baseline: dict[tuple[str, ...], float] = {}
        for (_, group, _), (code, output, seconds) in parallel([(Worker.run_tests, g, 1200) for g in groups]):
            if code != 0:
                raise RuntimeError(f"the unmutated tests fail ({' '.join(group)}); fix them first:\n{output[-3000:]}")
            baseline[group] = seconds

        # Longest groups first packs the workers best; the report keeps the list order.
        order = sorted(mutants, key=lambda m: -baseline[m.tests])
        bar = progress(len(order))
        # A mutant may slow its tests down (or loop): 3x the clean run plus a start-up margin.
        for _, outcome in parallel([(run_mutant, m, 3 * baseline[m.tests] + 30) for m in order]):
            outcomes.append(outcome)
            bar.update(1)
            bar.set_postfix_str(f"{sum(o.killed for o in outcomes)} killed, "
                                f"{sum(not o.killed for o in outcomes)} survived")
    except KeyboardInterrupt:
        print("\nmutate: interrupted; the working tree was never touched", file=sys.stderr)
        return 130
    except RuntimeError as err:
        print(f"mutate: {err}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
        for worker in workers:
            worker.stop()
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(scratch, ignore_errors=True)

    killed = sum(o.killed for o in outcomes)
    score = 100.0 * killed / len(outcomes)
    minutes = (time.monotonic() - started) / 60.0
    summary = (f"**{killed} of {len(outcomes)} mutants killed ({score:.1f} %)**, "
               f"{len(outcomes) - killed} survived; {minutes:.1f} min with {jobs} workers "
               f"on {os.cpu_count()} CPU cores (baseline included).")
    write_report(args.report, outcomes, summary)
    for o in sorted(outcomes, key=lambda o: o.mutant.index):
        if not o.killed:
            print(f"survived: #{o.mutant.index} {o.mutant.module}: {o.mutant.bug}")
    print(summary.replace("**", "") + f" Report: {args.report}")
    return 1 if score < args.fail_under else 0


if __name__ == "__main__":
    sys.exit(main())
