"""One image file to a uint8 RGB tensor, robustly: any mode Pillow reads (transparency on white, 16-bit and float
images scaled), EXIF orientation applied, a truncated file decoded as far as it goes (with a warning), and a large
JPEG decoded at a reduced size where what it is for allows (:func:`crop_decode_size`, :func:`resize_decode_size`).
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from ressl import progress
from ressl.errors import DataWarning

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
