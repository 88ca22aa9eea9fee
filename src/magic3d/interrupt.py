"""Ctrl-C or SIGTERM ends a stage at the next step boundary, with a checkpoint of that consistent state.

Lightning's own handling loses work: on Ctrl-C it tears the trainer down and exits the process
from inside ``fit``; on SIGTERM (what ``timeout`` and job schedulers send) it kills the DDP
workers and exits at the next batch. Neither saves a checkpoint, so a user would lose every step
since the last periodic one. This callback takes SIGINT and SIGTERM over while training runs,
both handled alike:

- the first one only sets a flag and says which signal arrived; the current step finishes, then
  ``save_checkpoint(trainer)`` writes the checkpoint, the loggers are flushed and training stops
  (the stage then exits, see :attr:`StopOnInterrupt.received`);
- a second one gives up waiting: ``KeyboardInterrupt``, i.e. Lightning's shutdown, no checkpoint.

Under DDP the ranks agree on stopping first (any rank that got the signal counts), so every rank
saves at the same step: ``save_checkpoint`` is called on every rank, as ``Trainer.save_checkpoint``
is collective.

The handlers are installed in ``on_train_start``, after Lightning has installed its own SIGTERM
handler (which it does after ``on_fit_start``), and put back in ``on_train_end``, before
Lightning restores the handlers it found. A signal before the first step (while models load)
still gets Lightning's handling: there is no progress to save yet.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import lightning
from lightning.pytorch.callbacks import Callback

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnInterrupt(Callback):
    def __init__(self, save_checkpoint: Callable[[lightning.Trainer], None]) -> None:
        self.save_checkpoint = save_checkpoint
        self.received: signal.Signals | None = None
        """The first stop signal this process received; the stage exits with ``128 + received``."""
        self.stopped_at: int | None = None
        """The step at which training stopped on a signal (on every rank, also one that got none)."""
        self._previous: dict[signal.Signals, Any] = {}
        self._rank = ""

    @property
    def requested(self) -> bool:
        return self.received is not None

    def on_train_start(self, trainer, pl_module) -> None:
        self._rank = f" (rank {trainer.global_rank})" if trainer.world_size > 1 else ""
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            _say(f"[magic3d] {name}, a second stop signal{self._rank}: quitting now, without a checkpoint")
            self._restore()
            raise KeyboardInterrupt
        self.received = signal.Signals(signum)
        _say(f"\n[magic3d] {name} received{self._rank}: stopping after this step and saving a checkpoint "
             f"({name} or Ctrl-C again to quit now)")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        self.save_checkpoint(trainer)
        for logger in trainer.loggers:
            logger.save()  # the CSV logger buffers rows between flushes
        trainer.should_stop = True
        self.stopped_at = trainer.global_step

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            if signal.getsignal(signum) == self._on_signal:  # not if someone has replaced ours since
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()


def _say(message: str) -> None:
    """Print from a signal handler: one unbuffered write, because the handler may run in the middle
    of a buffered ``print`` (e.g. the progress bar's), and re-entering that buffer raises."""
    try:
        os.write(sys.stderr.fileno(), (message + "\n").encode(errors="replace"))
    except (AttributeError, OSError, ValueError):  # stderr without a file descriptor (notebooks)
        print(message, file=sys.stderr, flush=True)
