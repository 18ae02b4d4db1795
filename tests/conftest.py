"""Shared fixtures: tiny generated datasets, never downloads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import tqdm

# no monitor thread beside progress bars (a bar's redraws without it are tqdm's own): the two-process tests fork
# this process only while it runs no other thread (test_distributed.start)
tqdm.tqdm.monitor_interval = 0


def make_images(n: int, size: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 (n, size, size, 3) images of ``classes`` kinds: a class colour and stripe direction, plus noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    palette = rng.integers(30, 225, size=(classes, 3))
    grid = np.arange(size)
    x = np.empty((n, size, size, 3), dtype=np.float64)
    for i, c in enumerate(y):
        stripes = ((grid[:, None] if c % 2 else grid[None, :]) // max(1, size // 4)) % 2 * 60.0
        x[i] = palette[c] + stripes[..., None] + rng.normal(0, 12, size=(size, size, 3))
    return x.clip(0, 255).astype(np.uint8), y.astype(np.int64)


@pytest.fixture
def npz_dir(tmp_path: Path) -> Path:
    """A directory with train.npz (128 images) and test.npz (64 images), 16 px, 4 classes."""
    x, y = make_images(128, 16, 4, seed=0)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    x, y = make_images(64, 16, 4, seed=1)
    np.savez(tmp_path / "test.npz", x=x, y=y)
    return tmp_path


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
