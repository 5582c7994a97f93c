"""Progress reporting, always on stderr: a tqdm bar when stderr is a terminal, plain periodic lines otherwise.

Every progress display of the package goes through :func:`progress_bar`. On a terminal it is a tqdm bar.
In a log (stderr not a terminal) a bar would fill the file with control codes, so it becomes a few plain
lines through the ``cimconvert.progress`` logger instead, one per tenth of the work and one at the end
(an *inner* bar, nested in an outer one, says nothing there: the outer one reports). The CLI routes the
``cimconvert`` loggers to stderr; a library caller sees the plain lines once it configures logging.
Setting the ``cimconvert`` logger's level above INFO (the CLI's ``--quiet``) switches progress off.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm import tqdm

#: The package's root logger: its level (set by the CLI's --quiet / -v) governs progress too.
PACKAGE_LOGGER = logging.getLogger("cimconvert")
LOGGER = logging.getLogger("cimconvert.progress")
#: Plain mode reports at each of these many equal steps of the total.
REPORT_STEPS = 10


def progress_quiet() -> bool:
    """True when the ``cimconvert`` logger was explicitly set above INFO (``--quiet``): no progress at all."""
    return PACKAGE_LOGGER.level > logging.INFO


def _counts(done: float, total: float | None, unit: str, unit_scale: bool) -> str:
    """``3/10 draw (30%)``; byte counts (``unit_scale``) in MB; without a total just the count."""
    if unit_scale and unit == "B":
        text = f"{done / 1e6:.1f} MB" + (f" of {total / 1e6:.1f} MB" if total else "")
    else:
        text = f"{done:g}" + (f"/{total:g}" if total else "") + f" {unit}"
    return text + (f" ({100 * done / total:.0f}%)" if total else "")


class PlainProgress:
    """A tqdm stand-in for logs: ``desc: done/total unit (pct)`` at every tenth of the total and at the end.

    It supports what the package uses of a bar: iteration, ``update``, ``set_postfix``, ``close`` and the
    context-manager protocol. Without a known total it reports only at the end.
    """

    def __init__(self, iterable: Iterable[Any] | None, total: float | None, desc: str, unit: str,
                 unit_scale: bool = False, initial: float = 0) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.unit_scale = unit_scale
        self.n = initial
        self.postfix = ""
        self._reported_step = self._step()
        self._closed = False

    def _step(self) -> int:
        """How many tenths of the total are done (0 without a total)."""
        return int(self.n * REPORT_STEPS // self.total) if self.total else 0

    def _report(self) -> None:
        """One plain line on the progress logger."""
        done = _counts(self.n, self.total, self.unit, self.unit_scale)
        LOGGER.info("%s: %s%s", self.desc or "progress", done, f" {self.postfix}" if self.postfix else "")

    def update(self, n: float = 1) -> None:
        """Count ``n`` more units; report when another tenth of the total is done."""
        self.n += n
        step = self._step()
        if step > self._reported_step:
            self._reported_step = step
            self._report()

    def set_postfix(self, **values: Any) -> None:
        """Figures appended to the next line (e.g. the loss)."""
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        """Report the final count unless the last line already said it."""
        if self._closed:
            return
        self._closed = True
        if not self.total or self.n < self.total:
            self._report()

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: float | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    inner: bool = False,
    unit_scale: bool = False,
    initial: float = 0,
) -> Any:
    """A progress display for ``iterable`` (or for ``update`` calls up to ``total``), on stderr.

    ``enabled=False`` or ``--quiet`` (:func:`progress_quiet`): a silent bar. stderr a terminal: a tqdm bar
    (an ``inner`` one is cleared when done). Otherwise :class:`PlainProgress` lines, none for ``inner``.
    """
    silent = not enabled or progress_quiet() or (inner and not sys.stderr.isatty())
    if silent:
        return tqdm(iterable, total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, initial=initial,
                    leave=not inner, file=sys.stderr)
    return PlainProgress(iterable, total, desc, unit, unit_scale=unit_scale, initial=initial)
