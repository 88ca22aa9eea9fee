"""The priors' log sink: a ``Log`` is any ``str -> None`` (tests pass ``list.append``)."""

from __future__ import annotations

from collections.abc import Callable

Log = Callable[[str], None]


def print_line(message: str) -> None:
    print(message, flush=True)
