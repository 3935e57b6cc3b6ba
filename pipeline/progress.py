"""Live progress of a job's phase: a tqdm bar on a terminal, periodic plain lines everywhere else.

A person at a terminal wants one line that moves (count, rate, ETA, errors so far); a log reader (CI, `ray job logs`,
a file) wants a line every few seconds that still reads well when 10,000 of them are concatenated, and no carriage
returns. `live` says which; the jobs decide it (`jobs/_output.live_progress()`: stderr is a terminal), so the pipeline
stays free of terminal handling and tests can ask for either.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


class Progress:
    """One phase (e.g. "segment", "epoch 3/14"): `update(n, status=...)` as work completes, `write(line)` for lines
    that must stay on screen (kept above a live bar), `close()` at the end (or use it as a context manager).

    Plain mode prints `line()` at most every `interval_s` seconds, and not at all if no `line` is given.
    """

    def __init__(
        self,
        desc: str,
        total: int | None = None,
        *,
        unit: str = "it",
        live: bool = False,
        log: Callable[[str], None] = print,
        interval_s: float = 10.0,
        initial: int = 0,
    ):
        self._log, self._interval_s = log, interval_s
        self._last_line = time.perf_counter()
        self._bar = None
        if live:
            from tqdm import tqdm

            # stderr: the bar is decoration, stdout keeps only the job's lines (a pipe into a file stays clean).
            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                file=sys.stderr,
                dynamic_ncols=True,
                leave=True,
                smoothing=0.1,
            )

    @property
    def live(self) -> bool:
        return self._bar is not None

    def update(self, n: int = 0, *, status: str | None = None, line: Callable[[], str] | None = None) -> None:
        if self._bar is not None:
            if status is not None:
                self._bar.set_postfix_str(status, refresh=False)
            self._bar.update(n)  # refreshes the bar (tqdm throttles redraws itself)
            return
        now = time.perf_counter()
        if line is not None and now - self._last_line >= self._interval_s:
            self._last_line = now
            self._log(line())

    def set(self, n: int, *, status: str | None = None, line: Callable[[], str] | None = None) -> None:
        """Like `update`, with the position given whole (counts that include work in flight may go down as well as
        up: a unit that fails and runs again starts its in-flight count from zero)."""
        if self._bar is not None:
            if status is not None:
                self._bar.set_postfix_str(status, refresh=False)
            self._bar.n = n
            self._bar.refresh()
            return
        self.update(0, line=line)

    def due_in(self) -> float:
        """Seconds until plain mode's next line is due (a caller polling for news can wake then); inf when live."""
        if self._bar is not None:
            return float("inf")
        return max(0.0, self._interval_s - (time.perf_counter() - self._last_line))

    def write(self, text: str) -> None:
        """A line that stays: above the live bar on a terminal, through `log` otherwise."""
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
        else:
            self._log(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
