"""Progress bars (training epochs, embedding a bank, checking a folder's images, a linear probe), on stderr: live on
a terminal or in a notebook; in a log file (a batch job's output) one state a minute, and nothing for work done
within the minute. And the lines a run prints as it goes (:func:`say`)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

LOG_SECONDS = 60.0  # off a terminal: the first state after this long, then one every this long


_lost = False  # stdout could not be written once: it goes nowhere since


def say(*args: Any, **kwargs: Any) -> bool:
    """``print``; False once stdout could not be written (its reader has gone: ``ressl pretrain | head``; a log file on
    a full disk), from then on: stdout then goes nowhere, silently, instead of an error in the middle of a run."""
    global _lost
    try:
        print(*args, **kwargs)
    except OSError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        _lost = True
    return not _lost


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and its noun, for people: ``count(1, "class", "classes")`` is "1 class", ``count(1234, "image")`` "1,234 images"."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def live() -> bool:
    """Whether stderr shows a bar as it changes (a terminal, or a Jupyter notebook's output), not a log file."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:
    """A ``tqdm`` bar over ``iterable`` (or updated by hand, with ``total``), gone once closed (``leave=False``), so
    that the line reporting the result follows cleanly. Callers that set a postfix pass ``refresh=live()``: a
    postfix otherwise redraws the bar at once, whatever the interval."""
    from tqdm import tqdm

    # in a log: maxinterval too, or tqdm's monitor thread would redraw every 10 s after the first state
    timing = {} if live() else dict(mininterval=LOG_SECONDS, maxinterval=LOG_SECONDS, delay=LOG_SECONDS)
    return tqdm(iterable, leave=False, dynamic_ncols=True, **timing, **kwargs)
