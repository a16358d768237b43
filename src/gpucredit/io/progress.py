"""One progress display for a whole run: pass 1, contributions, the calibration's year-1 pass,
sensitivities and each stress case, each a row with its rate and ETA.

`RunProgress` is what `simulate(progress=...)` is told each phase through (``phase(name,
total)``, then ``(done, total)`` calls; `portfolio.runner.phase_progress`). On a terminal or in
a Jupyter notebook it draws rich progress bars (rich renders them as a live widget in a
notebook); elsewhere (a log file, CI) it writes a plain line per phase every few seconds; quiet,
nothing. Use it from Python as::

    from gpucredit.io.progress import RunProgress

    with RunProgress() as progress:
        result = simulate(book, assumptions, scenarios=1_000_000, progress=progress)
"""

from __future__ import annotations

import sys
import time

from gpucredit.io.names import terminal

LOG_INTERVAL_SECONDS = 5.0  # plain-text mode: at most one line a phase this often


def _interactive() -> bool:
    """A terminal, or a Jupyter kernel (where rich draws a live widget)."""
    if sys.stderr.isatty():
        return True
    try:
        from IPython import get_ipython  # only present where IPython is installed
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class RunProgress:
    """Bars with rate and ETA per phase on a terminal or in a notebook, plain log lines
    otherwise, nothing when `quiet`. A context manager; `note` prints a line above the bars."""

    def __init__(self, quiet: bool = False, interactive: bool | None = None):
        self.quiet = quiet
        self.interactive = _interactive() if interactive is None else interactive
        self._bars = None
        self._task = None
        self._phase = "pass 1"
        self._phase_start = time.perf_counter()
        self._last_log = 0.0

    def __enter__(self) -> RunProgress:
        if not self.quiet and self.interactive:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bars = Progress(
                TextColumn("{task.description:<24}", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._bars.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._bars is not None:
            self._bars.__exit__(*exc)
            self._bars = None

    def phase(self, name: str, total: int) -> None:
        """A new phase starts (its total may be 0 until its first update)."""
        name = terminal(name)  # a stress case's name is data: no control sequences
        self._phase, self._phase_start, self._last_log = name, time.perf_counter(), 0.0
        if self._bars is not None:
            self._task = self._bars.add_task(name, total=total or None, rate="")

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        elapsed = max(time.perf_counter() - self._phase_start, 1e-9)
        rate = done / elapsed
        if self._bars is not None:
            if self._task is None:  # told no phase: a plain (done, total) caller
                self._task = self._bars.add_task(self._phase, total=total, rate="")
            self._bars.update(self._task, completed=done, total=total, rate=f"{rate:,.0f}/s")
            return
        now = time.perf_counter()
        if now - self._last_log > LOG_INTERVAL_SECONDS or done == total:
            self._last_log = now
            eta = (total - done) / rate if rate > 0 else float("nan")
            print(
                f"{self._phase}: {done:,}/{total:,} scenarios, {rate:,.0f}/s, eta {eta:,.0f} s",
                file=sys.stderr,
                flush=True,
            )

    def note(self, message: str) -> None:
        """A line of text (names in it are printed as they are, never as markup, and their
        control characters escaped)."""
        if self.quiet:
            return
        message = terminal(message, keep_newlines=True)
        if self._bars is not None:
            self._bars.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=sys.stderr, flush=True)
