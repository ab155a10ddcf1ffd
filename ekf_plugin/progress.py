"""Progress bars for long work (feature pass, ``ekf-plugin errors|fisher|select``): tqdm on stderr.

On a terminal the bar refreshes as tqdm does (up to 10 times a second). When stderr is not a terminal (``nohup``,
a batch job's log file, CI) every refresh is appended to the log, so the bar refreshes at most once every
:data:`LOG_INTERVAL_S` seconds there: a log of an hour's work keeps a readable trail instead of tens of thousands
of carriage-return segments.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, Optional

__all__ = ["LOG_INTERVAL_S", "progress_bar"]

LOG_INTERVAL_S = 30.0  # seconds between refreshes when stderr is not a terminal


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable: Optional[Iterable] = None, **kwargs: Any):
    """A ``tqdm.auto.tqdm`` bar over ``iterable`` (or a manual one: ``total=``, ``.update``) on stderr (or
    ``file=``); ``mininterval`` defaults to tqdm's 0.1 s on a terminal and to :data:`LOG_INTERVAL_S` elsewhere.
    Other keyword arguments go to tqdm unchanged."""
    from tqdm.auto import tqdm  # noqa: PLC0415 - not imported by the package's import

    stream = kwargs.pop("file", None) or sys.stderr
    kwargs.setdefault("mininterval", 0.1 if _is_terminal(stream) else LOG_INTERVAL_S)
    return tqdm(iterable, file=stream, **kwargs)
