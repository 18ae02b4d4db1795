"""The batches a run draws from a dataset (``ressl.data``): training pairs for the loop and evaluation batches.

Sets held in memory are sliced on their device; image folders are decoded (and cropped) by loader workers, which
leave SIGTERM and SIGINT to the main process so that it stops at a step boundary with a checkpoint.
"""

from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.context
import os
import pickle
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from ressl import dist
from ressl.augment import eval_transform
from ressl.decode import DecodeSize, crop_decode_size, resize_decode_size
from ressl.folder import ImageFolderDataset
from ressl.views import draw_seed

if TYPE_CHECKING:
    from ressl.data import Dataset, Split


def precropped(dataset: Dataset) -> bool:
    """Whether training views arrive already cropped (folders: crops are cut by loader workers)."""
    return dataset.train.images is None


class TwoViews:
    """A per-image (weak, strong) pair made by loader workers: (C, H, W) -> (2, 3, S, S).

    With ``ressl.augment.torchvision_pipeline`` for both (``augment_backend torchvision``, the official
    code's loader) the views are finished float images; folders otherwise get two uint8 crops here.
    """

    def __init__(self, weak: Callable[[torch.Tensor], torch.Tensor], strong: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.weak, self.strong = weak, strong

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.weak(image), self.strong(image)])


def _two_crops(size: int, min_scale: float) -> TwoViews:
    """Two independent RandomResizedCrops of a decoded image (weak, strong sources): uint8 (2, 3, S, S)."""
    from torchvision.transforms import v2

    crop = v2.RandomResizedCrop(size, scale=(min_scale, 1.0), antialias=True)
    return TwoViews(crop, crop)


def crops_decode_size(size: int, min_scale: float) -> DecodeSize:
    """What crops of ``RandomResizedCrop(size, scale=(min_scale, 1))`` need of an image (``ImageFolderDataset``'s
    ``decode_size``; a module-level function's partial, which a fork server's workers can unpickle)."""
    return functools.partial(crop_decode_size, size=size, min_scale=min_scale)


class _InMemoryImages(torch.utils.data.Dataset):
    """``(transform(images[i]), labels[i])`` of an in-memory split, for loader workers (a CPU copy of the images)."""

    def __init__(self, split: Split, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        assert split.images is not None
        self.images, self.transform = split.images.cpu(), transform
        self.labels = split.labels_or_unlabeled().cpu()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[i]), self.labels[i]


class _EvalResize:
    """Resize (shorter side to size/0.875 above 64 px, as torchvision's ImageNet protocol) and centre-crop.
    ``decode_size``: what it needs of an image (``ImageFolderDataset``'s)."""

    def __init__(self, size: int) -> None:
        from torchvision.transforms import v2

        resize = size if size <= 64 else round(size / 0.875)
        self.t = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size)])
        self.decode_size: DecodeSize = functools.partial(resize_decode_size, shorter=resize)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.t(image)


def epoch_seed(seed: int, epoch: int) -> int:
    """A generator seed for each (run seed, epoch): the epoch's order, and the draws of its loader's crops."""
    return seed * 1_000_003 + epoch  # within 64 bits for the seeds config.validate accepts (below 2**32)


def pretrain_batches(
    dataset: Dataset, batch_size: int, image_size: int, min_scale: float, workers: int,
    order: torch.Tensor, start: int, device: torch.device, views: TwoViews | None = None, seed: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The epoch's (weak source, strong source) batches for this process, from batch ``start`` on.

    ``order`` (N,) is the epoch's permutation; the last partial batch is dropped. In memory: both
    sources are the same (B, C, H, W) slice, cropped later on the device. Folders: two independent
    crops (B, 3, S, S) cut by the workers. ``batch_size`` is global; each process takes its share.
    With ``views`` (``augment_backend torchvision``) loader workers make finished float views instead,
    image by image, from memory or folder alike. Their random draws come from ``seed`` (the epoch's), the process's
    rank and ``start``: each process crops its images its own way (in the main process, with no workers, through the
    global generator, seeded here).
    """
    world, rank = dist.world_size(), dist.rank()
    local = batch_size // world
    split = dataset.train
    steps = len(split) // batch_size
    if split.images is not None and views is None:
        images = split.images
        order = order.to(images.device)  # once per epoch: a copy per step from pageable memory would wait for the GPU
        for step in range(start, steps):
            idx = order[step * batch_size + rank * local : step * batch_size + (rank + 1) * local]
            batch = images.index_select(0, idx).to(device, non_blocking=True)  # 10x faster than images[idx] on CPU
            yield batch, batch
        return
    mine = order[: steps * batch_size].view(steps, world, local)[start:, rank].reshape(-1).tolist()
    if split.images is not None:
        assert views is not None
        ds: torch.utils.data.Dataset = _InMemoryImages(split, views)
    else:
        assert split.folder is not None
        ds = ImageFolderDataset(split.folder, transform=views or _two_crops(image_size, min_scale),
                                max_bad_fraction=split.max_bad_fraction, record=split.failure_record(),
                                decode_size=None if views else crops_decode_size(image_size, min_scale))
    draws = torch.Generator().manual_seed(draw_seed((seed, rank), start))
    # in memory: forked workers share the images as they are, where a fork server's would copy them into shared
    # memory (a container's /dev/shm is often 64 MB); under torchrun, whose threads make forking unsafe, they must
    fresh = split.images is None or dist.is_distributed()
    for pair, _ in worker_batches(torch.utils.data.Subset(ds, mine), local, workers, device, draws, drop_last=True, fresh=fresh):
        pair = pair.to(device, non_blocking=True)  # (B, 2, 3, S, S)
        yield pair[:, 0], pair[:, 1]


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def ignore_stop_signals(worker_id: int) -> None:
    """A loader worker's start (``worker_init_fn``): SIGTERM and SIGINT are left to the main process, which stops at a
    step boundary with a checkpoint. A launcher or scheduler signals the whole process group (torchrun, SLURM,
    Ctrl-C): a worker killed by it would break the main process's next batch before it could stop cleanly.

    SIGINT is ignored. SIGTERM stays blocked (the worker was started so, :func:`started`) and a thread takes each
    one: from the main process, which ends a worker that did not stop by itself (a loader closed early, the
    interpreter's exit), the worker exits as PyTorch's own handler would make it; from anyone else it is dropped.
    Where a thread cannot wait for a signal (no ``sigwaitinfo``), PyTorch's handler stays."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    creator = multiprocessing.parent_process()  # the main process, also where a fork server started the worker
    parent = creator.pid if creator is not None and creator.pid is not None else os.getppid()

    def take_sigterm() -> None:
        while True:
            if signal.sigwaitinfo([signal.SIGTERM]).si_pid == parent:
                os._exit(0)

    threading.Thread(target=take_sigterm, name="ressl-sigterm", daemon=True).start()


def started(loader: DataLoader) -> Iterator[Any]:
    """``iter(loader)``, its worker processes started with SIGTERM and SIGINT blocked, which they inherit until
    :func:`ignore_stop_signals` runs in them: PyTorch gives a new worker a SIGTERM handler of its own first, and a
    signal in that window killed it (a launcher's SIGTERM as an epoch's workers started). In this process a signal
    sent meanwhile arrives once they are started.

    With a fork server (:func:`fresh_workers`) the server is started here too, blocked alike for good, so that a
    launcher's SIGTERM to the whole process group leaves it (and with it its workers) to the main process. First
    the resource tracker that its queues need: starting, it unblocks the two signals in the calling thread."""
    if loader.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):
        return iter(loader)
    server = isinstance(loader.multiprocessing_context, multiprocessing.context.ForkServerContext)
    if server:
        from multiprocessing import forkserver, resource_tracker

        resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        if server:
            forkserver.ensure_running()
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def worker_batches(ds: torch.utils.data.Dataset, batch_size: int, workers: int, device: torch.device,
                   generator: torch.Generator | None = None, fresh: bool = True, **loader_args: Any) -> Iterator[Any]:
    """The batches of ``ds``, made by up to ``workers`` loader processes (:func:`loader_workers`) that leave stop
    signals to this one (:func:`ignore_stop_signals`, :func:`started`), pinned for a copy to CUDA. Their random draws
    come from ``generator``; without workers they are made here, from the global generator, seeded from it.
    ``fresh``: the workers start from a fork server (:func:`fresh_workers`), not as copies of this process (False
    for a dataset held in memory in one process, which forked workers share as it is). The warning filters of this
    process go with them (:class:`_WorkerStart`)."""
    processes = loader_workers(workers)
    if generator is not None and processes == 0:
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    context = fresh_workers() if fresh and processes > 0 else None
    return started(DataLoader(ds, batch_size=batch_size, num_workers=processes, pin_memory=device.type == "cuda",
                              generator=generator, worker_init_fn=_WorkerStart(), multiprocessing_context=context,
                              **loader_args))


class _WorkerStart:
    """A loader worker's ``worker_init_fn``: this process's warning filters as they are now (a fork server's workers
    start from the server's: ``warnings.simplefilter("ignore", DataWarning)`` would not reach them), then
    :func:`ignore_stop_signals`. Filters that cannot travel to another process are left out."""

    def __init__(self) -> None:
        self.filters = [entry for entry in warnings.filters if _travels(entry)]

    def __call__(self, worker_id: int) -> None:
        saved = list(warnings.filters)
        try:
            warnings.resetwarnings()
            for action, message, category, module, lineno in reversed(self.filters):  # each goes in front: same order
                warnings.filterwarnings(action, _pattern(message), category, _pattern(module), lineno)
        except Exception:  # noqa: BLE001 - best effort: a filter that does not fit keeps the worker's own filters
            warnings.filters[:] = saved
        _forget_fork_server()
        ignore_stop_signals(worker_id)


def _forget_fork_server() -> None:
    """Close this worker's copy of the pipe that keeps the fork server alive. The server exits when every copy is
    closed; Python gives one to each process the server starts (so that it may start more: a loader worker never
    does). With the copies open, a main process killed outright (SIGKILL, the out-of-memory killer) left the server
    and its workers running for ever: PyTorch's workers exit when their parent process changes, and their parent is
    the server. Closed, the server exits with the main process, and the workers within seconds after it."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is None:
        return
    try:
        os.close(fd)
    except OSError:
        pass
    server._forkserver_alive_fd = None  # type: ignore[union-attr]


def _pattern(regex: re.Pattern[str] | str | None) -> str:
    """A warning filter's message or module: compiled, a plain string (the interpreter's own filters) or None."""
    return "" if regex is None else getattr(regex, "pattern", regex)  # type: ignore[return-value]


def _travels(value: object) -> bool:
    try:
        pickle.loads(pickle.dumps(value))
        return True
    except Exception:  # noqa: BLE001 - a category defined in a script, a lambda...
        return False


_PRELOADED = ["torch", "torchvision.transforms.v2", "ressl.batches"]  # imported once, by the fork server


def fresh_workers() -> multiprocessing.context.BaseContext | None:
    """The start method of loader workers that read files: ``forkserver``, where the platform has it (else None:
    the default). A worker forked from this process would start as a copy of it at that instant, the locks that its
    other threads held then included, and never get them: a thread starting or ending at that instant (the last
    epoch's loader's queue threads, a process group's threads under torchrun) hung a worker before its first image,
    and its process with it, in 2 of 7 ``linear --augment`` runs of a folder under torchrun. The fork server is a
    process of its own without threads, started once (with the stop signals blocked, as its workers inherit them:
    :func:`started`), with torch already imported; workers start from it. A script that uses the API with image
    folders needs ``if __name__ == "__main__":`` (the workers import it), as with Python 3.14's default start."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOADED)
    return context


def refuse_in_a_starting_worker() -> None:
    """Stop a loader worker that, as it starts, is running a script's call into ressl. A worker started by the fork
    server (or spawned) first imports the main script, as Python does for every start method but fork: a script that
    calls ``ressl.train.pretrain`` (or loads a dataset) without ``if __name__ == "__main__":`` would run it again
    inside each worker, a second pretraining beside the first (or an error about the run directory the first holds).
    Instead the worker says why on stderr, in one line, and exits; the script's own process then reports that its
    loader worker ended."""
    if not getattr(multiprocessing.current_process(), "_inheriting", False):  # set while a child imports the script
        return
    script = sys.argv[0] if sys.argv and sys.argv[0] else "the main script"  # the script's own argv (set for the child)
    print(f"ressl: {script} calls ressl as it is imported, and loader workers import it as they start: put its calls "
          'under `if __name__ == "__main__":`', file=sys.stderr, flush=True)
    raise SystemExit(1)


def loader_workers(asked: int) -> int:
    """``--workers``, but no more than the CPUs this process may use (more only queue up, and PyTorch warns)."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(asked, available))


PAD_LABEL = -100  # rows added so that every process gets as many evaluation images; dropped after gathering


def rows_per_rank(n: int) -> int:
    """Evaluation rows each process takes of ``n`` images (the last ones padded with ``PAD_LABEL``)."""
    return -(-n // dist.world_size())


def rank_block(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's block of ``n`` rows (:func:`rows_per_rank` of them): their indices into ``0..n-1`` (R,) int64,
    and which of them only pad the last block to equal counts (R,) bool (they repeat the first rows)."""
    per_rank = rows_per_rank(n)
    rows = torch.arange(dist.rank() * per_rank, (dist.rank() + 1) * per_rank)
    return rows.remainder(n), rows >= n


def eval_batches(
    split: Split, image_size: int, mean: tuple[float, ...], std: tuple[float, ...], batch_size: int,
    device: torch.device, workers: int = 4, stand_in: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic evaluation batches: normalised float images (B, 3, S, S) and labels (B,).

    A folder's image that broke since the scan stops them, as its row stands for its file (``embed``'s files.txt,
    ``report``'s pictures); with ``stand_in`` (kNN and the linear probe, which count labels, not files) the next
    readable image takes its row with its own label, as in training, and one warning says so (none for a file
    training already found broken: the split's record).

    Under ``torchrun`` each process takes its block of consecutive images, the last padded to equal counts with
    ``PAD_LABEL`` rows: ``ressl.evaluate.extract_features`` gathers the blocks in rank order, which is the split's
    (``embed``'s rows name their files in that order), and drops the padding.
    """
    indices, pad = rank_block(len(split))
    per_rank = len(indices)
    if split.images is not None:
        labels = torch.where(pad, PAD_LABEL, split.labels_or_unlabeled()[indices])
        for start in range(0, per_rank, batch_size):
            idx = indices[start : start + batch_size]
            x = split.images[idx.to(split.images.device, non_blocking=True)].to(device, non_blocking=True)
            yield eval_transform(x, image_size, mean, std), labels[start : start + batch_size].to(device, non_blocking=True)
        return
    assert split.folder is not None
    resize = _EvalResize(image_size)
    ds = ImageFolderDataset(split.folder, transform=resize, max_bad_fraction=split.max_bad_fraction,
                            replace=stand_in, record=split.failure_record(), decode_size=resize.decode_size)
    start = 0
    for x, y in worker_batches(torch.utils.data.Subset(ds, indices.tolist()), batch_size, workers, device):
        y = torch.where(pad[start : start + len(y)], PAD_LABEL, y)
        start += len(y)
        yield eval_transform(x.to(device, non_blocking=True), image_size, mean, std), y.to(device, non_blocking=True)
