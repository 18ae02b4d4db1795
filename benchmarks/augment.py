"""Augmentation throughput: our batched weak + strong views against the per-sample PIL pipeline.

Ours: one uint8 batch sliced from the in-memory set, ``weak_augment`` and ``strong_augment`` over the
whole batch (on the training device). Reference, as the official code's DataLoader workers do it:
per image ``PIL.Image.fromarray``, then ``ressl.augment.torchvision_pipeline`` (transforms v2) once
for the weak view and once for the strong view, then the collate (``torch.stack``). Both run with
one thread (``torch.set_num_threads(1)``), as one loader worker would; throughput in view pairs/s.

    python -m benchmarks.augment [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from PIL import Image

from benchmarks import common
from ressl.augment import strong_augment, torchvision_pipeline, weak_augment


def run(args: argparse.Namespace) -> common.Result:
    device = common.device_of(args)
    root, source = common.data_dir(args)
    cfg = common.build_config(args, root)
    dataset = common.load(cfg)
    images = dataset.train.images
    assert images is not None, "the augmentation benchmark needs an in-memory dataset (train.npz)"
    size, mean, std, b = cfg.image_size, dataset.mean, dataset.std, cfg.batch_size
    kw = dict(crop=True, crop_scale=(cfg.crop_min_scale, 1.0))
    weak_aug = weak_augment(size, mean, std, **kw)
    strong_aug = strong_augment(size, mean, std, blur=cfg.blur, **kw)
    weak_ref = torchvision_pipeline(size, strong=False, mean=mean, std=std, crop_scale=(cfg.crop_min_scale, 1.0))
    strong_ref = torchvision_pipeline(size, strong=True, mean=mean, std=std, blur=cfg.blur, crop_scale=(cfg.crop_min_scale, 1.0))

    on_device = images.to(device)
    hwc = np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy())  # what a Dataset's __getitem__ starts from
    if hwc.shape[-1] == 1:
        hwc = hwc[..., 0]
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    position = {"ours": 0, "pil": 0}

    def next_indices(who: str) -> torch.Tensor:
        start = position[who] % (len(images) // b) * b
        position[who] += 1
        return order[start:start + b]

    def ours() -> None:
        batch = on_device[next_indices("ours").to(device)]
        weak_aug(batch, generator)
        strong_aug(batch, generator)

    def pil() -> None:
        weak, strong = [], []
        for i in next_indices("pil").tolist():
            image = Image.fromarray(hwc[i])
            weak.append(weak_ref(image))
            strong.append(strong_ref(image))
        torch.stack(weak), torch.stack(strong)

    repeats = args.repeats or (3 if args.quick else 7)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        print(f"[augment] batch {b}, {size}px, blur {strong_aug.blur}, device {device.type}, 1 thread for both; data: {source}",
              flush=True)
        t = common.side_by_side({"ours": ours, "pil": pil}, device, repeats, warmup=1 if args.quick else 2)
    finally:
        torch.set_num_threads(threads)
    ours_rate, pil_rate = b / t["ours"], b / t["pil"]
    detail = (f"batched {ours_rate:.0f} pairs/s ({1e3 * t['ours']:.1f} ms per batch), per-sample PIL {pil_rate:.0f} pairs/s "
              f"({1e3 * t['pil']:.1f} ms per batch); median of {repeats}")
    return common.report("augment", "augmentation speed-up (batched / PIL pairs/s)", ours_rate / pil_rate, ">= 5", detail, quick=args.quick)


def main(argv: list[str] | None = None) -> int:
    return common.main(run, __doc__, "augment", None, argv)


if __name__ == "__main__":
    sys.exit(main())
