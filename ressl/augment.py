"""Batched, device-agnostic image augmentation for ReSSL.

Images arrive as one ``uint8`` batch ``(B, C, H, W)`` on the training device; every sample
gets its own random parameters, but every operation runs on the whole batch at once:

* crop + resize: one ``grid_sample`` (crops enlarged to ``size``) and one
  :func:`torchvision.ops.roi_align` (crops shrunk; adaptive sampling averages several bilinear
  taps per output pixel, playing the role of torchvision's antialiasing), a box per sample;
* colour jitter / grayscale: tensor arithmetic with per-sample factors of shape ``(B, 1, 1, 1)``;
* Gaussian blur: a separable depthwise convolution with one kernel per sample (``B * C`` groups).

Random parameters are drawn with ``torch.rand(..., generator=generator)`` on the generator's
device (the CPU by default), so a seeded CPU generator reproduces the same augmentations on
any device. The distributions follow torchvision's ``RandomResizedCrop``, ``ColorJitter``,
``RandomGrayscale``, ``GaussianBlur`` and ``RandomHorizontalFlip``.

Jitter order: like torchvision's ``ColorJitter``, the four colour operations are applied in a
uniformly random order. ``jitter_order="batch"`` (the default, as torchvision's ``ColorJitter``
draws one order per call) uses one permutation for the whole batch: four whole-batch kernels
instead of sixteen gathered subsets, about twice as fast on a CPU; each image's marginal
distribution is the same as with ``jitter_order="sample"`` (one permutation per image). In training,
the batches of the few steps augmented in one call share it (``ressl.views.ViewAugment``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from ressl.dist import to_device

__all__ = ["BatchAugment", "eval_transform", "strong_augment", "torchvision_pipeline", "weak_augment"]

# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma, 0.2989 as in torchvision).
_LUMA = (0.2989, 0.587, 0.114)
_OPS = ("brightness", "contrast", "saturation", "hue")
CROP_TRIES = 10  # candidate boxes per crop before the centre-crop fallback, as torchvision's RandomResizedCrop


def blur_kernel_size(size: int, max_sigma: float = 2.0) -> int:
    """Odd kernel size: about 10% of the image side (23 at 224 px, as torchvision ports of MoCo-v2 use), and no
    less than the +-3 sigma that the official code's PIL blur spans at the largest sigma (13 taps at sigma 2, so
    a 32 or 64 px image is blurred as much as PIL would); within what reflect padding allows (< 2 * size)."""
    k = max(int(0.1 * size), 2 * math.ceil(3 * max_sigma) + 1)
    k = k if k % 2 == 1 else k + 1
    return min(k, 2 * size - 1)


def blur_rule(size: int, blur: bool | None, max_sigma: float = 2.0) -> tuple[bool, int]:
    """Whether the strong view is blurred at ``size`` px, and its kernel size: ``blur`` as given, with
    :func:`blur_kernel_size`; ``None``, the rule of runs before the tenth session (their ``config.yaml``): on above
    32 px, with a kernel of 10% of the side, at least 3."""
    if blur is not None:
        return bool(blur), blur_kernel_size(size, max_sigma)
    k = max(int(0.1 * size), 3)
    return size > 32, k if k % 2 == 1 else k + 1


# ----------------------------------------------------------------------------- colour kernels
@functools.lru_cache(maxsize=64)
def _constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """A small constant (1, len(values), 1, 1), made once per device and dtype: a fresh copy from host
    memory at every step would make PyTorch wait for the GPU (a blocking copy). Read-only."""
    return torch.tensor(values, dtype=torch.float64).view(1, -1, 1, 1).to(device, dtype)


def grayscale(x: Tensor) -> Tensor:
    """Luma of float RGB images ``(B, 3, H, W)`` -> ``(B, 1, H, W)``."""
    return (x[:, 0:1] * _LUMA[0]).add_(x[:, 1:2], alpha=_LUMA[1]).add_(x[:, 2:3], alpha=_LUMA[2])


# The adjust_*_ kernels overwrite ``x`` (B, 3, H, W) float in [0, 1] and return it: a pass over a batch
# in place costs about a third of one that writes a fresh tensor (measured on CPU, 1.5 MB batches).
def adjust_brightness_(x: Tensor, factor: Tensor) -> Tensor:
    """``x = clamp(factor * x)`` with ``factor`` (B,) per image."""
    return x.mul_(factor.to(x.dtype).view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def _blend_(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """``x = clamp(factor * x + (1 - factor) * other)``, ``other`` broadcast to ``x``, ``factor`` (B,)."""
    return x.lerp_(other.expand_as(x), 1.0 - factor.to(x.dtype).view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_contrast_(x: Tensor, factor: Tensor) -> Tensor:
    """Blend ``x`` with the per-image mean of its grayscale; ``factor`` (B,)."""
    luma = _constant(_LUMA, x.device, x.dtype).view(3)
    mean_gray = x.mean(dim=(2, 3)) @ luma  # (B,): the mean of the luma is the luma of the means
    # the blend as multiply-add: lerp_ towards a (B, 1, 1, 1) value is 3x slower on a CPU than these two passes
    f = factor.to(x.dtype)
    return x.mul_(f.view(-1, 1, 1, 1)).add_((mean_gray * (1.0 - f)).view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_saturation_(x: Tensor, factor: Tensor) -> Tensor:
    """Blend ``x`` with its grayscale version; ``factor`` (B,)."""
    return _blend_(x, grayscale(x), factor)


def adjust_hue_(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the HSV hue of ``x`` by ``shift`` (B,) in [-0.5, 0.5] turns.

    Same maths as torchvision's RGB -> HSV -> RGB round trip, written branch-free (float masks
    instead of ``torch.where``, which is slow on CPU): value and chroma are unchanged, only the
    position of every channel between min and max moves with the hue.
    """
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    # element-wise maximum/minimum of the planes: on a CPU faster than amax/amin over the channel dimension
    maxc = torch.maximum(torch.maximum(r, g), b)
    delta = torch.minimum(torch.minimum(r, g), b).neg_().add_(maxc)  # chroma (B, 1, H, W)
    # hexagonal hue in sextants: (g-b)/d, 2 + (b-r)/d or 4 + (r-g)/d for a max in r, g or b (r wins
    # ties, then g); here in turns, shifted, > 0. Blended with 0/1 masks and written in place:
    # every temporary is a (B, 1, H, W) plane. The comparisons write float masks directly (out=): a bool
    # mask converted to float costs ten times as much on a CPU.
    is_r = torch.eq(r, maxc, out=torch.empty_like(maxc))
    is_g = torch.eq(g, maxc, out=torch.empty_like(maxc)).sub_(is_r).clamp_min_(0.0)  # g is the max and r is not
    num = (r - g).add_(delta, alpha=4.0)  # the b case ...
    num.add_(is_g * ((b - r).add_(delta, alpha=2.0) - num)).add_(is_r * ((g - b) - num))  # ... replaced by g, then r
    hue = num.div_(delta.clamp_min(1e-12).mul_(6.0)).add_(shift.to(x.dtype).view(-1, 1, 1, 1) + 1.0)
    # HSV -> RGB: channel n in (r, g, b) = max - chroma * clamp(min(k, 4 - k), 0, 1),
    # k = (n + 6 * hue) mod 6 with n = 5, 3, 1; with t = k / 6 this is max - chroma * clamp(2 - 6 |t - 1/3|, 0, 1),
    # written as max + 6 chroma * clamp(|t - 1/3| - 1/3, -1/6, 0): one pass fewer. r, g, b are read no more,
    # so t is written over x.
    n = _constant((5 / 6, 3 / 6, 1 / 6), x.device, x.dtype)
    t = torch.add(hue, n, out=x).frac_()
    t.sub_(1.0 / 3.0).abs_().sub_(1.0 / 3.0).clamp_(-1.0 / 6.0, 0.0)
    return torch.addcmul(maxc, delta, t, value=6.0, out=x)


def gaussian_kernels(sigma: Tensor, ksize: int) -> Tensor:
    """Normalised 1-D Gaussian kernels, ``sigma`` (N,) -> ``(N, ksize)`` (torchvision's formula)."""
    t = torch.arange(ksize, device=sigma.device, dtype=sigma.dtype) - (ksize - 1) / 2
    return torch.softmax(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2, dim=1)


def gaussian_blur(x: Tensor, sigma: Tensor, ksize: int) -> Tensor:
    """Blur each image of ``x`` (B, C, H, W) with its own ``sigma`` (B,): separable depthwise
    convolution over ``B * C`` groups with reflect padding of ``ksize // 2``."""
    b, c, h, w = x.shape
    kern = gaussian_kernels(sigma.to(x.dtype), ksize).repeat_interleave(c, dim=0)  # (B*C, k)
    pad = ksize // 2
    y = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kern.view(b * c, 1, ksize, 1), groups=b * c)
    y = F.conv2d(y, kern.view(b * c, 1, 1, ksize), groups=b * c)
    return y.view(b, c, h, w)


_COLOUR_FNS: tuple[Callable[[Tensor, Tensor], Tensor], ...] = (
    adjust_brightness_, adjust_contrast_, adjust_saturation_, adjust_hue_)  # in _OPS order


# ----------------------------------------------------------------------------- crop sampling
def sample_crops(batch: int, height: int, width: int, scale: tuple[float, float],
                 ratio: tuple[float, float], generator: torch.Generator | None = None,
                 tries: int = CROP_TRIES) -> Tensor:
    """Vectorised ``RandomResizedCrop.get_params``: ``(B, 4)`` long boxes ``(top, left, h, w)``.

    Per sample, up to ``tries`` candidates with area ``~ U(scale) * H * W`` and log aspect
    ratio ``~ U(log ratio)``; the first one that fits is kept, otherwise the centre crop with
    the aspect ratio clamped into ``ratio``.
    """
    dev = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(batch, tries, 4, generator=generator, device=dev, dtype=torch.float64).cpu().numpy()
    return torch.from_numpy(_crops_from_uniform(u, height, width, scale, ratio)).to(dev)


def _crops_from_uniform(u: np.ndarray, height: int, width: int, scale: tuple[float, float],
                        ratio: tuple[float, float]) -> np.ndarray:
    """:func:`sample_crops` from its uniforms ``u`` (B, tries, 4) in [0, 1): (B, 4) int64 boxes. The arithmetic on
    these few numbers runs in numpy, which costs a microsecond per operation where torch's dispatch costs ten."""
    batch = u.shape[0]
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(lo + (hi - lo) * u[..., 1])
    w = np.round(np.sqrt(area * aspect)).astype(np.int64)  # (B, tries); rounds half to even, as torch.round
    h = np.round(np.sqrt(area / aspect)).astype(np.int64)
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.argmax(axis=1)  # index of the first valid try (0 if none)
    rows = np.arange(batch)
    w, h = w[rows, first], h[rows, first]
    top = np.minimum((u[rows, first, 2] * (height - h + 1)).astype(np.int64).clip(min=0), height - h)
    left = np.minimum((u[rows, first, 3] * (width - w + 1)).astype(np.int64).clip(min=0), width - w)
    boxes = np.stack([top, left, h, w], axis=1)
    # fallback: centre crop with the aspect ratio clamped into [min(ratio), max(ratio)]
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    boxes[~ok.any(axis=1)] = ((height - fh) // 2, (width - fw) // 2, fh, fw)
    return boxes


def resized_crop(x: Tensor, boxes: Tensor, size: int, flip: Tensor | None = None, grid: Tensor | None = None) -> Tensor:
    """Crop ``boxes`` (B, 4) ``(top, left, h, w)`` from float ``x`` (B, C, H, W) and resize every
    crop bilinearly to ``(size, size)`` -> ``(B, C, size, size)``, batched; crops where ``flip``
    (B,) bool is set come out mirrored left-right (sampled right to left: no extra pass). ``grid``
    (B, 2, size), on the CPU: the sampling positions of :func:`_sampling_positions` for these boxes and
    flips, if they were worked out already (``BatchAugment.sample_steps`` does, many steps at once).

    Crops no larger than ``size`` (upsampling) go through one ``grid_sample`` (plain bilinear,
    ``align_corners=False``, like torchvision's resize); larger crops go through one
    ``roi_align`` whose adaptive sampling averages ``ceil(crop / size)**2`` bilinear taps per
    output pixel, standing in for torchvision's antialiasing. Both sample the image around the
    box, so border pixels may mix in a neighbour just outside the crop (torchvision clamps at it).
    """
    b, c, height, width = x.shape
    boxes_cpu = boxes.cpu()
    flip_cpu = torch.zeros(b, dtype=torch.bool) if flip is None else flip.cpu()
    if grid is None:
        grid = torch.from_numpy(_sampling_positions(boxes_cpu.numpy(), flip_cpu.numpy(), size, height, width))
    up = (boxes_cpu[:, 2:] <= size).all(dim=1)
    if bool(up.all()):
        return _grid_crop(x, grid)
    out = x.new_empty(b, c, size, size)
    up_idx, down_idx = torch.nonzero(up).squeeze(1), torch.nonzero(~up).squeeze(1)
    if up_idx.numel() > 0:
        idx = to_device(up_idx, x.device)
        out[idx] = _grid_crop(x[idx], grid[up_idx])
    top, left, h, w = boxes_cpu[down_idx].to(x.dtype).unbind(1)
    rois = torch.stack([down_idx.to(x.dtype), left, top, left + w, top + h], dim=1)  # batch, x1, y1, x2, y2
    down = roi_align(x, to_device(rois, x.device), output_size=(size, size), spatial_scale=1.0,
                     sampling_ratio=-1, aligned=True)
    mirror = to_device(torch.nonzero(flip_cpu[down_idx]).squeeze(1), x.device)
    down[mirror] = down[mirror].flip(-1)
    out[to_device(down_idx, x.device)] = down
    return out


def _sampling_positions(boxes: np.ndarray, flip: np.ndarray, size: int, height: int, width: int) -> np.ndarray:
    """Bilinear sampling positions of crops ``boxes`` (..., B, 4) int ``(top, left, h, w)`` resized to ``size``
    from ``height x width`` images: (..., B, 2, size) float32 in [-1, 1], across then down (``grid_sample``'s
    x and y; separable, so the (B, size, size, 2) grid is spread out on the device). Crops where ``flip``
    (..., B) bool is set read right to left. Worked out in numpy: a few microseconds where torch's dispatch costs
    ten per operation."""
    top, left, h, w = np.moveaxis(boxes.astype(np.float32), -1, 0)[..., None]  # each (..., B, 1)
    t = (np.arange(size, dtype=np.float32) + 0.5) / size  # output pixel centres in [0, 1]
    t_x = np.where(flip[..., None], t[::-1], t)  # (..., B, size): mirrored crops read right to left
    gx = (left + t_x * w) * (2.0 / width) - 1.0
    gy = (top + t * h) * (2.0 / height) - 1.0
    return np.stack([gx, gy], axis=-2)


def _grid_crop(x: Tensor, grid: Tensor) -> Tensor:
    """Bilinear crop+resize of ``x`` (B, C, H, W) at the separable sampling positions ``grid`` (B, 2, size)
    (:func:`_sampling_positions`, on the CPU) via ``grid_sample`` -> (B, C, size, size)."""
    b, _, size = grid.shape
    gx_gy = to_device(grid, x.device, x.dtype)  # only these (B, 2, size) rows cross
    full = torch.stack([gx_gy[:, 0:1].expand(b, size, size), gx_gy[:, 1:2].transpose(1, 2).expand(b, size, size)], dim=-1)
    return F.grid_sample(x, full, mode="bilinear", padding_mode="border", align_corners=False)


def _normalise_(x: Tensor, mean: Sequence[float], std: Sequence[float], scale: float) -> Tensor:
    """``x = (x * scale - mean) / std`` per channel for ``x`` (B, 3, H, W), in place: one multiply, one add."""
    gain = _constant(tuple(scale / s for s in std), x.device, x.dtype)
    shift = _constant(tuple(m / s for m, s in zip(mean, std)), x.device, x.dtype)
    return x.mul_(gain).sub_(shift)


def _three_channels(x: Tensor) -> Tensor:
    """(B, 1 or 3, H, W) -> (B, 3, H, W) with memory of its own, ready for in-place kernels."""
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def _check_images(images: Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 (B, C, H, W) with C in (1, 3), got {images.dtype} "
                         f"{tuple(images.shape)}")


# ----------------------------------------------------------------------------- augmentation
class BatchAugment:
    """Per-sample random augmentation of a whole uint8 batch (MoCo-v2 / ReSSL recipe).

    ``strong=False`` (teacher view): RandomResizedCrop + horizontal flip only, colours are
    never changed. ``strong=True`` (student view) adds ColorJitter (p=``jitter_p``, the four ops in a
    random order drawn per batch or per sample, ``jitter_order``), RandomGrayscale (p=``gray_p``) and GaussianBlur
    (p=``blur_p``, sigma ~ U(``blur_sigma``) pixels; on and its kernel as :func:`blur_rule` says). ``crop=False`` skips the crop (the input is expected to be
    ``size x size``; other sizes are resized).
    """

    def __init__(self, size: int, *, strong: bool, mean: Sequence[float], std: Sequence[float],
                 crop: bool = True, crop_scale: tuple[float, float] = (0.2, 1.0),
                 crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
                 jitter_p: float = 0.8, gray_p: float = 0.2, blur: bool | None = True,
                 blur_p: float = 0.5, blur_sigma: tuple[float, float] = (0.1, 2.0),
                 flip_p: float = 0.5, jitter_order: str = "batch") -> None:
        if jitter_order not in ("batch", "sample"):
            raise ValueError(f"jitter_order must be 'batch' or 'sample', got {jitter_order!r}")
        self.jitter_order = jitter_order
        self.size, self.strong, self.crop = int(size), bool(strong), bool(crop)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(self.mean) not in (1, 3) or len(self.std) not in (1, 3):
            raise ValueError("mean and std need 1 or 3 entries")
        self.crop_scale, self.crop_ratio = crop_scale, crop_ratio
        self.jitter, self.jitter_p, self.gray_p = jitter, jitter_p, gray_p
        self.blur, self.kernel_size = blur_rule(self.size, blur, blur_sigma[1])
        self.blur_p, self.blur_sigma, self.flip_p = blur_p, blur_sigma, flip_p

    def __repr__(self) -> str:
        return (f"BatchAugment(size={self.size}, strong={self.strong}, crop={self.crop}, "
                f"blur={self.blur and self.strong}, kernel_size={self.kernel_size})")

    def sample_params(self, batch: int, height: int | None = None, width: int | None = None,
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Draw every random parameter for ``batch`` images of ``height x width`` (default
        ``size``), on the generator's device (CPU by default). Keys, all with leading dim B:
        ``crop`` (B, 4) long ``(top, left, h, w)`` [only if ``crop``], ``flip`` (B,) bool, and
        for strong views ``jitter`` (B,) bool, ``brightness``/``contrast``/``saturation``/``hue``
        (B,) float, ``order`` (B, 4) long (a permutation of 0..3 = the four ops above),
        ``gray`` (B,) bool, ``blur`` (B,) bool, ``sigma`` (B,) float. With ``crop`` also ``grid``
        (B, 2, size) float: the crop's bilinear sampling positions across and down, in [-1, 1]
        (worked out from ``crop`` and ``flip``: change those and drop it).
        """
        return {k: v[0] for k, v in self.sample_steps(1, batch, height, width, generator).items()}

    def sample_steps(self, steps: int, batch: int, height: int | None = None, width: int | None = None,
                     generator: torch.Generator | None = None, order_steps: int = 1) -> dict[str, Tensor]:
        """The parameters of ``steps`` batches in one draw: each value of :meth:`sample_params` with a leading
        ``steps`` dimension, ``(steps, B, ...)``; batch ``s`` takes ``{k: v[s]}``. Many steps in one call run the
        numpy work once: inside the training loop, where the network has left the caches cold, each call costs
        about a millisecond on a CPU whatever its size. ``sample_params`` is this with ``steps=1``.

        With ``jitter_order="batch"``, batches ``0..order_steps-1``, ``order_steps..2*order_steps-1``, ... share
        their first batch's colour order, so that their images can be augmented in one call with whole-batch kernels.
        """
        height, width = height or self.size, width or self.size
        dev = generator.device if generator is not None else torch.device("cpu")
        # every uniform of the call in one draw: per image, crop tries, then flip, then for strong views jitter, the
        # four factors, gray, blur, sigma and the four keys of the order
        per_sample = 13 if self.strong else 1
        n_crop = 4 * CROP_TRIES if self.crop else 0
        u = torch.rand(steps, batch, n_crop + per_sample, generator=generator, device=dev, dtype=torch.float64).cpu().numpy()
        v = u[..., n_crop:]

        def out(a: np.ndarray) -> Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(dev)

        p: dict[str, Tensor] = {}
        flip = v[..., 0] < self.flip_p
        if self.crop:
            crops = _crops_from_uniform(u[..., :n_crop].reshape(steps * batch, CROP_TRIES, 4), height, width,
                                        self.crop_scale, self.crop_ratio).reshape(steps, batch, 4)
            p["crop"] = out(crops)
            p["grid"] = out(_sampling_positions(crops, flip, self.size, height, width))
        p["flip"] = out(flip)
        if self.strong:
            p["jitter"] = out(v[..., 1] < self.jitter_p)
            for k, (name, amount) in enumerate(zip(_OPS, self.jitter)):
                lo, hi = ((-amount, amount) if name == "hue" else (max(0.0, 1.0 - amount), 1.0 + amount))
                p[name] = out((lo + (hi - lo) * v[..., 2 + k]).astype(np.float32))
            p["gray"] = out(v[..., 6] < self.gray_p)
            p["blur"] = out((v[..., 7] < self.blur_p) & self.blur)
            p["sigma"] = out((self.blur_sigma[0] + (self.blur_sigma[1] - self.blur_sigma[0]) * v[..., 8]).astype(np.float32))
            first = np.arange(steps) // order_steps * order_steps  # the batch whose order each batch takes
            keys = v[..., 9:13] if self.jitter_order == "sample" else np.broadcast_to(v[first, :1, 9:13], (steps, batch, 4))
            p["order"] = out(np.argsort(keys, axis=-1).astype(np.int64))
        return p

    def apply(self, images: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Augment ``images`` (B, C, H, W) uint8 with given ``params`` (see :meth:`sample_params`)
        -> (B, 3, size, size) float32, normalised, on ``images.device``."""
        _check_images(images)
        dev = images.device
        x = images.float()  # (uint8 x float multiplies take 3-4 times as long as this conversion)
        if self.crop:
            x = resized_crop(x, params["crop"], self.size, params["flip"], params.get("grid"))  # the flip rides along
        else:
            if x.shape[-2:] != (self.size, self.size):
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True,
                                  align_corners=False)
            # masks as exact 0/1 lerp weights (torch.where is slow on CPU)
            flip = params["flip"].to(device=dev, dtype=x.dtype, non_blocking=True).view(-1, 1, 1, 1)
            x = torch.lerp(x, x.flip(-1), flip)
        x = _three_channels(x)  # from here on x is ours: every kernel below works in place
        if not self.strong:
            return _normalise_(x, self.mean, self.std, 1.0 / 255.0)
        x.mul_(1.0 / 255.0)  # colour operations work on [0, 1]

        jit, order = params["jitter"].cpu(), params["order"].cpu()
        if bool((order == order[:1]).all()):  # one order for the batch: whole-batch ops, identity where not jittered
            factors = torch.stack([params[name].cpu().float() for name in _OPS])  # (4, B), in _OPS order
            identity = torch.tensor([1.0, 1.0, 1.0, 0.0]).view(4, 1)  # brightness, contrast, saturation x1; hue +0
            factors = to_device(torch.where(jit, factors, identity), dev, x.dtype)  # one copy
            for op in order[0].tolist():
                _COLOUR_FNS[op](x, factors[op])
            order = order[:0]  # nothing left for the per-sample path below
        for step in range(order.shape[1] if order.shape[0] else 0):
            for op, fn in enumerate(_COLOUR_FNS):
                sel = torch.nonzero(jit & (order[:, step] == op)).squeeze(1)  # on CPU: no sync
                if sel.numel() > 0:
                    sel = to_device(sel, dev)
                    x[sel] = fn(x[sel], params[_OPS[op]].to(dev, non_blocking=True)[sel])
        gray = params["gray"].to(device=dev, dtype=x.dtype, non_blocking=True).view(-1, 1, 1, 1)
        x.lerp_(grayscale(x).expand_as(x), gray)
        sel = torch.nonzero(params["blur"].cpu()).squeeze(1)
        if sel.numel() > 0:
            sel = to_device(sel, dev)
            x[sel] = gaussian_blur(x[sel], params["sigma"].to(dev, non_blocking=True)[sel],
                                   self.kernel_size)
        return _normalise_(x, self.mean, self.std, 1.0)

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """images (B, C, H, W) uint8 (C = 1 or 3; 1 is replicated to 3) -> (B, 3, size, size)
        float32, normalised ((x/255 - mean) / std), on images.device."""
        _check_images(images)
        params = self.sample_params(images.shape[0], images.shape[2], images.shape[3], generator)
        return self.apply(images, params)


def weak_augment(size: int, mean: Sequence[float], std: Sequence[float], **kw) -> BatchAugment:
    """Teacher view: RandomResizedCrop + horizontal flip only (never colour operations)."""
    return BatchAugment(size, strong=False, mean=mean, std=std, **kw)


def strong_augment(size: int, mean: Sequence[float], std: Sequence[float], **kw) -> BatchAugment:
    """Student view: MoCo-v2 recipe (crop, jitter p=0.8, grayscale p=0.2, blur p=0.5, flip)."""
    return BatchAugment(size, strong=True, mean=mean, std=std, **kw)


def eval_transform(images: Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Deterministic eval transform: uint8 (B, C, H, W) -> float32 (B, 3, size, size); bilinear
    antialiased resize to ``size x size`` if needed, then ``(x/255 - mean) / std``."""
    _check_images(images)
    x = images.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = x.clamp_(0.0, 255.0)
    return _normalise_(_three_channels(x), mean, std, 1.0 / 255.0)


def torchvision_pipeline(size: int, *, strong: bool, mean: Sequence[float], std: Sequence[float],
                         blur: bool | None = True,
                         crop_scale: tuple[float, float] = (0.2, 1.0), flip: bool = True) -> Callable:
    """Per-sample reference recipe with ``torchvision.transforms.v2`` (official-code style):
    PIL image or uint8 (C, H, W) tensor -> float32 (3, size, size), normalised."""
    from torchvision.transforms import v2

    ops: list = [v2.ToImage(), v2.RGB(), v2.RandomResizedCrop(size, scale=crop_scale, antialias=True)]
    if strong:
        ops += [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(0.2)]
        blurred, k = blur_rule(size, blur)
        if blurred:
            ops.append(v2.RandomApply([v2.GaussianBlur(k, sigma=(0.1, 2.0))], p=0.5))
    ops += [v2.RandomHorizontalFlip(0.5 if flip else 0.0), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)
