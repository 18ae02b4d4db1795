"""End to end: images/s of real ReSSL training divided by the images/s of the bare step.

Training: ``ressl.train.setup(cfg)`` then ``ressl.train.train_one_epoch(run, deadline)`` (epoch after
epoch until the deadline), the very loop ``ressl pretrain`` runs, with its progress bar and metric
log; images/s are read from the run's ``metrics.jsonl`` (one record per ``log_every`` steps), leaving
out the first window (warm-up). Mid-run checkpoints are off (``checkpoint_every=0``): disk writes are
not the step. Bare step: as in ``benchmarks.step`` (student forward + backward, teacher forward, on
an already augmented batch), on the run's own model, timed between stretches of training (a quarter
of the time each). The ratio is the median of the stretches' own: each stretch's training against the bare
steps on either side of it, so that a drift of the machine's speed (seen on a shared 2-core host) touches both.

    python -m benchmarks.end_to_end [--device cpu|cuda] [--quick] [--seconds 30] [--data DIR]

``--data`` may name a folder of images too (as ``ressl pretrain`` reads it, with ``--preset`` for its recipe): held
in memory where it can be (``ressl.held``), otherwise decoded and cropped by loader workers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common
from benchmarks.step import FullStep, make_bare_step
from ressl.train import setup, train_one_epoch


def add_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--seconds", type=float, default=None, help="training time (default 30, --quick 4)")
    return parser


def stretch_totals(metrics: Path, batch_size: int, skip_steps: int, call_starts: list[int]) -> list[tuple[float, float, int]]:
    """Images, seconds and steps of each ``train_one_epoch`` call (``call_starts``: the step count at each call), over
    its logged windows that start at or after step ``skip_steps`` (zeros where none does).

    A window runs from the previous logged step, or from the start of the call that logged it when that is later: a
    call restarts the window's clock.
    """
    totals = [[0.0, 0.0, 0] for _ in call_starts]
    previous = 0
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "images_per_s" not in record:
            continue
        call = max(i for i, s in enumerate(call_starts) if s < record["step"])
        start = max(previous, call_starts[call])
        window = record["step"] - start
        if start >= skip_steps and window > 0:
            totals[call][0] += window * batch_size
            totals[call][1] += window * batch_size / record["images_per_s"]
            totals[call][2] += window
        previous = record["step"]
    return [(images, seconds, steps) for images, seconds, steps in totals]


def run(args: argparse.Namespace) -> common.Result:
    device = common.device_of(args)
    root, source = common.data_dir(args, folders=True)
    seconds = args.seconds if getattr(args, "seconds", None) else (4.0 if args.quick else 30.0)
    out = Path(tempfile.mkdtemp(prefix="ressl-bench-e2e-"))
    extra = dict(out=str(out / "run"), checkpoint_every=0, knn_every=0)
    if args.quick:
        extra["log_every"] = 2
    try:
        cfg = common.build_config(args, root, **extra)
        run_ = setup(cfg)
        print(f"[end_to_end] {common.describe(cfg, device, run_.amp_dtype, run_.graph is not None)}, {seconds:.0f} s of training, "
              f"log every {cfg.log_every} steps; data: {source}", flush=True)
        print(f"[end_to_end] {run_.dataset.describe()}", flush=True)  # a folder: held in memory, or read by workers
        first = FullStep(run_)
        weak, strong = first.views()  # one batch as the loop augments it (batched, or by loader workers)
        first.batches.close()  # its loader workers end here, not inside the training loop's forked ones
        bare = make_bare_step(run_.model, weak, strong, device, run_.amp_dtype, graph=run_.graph is not None)
        repeats = args.repeats or (2 if args.quick else 3)  # bare steps timed before each stretch of training
        for _ in range(5):  # with CUDA graphs: 3 warm-up calls, the capture, a replay
            bare()
        gaps: list[list[float]] = []  # the bare steps timed before each stretch of training, and after the last

        skip = cfg.log_every  # the first logged window holds the warm-up
        min_steps = skip + 2 * cfg.log_every  # at least two windows after it, however slow the machine
        call_starts: list[int] = []
        deadline = time.time() + seconds
        stretch = max(seconds / 4, 1.0)  # training in stretches with bare steps between: each stretch is paired
        while True:  # with the bare steps on either side of it, as the step benchmark pairs its calls
            gaps.append([common.timed(bare, device) for _ in range(repeats)])
            call_starts.append(run_.state.step)
            train_one_epoch(run_, min(deadline, time.time() + stretch))
            if time.time() >= deadline:
                if run_.state.step >= min_steps:
                    break
                deadline = time.time() + max(1.0, seconds / 4)  # too few steps so far: keep going a while

        gaps.append([common.timed(bare, device) for _ in range(repeats)])
        stretches = stretch_totals(run_.out / "metrics.jsonl", cfg.batch_size, skip, call_starts)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    ratios = [images / seconds / (cfg.batch_size / statistics.median(gaps[k] + gaps[k + 1]))
              for k, (images, seconds, _) in enumerate(stretches) if seconds > 0]
    if not ratios:
        raise RuntimeError(f"no logged window after the first {skip} steps: train longer (--seconds)")
    trained, seconds, steps = (sum(column) for column in zip(*stretches))
    train_rate, bare_rate = trained / seconds, cfg.batch_size / statistics.median([t for gap in gaps for t in gap])
    detail = (f"median of {len(ratios)} stretches' ratios, each of its training to the bare steps timed on either side "
              f"(range {min(ratios):.3f}-{max(ratios):.3f}); in all, training {train_rate:.0f} img/s over {steps} steps "
              f"({run_.state.step} run), bare step {bare_rate:.0f} img/s (median of {sum(map(len, gaps))})")
    return common.report("end_to_end", "end to end (training / bare img/s)", statistics.median(ratios), ">= 0.90", detail,
                         quick=args.quick)


def main(argv: list[str] | None = None) -> int:
    return common.main(run, __doc__, "end_to_end", add_flags, argv)


if __name__ == "__main__":
    sys.exit(main())
