"""Distributed helpers read from ``torchrun``'s (or SLURM's) environment; each is a no-op in a single process."""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist
from torch import nn

from ressl.errors import StoppedWithRankZero
from ressl.launcher import launched_rank, launched_world_size, local_rank, speaks_for_machine  # noqa: F401 (dist.X for callers)

T = TypeVar("T")


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def world_size() -> int:
    return torch_dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return torch_dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def local_device_index() -> int:
    """This process's GPU: ``cuda:LOCAL_RANK``, or, where the launcher shows each process only its own GPUs (SLURM's
    ``--gpus-per-task``), the one it sees."""
    return local_rank() % max(1, torch.cuda.device_count())


def _slurm_to_torchrun_env() -> None:
    """In a task of ``srun`` without torchrun, translate SLURM's variables into the ones ``env://`` reads. Only srun
    sets ``SLURM_STEP_NUM_TASKS``: the batch script of a job with several tasks also has ``SLURM_NTASKS`` and
    ``SLURM_PROCID``, and a process started there alone must not wait for the others."""
    if "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) <= 1 or "SLURM_PROCID" not in os.environ:
        return
    os.environ["WORLD_SIZE"] = os.environ["SLURM_STEP_NUM_TASKS"]
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        nodes = next((os.environ[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if k in os.environ),
                     "127.0.0.1")
        os.environ["MASTER_ADDR"] = first_host(nodes)
    os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000))


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[03-05,07],cpu1`` -> ``gpu03``, ``rack[1-2]-n[01-04]`` -> ``rack1-n01``."""
    entry = re.match(r"(?:[^,\[]|\[[^\]]*\])*", nodelist.strip())  # up to the first comma outside brackets
    assert entry is not None  # the pattern matches the empty string
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], entry.group(0))


def leave(together: bool = True) -> None:
    """Close the process group, if one was joined. ``together``: wait for every process first (after a
    clean finish); after an error a peer may never arrive, so close at once. A process that exits with
    the group still open can die with SIGABRT while gloo's threads serve a slower peer."""
    if not is_distributed():
        return
    if together:  # NCCL's barrier is told the process's GPU (else it warns that it guesses the current one)
        torch_dist.barrier(device_ids=[torch.cuda.current_device()] if torch_dist.get_backend() == "nccl" else None)
    torch_dist.destroy_process_group()
    _PATIENT.clear()


def init_from_env(device_type: str) -> bool:
    """Join the process group described by torchrun (``WORLD_SIZE`` > 1) or SLURM; return whether we did.

    NCCL on CUDA (each process on ``cuda:LOCAL_RANK``), gloo on CPU.
    """
    _slurm_to_torchrun_env()
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_device_index())
    torch_dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return True


def resolve_device(name: str) -> torch.device:
    """The device for ``--device``; under torchrun/SLURM it also joins the process group, and CUDA
    processes take ``cuda:LOCAL_RANK``."""
    from ressl.config import ConfigError  # config imports nothing of ressl's at module level: no cycle

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type == "cuda" and local_processes > gpus:  # NCCL would refuse two processes on one GPU, in a traceback
        raise ConfigError(f"torchrun started {local_processes} processes on this machine but {gpus} CUDA GPU(s) are "
                          f"visible: one process per GPU (--nproc_per_node {gpus}); on one GPU, --bn_groups stands in "
                          "for the shuffled BatchNorm of several processes")
    if init_from_env(device.type) and device.type == "cuda":
        device = torch.device("cuda", local_device_index())
    if device.type == "cuda":  # the current device too: streams, events and CUDA graphs are made on it
        index = torch.cuda.current_device() if device.index is None else device.index  # "cuda": the current one
        if index >= gpus:
            raise ConfigError(f"--device {name}: only {gpus} CUDA device(s) are visible, cuda:0 to cuda:{gpus - 1}")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)  # which takes only a device with an index
    return device


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (B, ...) from every rank in rank order -> (world * B, ...); no gradient. Gathered straight
    into the result (a kNN bank of ImageNet's size is 5 GB: a list of parts, then their concatenation, held it 3 times)."""
    if not is_distributed():
        return tensor
    out = tensor.new_empty((world_size() * tensor.shape[0], *tensor.shape[1:]))
    single = getattr(torch_dist, "all_gather_single", None)  # torch 2.14's name of all_gather_into_tensor
    if single is not None:
        single(out, tensor.contiguous())
    else:  # into views of the result: gloo of older torch versions lacks the single-tensor form
        torch_dist.all_gather(list(out.chunk(world_size())), tensor.contiguous())
    return out


def rank_0_first(load: Callable[[], T], share: bool = False) -> T:
    """``load()`` on rank 0 first; an exception it raises, every process raises. Then, with ``share``, the other
    processes receive rank 0's result instead of computing it (a scan of an image folder: a million files read once,
    not once per process, and the same list in every process); without, each runs ``load()`` itself once rank 0's
    has finished, in :func:`in_machine_turns` (a download, which one process per disk writes). One process: ``load()``.
    A collective: every rank calls it.
    """
    if not is_distributed():
        return load()
    if not share:
        return in_machine_turns(load)
    outcome: list[object] = [None]
    failure: BaseException | None = None
    if is_main():
        try:
            result = load()
            outcome[0] = ("done", result)
        except Exception as err:  # noqa: BLE001 - any failure: sent on, then raised here too
            failure = err
            outcome[0] = ("failed", _portable(err))
    torch_dist.broadcast_object_list(outcome, src=0, group=_patient_group())
    if failure is not None:
        raise failure
    kind, value = outcome[0]  # type: ignore[misc]
    if kind == "failed":
        raise value
    return result if is_main() else value  # type: ignore[no-any-return]


def machine_turn() -> int:
    """When this process runs a load that writes where others read (:func:`in_machine_turns`): 0 for rank 0, 1 for the
    first process of every other machine (``LOCAL_RANK`` 0), 2 for the rest."""
    return 0 if is_main() else 1 if local_rank() == 0 else 2


def in_machine_turns(load: Callable[[], T]) -> T:
    """``load()`` on every process, in three turns (:func:`machine_turn`), each waiting for the one before: rank 0
    first (it downloads into a root that every machine shares: the others then find the files there), then the first
    process of each other machine (into a root on its own machine's disk: one download per machine, at once on
    every machine, never two into one directory), then the rest (who find their machine's copy). When a turn's
    processes raise, every process raises, without running ``load()`` again: its own error where it failed, else the
    first of theirs in rank order. A collective, in the patient group: a download may take longer than a training
    step's timeout."""
    result: T | None = None
    for turn in range(3):
        failure: Exception | None = None
        if machine_turn() == turn:
            try:
                result = load()
            except Exception as err:  # noqa: BLE001 - any failure: sent on, then raised here too
                failure = err
        outcomes: list[Exception | None] = [None] * world_size()
        torch_dist.all_gather_object(outcomes, None if failure is None else _portable(failure), group=_patient_group())
        if failure is not None:
            raise failure
        first = next((raised for raised in outcomes if raised is not None), None)
        if first is not None:
            raise first
    return result  # type: ignore[return-value]


_PATIENT: list[Any] = []  # the group of _patient_group, made once per process group


def _patient_group() -> Any:
    """A gloo group of every process whose collectives wait hours, not the default group's 30 minutes: the others wait
    in it while rank 0 alone scans a folder (ImageNet's 1.28 million files on a slow network disk) or downloads."""
    if not _PATIENT:
        _PATIENT.append(torch_dist.new_group(backend="gloo", timeout=timedelta(hours=6)))
    return _PATIENT[0]


def _portable(err: Exception) -> Exception:
    """``err`` if it survives pickling (to be raised by the other processes), else a RuntimeError with its message."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(f"{type(err).__name__}: {err}")


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is set on any process (a collective: call it on every rank at the same step)."""
    return bool(max_each([float(flag)], device)[0])


def main_writes(write: Callable[[], T], device: torch.device, agree: bool = True) -> T | None:
    """Run ``write`` (a file of the run: checkpoint, metrics, configuration, results) on rank 0 alone; returns what it
    returns there, None elsewhere. Under torchrun, where every process calls this at the same point (``agree``), they
    then learn its outcome in one collective: a write that failed on rank 0 (a full disk: a :class:`WriteError`, or
    any other error) raises its error there and :class:`StoppedWithRankZero` everywhere else, at once. Without the
    agreement the others would go on to their next collective and wait there for rank 0, with NCCL until its
    30-minute timeout."""
    failure: Exception | None = None
    result = None
    if is_main():
        try:
            result = write()
        except Exception as err:
            if not (agree and is_distributed()):
                raise
            failure = err
    if agree and is_distributed() and any_rank(failure is not None, device):
        if failure is not None:
            raise failure
        raise StoppedWithRankZero("rank 0 failed to write a file of the run (its message says why)")
    return result


def messages_of_all(message: str | None) -> list[str]:
    """Every process's ``message`` (None: it has none), in rank order as ``[rank R] MESSAGE``; in one process,
    ``message`` alone (a collective)."""
    if not is_distributed():
        return [] if message is None else [message]
    gathered: list[str | None] = [None] * world_size()
    torch_dist.all_gather_object(gathered, message)
    return [f"[rank {r}] {m}" for r, m in enumerate(gathered) if m is not None]


_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def peer_lost(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because another process of the group is gone (it stopped on an error
    of its own, which it reports): gloo's lost connections, NCCL's aborted communicator."""
    return isinstance(err, RuntimeError) and is_distributed() and any(text in str(err) for text in _PEER_LOST)


def max_of_all(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Element by element, the largest of every process's ``tensor`` (same shape everywhere; a collective, through
    ``device``), on ``tensor``'s device; ``tensor`` itself in one process."""
    if not is_distributed():
        return tensor
    merged = tensor.to(device, copy=True)
    torch_dist.all_reduce(merged, op=torch_dist.ReduceOp.MAX)
    return merged.to(tensor.device)


def max_each(values: list[float], device: torch.device) -> list[float]:
    """The largest of every process's value, position by position, in one collective (every rank, the same step)."""
    if not is_distributed():
        return values
    agreed = torch.tensor(values, dtype=torch.float64, device=device)  # exact for counts up to 2^53 (images, classes)
    torch_dist.all_reduce(agreed, op=torch_dist.ReduceOp.MAX)
    return agreed.tolist()


@torch.no_grad()
def shuffled_forward(teacher: nn.Module, weak: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shuffle-BN (MoCo): the teacher embeds a batch mixed from all processes, then rows are put back.

    Args:
        teacher: the network, in train mode (its BatchNorm uses the batch it is given).
        weak: (B, ...) this process's batch.
        generator: a CPU generator in the same state on every rank (the permutation must agree).

    Returns:
        (world * B, D): the teacher's embeddings of every process's batch, in rank order, so the
        caller can push them to the queue without another gather; this rank's rows are
        ``[rank * B : (rank + 1) * B]``.
    """
    everything = all_gather_cat(weak)  # (W*B, ...)
    b = weak.shape[0]
    perm = draw_shuffle(everything.shape[0], generator, weak.device)
    mine = perm[rank() * b : (rank() + 1) * b]
    shuffled = all_gather_cat(teacher(everything[mine]))  # row i embeds image perm[i]
    out = torch.empty_like(shuffled)
    out[perm] = shuffled
    return out


@torch.no_grad()
def grouped_forward(teacher: nn.Module, weak: torch.Tensor, shuffle: torch.Tensor | None) -> torch.Tensor:
    """Emulated shuffle-BN on one device: the teacher, whose BatchNorms normalise groups of its batch apart
    (``ressl.model.SplitBatchNorm``), sees the batch in the order ``shuffle`` (B,) (a permutation on ``weak``'s device,
    :func:`draw_shuffle`), so that each group is a random subset; one forward pass, as the MoCo CIFAR demo's.
    ``weak`` (B, ...) -> (B, D) in the input's order; ``shuffle`` None: the teacher on ``weak`` as it is.
    """
    if shuffle is None:
        return teacher(weak)
    shuffled = teacher(weak[shuffle])
    out = torch.empty_like(shuffled)
    out[shuffle] = shuffled
    return out


def to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` copied to ``device`` without waiting: from the host to a GPU through pinned memory (a copy from pageable
    memory may wait for the GPU's queue to drain)."""
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device=device, dtype=dtype, non_blocking=True)


def draw_shuffle(batch: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """A random permutation of ``batch`` rows, drawn on the host from ``generator`` (its state is the checkpoint's)
    and sent to ``device`` without waiting for it (through pinned memory on a GPU): (B,) int64."""
    order = torch.randperm(batch, generator=generator)
    return to_device(order, device)


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes, differentiable: the gradient of every process's output is summed back."""

    @staticmethod
    def forward(ctx: object, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = tensor.clone()
        torch_dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        torch_dist.all_reduce(grad)
        return grad


def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) in ``module`` on every process; a no-op in one process.

    During training each process updates its own running statistics from its own batches, so at an evaluation
    they differ by process; the checkpoint holds rank 0's, and an evaluation should see the network it saves."""
    if is_distributed():
        for buffer in module.buffers():
            torch_dist.broadcast(buffer, src=0)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over every process, differentiable (its gradient is summed too: SyncBatchNorm's
    statistics); ``tensor`` itself in one process."""
    return _AllReduceSum.apply(tensor) if is_distributed() else tensor


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose batch statistics span every process, on any device and backend (gloo included).

    Sums and sums of squares are all-reduced with autograd, so gradients equal those of one process
    holding the whole batch. In one process, or in eval mode, it is an ordinary BatchNorm. Handles
    (B, C) and (B, C, H, W) inputs.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 4):
            raise ValueError(f"expected a (B, C) or (B, C, H, W) input, got {tuple(input.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        dims = [0] if x.dim() == 2 else [0, 2, 3]
        shape = (1, -1) if x.dim() == 2 else (1, -1, 1, 1)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 under autocast -> fp32; fp64 stays
        count = xf.new_full((1,), xf.numel() / xf.shape[1])  # made on the device: no blocking copy from the host
        sums = all_reduce_sum(torch.cat([xf.sum(dims), count]))  # two passes, as exact as one process's
        n = sums[-1]
        mean = sums[:-1] / n
        centred = xf - mean.view(shape)
        var = all_reduce_sum((centred * centred).sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum or 0.1)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), self.momentum or 0.1)
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d in ``module`` by :class:`SyncBatchNorm`, keeping parameters and statistics."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(child, SyncBatchNorm):
            sync = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            reference = child.running_mean if child.running_mean is not None else next(child.parameters())
            sync.to(device=reference.device, dtype=reference.dtype)
            sync.load_state_dict(child.state_dict())
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child)
    return module


__all__ = ["SyncBatchNorm", "all_gather_cat", "convert_sync_batchnorm", "draw_shuffle", "grouped_forward", "init_from_env", "shuffled_forward"]
