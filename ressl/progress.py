"""Progress bars (training epochs, embedding a bank, checking a folder's images, a linear probe), on stderr: live on
a terminal; in a log file (a batch job's output) one state a minute, and nothing for work done within the minute."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

LOG_SECONDS = 60.0  # off a terminal: the first state after this long, then one every this long


def bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:
    """A ``tqdm`` bar over ``iterable`` (or updated by hand, with ``total``), gone once closed (``leave=False``), so
    that the line reporting the result follows cleanly."""
    from tqdm import tqdm

    live = sys.stderr.isatty()
    return tqdm(iterable, leave=False, dynamic_ncols=True, mininterval=0.1 if live else LOG_SECONDS,
                delay=0.0 if live else LOG_SECONDS, **kwargs)
