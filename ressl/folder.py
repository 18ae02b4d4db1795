"""Image folders "in the wild": scanning, robust decoding and a dataset.

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

import math
import os
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, features

from ressl import progress
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
_TRUNCATED_LOCK = threading.Lock()


_plain_formatwarning = warnings.formatwarning


def _format_data_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                         line: str | None = None) -> str:
    """``ressl: warning: MESSAGE`` on one line for a :class:`DataWarning` and for PIL's warning about an image of
    over 89 million pixels (past 179 million PIL refuses it, and the file is skipped as unreadable); other warnings
    are formatted as before. A loader worker's starts on a line of its own on a terminal: the training's progress
    bar, drawn there by another process, leaves its line open (in a log file no bar is drawn within a minute)."""
    if issubclass(category, (DataWarning, Image.DecompressionBombWarning)):
        lead = "\n" if torch.utils.data.get_worker_info() is not None and progress.live() else ""
        return f"{lead}ressl: warning: {message}\n"
    return _plain_formatwarning(message, category, filename, lineno, line)


warnings.formatwarning = _format_data_warning  # the terminal shows no line of this file's source under the message


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


def _upright(im: Image.Image) -> Image.Image:
    """A detached copy of a loaded image with its EXIF orientation applied (broken EXIF is ignored)."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - broken EXIF: keep the stored orientation
        return im.copy()


DecodeSize = Callable[[int, int], tuple[int, int]]  # a stored (width, height) -> the least (width, height) to decode


def crop_decode_size(width: int, height: int, *, size: int, min_scale: float) -> tuple[int, int]:
    """The least size a (``width``, ``height``) image may be decoded at for ``RandomResizedCrop(size, scale=(min_scale,
    1))`` to cut every crop from ``size`` pixels a side or more, as at full size. A crop's area is a share of the
    image's, so a crop (torchvision's aspect ratios 3/4 to 4/3) has a shorter side of sqrt(0.75 * min_scale * width *
    height) or more, in pixels of whatever size the image was decoded at; none is larger than the image, and where
    none fits (a long panorama), the fallback takes the image's shorter side."""
    smallest = min(math.sqrt(0.75 * min_scale * width * height), width, height)
    return _reduced(width, height, smallest / size)


def resize_decode_size(width: int, height: int, *, shorter: int) -> tuple[int, int]:
    """The least size a (``width``, ``height``) image may be decoded at before its shorter side is resized to
    ``shorter`` pixels (the evaluations' resize, then a centre crop)."""
    return _reduced(width, height, min(width, height) / shorter)


def _reduced(width: int, height: int, factor: float) -> tuple[int, int]:
    factor = max(1.0, factor)
    return math.ceil(width / factor), math.ceil(height / factor)


def _draft(im: Image.Image, least: DecodeSize | None) -> None:
    """Have a JPEG decoded at 1/2, 1/4 or 1/8 of its size where that still covers ``least`` of its stored size
    (Pillow's ``draft``: libjpeg scales while decoding, 4-5x faster for a phone's 12-megapixel photo). Other formats,
    and any image without ``least``, decode whole. The requirements of ``least`` (a share of the area, the shorter
    side) do not depend on the orientation, which is applied after."""
    if least is None:
        return
    try:
        im.draft(None, least(*im.size))
    except Exception:  # noqa: BLE001, S110 - a decoder that cannot scale decodes whole
        pass


def _open_loaded(path: Path, partial: Callable[[Path], None], least: DecodeSize | None = None) -> Image.Image:
    """Open and fully decode ``path`` (EXIF orientation applied; a JPEG reduced as ``least`` allows, :func:`_draft`);
    on failure retry once accepting truncated data, and if that decodes it, tell ``partial``.

    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is a PIL global: it is switched on only for
    the retry, under a lock, and always restored afterwards. A partially decoded
    image keeps whatever PIL filled in for the missing part.
    """
    try:
        with Image.open(path) as im:
            _draft(im, least)
            im.load()
            return _upright(im)
    except Image.DecompressionBombError:
        raise
    except Exception:  # noqa: BLE001, S110 - retry permissively below
        pass
    with _TRUNCATED_LOCK:
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            with Image.open(path) as im:
                _draft(im, least)
                im.load()
                image = _upright(im)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous
    partial(path)
    return image


_truncated_warned = False  # per process, for files read outside a dataset (ImageFolderDataset keeps its own record)


def warn_decoded_in_part(path: Path) -> None:
    """A :class:`DataWarning` for an image decoded only in part (a file cut short, or with damaged data): the rest of
    it is filled (black for a file cut right after its header), which a user should hear about."""
    warnings.warn(f"{path} is damaged or truncated: decoded only in part, the rest filled (black where nothing was "
                  "decoded); later such files are used the same way without a warning", DataWarning, stacklevel=4)


def _warn_truncated(path: Path) -> None:
    """:func:`warn_decoded_in_part` for the first such image of this process."""
    global _truncated_warned
    if not _truncated_warned:
        _truncated_warned = True
        warn_decoded_in_part(path)


def _scale_gray(arr: np.ndarray, mode: str) -> np.ndarray:
    """Map a single-channel high-bit-depth array (H, W) to uint8 (H, W).

    ``I;16*``: ``round(v / 257)`` (0..65535 -> 0..255). ``I``: same if values fit
    0..65535, else min-max stretch. ``F``: ``v * 255`` if values fit 0..1, else
    min-max stretch. NaN becomes 0.
    """
    a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535):
        a = a / 257.0
    elif mode == "F" and lo >= 0 and hi <= 1.0:
        a = a * 255.0
    else:
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 RGBA -> (H, W, 3) uint8 RGB blended over a white background."""
    alpha = rgba[..., 3:4].astype(np.float64) / 255.0
    rgb = rgba[..., :3].astype(np.float64) * alpha + 255.0 * (1.0 - alpha)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """Any PIL image -> (H, W, 3) uint8 RGB (see :func:`load_rgb` for the rules)."""
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    elif mode.startswith("I") or mode == "F":
        gray = _scale_gray(np.array(im), mode)
        return np.repeat(gray[:, :, None], 3, axis=2)
    elif mode == "L" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        return _composite_on_white(np.array(im))
    if im.mode != "RGB":
        im = im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX, ...
    return np.array(im)


def load_rgb(path: Path, partial: Callable[[Path], None] = _warn_truncated, least: DecodeSize | None = None) -> torch.Tensor | None:
    """Decode ``path`` to a uint8 tensor of shape (3, H, W) in RGB, or ``None`` if unreadable.

    With ``least`` (:func:`crop_decode_size`, :func:`resize_decode_size`), a large JPEG may come smaller than stored,
    but never smaller than ``least`` of its stored size.

    * EXIF orientation is applied (``ImageOps.exif_transpose``); multi-frame files give frame 0.
    * Transparency (RGBA, LA, palette/grayscale with ``transparency``) is
      **composited on white**: transparent pixels become white, partial alpha blends.
    * 16-bit ``I;16``/``I`` are scaled (``v / 257``), not clipped; ``F`` in 0..1 is
      scaled by 255, other ranges are min-max stretched.
    * ``L``, ``1``, ``CMYK``, ``YCbCr`` and other modes use PIL's RGB conversion.
    * Truncated files are decoded as far as possible (see :func:`_open_loaded`), and ``partial`` is told (by
      default, the first one of the process gets a warning).
    """
    try:
        arr = _to_rgb_array(_open_loaded(Path(path), partial, least))
    except Exception:  # noqa: BLE001 - any decoding failure means "unreadable"
        return None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        return None
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


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
