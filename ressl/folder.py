"""Image folders "in the wild": scanning, and a dataset that decodes their files (:mod:`ressl.decode`).

Layout rule used by :func:`scan_folder` (hidden files/folders, i.e. any path
part starting with ``.``, are always ignored):

* Every first-level sub-folder that contains at least one image (at any depth)
  is a **class**; class names are the sorted sub-folder names and an image's
  label is the index of its first-level folder. Sub-folders without images are
  ignored.
* Images directly in ``root`` beside two or more class folders that hold most of
  the images are strays: they are skipped with one :class:`DataWarning` naming them.
* Otherwise, if ``root`` holds image files *directly*, the folder is **flat /
  unlabeled**: every image under ``root`` (recursively, sub-folders included) is
  a sample and ``labels`` / ``classes`` are ``None``.

Files are sorted by their path relative to ``root`` (POSIX form), so the order
is the same on every machine and run.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from PIL import Image, features

from ressl.decode import DecodeSize, load_rgb, warn_decoded_in_part
from ressl.dist import speaks_for_machine
from ressl.errors import DataError, DataWarning
from ressl.progress import bar as progress_bar


def _pillow_reads(feature: str) -> bool:
    """Whether the installed Pillow was built with ``feature`` (a codec whose library its wheels may lack)."""
    try:
        return bool(features.check(feature))
    except ValueError:  # a Pillow too old to know the feature
        return False


# AVIF and JPEG 2000 where the installed Pillow decodes them (its wheels carry AVIF since 11.3), else counted as unread
_OPTIONAL = {".avif": _pillow_reads("avif"), ".jp2": _pillow_reads("jpg_2000"), ".j2k": _pillow_reads("jpg_2000")}
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                                     ".ppm", ".pgm", ".tga", *(e for e, read in _OPTIONAL.items() if read))
# Images in formats we do not read (phones' HEIC, cameras' raw files, vector graphics, layered documents, icons, ...):
# passed over like any other file, but counted and named in one DataWarning, so that a folder of them is not silently
# left out.
UNREAD_IMAGE_EXTENSIONS: tuple[str, ...] = (".heic", ".heif", ".jxl", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf",
                                            ".rw2", ".raf", ".raw", ".svg", ".psd", ".ico", ".exr", ".hdr",
                                            *(e for e, read in _OPTIONAL.items() if not read))
_MAX_LISTED = 10  # how many bad files a message names before "and N more"


class FileList(Sequence[Path]):
    """The paths of files below ``root``, kept as one UTF-8 byte buffer and (N + 1) offsets: two numpy arrays, not
    a Python object per file. Indexing gives ``root / relative`` as a ``Path``, made on access.

    Why: ImageNet's 1.28 million ``Path`` objects take ~450 MB in every process, and each loader worker, touching
    every object's reference count over an epoch, ends up with a private copy of them; the arrays take 46 MB
    (measured on ImageNet-style names), and a worker started by the fork server unpickles its own copy of them in
    about 0.1 s.
    """

    def __init__(self, root: str | Path, relative: Iterable[str]) -> None:
        self.root = Path(root)
        encoded = [name.encode("utf-8", "surrogateescape") for name in relative]  # any name os.walk returns
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded)), out=self._offsets[1:])
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def relative(self, i: int) -> str:
        """The ``i``-th path relative to ``root``, POSIX form."""
        i = range(len(self))[i]  # negative indices, and IndexError beyond the end
        return self._blob[self._offsets[i]:self._offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")

    @overload
    def __getitem__(self, i: int) -> Path: ...
    @overload
    def __getitem__(self, i: slice) -> FileList: ...
    def __getitem__(self, i: int | slice) -> Path | FileList:
        if isinstance(i, slice):
            return self.take(range(len(self))[i])
        return self.root / self.relative(i)

    def __iter__(self) -> Iterator[Path]:
        return (self.root / self.relative(i) for i in range(len(self)))

    def take(self, indices: Iterable[int]) -> FileList:
        """The files at ``indices``, in that order, as another :class:`FileList`."""
        return FileList(self.root, (self.relative(i) for i in indices))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FileList):
            return (self.root == other.root and np.array_equal(self._offsets, other._offsets)
                    and np.array_equal(self._blob, other._blob))
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # mutable-equality semantics, as a list

    def __repr__(self) -> str:
        return f"FileList({str(self.root)!r}, {len(self)} files)"


def take(files: Sequence[Path], indices: Iterable[int]) -> Sequence[Path]:
    """``files[i] for i in indices``, compact when ``files`` is a :class:`FileList`."""
    return files.take(indices) if isinstance(files, FileList) else [files[i] for i in indices]


@dataclass
class FolderIndex:
    """Result of :func:`scan_folder`.

    ``files[i]`` has label ``labels[i]`` (an index into ``classes``); both
    ``labels`` and ``classes`` are ``None`` for a flat folder of unlabeled images.
    ``files`` is a :class:`FileList` when scanned, any sequence of paths when built by hand.
    """

    files: Sequence[Path]
    labels: list[int] | None
    classes: list[str] | None


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _is_unread_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(UNREAD_IMAGE_EXTENSIONS)


def _images_under(folder: Path, root: Path, seen: set[tuple[int, int]] | None = None,
                  unread: list[str] | None = None) -> list[str]:
    """All non-hidden image files below ``folder`` (recursive), as sorted POSIX paths relative to ``root``
    (strings: a million ``Path`` objects take seconds to make and sort). Images in formats we do not read are
    appended to ``unread``, if given.

    Symbolic links are followed, but never into a directory in ``seen`` (device, inode), to which every directory
    walked is added: a link back up the tree (``blue/up -> ..``) or into another class would list images again,
    under the wrong class, or without end.
    """
    seen = set() if seen is None else seen
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and _first_visit(os.path.join(dirpath, d), seen)]
        prefix = Path(os.path.relpath(dirpath, root)).as_posix() + "/"
        found.extend(prefix + f for f in filenames if _is_image_name(f))
        if unread is not None:
            unread.extend(prefix + f for f in filenames if _is_unread_image_name(f))
    return sorted(found)


def holds_images(root: Path) -> bool:
    """Whether ``root``, a child or a grandchild of it (train/<class>/) holds an image file: an image folder, not
    torchvision's files of a dataset. A glance (64 sub-folders a level), not a scan."""
    level = [root]
    for _ in range(3):
        children = [e for d in level for e in _entries(d) if not e.name.startswith(".")]
        if any(e.is_file() and _is_image_name(e.name) for e in children):
            return True
        level = [Path(e.path) for e in children if e.is_dir()][:64]
    return False


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    """What ``directory`` holds; nothing where it cannot be read (``lost+found`` at a disk's root) or is no directory."""
    try:
        return list(os.scandir(directory))
    except OSError:
        return []


def _first_visit(path: str, seen: set[tuple[int, int]]) -> bool:
    """Whether the directory at ``path`` (after links) is not in ``seen`` yet; adds it."""
    try:
        st = os.stat(path)
    except OSError:  # a broken link or a directory that went away: nothing to walk
        return False
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return False
    seen.add(key)
    return True


def listed(items: list[str]) -> str:
    """``"a, b, c ... and 3 more"`` on one line (the first few items)."""
    text = ", ".join(items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        text += f" ... and {len(items) - _MAX_LISTED} more"
    return text


def _unread_text(unread: list[str]) -> str:
    """``"1,200 .heic and 3 .dng: a.heic, b.heic ... and 1,201 more"``."""
    counts = Counter(os.path.splitext(name)[1].lower() for name in unread)
    kinds = [f"{n:,} {ext}" for ext, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]
    return f"{' and '.join([', '.join(kinds[:-1]), kinds[-1]] if len(kinds) > 1 else kinds)}: {listed(sorted(unread))}"


def _summarise(bad: list[tuple[Path, str]], root: Path | None = None) -> str:
    """``"a.jpg (empty file), b.png (not an image), ... and 3 more"`` on one line."""
    return listed([f"{p.relative_to(root) if root else p} ({why})" for p, why in bad])


def _check_file(path: Path) -> str | None:
    """Cheap header-level check; returns why ``path`` is unusable, or ``None`` if it looks fine."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as im:
            width, height = im.size
        if width <= 0 or height <= 0:
            return "zero-sized image"
    except Image.DecompressionBombError:
        return "too many pixels"
    except Image.UnidentifiedImageError:
        return "not a readable image"
    except Exception as err:  # noqa: BLE001 - any failure means "skip this file"
        return f"{type(err).__name__}: {err}".replace("\n", " ")
    return None


def scan_folder(root: str | Path, *, verify: bool = True, max_bad_fraction: float = 0.01) -> FolderIndex:
    """Index the images under ``root`` (see the module docstring for the layout rule).

    With ``verify=True`` each file gets a cheap check (empty file, PIL cannot read
    the header); failing files are dropped with ONE :class:`DataWarning` naming
    them. If more than ``max_bad_fraction`` of the files fail, :class:`DataError`
    is raised instead.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data directory {root} does not exist: pass --data PATH pointing at an image folder")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a directory: pass --data PATH pointing at an image folder")

    entries = sorted(os.scandir(root), key=lambda e: e.name)
    loose = [e.name for e in entries if e.is_file() and _is_image_name(e.name)]
    unread = [e.name for e in entries if e.is_file() and _is_unread_image_name(e.name)]
    folders = [e for e in entries if not e.name.startswith(".") and e.is_dir()]
    seen = {(st.st_dev, st.st_ino) for st in (os.stat(p) for p in [root, *(e.path for e in folders)])}  # never walked twice
    groups = [(e.name, _images_under(Path(e.path), root, seen, unread)) for e in folders]
    groups = [(name, found) for name, found in groups if found]
    in_classes = sum(len(found) for _, found in groups)
    names: list[str]  # paths relative to root
    labels: list[int] | None
    classes: list[str] | None
    if loose and (len(groups) < 2 or len(loose) >= in_classes):  # a flat folder: every image, unlabeled
        names = sorted(loose + [name for _, found in groups for name in found])
        labels, classes = None, None
    else:
        names, labels, classes = [], [], []
        for label, (name, found) in enumerate(groups):
            names += found
            labels += [label] * len(found)
            classes.append(name)
        if loose and speaks_for_machine():  # every process of a machine scans the same files
            warnings.warn(
                f"skipped {len(loose)} image file{'s' if len(loose) > 1 else ''} directly in {root}, beside its "
                f"{len(classes)} class folders (labels come from the class folders): "
                f"{listed(loose)}; move {'them' if len(loose) > 1 else 'it'} into a class folder",
                DataWarning,
                stacklevel=2,
            )
    if not names:
        raise DataError(
            f"no images found in {root} (looked for {' '.join(IMAGE_EXTENSIONS)}, any case, "
            f"directly or in sub-folders{f'; found only images ressl does not read, {_unread_text(unread)}' if unread else ''}): "
            f"pass --data PATH pointing at a folder of images{' or convert them to JPEG or PNG' if unread else ''}"
        )
    if unread and speaks_for_machine():
        warnings.warn(f"passed over {len(unread):,} image file{'s' if len(unread) > 1 else ''} under {root} in formats "
                      f"ressl does not read ({_unread_text(unread)}): convert them to JPEG or PNG to train on them",
                      DataWarning, stacklevel=2)

    if verify:
        names, labels = readable(root, names, labels, max_bad_fraction)
    return FolderIndex(files=FileList(root, names), labels=labels, classes=classes)


def over_the_limit(failed: int, total: int, max_bad_fraction: float) -> bool:
    """Whether ``failed`` of ``total`` image files stop a command: more than ``max_bad_fraction`` of them, or all."""
    return failed / total > max_bad_fraction or failed == total


def readable(root: Path, names: list[str], labels: list[int] | None, max_bad_fraction: float) -> tuple[list[str], list[int] | None]:
    """``names`` (paths relative to ``root``) and their ``labels`` without the files that fail :func:`_check_file`
    (missing, empty, not an image), dropped with one :class:`DataWarning` naming them; a :class:`DataError` when more
    than ``max_bad_fraction`` of them fail, or all do."""
    bad = {i: why for i, name in enumerate(_checking(names, root)) if (why := _check_file(root / name)) is not None}
    if not bad:
        return names, labels
    n_total = len(names)
    described = _summarise([(root / names[i], why) for i, why in bad.items()], root)
    if over_the_limit(len(bad), n_total, max_bad_fraction):
        raise DataError(
            f"{len(bad)} of {n_total} image files under {root} are unreadable "
            f"({len(bad) / n_total:.1%} > max_bad_fraction={max_bad_fraction}): "
            f"{described}; fix or delete them, or raise max_bad_fraction to skip them"
        )
    if speaks_for_machine():
        warnings.warn(f"skipped {len(bad)} unreadable of {n_total} image files under {root}: {described}", DataWarning, stacklevel=3)
    kept = [i for i in range(n_total) if i not in bad]
    return [names[i] for i in kept], None if labels is None else [labels[i] for i in kept]


_PROGRESS_FROM = 20_000  # files: checking more than this takes seconds, and shows a progress bar


def _checking(names: list[str], root: Path) -> Iterable[str]:
    """``names``, with a progress bar on the machine's first process when there are many (ImageNet: a minute or more)."""
    if len(names) < _PROGRESS_FROM or not speaks_for_machine():
        return names
    return progress_bar(names, desc=f"checking the images in {root}", unit="file", unit_scale=True)


def too_many_failed(record: torch.Tensor, files: list[Path], max_bad_fraction: float) -> str | None:
    """The error that stops a command once more than ``max_bad_fraction`` of the ``files`` failed to load (all of
    them, whatever the fraction), by their ``record`` (N,) (1: failed, as :class:`ImageFolderDataset` keeps it),
    else None."""
    failed = (record == 1).nonzero().flatten().tolist()
    if not over_the_limit(len(failed), len(files), max_bad_fraction):
        return None
    bad = [(files[i], "unreadable") for i in failed]
    return (f"{len(failed)} of {len(files)} images failed to load ({_summarise(bad)}); "
            f"fix or delete them, or raise max_bad_fraction (now {max_bad_fraction}) to skip them")


class ImageFolderDataset(torch.utils.data.Dataset):
    """Samples of a :class:`FolderIndex`: ``(transform(uint8 (3, H, W)), label)``.

    The label is ``-1`` for unlabeled folders; without a transform the raw uint8
    tensor is returned. A file that cannot be decoded at load time is remembered
    in :attr:`failed_files` and replaced by the next readable index
    (``i+1, i+2, ...`` wrapping around), together with that sample's label. The
    first failure raises one :class:`DataWarning`; later ones are only recorded.
    :class:`DataError` is raised once more than ``max_bad_fraction`` of the files
    failed. The record is in shared memory: the DataLoader workers of one dataset count
    their failures together and pass over the files another found broken; ``record`` (N,)
    continues one (``Split.failure_record``: training makes a dataset per epoch, and the
    next epoch's passes over the files the last found broken without a word). Files decoded
    only in part are used, with one warning (a 2 in the record). Under torchrun each process
    keeps its own, and the processes pool them as they agree on stopping
    (:func:`ressl.data.pool_failures`). With ``replace=False`` (evaluations, whose rows stand
    for their files) a failure raises a :class:`DataError` naming the file instead. ``decode_size``: what the
    transform needs of an image (:func:`load_rgb`'s ``least``), so that a large JPEG decodes smaller and faster.
    """

    def __init__(self, index: FolderIndex, transform: Callable[[torch.Tensor], Any] | None = None,
                 max_bad_fraction: float = 0.01, replace: bool = True, record: torch.Tensor | None = None,
                 decode_size: DecodeSize | None = None) -> None:
        if not index.files:
            raise DataError("the image index is empty: pass --data PATH pointing at a folder of images")
        self.index = index
        self.transform = transform
        self.max_bad_fraction = max_bad_fraction
        self.replace = replace
        self.decode_size = decode_size
        if record is not None and record.shape != (len(index.files),):
            raise ValueError(f"record: ({len(index.files)},) for the index's files, not {tuple(record.shape)}")
        # (N,) 1 where a file failed to decode, 2 where it decoded only in part; shared with the loader workers
        self._failed = record if record is not None else torch.zeros(len(index.files), dtype=torch.uint8).share_memory_()

    def __len__(self) -> int:
        return len(self.index.files)

    @property
    def failed_files(self) -> list[Path]:
        """Files that could not be decoded so far, in index order."""
        return [self.index.files[i] for i in (self._failed == 1).nonzero().flatten().tolist()]

    def _record_failure(self, i: int) -> None:
        first = not bool((self._failed == 1).any())
        self._failed[i] = 1
        too_many = too_many_failed(self._failed, self.index.files, self.max_bad_fraction)
        if too_many:
            raise DataError(too_many)
        if first:
            warnings.warn(
                f"could not decode {self.index.files[i]}; it is replaced by another sample "
                f"(later failures are only recorded in ImageFolderDataset.failed_files)",
                DataWarning,
                stacklevel=3,
            )

    def _decoded_in_part(self, i: int) -> None:
        """Mark file ``i`` as decoded only in part; the first such file of the record gets a warning."""
        if self._failed[i] == 0:
            first = not bool((self._failed == 2).any())
            self._failed[i] = 2
            if first:
                warn_decoded_in_part(self.index.files[i])

    def __getitem__(self, i: int) -> tuple[Any, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        i %= n
        for step in range(n):
            j = (i + step) % n
            broken = self._failed[j] == 1
            if broken and self.replace:
                continue
            image = None if broken else load_rgb(self.index.files[j], partial=lambda _path, j=j: self._decoded_in_part(j),
                                                 least=self.decode_size)
            if image is None and not self.replace:
                raise DataError(f"{self.index.files[j]} could not be decoded (it changed after the folder was scanned): "
                                "fix or delete it and run the command again")
            if image is None:
                self._record_failure(j)
                continue
            label = self.index.labels[j] if self.index.labels is not None else -1
            return (self.transform(image) if self.transform is not None else image), label
        raise DataError("no image in the folder could be decoded: check the files under --data PATH")
