"""A run directory (``--out``): what may start or continue in it, one ``ressl pretrain`` at a time.

A run directory holds ``config.yaml``, ``metrics.jsonl``, ``checkpoint.pt`` and, once the run has finished,
``final.json`` (see the README's "Run directory"). Re-running the same command in it continues the run; a directory
that holds something else is refused rather than written over.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from ressl import dist
from ressl.checkpoint import writing
from ressl.config import Config, ConfigError
from ressl.data import TORCHVISION_SETS

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
_HELD: dict[Path, int] = {}  # run directories this process has locked (the Python API may set up a run twice)


def reuse_problem(out: Path) -> str | None:
    """Why ``out`` may not hold this run (a one-line error), or None. Refused, when it has no checkpoint: a
    ``config.yaml`` that is not a ressl run's or a ``metrics.jsonl`` without one (the user's own files would be
    replaced), or a ``final.json`` (a finished run whose checkpoint was deleted: its results would be replaced). A ressl run stopped before its
    first checkpoint starts again."""
    if not out.is_dir() or (out / "checkpoint.pt").exists():
        return None
    if (out / "final.json").exists():
        return (f"--out {out} holds a finished run's final.json but no checkpoint.pt: choose another --out (or delete "
                "final.json to train a new run there)")
    own = out / "config.yaml"
    if own.is_file() and not _is_run_config(own):
        return f"--out {out} holds a config.yaml that is not a ressl run's: choose another --out, so that it is not overwritten"
    if (out / "metrics.jsonl").exists() and not own.is_file():  # a run writes its config.yaml before any metric
        return f"--out {out} holds a metrics.jsonl but no run's config.yaml: choose another --out, so that it is not overwritten"
    return None


def check_outside_data(out: Path, cfg: Config) -> None:
    """Refuse an ``out`` inside an image folder that the run reads (``--data``): a resume would scan the run's own
    files (its report's PNGs) as training images."""
    if cfg.data is None or cfg.dataset in (*TORCHVISION_SETS, "digits", "npz"):
        return
    data = Path(cfg.data).expanduser().resolve()
    if (data / "train.npz").exists():
        return
    scanned = [data / part for part in ("train", "val", "test") if (data / part).is_dir()] if (data / "train").is_dir() else [data]
    if any(out.expanduser().resolve().is_relative_to(folder) for folder in scanned):  # beside train/ it is not read
        raise ConfigError(f"--out {out} is inside --data {cfg.data}: the run's own files (a report's images) would be "
                          "read as training images; choose an --out outside it")


def _is_run_config(path: Path) -> bool:
    """Whether ``path`` is a ``config.yaml`` that ressl wrote for a run (not another program's, nor unreadable)."""
    try:
        values = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return False
    return run_values(values)


def run_values(values: Any) -> bool:
    """Whether ``values``, a ``config.yaml`` as loaded, are a run's configuration."""
    return isinstance(values, dict) and {"backbone", "queue_size", "student_temperature"} <= set(values)


def claim(out: Path, device: torch.device) -> bool:
    """Make ``out`` and hold its lock for as long as this process lives (or until :func:`release`): a second
    ``ressl pretrain`` with the same ``--out`` (started twice, or a requeued job while the first still runs) is
    refused instead of mixing its checkpoints and logs with this one's. Rank 0 holds it for the whole job. Returns
    whether this call took the lock (False where this process held it already, and on the other processes)."""
    busy, taken = dist.main_writes(lambda: _lock(out), device) or (False, False)  # a full disk stops every process
    if dist.any_rank(busy, device):
        raise ConfigError(f"another ressl pretrain is running with --out {out}: wait for it to end, or choose another "
                          "--out")
    return taken


def _lock(out: Path) -> tuple[bool, bool]:
    """:func:`claim` on rank 0: whether another process holds ``out``'s lock, and whether this call took it."""
    if out.resolve() in _HELD:
        return False, False
    with writing(f"--out {out}"):
        out.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        return False, False
    with writing(str(out / LOCK_NAME), "remove it, or choose another --out"):
        fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:  # a POSIX lock: loader workers forked from this process do not inherit it (flock's would)
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        return err.errno in (errno.EACCES, errno.EAGAIN), False  # else a filesystem without locks: run unlocked
    _HELD[out.resolve()] = fd  # an empty file, never rewritten: a finished run's directory stays as it was
    return False, True


def release(out: Path) -> None:
    """Let go of ``out``'s lock (the end of :func:`ressl.train.pretrain`)."""
    fd = _HELD.pop(out.resolve(), None)
    if fd is not None:
        os.close(fd)


def finished(out: Path, step: int) -> dict[str, Any] | None:
    """``out/final.json`` when it holds the results of the run's ``step`` steps; ``None`` when it is missing, unreadable
    (cut short by a full disk) or older (a run stopped after its last checkpoint but before its final kNN)."""
    try:
        final = json.loads((out / "final.json").read_text())
    except (OSError, ValueError):
        return None
    return final if isinstance(final, dict) and final.get("steps") == step else None
