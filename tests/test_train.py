import copy
import json

import numpy as np
import pytest
import torch
from conftest import make_images

from ressl import config
from ressl.loss import relational_loss
from ressl.train import epoch_order, setup, train_one_epoch
from ressl.views import ViewAugment


def tiny_run(npz_dir, tmp_path, **overrides):
    values = dict(dataset="npz", data=str(npz_dir), out=str(tmp_path / "run"), image_size=16, width=8, hidden_dim=32,
                  out_dim=16, batch_size=32, queue_size=64, lr=0.05, epochs=5, precision="fp32", channels_last=False,
                  log_every=1, knn_k=10)
    values.update(overrides)
    return setup(config.resolve(None, values))


def test_one_step_follows_the_official_order(npz_dir, tmp_path):
    """One training step equals a naive re-implementation of: student(strong); EMA; teacher(weak);
    loss against the queue *before* this batch; SGD step; push the teacher's batch."""
    run = tiny_run(npz_dir, tmp_path, batch_size=128, queue_size=256, ema_momentum=0.9, weight_decay=1e-3)
    cfg = run.cfg
    student, teacher = copy.deepcopy(run.model.student), copy.deepcopy(run.model.teacher)
    queue_before = run.model.queue.queue.clone()
    order = epoch_order(run)

    train_one_epoch(run)

    # the naive reference, with the same random numbers: step 0's, from the run's seed alone
    batch = run.dataset.train.images[order]
    weak, strong = ViewAugment(run.augment.weak, run.augment.strong, seed=(cfg.seed, 0))(batch, batch, 0)
    z_student = student(strong)
    with torch.no_grad():
        for t, s in zip(teacher.parameters(), student.parameters()):
            t.copy_(0.9 * t + 0.1 * s)
        z_teacher = teacher(weak)
    relational_loss(z_student, z_teacher, queue_before, cfg.student_temperature, cfg.teacher_temperature).backward()
    with torch.no_grad():
        for p in student.parameters():
            decay = cfg.weight_decay if p.ndim > 1 else 0.0
            p -= cfg.lr * (p.grad + decay * p)  # first SGD step: the momentum buffer is the gradient

    for a, b in zip(student.parameters(), run.model.student.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(teacher.parameters(), run.model.teacher.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run.model.queue.queue[:128], z_teacher, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run.model.queue.queue[128:], queue_before[128:])
    assert run.state.step == 1


def test_training_steps_lower_the_loss(tmp_path):
    """The logged ReSSL loss falls once the queue holds real teacher embeddings (after the first epoch,
    while random initial rows are replaced, it rises towards ln K)."""
    x, y = make_images(256, 16, 4, seed=0)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    x, y = make_images(64, 16, 4, seed=1)
    np.savez(tmp_path / "test.npz", x=x, y=y)
    run = tiny_run(tmp_path, tmp_path, epochs=12, head_bn=True, queue_size=128)
    for _ in range(12):
        train_one_epoch(run)
    losses = [r["loss"] for r in map(json.loads, (run.out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 12 * 8
    second_epoch, last_epoch = sum(losses[8:16]) / 8, sum(losses[-8:]) / 8
    assert last_epoch < second_epoch - 0.1, (second_epoch, last_epoch)


def test_teacher_strong_switch_gives_teacher_colour_ops(npz_dir, tmp_path):
    assert not tiny_run(npz_dir, tmp_path).augment.weak.strong
    assert tiny_run(npz_dir, tmp_path / "b", teacher_strong=True).augment.weak.strong


def test_torchvision_backend_trains_on_views_from_the_workers(npz_dir, tmp_path):
    """--augment_backend torchvision: the per-image pipeline runs in the loader, the loop takes its views
    as they are, and training still lowers the loss."""
    run = tiny_run(npz_dir, tmp_path, augment_backend="torchvision", workers=0, epochs=4, queue_size=32)
    assert run.loader_views is not None
    losses = []
    for _ in range(4):
        losses.append(train_one_epoch(run))
    assert all(np.isfinite(losses)) and run.state.step == 16 and run.state.epoch == 4
    assert losses[-1] < losses[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_never_waits_for_the_gpu(npz_dir, tmp_path):
    """On CUDA a training step (augmentation included) queues its work without a host-device sync."""
    from ressl.data import pretrain_batches
    from ressl.train import train_step

    run = tiny_run(npz_dir, tmp_path, device="cuda", precision="bf16", channels_last=True)
    batches = pretrain_batches(run.dataset, run.cfg.batch_size, 16, 0.2, 0, epoch_order(run), 0, run.device)
    train_step(run, *next(batches))  # the first step may set things up
    run.state.step += 1
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_step(run, *next(batches))
    finally:
        torch.cuda.set_sync_debug_mode("default")
