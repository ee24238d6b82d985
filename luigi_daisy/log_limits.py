"""Logging text that comes from the network, without letting the network fill the log.

Two tools, both sans-clock (the caller passes the time):

- :func:`clip` shortens a text to a fixed number of characters and says how long the
  original was, so a 1 MiB task id in a refused ``Hello`` costs a log line, not a
  megabyte.
- :class:`WarningTally` logs the first few warnings of each kind, then only counts
  them and writes one summary line per kind at most every ``interval`` seconds (and
  when :meth:`WarningTally.flush` is forced, at the end of a run).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

#: characters of a network text kept in a log line
CLIP_CHARS = 200


def clip(text: object, limit: int = CLIP_CHARS) -> str:
    """``str(text)`` cut to ``limit`` characters, followed by ``...(N bytes)`` when cut.

    Parameters
    ----------
    text:
        Anything; typically a string received from a peer, or its ``repr``.
    limit:
        Characters kept.

    Returns
    -------
    str
        The text itself when short enough, else its head and its full size in UTF-8
        bytes.
    """
    text = str(text)
    if len(text) <= limit:
        return text
    size = len(text.encode("utf-8", "backslashreplace"))
    return f"{text[:limit]}...({size} bytes)"


@dataclass
class _Kind:
    total: int = 0
    unreported: int = 0
    last_summary: float | None = None


class WarningTally:
    """Counts repeated warnings instead of repeating them.

    Parameters
    ----------
    logger:
        Where warnings and summaries go.
    first:
        Warnings of one kind logged in full before they are only counted.
    interval:
        Least number of seconds between two summary lines of one kind.
    """

    def __init__(self, logger: logging.Logger, first: int = 5, interval: float = 10.0) -> None:
        self.logger = logger
        self.first = first
        self.interval = interval
        self._kinds: dict[str, _Kind] = {}

    def warn(self, kind: str, now: float, message: str, *args: object) -> None:
        """Count one warning of ``kind``; log it if it is among the first few.

        ``message`` and ``args`` are formatted as by :meth:`logging.Logger.warning`, so
        nothing is formatted for warnings that are only counted. Network text in
        ``args`` must already be :func:`clip`-ped.
        """
        state = self._kinds.setdefault(kind, _Kind())
        state.total += 1
        if state.total <= self.first:
            self.logger.warning(message, *args)
            if state.total == self.first:
                self.logger.warning("%s: further warnings of this kind are counted, and "
                                    "summed up at most every %g s", kind, self.interval)
                state.last_summary = now
            return
        state.unreported += 1
        self.flush(now)

    def count(self, kind: str) -> int:
        """How many warnings of ``kind`` were counted, logged or not."""
        state = self._kinds.get(kind)
        return 0 if state is None else state.total

    def flush(self, now: float, force: bool = False) -> None:
        """Write a summary line for each kind with unreported warnings whose last
        summary is ``interval`` seconds old (every such kind when ``force``)."""
        for kind, state in self._kinds.items():
            if not state.unreported:
                continue
            if not force and state.last_summary is not None and (
                    now - state.last_summary < self.interval):
                continue
            self.logger.warning("%s: %d more since the last report (%d in all)", kind,
                                state.unreported, state.total)
            state.unreported = 0
            state.last_summary = now
