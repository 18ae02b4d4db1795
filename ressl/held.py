"""An image folder's training images held in memory, as CIFAR's are: decoded once, then sliced and augmented batched
on the training device every epoch, instead of decoded and cropped again by loader workers (Tiny-ImageNet: 100,000
images of 64 x 64 px, 1.2 GB as uint8).

Only a folder whose images all have one size, and whose decoded set fits the limit, is held: crops are shares of the
image, so the views are drawn as from the folder (:func:`ressl.augment.weak_augment` and ``strong_augment`` crop
in memory as ``RandomResizedCrop`` does in the workers). Any other folder, and any image that fails to decode or
comes out of another size (an EXIF rotation), leaves it to the loader workers, which deal with it as before.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import torch

from ressl import dist
from ressl.batches import worker_batches
from ressl.decode import load_rgb
from ressl.dist import speaks_for_machine
from ressl.errors import load_failure
from ressl.folder import ImageFolderDataset
from ressl.progress import bar as progress_bar

if TYPE_CHECKING:
    from ressl.data import Dataset, Split

HOLD_LIMIT = 4 * 2**30  # bytes of uint8 images at most (STL-10's 105,000 images, in memory as arrays: 2.9 GB)
_BATCH = 256  # images a loader worker decodes per batch at most
_BATCH_BYTES = 8 * 2**20  # and within this (it crosses through /dev/shm, often 64 MB in a container)
_NO_LIMIT = 2**60  # bytes: cgroup v1 says "no limit" with a number near 2**63
_PROGRESS_FROM = 5_000  # images: fewer decode in seconds


def hold_limit(device: torch.device | None = None) -> int:
    """:data:`HOLD_LIMIT`, or less: a quarter of the machine's memory shared by the processes torchrun started on it
    (each holds its own copy: a laptop's 8 GB, 2 GB; 8 processes on 64 GB, 2 GB each), and on a GPU an eighth of its
    memory (a 12 GB GPU: 1.5 GB). The machine's memory is :func:`memory_limit`'s: a container's, where it has less."""
    limit = HOLD_LIMIT
    memory = memory_limit()
    if memory is not None:
        limit = min(limit, memory // (4 * max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))
    if device is not None and device.type == "cuda":
        limit = min(limit, torch.cuda.get_device_properties(device).total_memory // 8)
    return limit


def memory_limit(cgroups: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> int | None:
    """The bytes of memory this process may use: the machine's, or less where a control group holds it to less (a
    container's or a Slurm job's limit: cgroup v2's ``memory.max``, v1's ``memory.limit_in_bytes``, in the process's
    own group, the groups above it, or at the root of the mount, as a container sees its own group); None where
    neither can be read. ``membership`` lists the process's groups (``/proc/self/cgroup``: ``id:controllers:path``)."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # no such names on this platform
        pass
    files = [cgroups / "memory.max", cgroups / "memory" / "memory.limit_in_bytes"]
    try:
        lines = membership.read_text().splitlines()
    except OSError:  # not Linux
        lines = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        group = PurePosixPath(path.lstrip("/"))  # its parents run up to "." (the mount's root)
        for level in (group, *group.parents):
            if controllers == "":  # v2: one hierarchy for every controller
                files.append(cgroups / level / "memory.max")
            elif "memory" in controllers.split(","):
                files.append(cgroups / "memory" / level / "memory.limit_in_bytes")
    for file in files:
        try:
            limits.append(int(file.read_text().strip()))
        except (OSError, ValueError):  # no such group here, or "max": no limit
            continue
    limits = [limit for limit in limits if 0 < limit < _NO_LIMIT]
    return min(limits) if limits else None


def _together(batch: list[tuple[torch.Tensor, int]]) -> torch.Tensor | None:
    """A loader worker's batch of ``ImageFolderDataset`` items as one tensor of images (B, 3, H, W), which crosses to
    the main process at once (a list of B tensors crosses as B, each through shared memory of its own: slower than
    decoding here); None where its images differ in size."""
    images = [image for image, _ in batch]
    return torch.stack(images) if all(image.shape == images[0].shape for image in images) else None


def held_in_memory(split: Split, workers: int, limit: int | None = None) -> Split | None:
    """``split`` (a folder) as one uint8 tensor (N, 3, H, W) with its labels, or None where it is not held: not a
    folder, images of more than one size, more than ``limit`` bytes (:func:`hold_limit`), or an image that fails to
    decode, or a loader worker that dies. Decoded by up to ``workers`` loader processes, in the folder's order, with a
    progress bar for large sets."""
    from ressl.data import Split

    folder = split.folder
    if folder is None or not folder.files:
        return None
    n = len(folder.files)
    first = load_rgb(folder.files[0])
    if first is None or n * first.numel() > (hold_limit() if limit is None else limit):
        return None
    images = torch.empty((n, *first.shape), dtype=torch.uint8)
    shown = n >= _PROGRESS_FROM and speaks_for_machine()
    bar = progress_bar(total=n, desc=f"decoding {n:,} images into memory", unit="image", unit_scale=True, disable=not shown)
    try:
        start = 0
        batch_size = min(_BATCH, max(1, _BATCH_BYTES // first.numel()))
        files = ImageFolderDataset(folder, max_bad_fraction=split.max_bad_fraction, replace=False)  # a failure: DataError
        for batch in worker_batches(files, batch_size, workers, torch.device("cpu"), collate_fn=_together):
            if batch is None or batch.shape[1:] != first.shape:  # of another size
                return None
            images[start : start + len(batch)] = batch
            start += len(batch)
            bar.update(len(batch))
    except Exception as err:  # a file that failed, a loader worker that died: the folder's own loading meets it again
        if load_failure(err) is None:
            raise
        return None
    finally:
        bar.close()
    labels = torch.tensor(folder.labels, dtype=torch.int64) if folder.labels is not None else None
    return Split(images=images, labels=labels, max_bad_fraction=split.max_bad_fraction)


def hold_training_images(dataset: Dataset, workers: int, device: torch.device, limit: int | None = None) -> bool:
    """Replace ``dataset.train``, a folder, by its images held in memory (:func:`held_in_memory`) where every process
    can (an agreement under torchrun: each decodes its own copy), and say so in ``dataset.describe()``. The kNN bank
    and the held-out images stay folders, read as ``ressl knn`` reads them. Returns whether it did."""
    if dataset.train.folder is None:  # the same kind of data in every process
        return False
    held = held_in_memory(dataset.train, workers, hold_limit(device) if limit is None else limit)
    if dist.any_rank(held is None, device):
        return False
    assert held is not None and held.images is not None
    dataset.train = held
    dataset.layout += f" (training images held in memory: {held.images.numel() / 1e9:.2f} GB)"
    return True
