"""ReSSL pretraining: set-up, the training loop read top to bottom, and evaluation (checkpoints: ressl.resume)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ressl import checkpoint, config, dist, precision, progress, rundir
from ressl.augment import strong_augment, torchvision_pipeline, weak_augment
from ressl.batches import TwoViews, epoch_seed, precropped, pretrain_batches, refuse_in_a_starting_worker
from ressl.config import Config
from ressl.data import Dataset, load_dataset, same_data_everywhere, sample_split, to_device
from ressl.errors import Interrupted, LateDataError, how_to_continue, load_failure
from ressl.evaluate import accuracy_text, knn_accuracy, split_features
from ressl.graph import CapturedStep
from ressl.held import hold_training_images
from ressl.loss import relational_loss
from ressl.meter import Meter, MetricsLog, checkpoint_due
from ressl.model import ReSSL, model_from_config
from ressl.optim import build_optimizer
from ressl.precision import autocast_dtype
from ressl.resume import exists_everywhere, resume, resume_command, save_checkpoint
from ressl.schedule import cosine_lr, ema_momentum
from ressl.views import ViewAugment


@dataclass
class TrainState:
    step: int = 0  # optimiser steps taken
    epoch: int = 0  # epochs completed
    index: int = 0  # batches done inside the current epoch (a mid-epoch checkpoint resumes here)
    loss: float | None = None  # the last logged loss (final.json's, also when a run stops before a logging step)
    knn_random_init: dict[str, float] | None = None  # kNN before training, kept for final.json across resumes


@dataclass
class Run:
    """Everything the training loop touches, built once by :func:`setup`."""

    cfg: Config
    device: torch.device
    amp_dtype: torch.dtype | None
    dataset: Dataset
    model: ReSSL
    optimizer: torch.optim.SGD
    augment: ViewAugment | None  # uint8 (B, C, H, W) sources -> both float (B, 3, S, S) views, batched on the device ...
    loader_views: TwoViews | None  # ... or None of that: loader workers make the views (augment_backend torchvision)
    shuffle_generator: torch.Generator  # teacher batch shuffles; the same on every process
    student_forward: nn.Module  # the student, wrapped in DistributedDataParallel when distributed (compiled with --compile)
    teacher_forward: nn.Module  # the teacher (compiled with --compile)
    state: TrainState
    out: Path
    log: MetricsLog
    steps_per_epoch: int
    stop_requested: bool = False  # set by the SIGTERM/SIGINT handler, honoured at the next step boundary
    data_error: str | None = None  # torchrun: images failed to load here (then anywhere), honoured at the next agreement
    stop_check_every: int = 1  # torchrun: steps between agreements on stopping (ressl.meter.Meter), kept across epochs
    graph: CapturedStep | None = None  # network_step replayed as a CUDA graph (--cuda_graph), else None: eager
    clock: float = 0.0  # time.time() at which the run would have started had it never stopped (--max_minutes)
    final_knn_minutes: float = 0.0  # what the final kNN will take, from this invocation's latest kNN (0: none yet)

    def minutes(self) -> float:
        """Minutes of this run so far, over every invocation that trained it."""
        return (time.time() - self.clock) / 60

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch


def epoch_order(run: Run) -> torch.Tensor:
    """The epoch's sample order, from a generator seeded by (seed, epoch): a resumed run redraws it exactly."""
    generator = torch.Generator().manual_seed(epoch_seed(run.cfg.seed, run.state.epoch))
    return torch.randperm(len(run.dataset.train), generator=generator)


Observer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]  # (loss, student (B, D), teacher (B, D))


def epoch_views(run: Run, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The current epoch's (weak, strong) views from its batch ``start`` on, float (B, 3, S, S) each, for
    :func:`train_step`: the weak view crop + flip, the strong one the MoCo-v2 recipe. Batched on the device, a few
    steps per call (``ViewAugment.stream``), or made image by image by loader workers (``augment_backend torchvision``).
    """
    cfg = run.cfg
    batches = pretrain_batches(run.dataset, cfg.batch_size, cfg.image_size, cfg.crop_min_scale, cfg.workers,
                               epoch_order(run), start, run.device, run.loader_views, epoch_seed(cfg.seed, run.state.epoch))
    if run.augment is None:
        return batches
    return run.augment.stream(batches, run.state.epoch * run.steps_per_epoch + start)


def _outlast_data_errors(run: Run, views: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``views``; under torchrun, when this process's images fail to load, its last views again until the processes
    next agree on stopping (:meth:`ressl.meter.Meter.end_step`). It cannot leave alone (the others would wait for it
    in the step's collectives), so it asks them to stop there with it (``run.data_error``), with a checkpoint.
    Those steps train this process's share of the batch on views it has trained on already (blank ones when the
    failure came before any of the epoch's)."""
    weak = strong = None
    try:
        for weak, strong in views:
            yield weak, strong
    except Exception as err:
        run.data_error = load_failure(err)
        if run.data_error is None:
            raise
        if weak is None or strong is None:
            size = run.cfg.image_size
            weak = strong = torch.zeros(run.cfg.batch_size // dist.world_size(), 3, size, size, device=run.device)
        while True:
            yield weak, strong


def train_step(run: Run, weak: torch.Tensor, strong: torch.Tensor, observe: Observer | None = None) -> tuple[float, float]:
    """One ReSSL step, number ``run.state.step``, in the official order, on its finished (B, 3, S, S) views
    (:func:`epoch_views`); returns its learning rate and EMA momentum.

    ``observe(loss, student, teacher)`` sees the step before the queue changes (logging, NaN watch).
    The caller advances ``run.state``.
    """
    cfg, model = run.cfg, run.model
    lr = cosine_lr(run.state.step, run.total_steps, cfg.lr, round(cfg.warmup_epochs * run.steps_per_epoch))
    momentum = ema_momentum(run.state.step, run.total_steps, cfg.ema_momentum, cfg.ema_cosine)
    shuffle = teacher_shuffle(run, weak.shape[0])  # (B,) the teacher's batch order with --bn_groups, else None
    views = (weak, strong) if shuffle is None else (weak, strong, shuffle)
    # 1.-4. student, EMA, teacher, loss, backward, SGD step: one CUDA graph replay, or eager
    if run.graph is not None:
        loss, student, teacher, everyone = run.graph(*views, lr=lr, momentum=momentum)
    else:
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        loss, student, teacher, everyone = network_step(run, *views, momentum=momentum)
    if observe is not None:
        observe(loss, student, teacher)
    # 5. the teacher's batch (from every process) enters the queue
    model.queue.push(everyone, gather=False)
    return lr, momentum


def network_step(run: Run, weak: torch.Tensor, strong: torch.Tensor, shuffle: torch.Tensor | None = None, *,
                 momentum: float | torch.Tensor, autocast_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1-4 of a ReSSL step on the finished (B, 3, S, S) views, at the learning rate the optimiser holds;
    ``shuffle`` (B,): the order the teacher sees its batch in with ``bn_groups`` > 1 (:func:`teacher_shuffle`).

    Returns the loss, the student's (B, D) and teacher's (B, D) embeddings and the teacher's embeddings of every
    process (world * B, D), all computed against the queue as it was before this step. ``momentum`` and the
    optimiser's learning rate may be 0-dim device tensors, and ``autocast_cache`` off, as a CUDA graph needs.
    """
    cfg, model, optimizer = run.cfg, run.model, run.optimizer
    autocast = precision.autocast(run.device, run.amp_dtype, autocast_cache)
    # 1. student on the strong view
    with autocast:
        student = run.student_forward(strong)  # (B, D), unit norm
    # 2. EMA update of the teacher, then the teacher on the weak view (no gradient)
    model.update_teacher(momentum)
    with torch.no_grad(), autocast:
        teacher, everyone = embed_weak(run, weak, shuffle)  # (B, D) ours, (world * B, D) all processes
    # 3. relational loss against the queue as it was before this batch (with bf16 autocast, its matmuls in bf16 on a CPU)
    loss = relational_loss(student, teacher, model.queue.queue, cfg.student_temperature, cfg.teacher_temperature,
                           bf16_matmul=run.amp_dtype == torch.bfloat16)
    # 4. one backward pass and an optimiser step
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), student.detach(), teacher, everyone


def use_cuda_graph(cfg: Config, device: torch.device) -> bool:
    """``--cuda_graph``: None means wherever it can run; true where it cannot is a configuration error."""
    blockers = {"it needs a CUDA device": device.type != "cuda", "it runs in one process only": dist.is_distributed(),
                "it does not combine with --compile": cfg.compile}
    why_not = next((why for why, blocked in blockers.items() if blocked), None)
    if cfg.cuda_graph and why_not:
        raise config.ConfigError(f"--cuda_graph true: {why_not}")
    return why_not is None and cfg.cuda_graph is not False


def capture_network_step(run: Run) -> CapturedStep:
    """:func:`network_step` as a :class:`ressl.graph.CapturedStep`: the learning rate and EMA momentum become 0-dim
    device tensors that each call sets (the optimiser's groups hold the learning rate's)."""
    lr, momentum = torch.zeros((), device=run.device), torch.zeros((), device=run.device)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    return CapturedStep(lambda *views: network_step(run, *views, momentum=momentum, autocast_cache=False),
                        dict(lr=lr, momentum=momentum))


def train_one_epoch(run: Run, deadline: float | None = None) -> float | None:
    """The rest of the current epoch, step after step; returns the run's last logged loss.

    A stop asked by a signal ends it at the next step boundary, with a checkpoint, by raising :class:`Interrupted`.
    """
    cfg, state = run.cfg, run.state
    views = epoch_views(run, state.index)
    if dist.is_distributed():
        views = _outlast_data_errors(run, views)
    run.model.train()
    stop = False
    with Meter(run, first_bad_step=torch.full((), -1, device=run.device)) as meter:  # logging, progress, NaN watch
        for weak, strong in views:
            lr, momentum = train_step(run, weak, strong, meter.observe)  # health signals on log steps
            state.step += 1
            state.index += 1
            stop = meter.end_step(lr, momentum)
            if stop or state.index == run.steps_per_epoch:
                break
            if checkpoint_due(cfg, state.step):
                save_checkpoint(run)
            if _late(run, deadline, check=meter.at_log_step):
                meter.log_last_step(lr, momentum)
                break
    if state.index == run.steps_per_epoch:
        state.epoch, state.index = state.epoch + 1, 0
    if stop and run.data_error:  # the processes agreed to stop; _data_failures_saved saves the checkpoint
        raise LateDataError(run.data_error)
    if stop:
        save_checkpoint(run)
        raise Interrupted(f"stopped at step {state.step}; checkpoint saved. To resume, {resume_command(run.out)}")
    return state.loss


def teacher_shuffle(run: Run, batch: int) -> torch.Tensor | None:
    """With ``bn_groups`` > 1 on one device, the order (B,) in which the teacher sees this step's batch, drawn on the
    host before the step (a CUDA graph of the step takes it as an input); None otherwise."""
    if run.cfg.bn_groups <= 1:
        return None
    return dist.draw_shuffle(batch, run.shuffle_generator, run.device)


def embed_weak(run: Run, weak: torch.Tensor, shuffle: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's embeddings of the weak view: (B, D) for this process and (world * B, D) for the queue.

    Distributed with ``teacher_bn=shuffle``, the teacher sees a batch shuffled across processes
    (shuffle-BN); on one device, ``bn_groups`` > 1 normalises groups of it apart in the order ``shuffle`` instead.
    """
    if dist.is_distributed() and run.cfg.teacher_bn == "shuffle":
        everyone = dist.shuffled_forward(run.teacher_forward, weak, run.shuffle_generator)
        b = weak.shape[0]
        return everyone[dist.rank() * b : (dist.rank() + 1) * b], everyone
    teacher = dist.grouped_forward(run.teacher_forward, weak, shuffle)
    return teacher, dist.all_gather_cat(teacher)


def _knn_record(accuracy: dict[str, float]) -> dict[str, float]:
    """A kNN result as metrics.jsonl fields: ``knn_top1`` and, with more than 5 classes, ``knn_top5``."""
    return {f"knn_{key}": accuracy[key] for key in ("top1", "top5") if key in accuracy}


def evaluate_knn(run: Run, subset: int | None = None) -> dict[str, float] | None:
    """Weighted kNN of the student's backbone: labelled training images as the bank, the test split as queries.

    ``subset`` caps both at a fixed, seeded sample of that many images (the online monitor's cheap check).
    """
    data, cfg = run.dataset, run.cfg
    if not data.evaluable:
        return None
    bank_split, test_split = (data.bank, data.test) if subset is None else (sample_split(data.bank, subset), sample_split(data.test, subset))
    dist.broadcast_buffers(run.model.student.backbone)  # every process embeds with the statistics the checkpoint holds
    features = lambda split: split_features(run.model.student.backbone, split, cfg.image_size, data.mean, data.std,
                                            cfg.eval_batch_size, run.device, run.amp_dtype, cfg.workers, stand_in=True)
    bank, bank_labels = features(bank_split)
    queries, query_labels = features(test_split)
    return knn_accuracy(bank, bank_labels, queries, query_labels, data.num_classes, cfg.knn_k, cfg.knn_temperature)


def timed_knn(run: Run, subset: int | None = None) -> dict[str, float] | None:
    """:func:`evaluate_knn`, timed: ``run.final_knn_minutes`` becomes its minutes, scaled to every image for a
    ``subset`` (the time goes with the images embedded), as the epoch lines' estimate of the final kNN."""
    start = time.time()
    accuracy = evaluate_knn(run, subset)
    if accuracy is not None:
        data = run.dataset
        assert data.bank is not None and data.test is not None
        every = len(data.bank) + len(data.test)
        done = every if subset is None else min(subset, len(data.bank)) + min(subset, len(data.test))
        run.final_knn_minutes = (time.time() - start) / 60 * every / done
    return accuracy


def view_makers(cfg: Config, dataset: Dataset) -> tuple[ViewAugment | None, TwoViews | None]:
    """What makes each step's weak and strong views: batched on the training device (the default), or, with
    ``augment_backend torchvision``, image by image in loader workers, as the official code does (for comparison)."""
    size, mean, std = cfg.image_size, dataset.mean, dataset.std
    if cfg.augment_backend == "torchvision":
        views = dict(mean=mean, std=std, blur=cfg.blur, crop_scale=(cfg.crop_min_scale, 1.0), flip=cfg.flip)
        weak = torchvision_pipeline(size, strong=cfg.teacher_strong, **views)
        return None, TwoViews(weak, torchvision_pipeline(size, strong=True, **views))
    common: dict[str, Any] = dict(crop=not precropped(dataset), crop_scale=(cfg.crop_min_scale, 1.0),
                                  flip_p=0.5 if cfg.flip else 0.0)
    strong = strong_augment(size, mean, std, blur=cfg.blur, jitter_order=cfg.jitter_order, **common)
    weak = strong if cfg.teacher_strong else weak_augment(size, mean, std, **common)  # the views are drawn apart
    # several steps per call for sets in memory; from a folder, loader workers would have to decode them all first
    steps_per_call = cfg.augment_steps if dataset.train.images is not None else 1
    return ViewAugment(weak, strong, seed=(cfg.seed, dist.rank()), steps_per_call=steps_per_call), None


def setup(cfg: Config) -> Run:
    """Build data, model, optimiser and run directory; resume from ``out/checkpoint.pt`` if it exists, else from
    ``cfg.resume`` if given. :func:`pretrain` writes ``config.yaml`` once it knows the run has training left."""
    refuse_in_a_starting_worker()  # before the run directory is claimed: the script's own process holds it
    device = dist.resolve_device(cfg.device)
    config.validate(cfg, dist.world_size())
    graphed = use_cuda_graph(cfg, device)
    out = Path(cfg.out) if cfg.out else config.default_out(cfg)
    refused = rundir.reuse_problem(out)  # before the data loads (an ImageNet folder's scan takes minutes)
    if dist.any_rank(refused is not None, device):
        raise config.ConfigError(refused or f"--out {out} was refused by another process: see its message")
    taken = exists_everywhere(out, device) and rundir.claim(out, device)  # before a resume rewrites its metrics.jsonl
    try:
        run = _build(cfg, device, out, graphed)
        taken = rundir.claim(out, device) or taken  # a new run directory exists from here on
        if dist.is_main():
            checkpoint.remove_stale_temporaries(out)
        if run.state.step == 0:  # what a run stopped before its first checkpoint logged is logged again
            run.log.keep_until(-1)
    except BaseException:
        if taken:  # a run that could not start leaves its directory free (the Python API goes on)
            rundir.release(out)
        raise
    return run


def _build(cfg: Config, device: torch.device, out: Path, graphed: bool) -> Run:
    """:func:`setup`'s data, model, optimiser and view makers, resumed where ``out`` (or ``--resume``) has a checkpoint."""
    dataset = load_dataset(cfg.dataset, cfg.data, cfg.download, cfg.max_bad_fraction)
    same_data_everywhere(dataset, device)
    if len(dataset.train) < cfg.batch_size:
        raise config.ConfigError(f"the training set has {progress.count(len(dataset.train), 'image')}, fewer than batch_size {cfg.batch_size}: lower --batch_size")
    if cfg.augment_backend != "torchvision":  # whose loader workers read the images from host memory
        if cfg.hold_in_memory:
            hold_training_images(dataset, cfg.workers, device)
        to_device(dataset, device)
    torch.manual_seed(cfg.seed)
    model = model_from_config(cfg).to(device)
    if cfg.teacher_bn == "sync" and dist.is_distributed():
        dist.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    model.flatten_parameters()  # device and layout are final: the EMA becomes one lerp_ over a flat buffer
    optimizer = build_optimizer(model, cfg)
    student_forward: nn.Module = model.student
    if dist.is_distributed():
        student_forward = DistributedDataParallel(model.student, device_ids=[device.index] if device.type == "cuda" else None)
    teacher_forward: nn.Module = model.teacher
    if cfg.compile:  # the modules keep their parameters: checkpoints and the EMA are unaffected
        student_forward, teacher_forward = torch.compile(student_forward), torch.compile(teacher_forward)  # type: ignore[assignment]
    augment, loader_views = view_makers(cfg, dataset)
    state = TrainState()
    shuffle_generator = torch.Generator().manual_seed(cfg.seed)
    run = Run(cfg, device, autocast_dtype(cfg.precision, device), dataset, model, optimizer, augment, loader_views,
              shuffle_generator, student_forward, teacher_forward, state, out, MetricsLog(out / "metrics.jsonl", device),
              len(dataset.train) // cfg.batch_size)
    run.clock = time.time()
    own = out / "checkpoint.pt"
    if exists_everywhere(own, device):  # the run's own progress comes first: re-running a --resume command after a stop continues it
        if cfg.resume and dist.is_main():
            progress.say(f"{out} has its own checkpoint: continuing from it, not from --resume {cfg.resume}", flush=True)
        resume(run, own)
    elif cfg.resume and exists_everywhere(Path(cfg.resume), device, "--resume"):
        resume(run, Path(cfg.resume))
    elif cfg.resume:
        checkpoint.load(cfg.resume)  # missing everywhere: its one-line error
    if graphed:  # after resume: the graph reads the optimiser's memory as loaded
        run.graph = capture_network_step(run)
    return run


def loss_text(loss: float | None) -> str:
    """The loss of an epoch's line, always with 4 decimals (6.7290 beside 6.5309, not 6.729); None: no step logged."""
    return "none yet" if loss is None else f"{loss:.4f}"


def epoch_pace(marks: list[tuple[float, float]]) -> float | None:
    """Minutes an epoch, from ``marks`` of (epochs trained, minutes of the run) taken when this invocation began to
    train (a resumed run's epoch may be part done) and after each epoch since (after its kNN check). The first epoch
    is left out once two more are past it: its warm-up (a compile, first allocations, a checkpoint's first write) is
    paid once. None before an epoch has ended."""
    if len(marks) < 2:
        return None
    (e0, m0), (e1, m1) = marks[1] if len(marks) > 3 else marks[0], marks[-1]
    return (m1 - m0) / (e1 - e0)


def time_left(pace: float | None, epoch: int, epochs: int, budget_left: float | None = None, final_knn: float = 0.0) -> str:
    """The epoch line's estimate of what is left of a run that has trained ``epoch`` of ``epochs`` at ``pace`` minutes
    an epoch (:func:`epoch_pace`), then its final kNN (``final_knn`` minutes); ``budget_left``: the minutes
    --max_minutes leaves for training. "" once no epoch is left."""
    if pace is None or pace <= 0 or not 0 < epoch < epochs:
        return ""
    if budget_left is not None and budget_left < pace * (epochs - epoch):
        return f"  (--max_minutes stops it in {_duration(budget_left).removeprefix('about ')}, near epoch {epoch + budget_left / pace:.0f})"
    return f"  ({_duration(pace * (epochs - epoch) + final_knn)} left)"


def _duration(minutes: float) -> str:
    return "under a minute" if minutes < 1 else f"about {minutes:.0f} min" if minutes < 90 else f"about {minutes / 60:.1f} h"


def _end_of_epoch(run: Run, say: Callable[..., None], deadline: float | None, marks: list[tuple[float, float]]) -> None:
    """The epoch's kNN check where due, then its line where due; ``marks``: :func:`epoch_pace`'s, this epoch's added."""
    cfg, loss = run.cfg, run.state.loss
    summary = f"epoch {run.state.epoch}/{cfg.epochs}  loss {loss_text(loss)}  {run.minutes():.1f} min"
    acc = None
    if cfg.knn_every and run.state.epoch % cfg.knn_every == 0 and run.state.epoch < cfg.epochs:
        acc = timed_knn(run, cfg.knn_subset)
        if acc is not None:
            run.log.write(step=run.state.step, epoch=run.state.epoch, **_knn_record(acc))
            summary += f"  kNN top-1 {acc['top1']:.2f}%"
    marks.append((run.state.epoch, run.minutes()))
    if acc is not None or run.state.epoch % max(1, cfg.epochs // 20) == 0:  # about 20 lines per run
        budget_left = None if deadline is None else (deadline - time.time()) / 60
        say(summary + time_left(epoch_pace(marks), run.state.epoch, cfg.epochs, budget_left, run.final_knn_minutes), flush=True)


@contextlib.contextmanager
def _stop_on_signals(run: Run) -> Iterator[None]:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) ask the loop to checkpoint and stop at the next step boundary. A second
    Ctrl-C stops at once; a SIGTERM again does not (SLURM signals every process and torchrun forwards it too)."""
    def request_stop(signum: int, frame: Any) -> None:
        if run.stop_requested and signum == signal.SIGINT:  # a second Ctrl-C: stop now, the last checkpoint stays
            raise KeyboardInterrupt
        run.stop_requested = True

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def pretrain(cfg: Config) -> dict[str, Any]:
    """Pretrain by ReSSL as ``cfg`` says; returns (and saves in ``out/final.json``) the final metrics.

    A run that is already complete (all its epochs, or its ``max_minutes``, done and ``final.json`` written) is
    left as it is: its ``final.json`` is returned and nothing is written.
    """
    run = setup(cfg)
    try:
        return _train_and_measure(run)
    finally:
        rundir.release(run.out)
        run.graph = None  # its body refers to the run: without this cycle, the run's GPU memory goes with the run


def _train_and_measure(run: Run) -> dict[str, Any]:
    """:func:`pretrain` once the run is set up: train what is left, then the final kNN and ``final.json``."""
    cfg, say = run.cfg, _printer(run)
    deadline = run.clock + 60 * cfg.max_minutes if cfg.max_minutes else None  # over every invocation of the run
    done = _done(run, deadline)
    final = rundir.finished(run.out, run.state.step) if done else None
    if done and not dist.any_rank(final is None, run.device):
        say(f"{run.out} is already complete ({done}); its results are in {run.out / 'final.json'}. Nothing was changed: "
            "raise --epochs or --max_minutes to train it further, or pass another --out for a new run", flush=True)
        assert final is not None  # on every process
        return final
    dist.main_writes(lambda: _start_files(run), run.device)
    say(f"ressl: {run.dataset.describe()} -> {run.out}  |  {cfg.backbone} width {cfg.width}, "
        f"{cfg.image_size}px, batch {cfg.batch_size}{_per_process(cfg.batch_size)}, {progress.count(cfg.epochs, 'epoch')}, device {run.device}, "
        f"precision {'bf16' if run.amp_dtype else 'fp32'}{', CUDA graph' if run.graph is not None else ''}", flush=True)
    for note in setting_notes(cfg, run.dataset):
        say(f"note: {note}", flush=True)
    if done:  # e.g. --resume from a run whose --max_minutes were already spent, or stopped before its final kNN
        say(f"no training left ({done}): the final kNN and final.json follow", flush=True)
        run.log.forget_evaluation(run.state.step)  # a final kNN logged before: it is logged again below
    if run.state.step == 0:
        run.state.knn_random_init = timed_knn(run)
        if run.state.knn_random_init is not None:
            initial = run.state.knn_random_init
            run.log.write(step=0, epoch=0, **_knn_record(initial))
            say(f"kNN of the randomly initialised encoder: top-1 {initial['top1']:.2f}%", flush=True)
    # the epoch lines' estimates go at this invocation's pace, from here (after its set-up and first kNN)
    marks = [(run.state.epoch + run.state.index / run.steps_per_epoch, run.minutes())]
    with _stop_on_signals(run), _data_failures_saved(run):
        while not done:
            train_one_epoch(run, deadline)
            if run.state.index == 0:  # the epoch ended (else its time ran out inside it, agreed by every process)
                save_checkpoint(run)
                _end_of_epoch(run, say, deadline, marks)
                done = _done(run, deadline)
            if run.state.index or (done and run.state.epoch < cfg.epochs):  # the time is up, inside or at the end
                _budget_spent(run)
                save_checkpoint(run)  # (again at an epoch's end): the checkpoint records the budget as spent
                say(f"stopping after {cfg.max_minutes} minutes (--max_minutes) at step {run.state.step}", flush=True)
                break
    final: dict[str, Any] = {} if run.state.knn_random_init is None else {"knn_random_init": run.state.knn_random_init}
    final.update(epochs=run.state.epoch, steps=run.state.step, loss=run.state.loss, minutes=run.minutes())
    acc = evaluate_knn(run)
    if acc is not None:
        final["knn"] = acc
        run.log.write(step=run.state.step, epoch=run.state.epoch, **_knn_record(acc))
        before = final.get("knn_random_init", {}).get("top1")
        say(f"kNN {accuracy_text(acc, run.dataset.num_classes)}" + (f"  (random init: {before:.2f}%)" if before is not None else ""),
            flush=True)
    dist.main_writes(lambda: checkpoint.write_run_file(run.out / "final.json", json.dumps(final, indent=2)), run.device)
    say(f"checkpoint: {run.out / 'checkpoint.pt'}", flush=True)
    return final


def setting_notes(cfg: Config, dataset: Dataset) -> list[str]:
    """Settings that run but are likely not what was meant, a line each (said as the run starts)."""
    notes, images = [], len(dataset.train)
    if cfg.warmup_epochs >= cfg.epochs:  # a short trial of a paper preset (5 warm-up epochs)
        notes.append(f"--warmup_epochs {cfg.warmup_epochs:g} spans the whole run of {progress.count(cfg.epochs, 'epoch')}, so the "
                     f"learning rate never reaches --lr {cfg.lr:g}: pass a smaller --warmup_epochs for a short run")
    if cfg.queue_size > images:  # e.g. a paper preset's queue on a small folder
        notes.append(f"the queue (--queue_size {cfg.queue_size:,}) is longer than the training set ({progress.count(images, 'image')}), "
                     f"so it holds about {cfg.queue_size / images:.1f} past embeddings of each image; the paper keeps it well "
                     "below (4,096 of CIFAR's 50,000): a smaller --queue_size relates each image to more others")
    side = max(dataset.train.images.shape[-2:]) if dataset.train.images is not None else cfg.image_size
    if cfg.image_size > 2 * side:  # images in memory (those of a folder are not known before they are decoded)
        notes.append(f"the images are {side} px, trained at --image_size {cfg.image_size}: each view is upscaled "
                     f"{cfg.image_size / side:.1f} times, which costs compute but adds no detail (the paper trains at "
                     "the images' own size, 32 px for CIFAR)")
    return notes


def _start_files(run: Run) -> None:
    """A run that trains (or measures) again: its resolved configuration (the default --out too) in ``config.yaml``,
    and no ``final.json`` until its new last word."""
    config.save(dataclasses.replace(run.cfg, out=str(run.out)), run.out / "config.yaml")
    with checkpoint.writing(str(run.out / "final.json")):  # the results of fewer steps
        (run.out / "final.json").unlink(missing_ok=True)


def _per_process(batch_size: int) -> str:
    """`` (8 processes x 32)`` under torchrun, nothing in one process."""
    world = dist.world_size()
    return f" ({world} processes x {batch_size // world})" if world > 1 else ""


@contextlib.contextmanager
def _data_failures_saved(run: Run) -> Iterator[None]:
    """Files that became unreadable during training stop it with their own message (not a loader worker's
    traceback), as a :class:`LateDataError`, after a checkpoint: fixing or deleting the files and re-running the
    command continues the run. So does a loader worker that died (the host's out-of-memory killer: the message says
    to lower --workers). Under torchrun the processes have agreed to stop together first, at the same step
    (:func:`_outlast_data_errors`, :func:`ressl.evaluate.extract_features`), and all raise the same message."""
    try:
        yield
    except Exception as err:
        failure = load_failure(err)
        if failure is None:
            raise
        save_checkpoint(run)
        raise LateDataError(f"{failure}; a checkpoint was saved at step {run.state.step}: {how_to_continue(failure)}") from None


def _printer(run: Run) -> Callable[..., None]:
    """``print`` on rank 0, a no-op elsewhere. When stdout can no longer be written (its reader has gone: ``ressl
    pretrain | head``), or could not be when the run was set up, the run stops at the next step boundary with a
    checkpoint, as on Ctrl-C, instead of dying inside a step."""
    if not dist.is_main():
        return lambda *args, **kwargs: None

    def say(*args: Any, **kwargs: Any) -> None:
        if not progress.say(*args, **kwargs):
            run.stop_requested = True

    return say


def _done(run: Run, deadline: float | None) -> str:
    """Why the run has no training left ("" while it has): all its epochs, or its time (agreed by every process)."""
    if run.state.epoch >= run.cfg.epochs:
        return f"{run.state.epoch}/{run.cfg.epochs} epochs, step {run.state.step}"
    if _late(run, deadline):
        return f"its --max_minutes {run.cfg.max_minutes} are spent, step {run.state.step}"
    return ""


def _budget_spent(run: Run) -> None:
    """Mark the run's ``max_minutes`` as all spent, so that its checkpoint says so on every process's clock (one
    process may have agreed to stop a moment before its own clock ran out): a re-run then trains no further."""
    assert run.cfg.max_minutes
    run.clock = min(run.clock, time.time() - 60 * run.cfg.max_minutes)


def _late(run: Run, deadline: float | None, check: bool = True) -> bool:
    """Whether the run's time (``--max_minutes``) is up. Distributed, every process must give the same answer, or
    one would wait forever in the next step's collectives for another that stopped: they agree (a collective), where
    ``check`` says all of them ask, at logging steps and epoch ends."""
    if deadline is None:
        return False
    if not dist.is_distributed():
        return time.time() > deadline
    return dist.any_rank(time.time() > deadline, run.device) if check else False
