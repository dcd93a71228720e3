"""Progress of long work, so that a user can tell work from a hang.

On a terminal: a tqdm bar with counts, elapsed time and the time left. Otherwise (a log file, a
pipe, a test): one line per step on stderr, at most one every `min_interval` seconds besides the
first and the last, each with the count and, once a step is done, an estimate of the time left:

    rankone: scoring (before): 64/480 prompts, 0:01 elapsed, about 0:09 left

Every display is switched by the caller (`enabled`; the CLI passes `not --quiet` down), never by
process-wide state; a display with `delay` shows nothing unless the work takes longer than that,
so that short steps inside a long loop stay quiet.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator, TextIO

def status(text: str, enabled: bool = True, stream: TextIO | None = None) -> None:
    """One line saying what starts now (before a step that has no count yet, such as loading a
    model), so that a long command is never silent; nothing when not enabled (--quiet)."""
    if enabled:
        print(f"rankone: {text}", file=stream if stream is not None else sys.stderr, flush=True)


def clock(seconds: float) -> str:
    """0:07, 3:25, 1:02:09."""
    s = int(round(max(0.0, seconds)))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """A counted piece of work. `update(n)` after each step; `close()` (or leave the `with`) at the end.

    `unit` is plural ("cases"); `initial` counts steps done before (a resumed run): the estimate
    uses the rate of this session only. `note(text)` adds a short status (e.g. the latest scores).
    Work that may stop before its total (a loop with an early stop) calls `end(n)` with the steps
    it ran: the last line shows n, not the total. Left by an exception (Ctrl-C, an error), the last
    line says where the work stopped, never "done".
    """

    def __init__(self, total: int | None, desc: str, unit: str = "steps", enabled: bool = True,
                 delay: float = 0.0, min_interval: float = 2.0, stream: TextIO | None = None, initial: int = 0) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.initial = initial
        self._note = ""
        self.delay, self.min_interval = delay, min_interval
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self._last = -1e9
        self._bar: Any = None
        self._shown = False  # a line was printed
        self._estimated = False  # a line after a step (with an estimate where there is a total) was printed
        if self.enabled and _isatty(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, leave=False, delay=delay,
                             dynamic_ncols=True, initial=initial)
        elif self.enabled and delay <= 0:
            self._line(force=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(stopped=exc_type is not None)

    def update(self, n: int = 1) -> None:
        if not self.enabled:
            return
        step = n if self.total is None else max(0, min(n, self.total - self.n))
        self.n += step
        if self._bar is not None:
            self._bar.update(step)
        elif self.total is None or self.n < self.total:  # the last step is close()'s line
            self._line(force=not self._estimated)  # the first estimate as soon as there is one

    def end(self, n: int) -> None:
        """The work is over after n steps in all (a loop that stopped early, or ran past a total
        that was a first guess): the count becomes n, and the total n where it was less."""
        if self.total is not None and n > self.total:
            self.total = n
            if self._bar is not None:
                self._bar.total = n
        if self._bar is not None:
            self._bar.update(n - self.n)
        self.n = n

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        self._note = text
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float | None:
        """Seconds left at the mean rate so far (None before the first step or without a total)."""
        if self.total is None or self.n == self.initial:
            return None
        return self.elapsed() / (self.n - self.initial) * (self.total - self.n)

    def _line(self, force: bool = False, final: bool = False, stopped: bool = False) -> None:
        now = time.perf_counter()
        if self.elapsed() < self.delay or (not force and not final and now - self._last < self.min_interval):
            return
        self._last, self._shown = now, True
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        tail = f"{clock(self.elapsed())} elapsed"
        if final:
            tail = f"{'stopped after' if stopped else 'done in'} {clock(self.elapsed())}"
        elif (left := self.left()) is not None:
            tail += f", about {clock(left)} left"
        self._estimated = self._estimated or self.n > self.initial
        note = f" ({self._note})" if self._note else ""
        print(f"rankone: {self.desc}: {count} {self.unit}{note}, {tail}", file=self.stream, flush=True)

    def close(self, stopped: bool = False) -> None:
        """The final line: "done in …", or with stopped (the work was interrupted) "stopped after …"."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            if stopped:  # the bar vanishes (leave=False): say where the work stopped
                self._line(final=True, stopped=True)
        elif self._shown or self.elapsed() >= self.delay:
            self._line(final=True, stopped=stopped)
        self.enabled = False


def track(items: Iterable[Any], desc: str, unit: str = "steps", total: int | None = None,
             enabled: bool = True, delay: float = 0.0) -> Iterator[Any]:
    """Iterate with a progress display (see `Progress`)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, desc, unit, enabled, delay) as bar:
        for x in items:
            yield x
            bar.update()


class Stepper:
    """A progress callback `step(i, n)` (i of n done) for library code that reports steps, shown as
    a `Progress` opened on the first call; `close()` ends it."""

    def __init__(self, desc: str, unit: str, enabled: bool = True) -> None:
        self.desc, self.unit, self.enabled = desc, unit, enabled
        self.bar: Progress | None = None

    def __call__(self, i: int, n: int) -> None:
        if self.bar is None:
            self.bar = Progress(n, self.desc, self.unit, enabled=self.enabled)
        self.bar.update(i - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
