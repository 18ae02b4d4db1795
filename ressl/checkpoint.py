"""Checkpoints: atomic writes, and loads that never execute pickled code."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or unsafe; the message is one line that names the fix."""


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to a temporary file beside ``path``, flush it to disk, then rename it over ``path``.

    A crash at any instant leaves either the previous file or the new one, never a torn one. If the
    write fails (a full disk), the temporary file is removed and the previous checkpoint stays.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise CheckpointError(f"could not write checkpoint {path}: {err.strerror or err}; free disk space or choose another --out") from None
        raise


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain data only, no code is run."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: pass --checkpoint RUN_DIR/checkpoint.pt")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unsupported content"
        raise CheckpointError(f"refusing to load {path}: it holds objects other than tensors and plain data ({first[:160]})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(err).splitlines()[0][:160]}; is it a ressl checkpoint.pt?") from None
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise CheckpointError(f"{path} is not a ressl checkpoint (no 'model' and 'config'): pass RUN_DIR/checkpoint.pt")
    return state
