"""How long work shows its progress: one place decides, for every progress display in the package.

Three modes, chosen per process:

- ``bar``: tqdm bars on stderr (redrawn in place), when stderr is a terminal;
- ``lines``: one plain line on stderr every :func:`line_interval` seconds and one when the work ends (``train
  spherical: 400/1600 step (25%), 1m12s, 5.5 step/s, ETA 3m38s, loss=0.412``), when stderr is not a terminal: a
  log file gets readable lines instead of a bar's carriage returns and escape codes;
- ``off``: nothing (``--no-progress``).

The environment variable ``MANIFOLD_FM_PROGRESS`` (``auto``, ``bar``, ``lines`` or ``off``; default ``auto``: ``bar``
on a terminal, ``lines`` otherwise) holds the choice, so worker processes a command starts (the default run's
parallel modes, DataLoader workers) follow it; ``MANIFOLD_FM_PROGRESS_INTERVAL`` sets the seconds between lines
(default 20). Commands that show progress take ``--progress/--no-progress`` (:func:`progress_option`), which sets it
for the command's duration. Library functions keep their ``progress`` arguments: ``progress=False`` shows nothing
whatever the mode.

Every display is made by :func:`progress_bar`, which takes tqdm's keywords (``total``, ``desc``, ``unit``,
``disable``, ``leave``, ``position``, ``initial``) and returns a tqdm bar or a :class:`LineProgress` with the same
methods (iteration, ``update``, ``set_postfix``, ``close``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

#: The environment variable holding the mode (``auto``, ``bar``, ``lines``, ``off``).
ENV = "MANIFOLD_FM_PROGRESS"
#: The environment variable holding the seconds between two lines of the ``lines`` mode.
INTERVAL_ENV = "MANIFOLD_FM_PROGRESS_INTERVAL"
#: Seconds between two lines of the ``lines`` mode by default.
DEFAULT_INTERVAL = 20.0

Mode = Literal["bar", "lines", "off"]
_MODES = ("auto", "bar", "lines", "off")


def progress_mode() -> Mode:
    """The mode of this process: ``MANIFOLD_FM_PROGRESS``, ``auto`` (unset or unknown) resolved by whether stderr is
    a terminal."""
    chosen = os.environ.get(ENV, "auto").strip().lower()
    if chosen in ("bar", "lines", "off"):
        return chosen  # type: ignore[return-value]
    stream = sys.stderr
    try:
        tty = stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        tty = False
    return "bar" if tty else "lines"


def shows_bars(enabled: bool = True) -> bool:
    """Whether a third-party progress display (torch-fidelity's ``verbose``) may draw: only as a bar on a
    terminal."""
    return enabled and progress_mode() == "bar"


def line_interval() -> float:
    """Seconds between two lines of the ``lines`` mode (``MANIFOLD_FM_PROGRESS_INTERVAL``, default 20)."""
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class LineProgress:
    """A progress display of one plain line per interval (the ``lines`` mode): tqdm's interface as the package
    uses it (iteration, ``update``, ``set_postfix``, ``close``, ``n``, ``total``, ``disable``, and the clock
    attributes ``start_t`` / ``last_print_t`` that a caller may shift to leave out time).

    A line is written when ``interval`` seconds have passed since the last one (checked at each update), and one
    when it closes if ``leave`` or if it wrote any line before, so short work with ``leave=False`` writes nothing.
    """

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: float | None = None,
        desc: str | None = None,
        unit: str = "it",
        initial: float = 0,
        leave: bool | None = True,
        interval: float | None = None,
        file: Any = None,
    ) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit = total, desc or "", unit
        self.n = self.initial = initial
        self.leave = leave is not False
        self.interval = line_interval() if interval is None else interval
        self.file = file
        self.disable = False
        self.postfix = ""
        self._time = time.time  # the clock (as tqdm's ``_time``)
        self.start_t = self.last_print_t = self._time()
        self.lines = 0
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("LineProgress without an iterable cannot be iterated")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def update(self, n: float = 1) -> None:
        self.n += n
        now = self._time()
        if now - self.last_print_t >= self.interval:
            self._write(now)

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.leave or self.lines:
            self._write(self._time())

    def line(self, now: float | None = None) -> str:
        """The line describing the progress now."""
        now = self._time() if now is None else now
        elapsed = max(now - self.start_t, 0.0)
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        head = f"{self.desc}: " if self.desc else ""
        count = f"{self.n:g}" if self.total is None else f"{self.n:g}/{self.total:g}"
        parts = [f"{head}{count} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(_duration(elapsed))
        if rate > 0:
            parts.append(f"{rate:.3g} {self.unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit}")
            if self.total and self.n < self.total:
                parts.append(f"ETA {_duration((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _write(self, now: float) -> None:
        stream = self.file or sys.stderr
        if stream is None:
            return
        try:
            stream.write(self.line(now) + "\n")
            stream.flush()
        except (OSError, ValueError):  # a closed stream: progress is never worth a crash
            return
        self.lines += 1
        self.last_print_t = now


def progress_bar(iterable: Iterable[Any] | None = None, *, disable: bool = False, **kwargs: Any) -> Any:
    """A progress display of the process's mode (see the module docstring): tqdm's ``tqdm(iterable, **kwargs)`` in
    the ``bar`` mode, a :class:`LineProgress` in the ``lines`` mode, a disabled tqdm (iterates, counts, shows
    nothing) with ``disable=True`` or in the ``off`` mode. Takes tqdm's keywords (the ``lines`` mode uses ``total``,
    ``desc``, ``unit``, ``initial``, ``leave`` and ignores the others)."""
    mode = "off" if disable else progress_mode()
    if mode == "lines":
        keep = {k: kwargs[k] for k in ("total", "desc", "unit", "initial", "leave") if k in kwargs}
        return LineProgress(iterable, **keep)
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=mode == "off", **kwargs)


@contextlib.contextmanager
def progress_shown(enabled: bool) -> Iterator[None]:
    """Inside the block, this process (and the processes it starts) shows progress in its automatic mode
    (``enabled``; an explicit ``MANIFOLD_FM_PROGRESS`` is kept) or not at all; the previous setting is restored."""
    previous = os.environ.get(ENV)
    if not enabled:
        os.environ[ENV] = "off"
    elif previous is not None and previous.strip().lower() == "off":
        os.environ.pop(ENV)  # --progress asked for it explicitly
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous


def progress_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The ``--progress/--no-progress`` option of a command that shows progress: the command runs inside
    :func:`progress_shown` of it. A command whose function takes a ``progress`` parameter also receives the value."""
    import click

    passes = "progress" in inspect.signature(fn).parameters

    @functools.wraps(fn)
    def command(*args: Any, progress: bool = True, **kwargs: Any) -> Any:
        if passes:
            kwargs["progress"] = progress
        with progress_shown(progress):
            return fn(*args, **kwargs)

    return click.option(
        "--progress/--no-progress",
        "progress",
        default=True,
        show_default=True,
        help="Show progress on stderr: bars on a terminal, one plain line every "
        f"{DEFAULT_INTERVAL:g} s (${INTERVAL_ENV}) when stderr is a file or pipe.",
    )(command)


__all__ = [
    "DEFAULT_INTERVAL",
    "ENV",
    "INTERVAL_ENV",
    "LineProgress",
    "line_interval",
    "progress_bar",
    "progress_mode",
    "progress_option",
    "progress_shown",
    "shows_bars",
]
