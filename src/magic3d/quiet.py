"""Library banners off, so that a stage's first lines are magic3d's.

:func:`quiet_libraries` silences, at their source, lines that libraries print on every run and
that tell a magic3d user nothing: advertisements, version banners, notices about optional
packages. Each entry below names the line, who prints it and why hiding it loses nothing. Only
these exact messages are matched (by their opening words, on the logger that emits them), so every
other warning or error from the same libraries still shows; environment variables are only
defaults, a value the user set wins.

Call it first thing in each process (``magic3d.cli.main``; a stage is its own process): logger
filters and environment defaults set before the libraries are imported apply when they are.

Two more W&B lines go with the helpers below, which the stage uses: :func:`wandb_logger` (no
"anonymous" warning) and :func:`finish_wandb` (a run left open at exit gets its footer printed by
wandb's service process, which ignores ``WANDB_QUIET``).

Not silenced here, because the fix belongs where the line is caused:

- "`weights_only` was not set, defaulting to `False`" is Lightning's ``Trainer.save_checkpoint``
  (``checkpoint_connector.dump_checkpoint``) asked to save without saying whether to drop the
  optimizer state: pass ``weights_only=False`` (the full state, which resume needs). It is not
  about ``torch.load``, which magic3d always calls with ``weights_only=True``.
- Lightning's notice that `tensorboardX` is not installed comes from a Trainer built with the
  default ``logger=True``: a stage's real Trainer gets magic3d's loggers; only a throwaway one
  (a config parser instantiating the ``trainer`` group) says it.
- wandb's "The anonymous setting has no effect" is Lightning's ``WandbLogger`` always passing
  ``anonymous=None`` to ``wandb.init`` (the setting is deprecated, any value warns):
  :func:`wandb_logger` drops that key.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning.pytorch.loggers import WandbLogger

# Environment defaults, read by the library when it starts a run.
_ENV_DEFAULTS = {
    # wandb: "Tracking run with wandb version ...", the offline-sync notice, "Run data is saved
    # locally in ...", the `wandb leet` hint, and at the end the run history table, the
    # `wandb sync` hint and "Find logs at ...". Its warnings and errors still print (they are
    # termwarn/termerror, not info). What the user needs, where the run is and how to upload
    # an offline run, magic3d prints in one line: see :func:`wandb_run_line`.
    "WANDB_QUIET": "true",
    "WANDB_SHOW_INFO": "false",
}

# Loggers that emit a line, and the opening words of the lines to drop, each with the reason.
_DROPPED_LINES: tuple[tuple[tuple[str, ...], str], ...] = (
    # Lightning's rank-zero info messages (which of its two modules names the logger depends on
    # import order): "💡 Tip: ... install litlogger / litmodels ...", advertisements for
    # Lightning's cloud service printed by every Trainer.
    (("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"), "💡 Tip:"),
    # Hardware that is absent: "TPU available: False, using: 0 TPU cores". ("GPU available: ...,
    # used: ..." stays: it says which device trains. A TPU that exists but is unused gets
    # Lightning's own warning, which is kept.)
    (("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"), "TPU available: False"),
    # diffusers without `accelerate`: loading then builds the model before reading its weights
    # (low_cpu_mem_usage=False), which works the same and costs host memory for a moment, once
    # per stage; accelerate is not a dependency of magic3d.
    (("diffusers.models.modeling_utils", "diffusers.pipelines.pipeline_utils"),
     "Cannot initialize model with low cpu memory usage because `accelerate` was not found"),
)


class _DropLines(logging.Filter):
    """Drops the records whose message starts with one of ``prefixes``."""

    def __init__(self) -> None:
        super().__init__()
        self.prefixes: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(prefix) for prefix in self.prefixes)


def quiet_libraries() -> None:
    """Silence the library banners listed in this module; safe to call more than once."""
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    for names, prefix in _DROPPED_LINES:
        for name in names:
            logger = logging.getLogger(name)  # the library gets this same object when it imports
            drop = next((f for f in logger.filters if isinstance(f, _DropLines)), None)
            if drop is None:
                drop = _DropLines()
                logger.addFilter(drop)
            drop.prefixes.add(prefix)


def wandb_run_line(run: Any) -> str:
    """The one line that says where a W&B run (``WandbLogger.experiment``) is, once wandb is quiet."""
    if run.offline:
        where = run.settings.sync_dir
        return f"[magic3d] W&B run (offline): {where}; upload it with `wandb sync {where}`"
    return f"[magic3d] W&B run: {run.url}"


def wandb_logger(**kwargs: Any) -> WandbLogger:
    """Lightning's ``WandbLogger(**kwargs)``, minus the ``anonymous=None`` it always hands to
    ``wandb.init``: wandb warns that the (deprecated) setting has no effect whatever its value.
    The run itself starts later, on first use, as with Lightning's."""
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(**kwargs)
    logger._wandb_init.pop("anonymous", None)  # Lightning keeps the wandb.init arguments here
    return logger


def finish_wandb(exit_code: int = 0) -> None:
    """Finish this process's W&B run, if there is one, with ``exit_code`` (0: finished; else failed
    or interrupted). Left open at exit, the run is closed by wandb's service process, which prints
    its own footer ("You can sync this run ...", "Find logs at ...") whatever ``WANDB_QUIET`` says."""
    wandb = sys.modules.get("wandb")  # never imports wandb: no module, no run
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)
