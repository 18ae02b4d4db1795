"""Image folders: photo-sized JPEGs decoded reduced to what the training crops need, against decoded whole.

A loader worker's work per image when pretraining on a folder: decode the file, then cut the two RandomResizedCrops
(``ImageFolderDataset`` with the crops' ``decode_size``, which lets Pillow decode a JPEG at 1/2, 1/4 or 1/8 of its
size, against the same dataset without it). The JPEGs are generated: 4032 x 3024, a phone's 12 megapixels (--quick:
1024 x 768). One thread, as one loader worker; throughput in images/s.

    python -m benchmarks.decode [--quick] [--image_size 64] [--crop_min_scale 0.2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks import common
from ressl.batches import _two_crops, crops_decode_size
from ressl.folder import ImageFolderDataset, scan_folder


def photos(root: Path, count: int, size: tuple[int, int]) -> None:
    """``count`` photo-like JPEGs of ``size`` (W, H) under ``root``: slow waves and gradients with a sensor's noise."""
    w, h = size
    y, x = np.ogrid[0:h, 0:w]
    rng = np.random.default_rng(0)
    for i in range(count):
        rgb = np.empty((h, w, 3), dtype=np.float32)
        rgb[..., 0] = 128 + 100 * np.sin(x / (97 + 13 * i)) * np.cos(y / 131)
        rgb[..., 1] = 255 * x / w
        rgb[..., 2] = 255 * y / h
        rgb += rng.normal(0, 6, rgb.shape).astype(np.float32)
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(root / f"{i}.jpg", quality=90)


def run(args: argparse.Namespace) -> common.Result:
    size = (1024, 768) if args.quick else (4032, 3024)
    root = Path(tempfile.mkdtemp(prefix="ressl-bench-photos-"))
    try:
        photos(root, 2 if args.quick else 4, size)
        index = scan_folder(root)
        crops = _two_crops(args.image_size, args.crop_min_scale)
        whole = ImageFolderDataset(index, transform=crops)
        reduced = ImageFolderDataset(index, transform=crops,
                                     decode_size=crops_decode_size(args.image_size, args.crop_min_scale))
        decoded = tuple(reduced.decode_size(*size))  # type: ignore[misc]

        def load_all(ds: ImageFolderDataset) -> None:
            for i in range(len(ds)):
                ds[i]

        repeats = args.repeats or (3 if args.quick else 7)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            print(f"[decode] {len(index.files)} JPEGs of {size[0]} x {size[1]}, two crops of {args.image_size} px from "
                  f"{args.crop_min_scale} of the image up, 1 thread", flush=True)
            t = common.side_by_side({"reduced": lambda: load_all(reduced), "whole": lambda: load_all(whole)},
                                    torch.device("cpu"), repeats, warmup=1)
        finally:
            torch.set_num_threads(threads)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n = len(index.files)
    fast, slow = n / t["reduced"], n / t["whole"]
    detail = (f"reduced {fast:.1f} images/s (decoded at no less than {decoded[0]} x {decoded[1]}), whole {slow:.1f} "
              f"images/s; median of {repeats}")
    return common.report("decode", "folder decode speed-up (reduced / whole images/s)", fast / slow, ">= 2", detail,
                         quick=args.quick)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small images, a few seconds: a smoke test, not a measurement")
    parser.add_argument("--image_size", type=int, default=64, help="the crops' size (default 64, the README's folder example)")
    parser.add_argument("--crop_min_scale", type=float, default=0.2, help="the crops' smallest share of the image (default 0.2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (the median is reported)")
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
