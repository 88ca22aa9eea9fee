"""Run a stage in a child process that stops when the parent is told to stop.

The recipe runs each stage in its own process. A signal meant for the run (a terminal Ctrl-C,
``kill -INT <parent>``, or the SIGTERM that ``timeout`` and job schedulers send) has to reach
that stage exactly once, so that the stage finishes its step, saves and stops
(:class:`magic3d.interrupt.StopOnInterrupt`):

- The child gets **its own process group**. A terminal sends Ctrl-C to its whole foreground
  group; if the child shared the parent's group it would receive it twice (directly and
  forwarded), and a second signal means "quit now, without a checkpoint".
- The parent **forwards** SIGINT and SIGTERM to the child's group as the same signal (the
  group, so that a stage's own worker processes, e.g. DDP ranks, get it too, as they would from
  a terminal), then **keeps waiting** for the child: a second signal is forwarded as well,
  which makes the stage quit at once; the parent never returns before the stage has exited,
  so nothing is left half-written behind its back.
- SIGHUP (terminal closed) and SIGQUIT (Ctrl-\\) are forwarded too: in a group of its own the
  child would no longer get them from the terminal, and the parent dying of them would leave
  the stage running alone. Ctrl-Z (SIGTSTP) stops the child's group along with the parent, and
  ``fg`` continues both, as a shell user expects.
- The previous handlers are restored afterwards, and if the parent leaves by an exception
  while the child still runs, the child's group is killed: a stage never outlives its run.
  (A parent killed by SIGKILL cannot clean up; its stage then runs on to its end.)

Outside the terminal's foreground group the child could not read the terminal (it would be
stopped, silently): its stdin is empty instead, so a ``breakpoint()`` in a stage fails visibly;
to debug a stage, run ``python -m magic3d stage --config ... --stage-dir ...`` directly.

Handlers can only be installed from the main thread; from another thread the child is run
and waited for without forwarding.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from dataclasses import dataclass
from types import FrameType

# Signals the parent passes on to the child's group unchanged.
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


@dataclass(frozen=True)
class ChildResult:
    returncode: int
    """The child's exit status; negative ``-N`` if it died of signal N (``subprocess``'s convention)."""
    signal_name: str | None
    """The first forwarded signal the parent received while the child ran (``"SIGINT"``, ``"SIGTERM"``...)."""


def run_child(cmd: list[str], env: dict[str, str] | None = None) -> ChildResult:
    """Run ``cmd`` (environment ``env``, default: ours) to its end, forwarding stop signals to it."""
    received: list[signal.Signals] = []
    child: subprocess.Popen | None = None

    def signal_group(signum: int) -> None:
        # Not once the child is reaped (returncode set): its pid, and so its group id, may be reused.
        if child is not None and child.returncode is None:
            try:
                os.killpg(child.pid, signum)
            except ProcessLookupError:  # the group is gone already
                pass

    def forward(signum: int, frame: FrameType | None) -> None:
        received.append(signal.Signals(signum))
        signal_group(signum)  # before the child exists: sent as soon as it does (below)

    def stop_with_child(signum: int, frame: FrameType | None) -> None:
        signal_group(signal.SIGSTOP)
        os.kill(os.getpid(), signal.SIGSTOP)  # returns when the shell continues us (fg / bg)
        signal_group(signal.SIGCONT)

    previous: dict[signal.Signals, object] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in FORWARDED:
            previous[signum] = signal.signal(signum, forward)
        previous[signal.SIGTSTP] = signal.signal(signal.SIGTSTP, stop_with_child)
    try:
        child = subprocess.Popen(cmd, env=env, process_group=0, stdin=subprocess.DEVNULL)
        if received:  # arrived while the child was being started
            signal_group(received[0])
        child.wait()  # a handler runs between the wait's system calls, which then resume (PEP 475)
    except BaseException:
        if child is not None and child.returncode is None:
            signal_group(signal.SIGKILL)
            child.wait()
        raise
    finally:
        for signum, handler in previous.items():  # None: set outside Python, the default is closest
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    return ChildResult(child.returncode, received[0].name if received else None)
