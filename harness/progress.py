"""Progress of long work (fuzzing, benchmarking, the robustness matrix), shown one way everywhere.

Library code takes a `Progress` (or ``None``) and reports to it; it never prints to the terminal
itself. A command makes one with `progress_for`:

- on a terminal, one live tqdm bar: done / total, rate, elapsed and remaining, then the status;
- when the stream is not a terminal (a CI log, a pipe), plain lines at a modest rate: one when a
  task starts, one every `LINE_INTERVAL_S` seconds while it runs, one when it finishes;
- with ``quiet=True``, nothing (the base class, also what tests use).

A task is ``start(description, total=..., unit=...)``, then ``update(done, **status)`` with the
absolute position (``done`` out of ``total``), then ``finish()``. ``note(message)`` prints a line
above the bar (a finding, say) without breaking it. For a task measured in seconds
(``unit="s"``, a time budget) a status ``examples=N`` also gives the rate in examples per second.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import IO

LINE_INTERVAL_S = 10.0
"""Seconds between two plain progress lines of one task (not a terminal)."""


class Progress:
    """The silent progress: every method does nothing (``--quiet``, tests, library defaults)."""

    def start(self, description: str, *, total: float | None = None, unit: str = "it") -> None:
        """A new task of ``total`` ``unit``s (``None``: unknown); finishes the previous one."""

    def update(self, done: float, **status: object) -> None:
        """The task is at ``done`` (absolute, not an increment); ``status`` is shown after it."""

    def note(self, message: str) -> None:
        """A line of its own, printed above the progress."""

    def finish(self) -> None:
        """The task is over; a second call does nothing."""


def _status_text(status: dict[str, object]) -> str:
    return ", ".join(f"{k}={v}" for k, v in status.items())


def _clock_text(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:d}:{rest % 60:02d}"


def _amount(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() or abs(value) >= 10 else f"{value:.1f}"


def _with_rate(unit: str, elapsed: float, status: dict[str, object]) -> dict[str, object]:
    """For a task in seconds, the examples per second (when ``examples`` is given)."""
    examples = status.get("examples")
    if unit == "s" and isinstance(examples, int | float) and elapsed > 0:
        return {"rate": f"{examples / elapsed:.1f} ex/s", **status}
    return status


class LineProgress(Progress):
    """Plain lines: at a task's start, every ``interval`` seconds while it runs, and at its end."""

    def __init__(
        self,
        stream: IO[str],
        *,
        interval: float = LINE_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.interval = interval
        self.clock = clock
        self._description: str | None = None

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def start(self, description: str, *, total: float | None = None, unit: str = "it") -> None:
        self.finish()
        self._description, self._total, self._unit = description, total, unit
        self._started = self._last = self.clock()
        self._done: float = 0
        self._status: dict[str, object] = {}
        of = f", {_amount(total)} {unit}" if total is not None else ""
        self._print(f"{description}: started{of}")

    def _line(self, now: float, *, finished: bool = False) -> str:
        elapsed = now - self._started
        parts = ["done"] if finished else []
        parts.append(f"{_amount(self._done)}")
        if self._total is not None:
            parts[-1] += f"/{_amount(self._total)}"
        parts[-1] += f" {self._unit}"
        if self._total:
            parts[-1] += f" ({100 * min(self._done / self._total, 1):.0f}%)"
        parts.append(f"{_clock_text(elapsed)} elapsed")
        if self._total and 0 < self._done < self._total and elapsed > 0:
            parts.append(f"~{_clock_text(elapsed * (self._total - self._done) / self._done)} left")
        status = _status_text(_with_rate(self._unit, elapsed, self._status))
        return f"{self._description}: " + ", ".join(parts) + (f"; {status}" if status else "")

    def update(self, done: float, **status: object) -> None:
        if self._description is None:
            return
        self._done = done if self._total is None else min(done, self._total)
        self._status = status
        now = self.clock()
        if now - self._last >= self.interval:
            self._last = now
            self._print(self._line(now))

    def note(self, message: str) -> None:
        self._print(message)

    def finish(self) -> None:
        if self._description is None:
            return
        self._print(self._line(self.clock(), finished=True))
        self._description = None


class BarProgress(Progress):
    """One live tqdm bar on a terminal; notes go above it (``tqdm.write``)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._bar = None

    def start(self, description: str, *, total: float | None = None, unit: str = "it") -> None:
        from tqdm import tqdm

        self.finish()
        self._unit = unit
        rate = "" if unit == "s" else ", {rate_fmt}"  # seconds per second says nothing
        amount = "{n:.0f}/{total:.0f} {unit}" if total is not None else "{n:.0f} {unit}"
        bar = "{l_bar}{bar}| " if total is not None else "{desc}: "
        remaining = "<{remaining}" if total is not None else ""
        self._bar = tqdm(
            total=total,
            desc=description,
            unit=unit,
            file=self.stream,
            dynamic_ncols=_known_width(self.stream),
            # a pseudo-terminal that tells no size (under `script`) would hide the bar: assume 80x24
            ncols=None if _known_width(self.stream) else shutil.get_terminal_size().columns,
            nrows=None if _known_width(self.stream) else shutil.get_terminal_size().lines,
            mininterval=0.2,
            leave=True,
            bar_format=bar + amount + " [{elapsed}" + remaining + rate + "]{postfix}",
        )

    def update(self, done: float, **status: object) -> None:
        if self._bar is None:
            return
        shown = _with_rate(self._unit, self._bar.format_dict["elapsed"], status)
        self._bar.set_postfix_str(_status_text(shown), refresh=False)
        total = self._bar.total
        self._bar.update((done if total is None else min(done, total)) - self._bar.n)

    def note(self, message: str) -> None:
        from tqdm import tqdm

        tqdm.write(message, file=self.stream)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.refresh()
            self._bar.close()
            self._bar = None


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _known_width(stream: IO[str]) -> bool:
    """Whether the terminal tells its size (a pseudo-terminal of `script` may say 0 x 0)."""
    try:
        size = os.get_terminal_size(stream.fileno())
        return size.columns > 0 and size.lines > 0
    except (AttributeError, OSError, ValueError):
        return False


def progress_for(*, quiet: bool = False, stream: IO[str] | None = None) -> Progress:
    """A bar on a terminal, plain lines elsewhere, nothing when ``quiet`` (module docstring).

    ``stream`` defaults to the current ``sys.stderr`` (looked up at the call, so a test's capture
    applies).
    """
    stream = sys.stderr if stream is None else stream
    if quiet:
        return Progress()
    return BarProgress(stream) if _is_terminal(stream) else LineProgress(stream)
