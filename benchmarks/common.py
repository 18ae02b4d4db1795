"""Shared pieces of the benchmarks: flags, configuration, data, timing and the result line.

Every benchmark measures two things side by side in the same process and reports their ratio;
no absolute time is asserted anywhere.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ressl import allocator, config
from ressl.cli import USER_ERRORS
from ressl.config import Config
from ressl.data import Dataset, load_dataset
from ressl.dist import resolve_device
from ressl.folder import holds_images
from ressl.model import ReSSL

SHARED_CIFAR10 = Path("/work/shared/data/cifar10")
DATA_ENV = "RESSL_BENCH_DATA"  # "random" forces generated images, a directory points at a train.npz

# --quick: small enough for a smoke test of a few seconds on a CPU
QUICK_OVERRIDES: dict[str, Any] = dict(batch_size=32, queue_size=256, width=8, hidden_dim=64, out_dim=32)


@dataclass
class Result:
    name: str
    ratio: float
    target: str  # e.g. "<= 1.10"
    detail: str  # the absolute rates behind the ratio, in words
    quick: bool = False  # --quick's toy sizes: the target does not apply

    @property
    def met(self) -> bool:
        op, value = self.target.split()
        return self.ratio <= float(value) if op == "<=" else self.ratio >= float(value)

    def line(self) -> str:
        verdict = "not measured (--quick)" if self.quick else "met" if self.met else "NOT met"
        return f"{self.name}: ratio {self.ratio:.3f} (target {self.target}: {verdict})  |  {self.detail}"


def report(module: str, name: str, ratio: float, target: str, detail: str, quick: bool = False) -> Result:
    """The benchmark's result, printed as its ``[module]`` line (the line ``benchmarks.__main__`` and the tests read)."""
    result = Result(name, ratio, target, detail, quick)
    print(f"[{module}] {result.line()}", flush=True)
    return result


def add_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run (default: cuda if visible)")
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds: a smoke test, not a measurement")
    parser.add_argument("--preset", default=None, help="ressl preset (default: cifar10-cpu on CPU, cifar10 on CUDA)")
    parser.add_argument("--data", default=os.environ.get(DATA_ENV, "auto"),
                        help=f"auto (CIFAR-10 from {SHARED_CIFAR10} when present, else random images), random, "
                             f"or a directory holding train.npz (end_to_end: or images) (default: ${DATA_ENV} or auto)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a configuration field, e.g. --set batch_size=256 (repeatable)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (the median is reported)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's, one per core); 1 on a CPU shared with another job")
    return parser


def parser(description: str, prog: str) -> argparse.ArgumentParser:
    return add_flags(argparse.ArgumentParser(prog=prog, description=description))


def device_of(args: argparse.Namespace) -> torch.device:
    allocator.keep_freed_memory()  # as the ressl command does
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return resolve_device(args.device)


def build_config(args: argparse.Namespace, data_dir: Path, **extra: Any) -> Config:
    """The preset (cifar10-cpu on CPU, cifar10 on CUDA), the --quick sizes, --set overrides, then ``extra``."""
    device = device_of(args)
    preset = args.preset or ("cifar10" if device.type == "cuda" else "cifar10-cpu")
    values: dict[str, Any] = dict(QUICK_OVERRIDES) if args.quick else {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE")
        values[key] = value
    values.update(data=str(data_dir), device=args.device, **extra)
    return config.resolve(preset, values)


_GENERATED: dict[int, Path] = {}


def data_dir(args: argparse.Namespace, folders: bool = False) -> tuple[Path, str]:
    """A directory with train.npz (or, where ``folders`` allows, of images: read as ``ressl pretrain`` reads it) and a
    phrase saying what it holds."""
    if args.data not in ("auto", "random"):
        path = Path(args.data)
        if (path / "train.npz").exists():
            return path, f"images from {path / 'train.npz'}"
        if folders and path.is_dir() and holds_images(path):
            return path, f"the image folder {path}"
        raise SystemExit(f"--data {path}: no train.npz there" + (" and no images" if folders else ""))
    if args.data == "auto" and (SHARED_CIFAR10 / "train.npz").exists():
        return SHARED_CIFAR10, f"CIFAR-10 from {SHARED_CIFAR10 / 'train.npz'}"
    n = 2048 if args.quick else 10240
    if n not in _GENERATED:
        root = Path(tempfile.mkdtemp(prefix="ressl-bench-data-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        rng = np.random.default_rng(0)
        np.savez(root / "train.npz", x=rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8),
                 y=rng.integers(0, 10, size=n))
        _GENERATED[n] = root
    why = "asked for" if args.data == "random" else f"{SHARED_CIFAR10 / 'train.npz'} absent"
    return _GENERATED[n], f"{n} random uint8 32x32 images ({why})"


def load(cfg: Config) -> Dataset:
    return load_dataset(cfg.dataset, cfg.data, False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds for one call of ``fn``, the device drained before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def alternate(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of each of ``repeats`` calls of each function, timed in alternation (A B A B ...) after ``warmup``
    calls of each, so that a drift of the machine's speed touches all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return times


def side_by_side(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternation (see :func:`alternate`)."""
    return {name: statistics.median(t) for name, t in alternate(fns, device, repeats, warmup).items()}


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median of the ratios of calls timed next to each other (``alternate``'s lists): a change of the machine's
    speed between pairs, as when another job starts on a shared host, cancels out within each pair."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def ratio_quartiles(numerator: list[float], denominator: list[float]) -> tuple[float, float]:
    """The first and third quartiles of the same paired ratios: how far the pairs scatter around their median."""
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    if len(ratios) < 2:
        return ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, q3


def channels_last(model: ReSSL, cfg: Config) -> ReSSL:
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model  # type: ignore[call-overload]


def describe(cfg: Config, device: torch.device, amp_dtype: torch.dtype | None, graph: bool = False) -> str:
    return (f"{cfg.backbone} width {cfg.width}, {cfg.image_size}px, batch {cfg.batch_size}, queue {cfg.queue_size}, "
            f"device {device.type}, {'bf16 autocast' if amp_dtype is not None else 'fp32'}"
            f"{', channels_last' if cfg.channels_last else ''}{', CUDA graphs' if graph else ''}, {torch.get_num_threads()} threads")


def main(run: Callable[[argparse.Namespace], Result], doc: str, module: str,
         add_flags: Callable[[argparse.ArgumentParser], argparse.ArgumentParser] | None = None,
         argv: list[str] | None = None) -> int:
    """``python -m benchmarks.<module>``: parse the shared flags (plus ``add_flags``'), run one benchmark."""
    p = parser(doc.splitlines()[0], f"python -m benchmarks.{module}")
    args = (add_flags(p) if add_flags else p).parse_args(argv)
    return user_errors_in_one_line(lambda: run(args), f"python -m benchmarks.{module}")


def user_errors_in_one_line(body: Callable[[], Any], prog: str) -> int:
    """Run ``body``; a user's mistake (no GPU for --device cuda, bad --set, missing data), the ``ressl`` command's
    ``USER_ERRORS``, is one line and exit code 2."""
    try:
        body()
    except USER_ERRORS as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 0
