"""Step overhead: one full ReSSL training step divided by the bare network work it cannot avoid.

Full step: the body of ``train_one_epoch``'s loop, on a run built by ``ressl.train.setup`` as ``ressl
pretrain`` builds it: the next views from ``ressl.train.epoch_views`` (the batch cut from the data, weak and
strong batched augmentation, a few steps per call; each timed call covers a multiple of them), then
``ressl.train.train_step``: learning rate and EMA momentum from the schedules, student forward on the
strong view, EMA update, teacher forward on the weak view (no gradient), relational loss against the
queue, backward, SGD step, queue push, and the loop's on-device finiteness flag.
Left out: logging, checkpoints, signals (``benchmarks.end_to_end`` measures the whole loop).

Bare work: student forward + backward on an already augmented strong batch and teacher forward on
the weak batch: same model (backbone, width, memory format), same batch, same autocast dtype; no
augmentation, no EMA, no loss against the queue, no optimiser step, no push.

    python -m benchmarks.step [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from benchmarks import common
from ressl import dist, precision
from ressl.graph import CapturedStep
from ressl.meter import mark_non_finite
from ressl.model import ReSSL
from ressl.train import Run, epoch_views, setup, train_step


def make_bare_step(model: ReSSL, weak: torch.Tensor, strong: torch.Tensor, device: torch.device,
                   amp_dtype: torch.dtype | None, graph: bool = False) -> Callable[[], None]:
    """Student forward + backward on ``strong`` and teacher forward on ``weak`` (both already augmented);
    with ``graph``, replayed as a CUDA graph as the training step's network part is (``ressl.graph``)."""
    autocast = precision.autocast(device, amp_dtype, cache=not graph)  # as ressl.train.network_step
    grad: torch.Tensor | None = None

    def bare_step(weak: torch.Tensor, strong: torch.Tensor) -> tuple[torch.Tensor]:
        nonlocal grad
        with autocast:
            student = model.student(strong)
        with torch.no_grad(), autocast:
            model.teacher(weak)
        if grad is None:  # a fixed upstream gradient stands in for the loss (made in a warm-up call, not in a capture)
            grad = torch.randn(student.shape, device=student.device, dtype=student.dtype, generator=None) / student.shape[0]
        model.student.zero_grad(set_to_none=True)  # as the full step: fresh gradients, no accumulation
        student.backward(grad)
        return (student.detach(),)

    body = CapturedStep(bare_step) if graph else bare_step

    def call() -> None:
        body(weak, strong)

    return call


class FullStep:
    """``ressl.train.train_step`` on the views ``train_one_epoch`` makes: the loop's body minus logging,
    checkpoints and signals, on a ``Run`` built by ``ressl.train.setup`` as ``ressl pretrain`` builds it."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.first_bad_step = torch.full((), -1, device=run.device)  # the loop's on-device NaN watch
        self.batches = self._batches()
        run.model.train()

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield from epoch_views(self.run, 0)
            self.run.state.epoch += 1

    def observe(self, loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor) -> None:
        step = self.run.state.step + 1
        self.first_bad_step = mark_non_finite(self.first_bad_step, loss, step)

    def __call__(self) -> None:
        train_step(self.run, *next(self.batches), self.observe)
        self.run.state.step += 1

    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """An augmented (weak, strong) pair of one batch, for the bare step: batched, or by loader workers."""
        return next(self.batches)

    def steps_per_call(self) -> int:
        """Steps whose views one augmentation call makes (``ViewAugment.call_steps``; 1 for loader workers)."""
        augment = self.run.augment
        return 1 if augment is None else augment.call_steps(self.run.cfg.batch_size // dist.world_size())


def repeat(fn: Callable[[], None], n: int) -> Callable[[], None]:
    def many() -> None:
        for _ in range(n):
            fn()
    return many


def run(args: argparse.Namespace) -> common.Result:
    device = common.device_of(args)
    root, source = common.data_dir(args)
    out = Path(tempfile.mkdtemp(prefix="ressl-bench-step-"))
    try:
        cfg = common.build_config(args, root, out=str(out / "run"), checkpoint_every=0, knn_every=0)
        full = FullStep(setup(cfg))
    finally:
        shutil.rmtree(out, ignore_errors=True)  # nothing is written after setup
    weak, strong = full.views()
    graphed = full.run.graph is not None  # then the bare work is a CUDA graph too, and eager beside it for the record
    fns = {"full": full, "bare": make_bare_step(full.run.model, weak, strong, device, full.run.amp_dtype, graph=graphed)}
    if graphed:
        fns["bare eager"] = make_bare_step(full.run.model, weak, strong, device, full.run.amp_dtype)
    # steps per timed call; on CUDA the host runs ahead of the GPU, and each timed call starts with the queue empty:
    # the first step's augmentation is launched before any GPU work, a fill that training pays once, not per step.
    # A multiple of the steps one augmentation call covers: every timed call starts as many calls (steps whose views
    # are made at once) as every other, away from an epoch's end.
    per_call = full.steps_per_call()
    steps = per_call * -(-(2 if args.quick else 12 if device.type == "cuda" else 3) // per_call)
    repeats = args.repeats or (3 if args.quick else 15)
    print(f"[step] {common.describe(cfg, device, full.run.amp_dtype, graphed)}; data: {source}", flush=True)
    # graphs: 3 eager warm-up calls and the capture happen before the timed ones
    t = common.alternate({name: repeat(fn, steps) for name, fn in fns.items()}, device, repeats,
                         warmup=2 if graphed or not args.quick else 1)
    if int(full.first_bad_step) >= 0:
        print(f"[step] warning: the loss became non-finite at step {int(full.first_bad_step)}", flush=True)
    ms = {name: 1e3 * statistics.median(times) / steps for name, times in t.items()}
    b = cfg.batch_size
    eager = f" as a CUDA graph (eager: {ms['bare eager']:.1f} ms)" if graphed else ""
    q1, q3 = common.ratio_quartiles(t["full"], t["bare"])
    detail = (f"full step {ms['full']:.1f} ms ({1e3 * b / ms['full']:.0f} img/s), bare work {ms['bare']:.1f} ms "
              f"({1e3 * b / ms['bare']:.0f} img/s){eager}, medians of {repeats} x {steps} steps; "
              f"ratio: median of the {repeats} pairs' ratios (quartiles {q1:.3f}-{q3:.3f})")
    return common.report("step", "step overhead (full / bare time)", common.paired_ratio(t["full"], t["bare"]), "<= 1.10", detail, quick=args.quick)


def main(argv: list[str] | None = None) -> int:
    return common.main(run, __doc__, "step", None, argv)


if __name__ == "__main__":
    sys.exit(main())
