"""How far a long loop is, as lines on stderr: feature extraction, the augmented probe, embedding or decoding a
folder of images. The command line turns it on (:func:`reporting_progress`); library calls and the training
callbacks stay silent."""

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from ssl_toolkit.distributed import rank

_progress: ContextVar[bool] = ContextVar("ssl_toolkit_progress", default=False)
PROGRESS_EVERY = 10.0  # seconds between two progress lines of a loop (see Progress)


@contextmanager
def reporting_progress(on: bool = True) -> Iterator[None]:
    """Inside the block (``on``), long loops (feature extraction, the augmented probe, embedding or decoding a folder)
    say on stderr how far they are (see :class:`Progress`): what every ``ssl-toolkit`` command does. Outside it (the
    default) and inside ``reporting_progress(False)`` (the training callbacks' evaluations) they are silent."""
    token = _progress.set(on)
    try:
        yield
    finally:
        _progress.reset(token)


def duration(seconds: float) -> str:
    """``'42 s'``, ``'17 min'`` or ``'2 h 5 min'``: a time as a person reads it."""
    if seconds < 99.5:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 100 else f"{minutes // 60} h {minutes % 60} min"


class Progress:
    """How far a long loop is: ``report(done)`` after each piece of work prints a line on stderr such as
    ``train: 10,240 of 50,000 images encoded, 95 a second, about 7 min left``.

    A line at most every ``every`` seconds (default ``PROGRESS_EVERY``, 10; 0: at every call); the last one
    (``done == total``) only when earlier ones were printed, so a loop quicker than that stays silent. Silent
    outside :func:`reporting_progress` and on every DDP rank but rank 0. ``note`` ends the line (e.g. the unreadable
    files so far).
    """

    def __init__(self, total: int | Callable[[], int], unit: str, label: str = "", every: float | None = None):
        self.on = _progress.get() and rank() == 0
        self.total = total() if callable(total) and self.on else total  # a callable: counted only when reporting
        self.unit, self.every = unit, PROGRESS_EVERY if every is None else every
        self.label = f"{label}: " if label else ""
        self.began = self.last = time.perf_counter()
        self.shown = False

    def __call__(self, done: int, note: str = "") -> None:
        if not self.on or done < 1:
            return
        now, finished = time.perf_counter(), done >= self.total
        if now - self.last < self.every and not (finished and self.shown):
            return
        rate = done / max(now - self.began, 1e-9)
        pace = f"{rate:,.0f} a second" if rate >= 1 else f"{duration(1 / rate)} each"
        left = "" if finished else f", about {duration((self.total - done) / rate)} left"
        print(f"{self.label}{done:,} of {self.total:,} {self.unit}, {pace}{left}{note}", file=sys.stderr, flush=True)
        self.shown, self.last = True, now
