"""Checkpoints: atomic writes, and loads that never execute pickled code."""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors import SafetensorError

from ressl.errors import CheckpointError, WriteError

WRITE_FIX = "free disk space or choose another --out"


def write_failure(err: BaseException) -> str | None:
    """Why a write failed, when ``err`` is a write failure: an ``OSError``, the ``RuntimeError`` that
    ``torch.save``'s zip writer makes of one (``PytorchStreamWriter failed writing file``, ``unexpected pos``), or
    safetensors' own error."""
    if isinstance(err, OSError):
        return str(err.strerror or err)
    if isinstance(err, SafetensorError):
        return str(err).splitlines()[0][:160] if str(err) else "the write failed"
    text = str(err)
    if isinstance(err, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text):
        return "the write failed (a full disk, or a file size limit)"
    return None


@contextlib.contextmanager
def writing(what: str, fix: str = WRITE_FIX) -> Iterator[None]:
    """A write failure inside the block becomes one :class:`WriteError`: ``could not write {what}: {why}; {fix}``."""
    try:
        yield
    except Exception as err:
        why = write_failure(err)
        if why is None:
            raise
        raise WriteError(f"could not write {what}: {why}; {fix}") from None


def write_run_file(path: Path, text: str, mode: str = "w") -> None:
    """Write (``mode`` "w": whole, through :func:`replaced`, so that a full disk never leaves it
    cut short) or append ("a") ``text`` to a file of the run directory; a failure is a one-line :class:`WriteError`."""
    with writing(str(path)):
        if mode == "a":
            with path.open("a") as f:
                f.write(text)
            return
        with replaced(path) as f:
            f.write(text.encode())


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file (0666 less the umask): mkstemp's own 0600 would hide checkpoints from a
    group that reads the run's other files."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def replaced(path: Path, sync: bool = False) -> Iterator[BinaryIO]:
    """A binary file for ``path``'s new content: a temporary file beside it, renamed over ``path`` when the block
    ends. A write that fails (a full disk) or is interrupted removes the temporary file and leaves what ``path``
    held, never a torn file. ``sync``: flushed to disk before the rename, so that a crash cannot tear it either.
    A symbolic link is followed (the file it points to is replaced, the link kept); an existing file keeps its mode."""
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o7777 if path.is_file() else new_file_mode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to a temporary file beside ``path``, flush it to disk, then rename it over ``path``.

    A crash at any instant leaves either the previous file or the new one, never a torn one. If the
    write fails (a full disk), the temporary file is removed and the previous checkpoint stays.
    """
    with writing(f"checkpoint {path}"), replaced(path, sync=True) as f:
        torch.save(state, f)


def remove_stale_temporaries(out: Path) -> None:
    """Delete the temporary files a killed process left in the run directory ``out`` (``.checkpoint.pt.*.tmp``,
    ``.final.json.tmp`` ...): the files they were to replace are never torn."""
    for tmp in out.glob(".*.tmp"):
        with contextlib.suppress(OSError):  # best effort (another user's file): a leftover harms nothing
            if tmp.is_file():
                tmp.unlink(missing_ok=True)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain data only, no code is run."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory: pass the checkpoint.pt inside it ({path / 'checkpoint.pt'})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: pass a run's checkpoint, RUN_DIR/checkpoint.pt")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        try:
            with path.open("rb") as f:
                cut_short = f.read(4) == b"PK\x03\x04"  # a zip's first entry, without the directory at its end
        except OSError as err:
            raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
        if cut_short:
            raise CheckpointError(f"checkpoint {path} is damaged (cut short: its end is missing, as after a copy or a "
                                  "download that stopped): copy it again from where it was written, or use another checkpoint")
        raise CheckpointError(f"cannot read checkpoint {path}: not a file written by torch.save; is it a ressl checkpoint.pt?")
    try:  # torch.load checks no checksum: a flipped bit in a tensor would load as silently wrong weights
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # every entry's CRC-32 (about 0.1 s per 300 MB)
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as err:  # cut short, an unknown compression
        why = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is damaged ({why}): copy it again from where it was written, "
                              "or use another checkpoint") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is damaged (entry {bad} fails its checksum): its bytes changed after "
                              "it was written (a disk or copy fault); copy it again from where it was written, or use another checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        detail = f" ({found[0][:120]})" if found else ""
        raise CheckpointError(f"refusing to load {path}: it holds pickled objects other than tensors and plain data{detail}") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(err).splitlines()[0][:160]}; is it a ressl checkpoint.pt?") from None
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise CheckpointError(f"{path} is not a ressl checkpoint (no 'model' and 'config'): pass RUN_DIR/checkpoint.pt")
    return state


def rng_states() -> dict[str, Any]:
    """Every global random-number state (torch, CUDA, numpy, Python) as tensors and plain data."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available():  # one state per GPU visible when saved; fewer may be visible now
        for index, state in enumerate(states["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
