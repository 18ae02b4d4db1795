"""Step overhead: one full ReSSL training step divided by the bare network work it cannot avoid.

Full step, exactly as ``ressl.train.train_one_epoch`` does per batch: slice the uint8 batch from the
in-memory set, learning rate and EMA momentum from the schedules, weak and strong batched
augmentation, student forward on the strong view, EMA update, teacher forward on the weak view (no
gradient), relational loss against the queue, backward, SGD step, queue push, the on-device
finiteness flag.

Bare work: student forward + backward on an already augmented strong batch and teacher forward on
the weak batch: same model (backbone, width, memory format), same batch, same autocast dtype; no
augmentation, no EMA, no loss against the queue, no optimiser step, no push.

    python -m benchmarks.step [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

from benchmarks import common
from ressl.augment import strong_augment, weak_augment
from ressl.config import Config
from ressl.loss import relational_loss
from ressl.model import ReSSL, build_model
from ressl.schedule import cosine_lr, ema_momentum
from ressl.train import autocast_dtype, build_optimizer


def autocast_for(device: torch.device, amp_dtype: torch.dtype | None) -> torch.autocast:
    """The same context ``train_one_epoch`` uses."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


def make_bare_step(model: ReSSL, weak: torch.Tensor, strong: torch.Tensor, device: torch.device,
                   amp_dtype: torch.dtype | None) -> Callable[[], None]:
    """Student forward + backward on ``strong`` and teacher forward on ``weak`` (both already augmented)."""
    autocast = autocast_for(device, amp_dtype)
    grad: torch.Tensor | None = None

    def bare_step() -> None:
        nonlocal grad
        with autocast:
            student = model.student(strong)
        with torch.no_grad(), autocast:
            model.teacher(weak)
        if grad is None:  # a fixed upstream gradient stands in for the loss
            grad = torch.randn(student.shape, device=student.device, dtype=student.dtype, generator=None) / student.shape[0]
        model.student.zero_grad(set_to_none=True)  # as the full step: fresh gradients, no accumulation
        student.backward(grad)

    return bare_step


class FullStep:
    """The body of ``train_one_epoch``'s loop, minus logging, checkpoints and signals."""

    def __init__(self, cfg: Config, device: torch.device, images: torch.Tensor, mean, std, steps_per_epoch: int) -> None:
        self.cfg, self.device, self.images = cfg, device, images
        torch.manual_seed(cfg.seed)
        self.model = common.channels_last(build_model(cfg.backbone, cfg.image_size, cfg.width, cfg.hidden_dim, cfg.out_dim,
                                                      cfg.queue_size, cfg.head_bn, cfg.small_stem).to(device), cfg)
        self.optimizer = build_optimizer(self.model.student, cfg)
        self.amp_dtype = autocast_dtype(cfg.precision, device)
        self.autocast = autocast_for(device, self.amp_dtype)
        common_kw = dict(crop=True, crop_scale=(cfg.crop_min_scale, 1.0))
        self.strong_aug = strong_augment(cfg.image_size, mean, std, blur=cfg.blur, **common_kw)
        self.weak_aug = (strong_augment(cfg.image_size, mean, std, blur=cfg.blur, **common_kw) if cfg.teacher_strong
                         else weak_augment(cfg.image_size, mean, std, **common_kw))
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = cfg.epochs * steps_per_epoch
        self.step = 0
        self.first_bad_step = torch.full((), -1, device=device)
        self.model.train()

    def source_batch(self, index: int) -> torch.Tensor:
        b = self.cfg.batch_size
        start = (index % self.steps_per_epoch) * b
        idx = self.order[start:start + b]
        return self.images.index_select(0, idx.to(self.images.device)).to(self.device, non_blocking=True)

    def __call__(self) -> None:
        cfg, model, optimizer, autocast = self.cfg, self.model, self.optimizer, self.autocast
        weak_source = strong_source = self.source_batch(self.step)
        lr = cosine_lr(self.step, self.total_steps, cfg.lr, round(cfg.warmup_epochs * self.steps_per_epoch))
        for group in optimizer.param_groups:
            group["lr"] = lr
        momentum = ema_momentum(self.step, self.total_steps, cfg.ema_momentum, cfg.ema_cosine)
        weak = self.weak_aug(weak_source, self.generator)
        strong = self.strong_aug(strong_source, self.generator)
        with autocast:
            student = model.student(strong)
        model.update_teacher(momentum)
        with torch.no_grad(), autocast:
            teacher = model.teacher(weak)
        loss = relational_loss(student, teacher, model.queue.queue, cfg.student_temperature, cfg.teacher_temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.queue.push(teacher)
        self.first_bad_step = torch.where((self.first_bad_step < 0) & ~torch.isfinite(loss.detach()), self.step + 1,
                                          self.first_bad_step)
        self.step += 1

    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """An augmented (weak, strong) pair of one batch, for the bare step."""
        source = self.source_batch(0)
        return self.weak_aug(source, self.generator), self.strong_aug(source, self.generator)


def repeat(fn: Callable[[], None], n: int) -> Callable[[], None]:
    def many() -> None:
        for _ in range(n):
            fn()
    return many


def run(args: argparse.Namespace) -> common.Result:
    device = common.device_of(args)
    root, source = common.data_dir(args)
    cfg = common.build_config(args, root)
    dataset = common.load(cfg)
    images = dataset.train.images
    assert images is not None, "the step benchmark needs an in-memory dataset (train.npz)"
    images = images.to(device)
    full = FullStep(cfg, device, images, dataset.mean, dataset.std, len(images) // cfg.batch_size)
    weak, strong = full.views()
    bare = make_bare_step(full.model, weak, strong, device, full.amp_dtype)
    steps = 2 if args.quick else 5  # steps per timed call
    repeats = args.repeats or (3 if args.quick else 9)
    print(f"[step] {common.describe(cfg, device, full.amp_dtype)}; data: {source}", flush=True)
    t = common.side_by_side({"full": repeat(full, steps), "bare": repeat(bare, steps)}, device, repeats,
                            warmup=1 if args.quick else 2)
    if int(full.first_bad_step) >= 0:
        print(f"[step] warning: the loss became non-finite at step {int(full.first_bad_step)}", flush=True)
    full_s, bare_s = t["full"] / steps, t["bare"] / steps
    b = cfg.batch_size
    detail = (f"full step {1e3 * full_s:.1f} ms ({b / full_s:.0f} img/s), bare work {1e3 * bare_s:.1f} ms "
              f"({b / bare_s:.0f} img/s); median of {repeats} x {steps} steps")
    result = common.Result("step overhead (full / bare time)", full_s / bare_s, "<= 1.10", detail)
    print(f"[step] {result.line()}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = common.parser(__doc__.splitlines()[0], "python -m benchmarks.step").parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
