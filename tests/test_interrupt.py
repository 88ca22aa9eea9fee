"""SIGINT or SIGTERM, to the run's parent process or to the stage itself, stops the stage at the
next step boundary with its checkpoint saved (``run_child`` + ``StopOnInterrupt``).

A parent script runs, through :func:`magic3d.child_process.run_child`, a child script that fits a
toy LightningModule on the CPU with :class:`StopOnInterrupt`, whose save function writes the step
to a marker file. From step 3 on, each step waits for a ``release`` file that the test creates
once the stage has said it got the signal: so the signal always lands inside step 3, and the
checkpoint must be at step 4, the boundary right after it. The fit has a million steps, so a
stage that ignored the signal would run far past the test's timeout.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from magic3d.child_process import run_child

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 90  # seconds for anything to show up; a CPU Lightning start takes a few

CHILD = textwrap.dedent("""
    import json, os, sys, time, warnings
    from pathlib import Path

    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger

    from magic3d.interrupt import StopOnInterrupt

    warnings.filterwarnings("ignore")  # Lightning's advice about dataloader workers etc.
    out = Path(sys.argv[1])

    class Toy(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            print(f"STEP {self.global_step}", flush=True)
            while self.global_step >= 3 and not (out / "release").exists():
                time.sleep(0.01)  # a signal handler runs here, between sleeps
            return self.layer(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class Forever(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                yield torch.randn(2)

    def save(trainer):
        (out / "saved.json").write_text(json.dumps({"step": trainer.global_step}))

    stop = StopOnInterrupt(save)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=10**6, logger=CSVLogger(out), callbacks=[stop],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    print(f"CHILD PID {os.getpid()}", flush=True)
    trainer.fit(Toy(), train_dataloaders=torch.utils.data.DataLoader(Forever(), batch_size=4))
    if stop.received is not None:
        print(f"STOPPED AT {stop.stopped_at}", flush=True)
        sys.exit(128 + stop.received)
    (out / "finished").touch()
""")

PARENT = textwrap.dedent("""
    import json, signal, sys
    from pathlib import Path

    from magic3d.child_process import run_child

    out = Path(sys.argv[1])
    result = run_child([sys.executable, str(out / "child.py"), str(out)])
    restored = (signal.getsignal(signal.SIGINT) is signal.default_int_handler
                and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
    (out / "result.json").write_text(json.dumps({"returncode": result.returncode,
                                                 "signal_name": result.signal_name, "restored": restored}))
""")


class Run:
    """The parent process, its merged output read line by line in the background."""

    def __init__(self, out: Path) -> None:
        (out / "child.py").write_text(CHILD)
        (out / "parent.py").write_text(PARENT)
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PYTHONUNBUFFERED="1")
        self.out = out
        self.process = subprocess.Popen([sys.executable, str(out / "parent.py"), str(out)], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True)  # our own test process group stays out of it
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.child_pid: int | None = None

    def _read(self) -> None:
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, text: str) -> str:
        deadline = time.time() + TIMEOUT
        while time.time() < deadline:
            try:
                line = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if line.startswith("CHILD PID "):
                self.child_pid = int(line.split()[-1])
            if text in line:
                return line
        raise AssertionError(f"no line with {text!r}; output:\n" + "\n".join(self.lines))

    def finish(self) -> dict:
        self.process.wait(timeout=TIMEOUT)
        while (line := self._queue.get(timeout=TIMEOUT)) is not None:
            self.lines.append(line)
        return json.loads((self.out / "result.json").read_text())

    def kill(self) -> None:
        for group in (self.process.pid, self.child_pid):
            if group is not None:
                try:
                    os.killpg(group, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


@pytest.fixture
def run(tmp_path: Path):
    started = Run(tmp_path)
    yield started
    started.kill()  # whatever happened, nothing keeps running


def _stop_once(run: Run, signum: signal.Signals, target: str) -> dict:
    run.wait_for("STEP 3")
    os.kill(run.process.pid if target == "parent" else run.child_pid, signum)
    run.wait_for(f"{signum.name} received: stopping after this step and saving a checkpoint")
    (run.out / "release").touch()
    return run.finish()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_signal_to_the_parent_stops_the_stage_at_the_next_step(run: Run, signum: signal.Signals) -> None:
    result = _stop_once(run, signum, "parent")
    assert result == {"returncode": 128 + signum, "signal_name": signum.name, "restored": True}
    assert json.loads((run.out / "saved.json").read_text()) == {"step": 4}  # the boundary after step 3
    assert "STOPPED AT 4" in run.lines
    assert not (run.out / "finished").exists()
    assert sum(f"{signum.name} received" in line for line in run.lines) == 1, "the stage got the signal once"


def test_sigterm_to_the_stage_itself_stops_it_at_the_next_step(run: Run) -> None:
    result = _stop_once(run, signal.SIGTERM, "child")
    assert result == {"returncode": 128 + signal.SIGTERM, "signal_name": None, "restored": True}
    assert json.loads((run.out / "saved.json").read_text()) == {"step": 4}
    assert not (run.out / "finished").exists()


def test_a_second_signal_quits_at_once_without_a_checkpoint(run: Run) -> None:
    run.wait_for("STEP 3")
    os.kill(run.process.pid, signal.SIGTERM)
    run.wait_for("SIGTERM received")
    os.kill(run.process.pid, signal.SIGINT)
    run.wait_for("SIGINT, a second stop signal: quitting now, without a checkpoint")
    result = run.finish()  # no release: the stage quits inside step 3
    assert result["signal_name"] == "SIGTERM" and result["returncode"] != 0 and result["restored"]
    assert not (run.out / "saved.json").exists() and not (run.out / "finished").exists()


def test_the_child_does_not_outlive_a_parent_that_fails(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    child = [sys.executable, "-c",
             f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"]
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGTSTP)}

    def fail(signum, frame):
        if pid_file.exists() and pid_file.read_text():
            raise RuntimeError("the parent fails")

    previous_alarm = signal.signal(signal.SIGALRM, fail)
    signal.setitimer(signal.ITIMER_REAL, 0.2, 0.2)
    try:
        with pytest.raises(RuntimeError, match="the parent fails"):
            run_child(child)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_alarm)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)  # killed and reaped
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("finished_stages, expected", [
    (0, "stage 'coarse' stopped at a step boundary"),
    (1, "arrived after stage 'coarse' had finished (nothing of it is lost); the later stages did not start"),
    (2, "arrived after the last stage 'fine' had finished: the run in"),
])
def test_a_signal_after_the_stage_finished_is_not_called_a_stop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                finished_stages: int, expected: str) -> None:
    """A signal that lands while a stage closes its files, after DONE.json, must not send the
    user to a last.ckpt "kept" for a stage that is in fact done (seen on the GPU under `timeout`)."""
    import magic3d.recipe as recipe
    from magic3d.child_process import ChildResult

    calls = []

    def stage_signalled_at_the_end(cmd: list[str], env=None) -> ChildResult:
        stage_dir = Path(cmd[cmd.index("--stage-dir") + 1])
        calls.append(stage_dir.name)
        if len(calls) <= finished_stages:
            (stage_dir / "DONE.json").write_text("{}")
        return ChildResult(0, None) if len(calls) < finished_stages else ChildResult(143, "SIGTERM")

    monkeypatch.setattr(recipe, "run_child", stage_signalled_at_the_end)
    with pytest.raises(recipe.StageInterrupted, match=expected.replace("(", r"\(").replace(")", r"\)")) as err:
        recipe.run_recipe("coarse_to_fine", prompt="a red cube", run_dir=tmp_path / "run", profile="cpu")
    assert err.value.code == 128 + signal.SIGTERM
