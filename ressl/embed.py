"""``ressl embed``: the backbone features (N, F) of a split as ``.npy``, and where each row came from."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ressl import dist
from ressl.checkpoint import replaced, writing
from ressl.errors import DataError

if TYPE_CHECKING:
    from ressl.data import Split


def split_rows(split: Split, name: str) -> list[str]:
    """Where each row of the split's features came from: the file path (folders) or ``name:index`` (in memory). A
    newline or carriage return in a file name is written as ``\\n`` / ``\\r``, so that line i names row i."""
    if split.folder is not None:
        return [str(p).replace("\n", "\\n").replace("\r", "\\r") for p in split.folder.files]
    return [f"{name}:{i}" for i in range(len(split))]


def embed(
    checkpoint: str, data: str | None, out: str, dataset: str | None = None, split: str = "train", teacher: bool = False,
    device: str = "auto", batch_size: int = 512, workers: int = 4, max_bad_fraction: float | None = None,
) -> tuple[Path, Path, tuple[int, int]]:
    """Write the backbone features (N, F) float32 of ``split`` to ``out`` (.npy) and the rows' origins to
    ``out``'s ``.files.txt``, replaced whole (a failed write leaves the earlier files); returns both paths and the
    shape. ``dataset``, ``data`` and ``max_bad_fraction`` (None) are the run's unless given."""
    from ressl.data import to_device
    from ressl.evaluate import checkpoint_features, load_for_evaluation

    if split not in ("train", "test"):
        raise DataError(f"--split must be train or test, got {split!r}")
    dev = dist.resolve_device(device)
    backbone, cfg, ds = load_for_evaluation(checkpoint, teacher, dev, dataset, data, download=False, max_bad_fraction=max_bad_fraction)
    chosen = ds.train if split == "train" else ds.test
    if chosen is None:
        raise DataError(f"{data or cfg.data or cfg.dataset} has no test split (test.npz, or a val/ or test/ folder beside train/): use --split train")
    to_device(ds, dev, [chosen])
    feats, _ = checkpoint_features(backbone, cfg, ds, chosen, dev, batch_size, workers, torch.float32)  # .npy: never bf16
    rows = split_rows(chosen, split)
    assert len(rows) == feats.shape[0], (len(rows), feats.shape)
    out_path = Path(out).expanduser()
    files_path = files_list_path(out_path)
    # under torchrun every process holds all the features: rank 0 writes them, and all learn whether it could
    dist.main_writes(lambda: _write_features(feats, rows, out, files_path), dev)
    return out_path, files_path, (int(feats.shape[0]), int(feats.shape[1]))


def _write_features(feats: torch.Tensor, rows: list[str], out: str, files_path: Path) -> None:
    """The (N, F) features as float32 ``.npy`` in ``out`` (as the user wrote it) and the rows' origins, both written,
    then both renamed over the earlier ones: a failed write replaces neither."""
    out_path = Path(out).expanduser()
    with writing(f"--out {out}", "free disk space or choose another --out"), replaced(out_path) as f, replaced(files_path) as g:
        np.save(f, feats.cpu().numpy().astype(np.float32))
        # a name that is not UTF-8 (Latin-1 on an old disk): the bytes the filesystem holds
        g.write("".join(r + "\n" for r in rows).encode("utf-8", errors="surrogateescape"))


def files_list_path(out: Path) -> Path:
    """``emb.npy`` -> ``emb.files.txt``; any other name (the Python API's) gets ``.files.txt`` appended."""
    return out.with_suffix(".files.txt") if out.suffix == ".npy" else out.with_name(out.name + ".files.txt")
