"""Progress for the whole toolkit: a tqdm bar on a terminal, plain lines otherwise.

    for batch in show_progress(batches, desc="factorize: calibration", unit="batch", disable=not show):
        ...

In logs and CI (stderr not a terminal) a carriage-return bar would pile up in one line and hide the
error printed after it, so there `progress` prints whole lines instead ("prune: 4/10 (40%) ..."),
at most about every tenth of the way or every `every_s` seconds, and a last line when it closes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm


class LineProgress:
    """The plain-lines progress: the small part of tqdm's interface the toolkit uses."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        disable: bool = False,
        every_s: float = 10.0,
        file: TextIO | None = None,
    ) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n, self.disable, self.every_s, self.postfix = initial, disable, every_s, ""
        self.file = file
        self._start = self._last_time = time.monotonic()
        self._last_n = initial
        self._closed = False

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None, "progress() over nothing: call update() instead"
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable:
            return
        now = time.monotonic()
        tenth = self.total is not None and self.n - self._last_n >= max(1, self.total // 10)
        if tenth or now - self._last_time >= self.every_s:  # without a total: by time only
            self._print()
            self._last_n, self._last_time = self.n, now

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.disable and self.n != self._last_n:
            self._print()

    def _print(self) -> None:
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        share = f" ({self.n / self.total:.0%})" if self.total else ""
        seconds = time.monotonic() - self._start
        postfix = f", {self.postfix}" if self.postfix else ""
        line = f"{self.desc}: {count} {self.unit}{share} in {seconds:.1f} s{postfix}"
        print(line, file=self.file or sys.stderr, flush=True)


def show_progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    disable: bool = False,
) -> Any:
    """A tqdm bar when stderr is a terminal, a `LineProgress` otherwise; nothing shown when `disable`.
    Iterate it over `iterable`, or call `update(n)`, `set_postfix(...)` and `close()`."""
    if not disable and _is_terminal(sys.stderr):
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False
