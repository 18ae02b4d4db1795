"""Datasets (embedded digits, npz arrays, torchvision sets, image folders): what a run trains and evaluates on.

Sets that fit in memory are held as one uint8 tensor (N, C, H, W), moved once to the training device; image folders
are an index of files with their labels, decoded by loader workers. The batches drawn from either: ``ressl.batches``.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ressl import config, dist
from ressl.batches import refuse_in_a_starting_worker
from ressl.errors import DataError
from ressl.folder import (
    FileList,
    FolderIndex,
    holds_images,
    listed,
    readable,
    scan_folder,
    take,
    too_many_failed,
)
from ressl.progress import count

# Per-channel mean and std on the 0..1 scale, from each set's training images.
STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "tinyimagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
TORCHVISION_SETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "stl10": "STL10"}


@dataclass
class Split:
    """Images in memory, ``images`` (N, C, H, W) uint8 and ``labels`` (N,) int64 (-1: unlabeled),
    or on disk as a scanned folder."""

    images: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    folder: FolderIndex | None = None
    max_bad_fraction: float = 0.01  # folders: unreadable images tolerated before the run stops
    _record: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def failure_record(self) -> torch.Tensor:
        """A folder's record of its files that failed to decode (1) or decoded only in part (2), in this command so
        far: (N,) uint8 in shared memory, given to the dataset of every epoch (``ImageFolderDataset``) and so to
        its loader workers. A broken file is then reported once, not every epoch, and passed over from then on."""
        if self._record is None:
            self._record = torch.zeros(len(self), dtype=torch.uint8).share_memory_()
        return self._record

    def __len__(self) -> int:
        if self.images is not None:
            return self.images.shape[0]
        assert self.folder is not None
        return len(self.folder.files)

    @property
    def labelled(self) -> bool:
        if self.folder is not None:
            return self.folder.labels is not None
        return self.labels is not None and bool((self.labels >= 0).all())

    def labels_or_unlabeled(self) -> torch.Tensor:
        """(N,) int64 labels of an in-memory split, -1 for every image when it has none."""
        return self.labels if self.labels is not None else torch.full((len(self),), -1)


EVAL_LAYOUT = "DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg (or DIR/test/<class>/*.jpg)"


@dataclass
class Dataset:
    name: str
    train: Split  # what pretraining sees (may hold unlabeled images)
    bank: Split | None  # labelled training images for kNN and the linear probe
    test: Split | None  # labelled held-out images
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layout: str = ""  # image folders: how the folder was read, one line (see describe)

    def describe(self) -> str:
        """One line saying what was loaded and whether kNN can run, e.g.
        ``folder photos: 1,234 images in 5 classes, no held-out split (...)``."""
        if self.layout:
            return self.layout
        text = f"{self.name}: {len(self.train):,} training images"
        if self.bank is not None and self.bank is not self.train:
            text += f" ({len(self.bank):,} labelled)"
        if self.test is not None and self.bank is not None:
            return text + f", {len(self.test):,} held-out, {count(self.num_classes, 'class', 'classes')}"
        if self.bank is None and self.test is not None:  # held-out labels, but none to vote with
            return text + f", unlabelled, {len(self.test):,} held-out (no kNN)"
        return text + (", unlabelled" if self.bank is None else f", {count(self.num_classes, 'class', 'classes')}") + ", no held-out split (no kNN)"

    @property
    def evaluable(self) -> bool:
        """Whether kNN and the linear probe can run: labelled training images (the bank) and held-out ones."""
        return self.bank is not None and self.test is not None and self.bank.labelled

    def evaluation_splits(self) -> tuple[Split, Split]:
        """(bank, test): labelled training and held-out images, or :class:`DataError` naming the layout needed."""
        if self.evaluable:
            return self.bank, self.test  # type: ignore[return-value]
        if self.train.folder is not None:
            need = f"labelled {EVAL_LAYOUT}, passed as --data DIR"
        elif self.train.images is not None and self.name not in TORCHVISION_SETS and self.name != "digits":
            need = ("labelled training images: labels y in train.npz (class indices from 0; -1 marks an unlabelled image)"
                    if self.bank is None and self.test is not None
                    else "--data DIR holding train.npz and test.npz, each with images x and labels y")
        else:
            need = "--data with labelled training and test images"
        raise DataError(f"nothing to evaluate on: {self.describe()}; kNN and the linear probe need {need}")


def _to_uint8_advice(x: np.ndarray) -> str:
    """How to turn images ``x`` of another dtype into uint8 0..255, judged by their values (a bare
    ``x.astype(np.uint8)`` makes 0..1 floats black and wraps larger integers modulo 256)."""
    if x.dtype == np.bool_:
        return "; convert with x.astype(np.uint8) * 255"
    if x.dtype.kind not in "iuf" or x.size == 0:
        return "; convert them to uint8 values 0..255"
    low, high = x.min().item(), x.max().item()
    if x.dtype.kind == "f" and not np.isfinite([low, high]).all():
        finite = x[np.isfinite(x)]  # a copy, made only on this error path
        if finite.size == 0:
            return " with no finite value"
        low, high = finite.min().item(), finite.max().item()
    span = f" values in [{low:g}, {high:g}]"
    if low < 0:
        return f"{span}: rescale them to 0..255 first (undo any normalisation), then .round().astype(np.uint8)"
    if x.dtype.kind in "iu" and high <= 255:
        return f"{span}, within 0..255: x.astype(np.uint8) keeps them"
    if x.dtype.kind == "u":  # 16-bit images: white is the dtype's maximum; astype alone would wrap modulo 256
        top = np.iinfo(x.dtype).max
        return f"{span}: scale them to 0..255, e.g. (x * (255 / {top})).round().astype(np.uint8) if {top} is white"
    if x.dtype.kind == "f" and high <= 1:
        return f"{span}: convert with (x * 255).round().astype(np.uint8)"
    if x.dtype.kind == "f" and high <= 255:
        return f"{span}: convert with x.round().astype(np.uint8)"
    return f"{span}: rescale them to 0..255 first, then .round().astype(np.uint8)"


def _to_nchw(x: np.ndarray, where: str) -> torch.Tensor:
    if x.dtype != np.uint8:
        raise DataError(f"{where}: images must be uint8 (N, H, W, C) in 0..255, got {x.dtype}{_to_uint8_advice(x)}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"{where}: images must be shaped (N, H, W, C) with C = 1 or 3, got {x.shape}")
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    sample = images[:: max(1, images.shape[0] // 5000)].float() / 255  # (n, C, H, W)
    if sample.shape[1] == 1:
        sample = sample.expand(-1, 3, -1, -1)
    mean = sample.mean(dim=(0, 2, 3))
    std = sample.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())


def _num_classes(*labels: torch.Tensor | None) -> int:
    known = [int(y.max()) + 1 for y in labels if y is not None and y.numel() and int(y.max()) >= 0]
    return max(known, default=0)


def load_digits() -> Dataset:
    """scikit-learn's bundled handwritten digits (1,797 8x8 images), split 75/25 with a fixed seed."""
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    x = torch.from_numpy((digits.images * (255.0 / 16.0)).round().astype(np.uint8))[:, None]  # (N, 1, 8, 8)
    y = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_train = int(0.75 * len(y))
    tr, te = order[:n_train], order[n_train:]
    train = Split(x[tr], y[tr])
    mean, std = _stats(train.images)  # type: ignore[arg-type]
    return Dataset("digits", train, train, Split(x[te], y[te]), 10, mean, std)


def _npz_files(root: Path) -> list[str]:
    """The names of the ``.npz`` files directly in ``root``, sorted."""
    return sorted(p.name for p in root.iterdir() if p.suffix.lower() == ".npz" and p.is_file())


def _no_train_npz(root: Path) -> DataError:
    """What to do about a directory read as npz arrays that lacks train.npz: name the .npz files it holds, or point
    at ``--dataset folder`` when it holds images."""
    found = _npz_files(root)
    expected = "expected train.npz (and test.npz) with images x and labels y"
    if found:
        rename = "; rename the file of training images to train.npz" if set(found) - {"test.npz"} else ""
        return DataError(f"{root} has no train.npz (found {listed(found)}): {expected}{rename}")
    if holds_images(root):
        return DataError(f"{root} holds images but no train.npz: read it with --dataset folder (npz data: {expected})")
    return DataError(f"{root} has no train.npz (nor any .npz file): {expected}")


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Images ``x`` and labels ``y`` (None when absent) of an .npz file, or :class:`DataError` saying why not."""
    save = "save it with np.savez(path, x=images, y=labels)"
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):  # np.save's one array under an .npz name
            raise DataError(f"{path} is a single .npy array, not an .npz file of named arrays: {save}")
        with f:
            if "x" not in f:
                raise DataError(f"{path} has no array 'x' (found {', '.join(f.files)}); save images as x=..., labels as y=...")
            return f["x"], f.get("y")
    except (zipfile.BadZipFile, EOFError) as err:  # a zip cut short or damaged (a bad checksum), an empty file
        why = "an empty file" if path.stat().st_size == 0 else f"cut short or damaged: {err}"
        raise DataError(f"{path} is not a readable .npz file ({why}); write it again: {save}") from None
    except ValueError as err:  # numpy's advice, allow_pickle=True, would run whatever code the file holds
        if "pickled" in str(err):  # neither a zip nor an .npy array: numpy takes it for a pickle
            raise DataError(f"{path} is not a numpy .npz file; {save}") from None
        if "Object arrays" in str(err):
            raise DataError(f"{path} holds an object array; images and labels must be numeric arrays: {save}") from None
        raise DataError(f"cannot read {path}: {err}") from None
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None


def load_npz(root: Path, name: str) -> Dataset:
    """``root/train.npz`` and optionally ``root/test.npz``, each with ``x`` uint8 (N, H, W, C) and ``y`` labels."""
    if not (root / "train.npz").is_file():
        raise _no_train_npz(root)
    splits: dict[str, Split] = {}
    for part in ("train", "test"):
        path = root / f"{part}.npz"
        if not path.exists():
            continue
        raw_x, raw_y = _read_npz(path)
        x = _to_nchw(raw_x, str(path))
        if len(x) == 0:
            fix = "write the training images into it" if part == "train" else "write the held-out images into it, or " \
                  "delete it (then no kNN or linear probe)"
            raise DataError(f"{path} holds no images (its x has 0 rows): {fix}")
        y = _npz_labels(raw_y, path) if raw_y is not None else None
        if y is not None and len(y) != len(x):
            raise DataError(f"{path}: {len(x)} images but {len(y)} labels")
        splits[part] = Split(x, y)
    train, test = splits["train"], splits.get("test")
    bank, held_out = _labelled_rows(train), _labelled_rows(test)  # -1 marks an unlabelled image
    if bank is not None and held_out is not None:
        unknown = sorted(set(held_out.labels.unique().tolist()) - set(bank.labels.unique().tolist()))  # type: ignore[union-attr]
        if unknown:
            raise DataError(f"{root / 'test.npz'} has labels {listed([str(u) for u in unknown])} that no image of train.npz "
                            "has; kNN and the linear probe can only predict classes with training images")
    mean, std = STATS.get(name) or _stats(train.images)  # type: ignore[arg-type]
    return Dataset(name, train, bank, held_out, _num_classes(train.labels, test.labels if test else None), mean, std)


MAX_CLASSES = 1_000_000  # labels are class indices (ImageNet-21k's 21,841 classes are far below this): larger ones are IDs


def _npz_labels(y: np.ndarray, path: Path) -> torch.Tensor:
    """An npz file's labels as (N,) int64: integers (or integral floats) of shape (N,) or (N, 1), -1 for unlabelled."""
    if y.ndim == 2 and y.shape[1] == 1:  # Keras' cifar10.load_data() layout
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{path}: labels y must be one per image, shape (N,) or (N, 1), got {y.shape}")
    if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():
        y = y.astype(np.int64)
    if y.dtype.kind not in "iub":
        raise DataError(f"{path}: labels y must be integers (class indices, -1 for unlabelled), got dtype {y.dtype}")
    labels = torch.from_numpy(y.astype(np.int64))
    if labels.numel() and int(labels.min()) < -1:
        raise DataError(f"{path}: labels y must be class indices from 0, or -1 for unlabelled; found {int(labels.min())}")
    if labels.numel() and int(labels.max()) >= MAX_CLASSES:  # kNN's votes and the probe's outputs: one per class
        distinct = len(np.unique(y[y >= 0]))
        raise DataError(f"{path}: labels y are class indices, one class per number from 0, but go up to "
                        f"{int(labels.max()):,} ({distinct:,} distinct values): number the classes 0..{distinct - 1}")
    return labels


def _labelled_rows(split: Split | None) -> Split | None:
    """The labelled images of an in-memory split (all of it when every image has a label; None when none has)."""
    if split is None or split.labels is None:
        return None
    keep = split.labels >= 0
    if bool(keep.all()):
        return split
    if not bool(keep.any()):
        return None
    assert split.images is not None
    return Split(split.images[keep], split.labels[keep])


def load_torchvision(name: str, root: Path, download: bool, can_download: bool = True) -> Dataset:
    """CIFAR-10/100 or STL-10 from torchvision's files in ``root``, downloaded first when ``download``.
    ``can_download``: whether the command has a ``--download`` flag to suggest."""
    import torchvision

    cls = getattr(torchvision.datasets, TORCHVISION_SETS[name])

    def get(**kw: object) -> Split:
        try:
            ds = cls(str(root), download=download, **kw)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
            why = str(err).split(" You can use download=True")[0].rstrip(".")  # that advice is the Python API's
            fix = "add --download to fetch it, or point --data at it" if can_download else "point --data at a directory that holds it"
            if holds_images(root):  # a preset's dataset (cifar10) with a folder of one's own images: not a download into it
                fix = f"{root} holds image files: for your own images pass --dataset folder (after --preset, if any)"
            raise DataError(f"{name} not found in {root} ({why}); {fix}") from None
        except OSError as err:  # no network (URLError), a full disk ...
            if root.is_dir() and not any(root.iterdir()):
                root.rmdir()  # made for the download: leave nothing behind
            raise DataError(f"could not download {name} into {root} ({getattr(err, 'reason', None) or err}): without a "
                            "network, fetch it elsewhere and point --data at the directory") from None
        if name == "stl10":
            return Split(torch.from_numpy(ds.data), torch.from_numpy(ds.labels.astype(np.int64)))
        return Split(_to_nchw(ds.data, name), torch.tensor(ds.targets, dtype=torch.long))

    if name == "stl10":  # the paper pretrains on train + unlabeled (105k images)
        train, bank, test = get(split="train+unlabeled"), get(split="train"), get(split="test")
    else:
        train = bank = get(train=True)
        test = get(train=False)
    mean, std = STATS[name]
    return Dataset(name, train, bank, test, 100 if name == "cifar100" else 10, mean, std)


def _tiny_imagenet_val(root: Path, classes: list[str], max_bad_fraction: float = 0.01) -> Split:
    """Tiny-ImageNet's ``val/images`` with labels from ``val/val_annotations.txt``; listed files that are missing or
    unreadable are checked and dropped as a scanned folder's are."""
    lookup = {c: i for i, c in enumerate(classes)}
    names, labels = [], []
    for line in (root / "val_annotations.txt").read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[1] in lookup:
            names.append(parts[0])
            labels.append(lookup[parts[1]])
    names, checked = readable(root / "images", names, labels, max_bad_fraction)
    assert checked is not None
    return Split(folder=FolderIndex(files=FileList(root / "images", names), labels=checked, classes=classes),
                 max_bad_fraction=max_bad_fraction)


def _held_out(part_dir: Path, train: FolderIndex, max_bad_fraction: float) -> Split:
    """``part_dir`` (val/ or test/) scanned, its labels taken from ``train``'s class names (not its own order)."""
    index = scan_folder(part_dir, max_bad_fraction=max_bad_fraction)
    if index.labels is None or index.classes is None or not train.classes:
        return Split(folder=index, max_bad_fraction=max_bad_fraction)  # unlabelled on either side: no kNN
    lookup = {name: i for i, name in enumerate(train.classes)}
    unknown = [name for name in index.classes if name not in lookup]
    if unknown:
        raise DataError(
            f"{part_dir} has class folder{'s' if len(unknown) > 1 else ''} {listed(unknown)} that "
            f"{part_dir.parent / 'train'} lacks; kNN and the linear probe can only predict classes with training "
            f"images: add them to train/ or remove them from {part_dir.name}/"
        )
    labels = [lookup[index.classes[y]] for y in index.labels]
    return Split(folder=FolderIndex(files=index.files, labels=labels, classes=list(train.classes)), max_bad_fraction=max_bad_fraction)


def _classes_text(index: FolderIndex) -> str:
    """``"1,234 images in 5 classes"`` or ``"1,234 unlabelled images"``."""
    if index.classes is None:
        return f"{len(index.files):,} unlabelled images"
    return f"{count(len(index.files), 'image')} in {count(len(index.classes), 'class', 'classes')}"


def load_folder(root: Path, name: str, max_bad_fraction: float = 0.01) -> Dataset:
    """An image folder: ``root/train`` + ``root/val`` (or ``test``) with class sub-folders, or one folder
    (class sub-folders, or a flat folder of unlabeled images for pretraining only).

    The held-out split's labels come from ``train``'s class names; a held-out class that ``train`` lacks is a
    :class:`DataError`. :meth:`Dataset.describe` says how the folder was read."""
    train_dir = root / "train"
    enable = "(train/<class>/ and val/<class>/ sub-folders enable kNN)"
    if train_dir.is_dir():
        train = Split(folder=scan_folder(train_dir, max_bad_fraction=max_bad_fraction), max_bad_fraction=max_bad_fraction)
        assert train.folder is not None
        test: Split | None = None
        part = ""
        for part in ("val", "test"):
            part_dir = root / part
            if (part_dir / "val_annotations.txt").exists() and train.folder.classes:
                test = _tiny_imagenet_val(part_dir, train.folder.classes, max_bad_fraction)
            elif part_dir.is_dir() and holds_images(part_dir):  # an empty val/ beside test/: test/ is the split
                test = _held_out(part_dir, train.folder, max_bad_fraction)
            if test is not None:
                break
        layout = f"folder {root}: {_classes_text(train.folder)} in train/"
        if test is None:
            layout += f", no val/ or test/ split {enable}"
        elif train.folder.labels is None:
            layout += f", so the {len(test):,} images in {part}/ are not evaluated {enable}"
        elif not test.labelled:
            layout += f", {len(test):,} images in {part}/ without class folders: no kNN {enable}"
        else:
            layout += f", {len(test):,} held-out in {part}/ for kNN"
    else:
        train, test = Split(folder=scan_folder(root, max_bad_fraction=max_bad_fraction), max_bad_fraction=max_bad_fraction), None
        assert train.folder is not None
        layout = f"folder {root}: {_classes_text(train.folder)}, no held-out split {enable}"
    bank = train if train.folder.labels is not None else None
    classes = train.folder.classes or []
    mean, std = STATS.get(name, STATS["imagenet"])
    return Dataset(name, train, bank, test if test is not None and test.labelled else None,
                   len(classes), mean, std, layout)


def evaluation_source(run_dataset: str, run_data: str | None, dataset: str | None, data: str | None) -> tuple[str, str | None]:
    """What an evaluation of a run reads (``ressl knn``, ``linear``, ``embed``, ``report``): the run's own dataset and
    directory, unless ``--dataset`` or ``--data`` says otherwise.

    ``--dataset`` alone names another dataset, read from the run's directory only if it is the run's own (digits needs
    none; the others then ask for ``--data``). ``--data`` alone is read as the run's dataset, except a directory of
    images (and no train.npz) after a run on npz arrays or a torchvision set (CIFAR, STL-10), read as an image folder.
    """
    if dataset is not None:
        config.check_dataset(dataset)
        return dataset, data if data is not None else run_data if dataset == run_dataset else None
    if data is None:
        return run_dataset, run_data
    root = Path(data).expanduser()
    if (run_dataset in TORCHVISION_SETS or run_dataset == "npz") and not (root / "train.npz").exists() and holds_images(root):
        return "folder", data
    return run_dataset, data


def load_dataset(dataset: str, data: str | None, download: bool = False, max_bad_fraction: float = 0.01, *,
                 can_download: bool = True) -> Dataset:
    """Resolve ``dataset`` and ``data`` into splits; raises :class:`DataError` with a one-line fix.

    ``can_download``: whether the command has a ``--download`` flag (``pretrain``) that the fixes may suggest.
    A directory is read as npz arrays when ``dataset`` is npz, or it holds train.npz, or it holds other .npz files
    and no images (so the error names what is missing rather than saying it found no images)."""
    refuse_in_a_starting_worker()  # a script without a main guard, imported again by a loader worker
    can_download = can_download and dataset in TORCHVISION_SETS
    if data is None:
        if dataset == "digits":
            return load_digits()
        if dataset in TORCHVISION_SETS and download:
            return dist.rank_0_first(lambda: load_torchvision(dataset, Path("data") / dataset, True))
        raise DataError(f"dataset {dataset!r} needs --data PATH (a directory of images or train.npz/test.npz)"
                        + (" or --download" if can_download else ""))
    root = Path(data).expanduser()
    if dataset in TORCHVISION_SETS and download:
        root.mkdir(parents=True, exist_ok=True)  # torchvision downloads into it
    if not root.exists():
        raise DataError(f"data directory {root} does not exist: pass --data PATH pointing at your images"
                        + (" (or add --download)" if can_download else ""))
    if not root.is_dir():
        raise DataError(f"--data {root} is a file; give the directory that holds it")
    if dataset == "npz" or (root / "train.npz").exists() or (_npz_files(root) and not holds_images(root)):
        return load_npz(root, dataset)
    # under torchrun: rank 0 downloads before the others read, and scans a folder for all of them
    if dataset in TORCHVISION_SETS:
        return dist.rank_0_first(lambda: load_torchvision(dataset, root, download, can_download))
    return dist.rank_0_first(lambda: load_folder(root, dataset, max_bad_fraction), share=True)


def pool_failures(split: Split, device: torch.device) -> str | None:
    """Under torchrun, merge every process's record of the image files that failed to load in ``split`` (a folder)
    into each (a collective: at the processes' agreements on stopping). Each process's loader workers then pass over
    the files any process found broken, and count them all: with W processes, each reading a W-th of the files, the
    run stops once more than ``max_bad_fraction`` of the files are broken in all, not W times that. Returns the
    message to stop with (the same on every process) once they are, else None; a no-op in one process and for
    images in memory."""
    if split.folder is None or not dist.is_distributed():
        return None
    record = split.failure_record()
    merged = dist.max_of_all(_FAILURE_FIRST[record.long()], device)
    record.copy_(_FAILURE_FIRST[torch.maximum(_FAILURE_FIRST[record.long()], merged).long()])  # with this process's latest
    return too_many_failed(record, split.folder.files, split.max_bad_fraction)


# A failure record's codes (0: read, 1: failed, 2: decoded in part) ranked so that a failure wins a maximum, and back
# (the mapping is its own inverse): a file that failed in one process and decoded in part in another (it changed) failed.
_FAILURE_FIRST = torch.tensor([0, 2, 1], dtype=torch.uint8)


def same_data_everywhere(dataset: Dataset, device: torch.device) -> None:
    """Under torchrun every process loads the data itself (an npz, a torchvision set), from its own machine's disk:
    copies that differ (a job's local disks) would end the processes' epochs (or their shares of an evaluation) at
    different steps, each then waiting for the others forever. Refused at start, on every process (a collective; a
    no-op in one process)."""
    sizes = {"training images": len(dataset.train), "labelled": -1 if dataset.bank is None else len(dataset.bank),
             "held-out": -1 if dataset.test is None else len(dataset.test), "classes": dataset.num_classes}
    highest = dist.max_each([*sizes.values(), *(-n for n in sizes.values())], device)
    differ = [f"{name} {-low:,.0f} to {high:,.0f}" for name, high, low in zip(sizes, highest, highest[len(sizes):]) if high != -low]
    if differ:
        raise config.ConfigError(f"the processes loaded different data ({', '.join(differ)}; -1: none): give every "
                                 "machine the same copy of --data")


def sample_split(split: Split, size: int, seed: int = 0) -> Split:
    """A fixed random subset of ``size`` images (the whole split if it is smaller), in a seeded order. A folder's subset
    starts its record (:meth:`Split.failure_record`) from what the split's holds so far: the online kNN of a
    training run passes over the files training found broken without a word. (The whole split, when it is not
    larger than ``size``, is the split itself, with the record it has.)"""
    if len(split) <= size:
        return split
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:size].sort().values
    if split.images is not None:
        labels = split.labels[idx.to(split.labels.device)] if split.labels is not None else None
        return Split(split.images[idx.to(split.images.device)], labels, max_bad_fraction=split.max_bad_fraction)
    assert split.folder is not None
    folder = split.folder
    known = split._record[idx].share_memory_() if split._record is not None else None
    return Split(folder=FolderIndex(files=take(folder.files, idx.tolist()),
                                    labels=[folder.labels[i] for i in idx.tolist()] if folder.labels is not None else None,
                                    classes=folder.classes), max_bad_fraction=split.max_bad_fraction, _record=known)


def to_device(dataset: Dataset, device: torch.device, splits: Iterable[Split | None] | None = None) -> None:
    """Move the in-memory images of ``splits`` (default: all of ``dataset``'s) to ``device`` once, so batches never
    cross the host-device link; the others stay where they are (an evaluation does not read the training set)."""
    chosen = (dataset.train, dataset.bank, dataset.test) if splits is None else splits
    for split in {id(s): s for s in chosen if s is not None}.values():
        if split.images is not None:
            split.images = split.images.to(device)


__all__ = ["Dataset", "Split", "evaluation_source", "load_dataset", "sample_split", "to_device"]
