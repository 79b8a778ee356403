"""Progress of long stages, for whoever listens (the CLI's progress bar); silent otherwise.

A stage says how far it is with :func:`report` (``report("validate events.parquet", rows, total)``);
the CLI listens for the length of one command with :func:`listening`, and shows one bar per task.
Nothing is printed or logged here, and a stage run by Airflow (no listener) pays one context
variable lookup per report.

Example:
    >>> seen = []
    >>> with listening(lambda task, done, total: seen.append((task, done, total))):
    ...     report("train", 1, 4)
    >>> seen
    [('train', 1, 4)]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

#: ``listener(task, done, total)``: ``total`` is ``None`` when the end is not known.
Listener = Callable[[str, int, "int | None"], None]

_listener: ContextVar[Listener | None] = ContextVar("couponops_progress", default=None)


def report(task: str, done: int, total: int | None = None) -> None:
    """Say that ``task`` has done ``done`` of ``total`` units (rows, epochs, shards)."""
    listener = _listener.get()
    if listener is not None:
        listener(task, int(done), None if total is None else int(total))


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Send every :func:`report` of this thread's stage to ``listener`` until the block ends."""
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)
