"""Ctrl-C ends a stage at the next step boundary, with a checkpoint of that consistent state.

Lightning's own Ctrl-C handling tears the trainer down and exits the process from inside
``fit`` (no checkpoint): a user would lose every step since the last periodic checkpoint. This
callback takes SIGINT over while ``fit`` runs: the first Ctrl-C only sets a flag, the current
step finishes, ``last.ckpt`` is written and training stops; a second Ctrl-C gives up waiting
(Lightning's handling, no checkpoint). Under DDP the ranks agree on stopping first, so every
rank saves at the same step (the checkpoint is collective).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback


class StopOnInterrupt(Callback):
    def __init__(self, checkpoint_path: Path) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.requested = False
        self._previous: Any = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        if self.requested:
            self._restore()
            raise KeyboardInterrupt
        self.requested = True
        print("\n[magic3d] Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to quit now)",
              flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stop = self.requested
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        trainer.save_checkpoint(self.checkpoint_path)
        for logger in trainer.loggers:
            logger.save()  # the CSV logger buffers rows between flushes
        trainer.should_stop = True

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()
