"""Large JPEGs decode reduced (Pillow's draft) to what the crops or the evaluation resize need, and no smaller."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import ressl.decode
import ressl.folder
from ressl.batches import _EvalResize, crops_decode_size, eval_batches, pretrain_batches
from ressl.data import load_dataset
from ressl.decode import DecodeSize, crop_decode_size, load_rgb, resize_decode_size
from ressl.evaluate import PROBE_CROP_MIN_SCALE, augmented_batches
from ressl.folder import ImageFolderDataset, scan_folder


def _photo(path: Path, size: tuple[int, int] = (1600, 1200), fmt: str = "JPEG") -> Path:
    """A smooth, photo-like picture (W, H = size): gradients and slow waves, with a little noise."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    rgb = np.stack([128 + 100 * np.sin(x / 97) * np.cos(y / 131), 255 * x / w, 255 * y / h], axis=-1)
    rgb += np.random.default_rng(0).normal(0, 2, rgb.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return path


def test_a_large_jpeg_decodes_at_a_fraction_of_its_size_but_never_below_what_is_asked(tmp_path: Path) -> None:
    path = _photo(tmp_path / "big.jpg")
    assert tuple(load_rgb(path).shape) == (3, 1200, 1600)  # nothing asked: whole
    crops = partial(crop_decode_size, size=64, min_scale=0.2)  # the smallest crop: 537 px a side at full size, 8.4 x 64
    assert crops(1600, 1200) == (191, 144)
    assert tuple(load_rgb(path, least=crops).shape) == (3, 150, 200)  # 1/8
    resize = partial(resize_decode_size, shorter=256)  # 1200 / 256 = 4.7: 1/4
    assert resize(1600, 1200) == (342, 256)
    assert tuple(load_rgb(path, least=resize).shape) == (3, 300, 400)
    assert tuple(load_rgb(path, least=partial(resize_decode_size, shorter=700)).shape) == (3, 1200, 1600)  # 1/2 too small


def test_other_formats_and_small_images_decode_whole(tmp_path: Path) -> None:
    crops = partial(crop_decode_size, size=32, min_scale=0.08)
    assert tuple(load_rgb(_photo(tmp_path / "big.png", fmt="PNG"), least=crops).shape) == (3, 1200, 1600)
    assert tuple(load_rgb(_photo(tmp_path / "small.jpg", (300, 200)), least=partial(crop_decode_size, size=224, min_scale=0.08)).shape) == (3, 200, 300)


def test_a_truncated_large_jpeg_still_decodes_reduced_in_part(tmp_path: Path) -> None:
    data = _photo(tmp_path / "full.jpg").read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    told: list[Path] = []
    image = load_rgb(cut, partial=told.append, least=partial(resize_decode_size, shorter=256))
    assert image is not None and tuple(image.shape) == (3, 300, 400) and told == [cut]


@pytest.mark.parametrize("size,min_scale", [(32, 0.08), (64, 0.2), (224, 0.08), (224, 0.5)])
def test_every_crop_of_the_least_decode_is_cut_from_at_least_the_output_size(size: int, min_scale: float) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    for width, height in [(4032, 3024), (3024, 4032), (6000, 1500)] + [tuple(rng.integers(300, 5000, 2)) for _ in range(5)]:
        least_w, least_h = crop_decode_size(int(width), int(height), size=size, min_scale=min_scale)
        assert least_w <= width and least_h <= height
        image = torch.zeros((), dtype=torch.uint8).expand(3, least_h, least_w)
        sides = [min(transforms.RandomResizedCrop.get_params(image, [min_scale, 1.0], [3 / 4, 4 / 3])[2:])
                 for _ in range(1500)]
        smallest_at_full = min((0.75 * min_scale * width * height) ** 0.5, width, height)
        assert min(sides) >= min(size, smallest_at_full) - 1  # torchvision rounds each side to a pixel


def test_the_evaluation_view_of_a_reduced_decode_matches_the_full_one(tmp_path: Path) -> None:
    path = _photo(tmp_path / "big.jpg")
    view = _EvalResize(224)  # shorter side to 256, then the centre 224
    full, reduced = view(load_rgb(path)), view(load_rgb(path, least=view.decode_size))
    assert full.shape == reduced.shape == (3, 224, 224)
    difference = (full.float() - reduced.float()).abs()
    assert difference.mean() < 1.5 and difference.max() < 12  # of 255: the same picture, resampled otherwise


def test_the_loaders_of_training_and_evaluation_ask_for_reduced_decodes(tmp_path: Path, monkeypatch) -> None:
    for split in ("train", "val"):
        for cls in ("a", "b"):
            _photo(tmp_path / split / cls / "0.jpg")
    asked: list[tuple[int, int]] = []
    real = ressl.folder.load_rgb

    def load_and_note(path: Path, partial: Callable[[Path], None] = ressl.decode._warn_truncated,
                      least: DecodeSize | None = None) -> torch.Tensor | None:
        asked.append(least(1600, 1200) if least is not None else (1600, 1200))
        return real(path, partial, least)

    monkeypatch.setattr(ressl.folder, "load_rgb", load_and_note)
    ds = load_dataset("folder", str(tmp_path))
    list(pretrain_batches(ds, 2, 32, 0.2, 0, torch.arange(2), 0, torch.device("cpu")))
    assert asked == [crop_decode_size(1600, 1200, size=32, min_scale=0.2)] * 2
    asked.clear()
    list(eval_batches(ds.test, 32, ds.mean, ds.std, 2, torch.device("cpu"), workers=0))
    assert asked == [resize_decode_size(1600, 1200, shorter=32)] * 2
    asked.clear()
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(4))
    list(augmented_batches(backbone, ds.train, 32, ds.mean, ds.std, 2, torch.device("cpu"), None, workers=0)(0))
    assert asked == [crop_decode_size(1600, 1200, size=32, min_scale=PROBE_CROP_MIN_SCALE)] * 2


def test_a_folder_dataset_that_decodes_reduced_travels_to_fork_server_workers(tmp_path: Path) -> None:
    _photo(tmp_path / "a" / "0.jpg")
    _photo(tmp_path / "b" / "0.jpg")
    ds = ImageFolderDataset(scan_folder(tmp_path), decode_size=crops_decode_size(64, 0.2))
    copy = pickle.loads(pickle.dumps(ds))
    assert tuple(copy[0][0].shape) == (3, 150, 200) and copy[1][1] == 1


def test_the_evaluation_decode_covers_its_resize_not_only_its_crop(tmp_path: Path) -> None:
    """The evaluation view resizes the shorter side to 256 before its centre 224: an 1800 px JPEG, whose 1/8 (225 px)
    would cover the crop, decodes at 1/4 (450 px), so that the resize never upscales."""
    path = _photo(tmp_path / "big.jpg", (1800, 1800))
    view = _EvalResize(224)
    image = load_rgb(path, least=view.decode_size)
    assert image is not None and tuple(image.shape) == (3, 450, 450)
