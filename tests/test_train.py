import copy
import itertools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_images

from ressl import config
from ressl.data import Dataset, Split
from ressl.errors import DataError
from ressl.loss import relational_loss
from ressl.model import SplitBatchNorm
from ressl.train import (
    _outlast_data_errors,
    capture_network_step,
    epoch_order,
    epoch_pace,
    epoch_views,
    setting_notes,
    setup,
    time_left,
    timed_knn,
    train_one_epoch,
    train_step,
    use_cuda_graph,
)
from ressl.views import ViewAugment


def tiny_run(npz_dir, tmp_path, **overrides):
    values = dict(dataset="npz", data=str(npz_dir), out=str(tmp_path / "run"), image_size=16, width=8, hidden_dim=32,
                  out_dim=16, batch_size=32, queue_size=64, lr=0.05, epochs=5, precision="fp32", channels_last=False,
                  log_every=1, knn_k=10, device="cpu")
    values.update(overrides)
    return setup(config.resolve(None, values))


@pytest.mark.parametrize("graph_body", [False, True], ids=["eager", "graph-body"])
def test_one_step_follows_the_official_order(npz_dir, tmp_path, graph_body):
    """One training step equals a naive re-implementation of: student(strong); EMA; teacher(weak);
    loss against the queue *before* this batch; SGD step; push the teacher's batch. So does the step's
    CUDA graph body (``capture_network_step``, on a CPU run eagerly: static inputs, learning rate and momentum
    in tensors)."""
    run = tiny_run(npz_dir, tmp_path, batch_size=128, queue_size=256, ema_momentum=0.9, weight_decay=1e-3)
    with torch.no_grad():  # a teacher apart from the student (as after any step): the EMA must come before its forward
        for p in run.model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if graph_body:
        run.graph = capture_network_step(run)
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
    lr = cfg.lr / round(cfg.warmup_epochs * run.steps_per_epoch)  # the first step of the linear warm-up
    assert cfg.decay_bn_bias and run.steps_per_epoch == 1  # the official small-dataset code decays every parameter
    with torch.no_grad():
        for p in student.parameters():
            p -= lr * (p.grad + cfg.weight_decay * p)  # first SGD step: the momentum buffer is the gradient

    for a, b in zip(student.parameters(), run.model.student.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(teacher.parameters(), run.model.teacher.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run.model.queue.queue[:128], z_teacher, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run.model.queue.queue[128:], queue_before[128:])
    assert run.state.step == 1


@pytest.mark.parametrize("bn_groups", [1, 4])
def test_graph_body_follows_the_schedules_as_the_eager_step(npz_dir, tmp_path, bn_groups):
    """Over steps whose learning rate and EMA momentum change (cosine schedules), the graph's body, reading
    them from tensors, trains exactly as the eager step; with --bn_groups, the teacher's shuffle drawn for each
    step reaches the body as one of its inputs."""
    runs = [tiny_run(npz_dir, tmp_path / name, epochs=2, ema_cosine=True, bn_groups=bn_groups) for name in ("eager", "graph")]
    runs[1].graph = capture_network_step(runs[1])  # on a CPU: its body, run eagerly
    for run in runs:
        train_one_epoch(run)
    assert runs[0].state.step == 4
    # Measured apart by rounding alone: the learning rate is a Python float in one, a float32 tensor in the other
    # (1e-7 apart), and four steps of a tiny network amplify that to 5e-3 of a tensor's largest value with one
    # thread (1e-6 to 2e-4 with two). A frozen learning rate or momentum, or a lost shuffle: 0.1 to 20.
    eager, graph = (run.optimizer.state_dict()["state"] for run in runs)
    pairs = [*zip(runs[0].model.state_dict().values(), runs[1].model.state_dict().values()),
             *((eager[i]["momentum_buffer"], graph[i]["momentum_buffer"]) for i in eager)]
    for a, b in pairs:
        assert (a.double() - b.double()).abs().max() <= 3e-2 * a.double().abs().max() + 1e-6


@pytest.mark.parametrize("scale,flip", [(0.5, True), (0.9, False)])
def test_both_views_follow_the_runs_crop_scale_and_flip(npz_dir, tmp_path, scale, flip):
    run = tiny_run(npz_dir, tmp_path, crop_min_scale=scale, flip=flip)
    for augment in (run.augment.weak, run.augment.strong):
        drawn = augment.sample_params(4000, 32, 32, torch.Generator().manual_seed(0))
        area = (drawn["crop"][:, 2] * drawn["crop"][:, 3]).double() / (32 * 32)
        assert area.min() >= scale - 0.05 and area.quantile(0.01) < scale + 0.02  # pixel rounding of the crop's sides
        assert abs(drawn["flip"].double().mean().item() - (0.5 if flip else 0.0)) < 0.04


def test_training_follows_the_cosine_ema_schedule_and_logs_it(npz_dir, tmp_path):
    """BYOL's increase written out: 1 - (1 - 0.9) (cos(pi s / 8) + 1) / 2 at step s of 8."""
    run = tiny_run(npz_dir, tmp_path, epochs=2, ema_cosine=True, ema_momentum=0.9)
    for _ in range(2):
        train_one_epoch(run)
    logged = [r["ema_momentum"] for r in map(json.loads, (run.out / "metrics.jsonl").read_text().splitlines())
              if "ema_momentum" in r]
    assert run.total_steps == 8
    assert logged == pytest.approx([1 - 0.1 * (math.cos(math.pi * s / 8) + 1) / 2 for s in range(8)])


def test_the_logged_relation_entropies_use_each_networks_temperature(npz_dir, tmp_path):
    """A student at temperature 1 spreads its relation far wider than the teacher's at 0.04."""
    run = tiny_run(npz_dir, tmp_path, student_temperature=1.0, teacher_temperature=0.04, epochs=1)
    train_one_epoch(run)
    record = next(r for r in map(json.loads, (run.out / "metrics.jsonl").read_text().splitlines()) if "teacher_entropy" in r)
    assert record["teacher_entropy"] < record["student_entropy"] - 0.5, record


def test_the_runs_knn_checks_vote_at_its_knn_temperature(npz_dir, tmp_path):
    """Every image of the bank votes (k 128): nearly the nearest alone at T 0.01, nearly a count at T 100."""
    import dataclasses

    from ressl.train import evaluate_knn

    run = tiny_run(npz_dir, tmp_path, knn_k=128)
    results = []
    for temperature in (0.01, 100.0):
        run.cfg = dataclasses.replace(run.cfg, knn_temperature=temperature)
        results.append(evaluate_knn(run)["top1"])
    assert results[0] != results[1], results


def test_cuda_graph_on_a_cpu_is_a_configuration_error(npz_dir, tmp_path):
    assert tiny_run(npz_dir, tmp_path).graph is None  # auto: off where it cannot run
    with pytest.raises(config.ConfigError, match="needs a CUDA device"):
        tiny_run(npz_dir, tmp_path, cuda_graph=True, device="cpu")


def test_cuda_graph_runs_with_bn_groups_but_not_with_compile():
    cuda = torch.device("cuda")
    assert use_cuda_graph(config.resolve(None, dict(bn_groups=8, student_bn_groups=8)), cuda)
    assert not use_cuda_graph(config.resolve(None, dict(compile=True)), cuda)
    with pytest.raises(config.ConfigError, match="does not combine with --compile"):
        use_cuda_graph(config.resolve(None, dict(compile=True, cuda_graph=True)), cuda)


@pytest.fixture
def deterministic_cuda():
    """Deterministic cuDNN kernels and full float32 (no TF32): two runs of the same steps then agree to rounding,
    instead of drifting apart through atomics and TF32 as a few training steps amplify them."""
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
     torch.backends.cuda.matmul.allow_tf32) = saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("student_bn_groups,bn_groups", [(1, 1), (4, 1), (4, 4)])
def test_cuda_graph_trains_as_the_eager_step(npz_dir, tmp_path, deterministic_cuda, student_bn_groups, bn_groups):
    """On CUDA the step's graph (a warm-up call, the capture, replays) trains as the eager step, with the student's
    split BatchNorm too (whose running statistics the graph updates through copies), and with the teacher's over
    its batch shuffled anew each step (the shuffle an input of the graph).

    Step 1 is eager in both runs. Step 2, the first replay, starts from the same state, so it may differ by one
    step's rounding only (the capture may pick other cuDNN kernels). Over all eight steps, whose learning rate and EMA
    momentum change, differences grow through training, so there the bound is looser. It still catches a number the
    graph would have frozen at its capture (checked on a CPU: 2e-3 to 3e-2)."""
    runs = [tiny_run(npz_dir, tmp_path / str(g), device="cuda", epochs=2, ema_cosine=True, cuda_graph=g,
                     student_bn_groups=student_bn_groups, bn_groups=bn_groups) for g in (False, True)]
    runs[1].graph.warmup = 1
    orders = [list(epoch_views(r, 0)) for r in runs]  # the same 4 steps' views in both
    losses: list[list[float]] = [[], []]
    for step in range(8):
        for i, run in enumerate(runs):
            train_step(run, *orders[i][step % 4], lambda loss, s, t, i=i: losses[i].append(loss.item()))
            run.state.step += 1
        eager, graphed = (r.model.flat_student()[0] for r in runs)
        if step == 1:
            assert runs[1].graph.captured
            torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)
    for a, b in zip(runs[0].model.state_dict().values(), runs[1].model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(runs[1].optimizer.state_dict()["state"], runs[0].optimizer.state_dict()["state"],
                               rtol=1e-3, atol=1e-4)


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


@pytest.mark.parametrize("bn_groups", [1, 2])
def test_bn_groups_train_each_network_with_its_split_batchnorm(npz_dir, tmp_path, bn_groups):
    """--student_bn_groups and --bn_groups reach the trained networks (channels-last, as runs train by default):
    every BatchNorm of the student normalises 4 groups apart through a step, the teacher's ``bn_groups`` (one
    forward pass over its shuffled batch: the running statistics move once)."""
    run = tiny_run(npz_dir, tmp_path, student_bn_groups=4, bn_groups=bn_groups, channels_last=True)
    norms = lambda net: [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms(run.model.student) and all(isinstance(m, SplitBatchNorm) and m.groups == 4 for m in norms(run.model.student))
    assert all(isinstance(m, SplitBatchNorm) == (bn_groups > 1) for m in norms(run.model.teacher))
    losses: list[float] = []
    train_step(run, *next(epoch_views(run, 0)), lambda loss, s, t: losses.append(loss.item()))
    assert len(losses) == 1 and np.isfinite(losses[0])
    assert all(int(m.num_batches_tracked) == 1 for m in norms(run.model.student) + norms(run.model.teacher))


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


def fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int, current: int) -> list[int]:
    """``count`` GPUs, ``current`` the current one, faked at torch.cuda's boundary (no GPU here); returns the
    indices ``torch.cuda.set_device`` is called with, read as it reads them (it refuses a device without one)."""
    made_current: list[int] = []
    def set_device(device: torch.device) -> None:
        made_current.append(torch.cuda._utils._get_device_index(device))
    for fake in (("is_available", lambda: True), ("device_count", lambda: count), ("current_device", lambda: current),
                 ("set_device", set_device)):
        monkeypatch.setattr(torch.cuda, *fake)
    return made_current


@pytest.mark.parametrize("name, expected", [("auto", 1), ("cuda", 1), ("cuda:0", 0), ("cuda:1", 1), ("cuda:2", None)])
def test_a_cuda_device_is_made_current_with_its_index(monkeypatch, name, expected):
    """On a machine with two GPUs, the second current: ``auto`` and ``cuda`` (no index, which torch.cuda.set_device
    refuses) name the current one, ``cuda:N`` that one, and a GPU that is not there is a one-line configuration
    error. The CUDA test below checks the same on a GPU."""
    from ressl.config import ConfigError
    from ressl.dist import resolve_device

    made_current = fake_gpus(monkeypatch, count=2, current=1)
    if expected is None:
        with pytest.raises(ConfigError, match=r"--device cuda:2: only 2 CUDA device\(s\) are visible, cuda:0 to cuda:1"):
            resolve_device(name)
        return
    assert resolve_device(name) == torch.device("cuda", expected) and made_current == [expected]


def test_more_processes_than_gpus_on_a_machine_is_a_one_line_error(monkeypatch):
    """torchrun --nproc_per_node 2 on a machine with one GPU: NCCL would refuse two processes on one GPU in a
    traceback at the first collective; the mistake is named before the process group is joined."""
    from ressl.config import ConfigError
    from ressl.dist import resolve_device

    made_current = fake_gpus(monkeypatch, count=1, current=0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"torchrun started 2 processes on this machine but 1 CUDA GPU\(s\) are "
                                          r"visible: one process per GPU \(--nproc_per_node 1\)"):
        resolve_device("auto")
    assert made_current == []  # refused before any GPU was taken
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # two machines of one GPU each: this one is fine (not joined here)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert resolve_device("auto") == torch.device("cuda", 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_asked_for_becomes_the_current_device():
    """Streams, events and CUDA graphs are made on the current device: --device cuda:N must make it N."""
    from ressl.dist import resolve_device

    last = torch.cuda.device_count() - 1
    assert resolve_device(f"cuda:{last}") == torch.device("cuda", last) and torch.cuda.current_device() == last
    torch.cuda.set_device(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_never_waits_for_the_gpu(npz_dir, tmp_path):
    """On CUDA training steps (their views' augmentation included) queue their work without a host-device sync."""
    run = tiny_run(npz_dir, tmp_path, device="cuda", precision="bf16", channels_last=True, batch_size=16, augment_steps=2)
    assert run.graph is not None  # on by default on CUDA
    # 8 batches in the epoch: the warm-up calls and the capture take 4, and the two steps watched below, one
    # augmentation call, are inside the same epoch (an epoch's start copies its order to the device once, a sync
    # allowed there)
    views = epoch_views(run, 0)
    while not run.graph.captured or run.state.step % 2:  # warm-up calls, the capture; then to a call's first step
        train_step(run, *next(views))
        run.state.step += 1
    assert run.state.step <= 6
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            train_step(run, *next(views))
            run.state.step += 1
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_logged_numbers_are_on_the_host_once_their_event_is_waited_for():
    """A logged step's numbers travel to pinned host memory without a wait; the event to wait on follows the copy
    (recorded before it, the numbers could be read while still on their way)."""
    from ressl.meter import _to_host

    x = torch.randn(2048, 2048, device="cuda")
    for _ in range(4):  # work queued before the numbers, so that the copy waits its turn
        x = torch.tanh(x @ x)
    values = torch.stack([x.sum(), x.abs().max()]).double()
    host, event = _to_host(values)
    assert host.device.type == "cpu" and host.is_pinned() and event is not None
    event.synchronize()
    assert host.tolist() == values.cpu().tolist()


def test_deferred_logs_write_the_same_records_one_window_later(npz_dir, tmp_path, monkeypatch):
    """On a GPU a logged step's numbers are written at the next logged step, not read at once (which would make the
    host wait for the GPU); the records are the same as when written at once, and none is lost at the epoch's end.
    Forced here on a CPU, where the numbers are the same."""
    from ressl import meter, train

    def records(run):
        lines = (run.out / "metrics.jsonl").read_text().splitlines() if (run.out / "metrics.jsonl").exists() else []
        return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"} for line in lines]

    now = tiny_run(npz_dir, tmp_path / "now", batch_size=16, log_every=2)
    train_one_epoch(now)
    monkeypatch.setattr(meter, "_defer_logs", lambda device: True)
    later = tiny_run(npz_dir, tmp_path / "later", batch_size=16, log_every=2)
    written = []
    real_step = train.train_step

    def step_and_count(run, *args, **kwargs):  # the records on disk before each step
        written.append(len(records(run)))
        return real_step(run, *args, **kwargs)
    monkeypatch.setattr(train, "train_step", step_and_count)
    train_one_epoch(later)
    assert records(later) == records(now) and len(records(now)) == 4  # steps 2, 4, 6, 8
    assert written == [0, 0, 0, 0, 1, 1, 2, 2]  # step 2's record is written after step 4, step 4's after step 6 (at once: 0, 0, 1, 1, 2, ...)


def _step_starts(monkeypatch) -> list[float]:
    """When each training step starts, from now on: ``train.train_step`` watched, not changed."""
    import time

    from ressl import train

    starts, real_step = [], train.train_step

    def timed_step(*args, **kwargs):
        starts.append(time.perf_counter())
        return real_step(*args, **kwargs)
    monkeypatch.setattr(train, "train_step", timed_step)
    return starts


def test_logged_images_per_second_count_the_time_the_device_runs_behind(npz_dir, tmp_path, monkeypatch):
    """On a GPU the host runs ahead of the device and waits for it at logging steps only: a window's images/s must
    count those waits (the device's time), so that the windows of a call add up to its time. Here a device that has
    done a logged step 0.4 s after the host queued it stands in for the GPU (each window takes less on this CPU); as
    on a GPU, a logged step's numbers reach the host only once waited for (NaN before)."""
    import time

    from ressl import meter

    made = []  # the stand-in's steps, one for each logged step, in order

    class Behind:  # what meter._to_host returns to wait on: done 0.4 s after it was queued
        def __init__(self, values: torch.Tensor) -> None:
            self.done, self.values = time.perf_counter() + 0.4, values
            self.host = torch.full_like(values, float("nan"))  # the pinned copy, not there yet
            made.append(self)

        def synchronize(self) -> None:
            while time.perf_counter() < self.done:
                time.sleep(self.done - time.perf_counter())
            self.host.copy_(self.values)

    def to_host(values):
        behind = Behind(values)
        return behind.host, behind

    monkeypatch.setattr(meter, "_defer_logs", lambda device: True)
    monkeypatch.setattr(meter, "_to_host", to_host)
    starts = _step_starts(monkeypatch)
    run = tiny_run(npz_dir, tmp_path, batch_size=16, log_every=2)
    start = time.perf_counter()
    train_one_epoch(run)
    wall = time.perf_counter() - start
    logged, previous, window = 0.0, 0, {}
    records = [json.loads(line) for line in (run.out / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        window[record["step"]] = (record["step"] - previous) * 16 / record["images_per_s"]
        logged += window[record["step"]]
        previous = record["step"]
    assert previous == 8  # 4 windows: 3 waits for the window before, the epoch's end for its own step
    assert 0.9 * wall < logged <= wall, (logged, wall)  # timed on the host alone: about wall - 1.6 s
    # each window ends once the device has done the step it waits for (the previous logged step's; at the epoch's
    # end its own), and starts before its first step does
    for step, waited in ((4, 2), (6, 4), (8, 8)):
        assert window[step] >= made[waited // 2 - 1].done - starts[step - 2] - 1e-6, (step, window, starts)
    assert all(math.isfinite(record["loss"]) for record in records)  # read once there, not before


def test_the_time_a_record_takes_to_write_counts_in_the_next_window(npz_dir, tmp_path, monkeypatch):
    """A logged step's record is written after its window's clock is read, and its writing counts in the next window,
    so that the windows of a call add up to its time (on a CPU every record is written at once). Here a TensorBoard
    that takes 0.3 s to flush its events (a slow network disk) stands in for a slow write."""
    import sys
    import time
    import types

    class SlowWriter:
        def __init__(self, logdir: str) -> None:
            pass

        def add_scalar(self, *args, **kwargs) -> None:
            pass

        def flush(self) -> None:
            time.sleep(0.3)

    board = types.ModuleType("torch.utils.tensorboard")
    board.SummaryWriter = SlowWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", board)
    starts = _step_starts(monkeypatch)
    run = tiny_run(npz_dir, tmp_path, batch_size=16, log_every=2)
    train_one_epoch(run)
    records = [json.loads(line) for line in (run.out / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [2, 4, 6, 8]
    # the windows after step 2's run from its clock (before step 3 starts) to step 8's (after step 8 starts); they
    # hold the writing of steps 4 and 6's records (0.3 s each), lost between windows if each started after its write
    after = sum(2 * 16 / record["images_per_s"] for record in records[1:])
    assert after >= starts[7] - starts[2] - 1e-6, (after, starts)


@pytest.mark.parametrize("error", [TypeError("Descriptors cannot be created directly"),
                                   ValueError("numpy.dtype size changed, may indicate binary incompatibility")])
def test_a_broken_tensorboard_leaves_the_run_going_with_a_warning(npz_dir, tmp_path, monkeypatch, error):
    """An installed TensorBoard that fails to load with another error than ImportError (protobuf's "Descriptors
    cannot be created directly", a numpy it was not built for, say) stopped a run at its first logged step; it warns,
    once, and metrics.jsonl goes on."""
    import sys
    import types

    class Broken(types.ModuleType):
        def __getattr__(self, name):
            raise error

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", Broken("torch.utils.tensorboard"))
    run = tiny_run(npz_dir, tmp_path, batch_size=16, log_every=2)
    said = rf"TensorBoard is installed but could not be loaded \({type(error).__name__}: {str(error)[:20]}"
    with pytest.warns(RuntimeWarning, match=said) as caught:
        train_one_epoch(run)
    assert [json.loads(line)["step"] for line in (run.out / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6, 8]
    assert len([w for w in caught if "TensorBoard" in str(w.message)]) == 1, [str(w.message) for w in caught]  # not at each record


def test_an_absent_tensorboard_is_no_warning(npz_dir, tmp_path, monkeypatch):
    """TensorBoard is an optional extra: without it the run logs to metrics.jsonl only, and says nothing about it."""
    import sys
    import warnings

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import fails: ModuleNotFoundError
    run = tiny_run(npz_dir, tmp_path, batch_size=16, log_every=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_one_epoch(run)
    assert [json.loads(line)["step"] for line in (run.out / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6, 8]
    assert not [str(w.message) for w in caught if "TensorBoard" in str(w.message)]


def test_views_of_several_steps_per_call_for_sets_in_memory_only(npz_dir, tmp_path):
    """In memory, a call makes the views of up to --augment_steps steps (a folder's images held there too); from a
    folder read by loader workers, which would have to decode them all before the first could train, one step's."""
    from PIL import Image

    assert tiny_run(npz_dir, tmp_path / "npz").augment.steps_per_call == 8
    assert tiny_run(npz_dir, tmp_path / "npz2", augment_steps=3).augment.steps_per_call == 3
    rng = np.random.default_rng(0)
    for i in range(16):
        (tmp_path / "photos" / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "photos" / str(i % 2) / f"{i}.png")
    run = tiny_run(npz_dir, tmp_path / "folder", dataset="folder", data=str(tmp_path / "photos"), batch_size=4, workers=0,
                   hold_in_memory=False)
    assert run.augment.steps_per_call == 1
    assert np.isfinite(train_one_epoch(run)) and run.state.step == 4
    held = tiny_run(npz_dir, tmp_path / "held", dataset="folder", data=str(tmp_path / "photos"), batch_size=4, workers=0)
    assert held.dataset.train.images is not None and held.augment.steps_per_call == 8
    assert np.isfinite(train_one_epoch(held)) and held.state.step == 4


def test_a_stop_asked_at_an_epochs_last_step_ends_there_with_a_checkpoint(npz_dir, tmp_path):
    """Not one step later, inside the next epoch: the checkpoint holds the finished epoch."""
    from ressl import checkpoint
    from ressl.errors import Interrupted

    run = tiny_run(npz_dir, tmp_path)
    run.state.index = run.steps_per_epoch - 1  # at the epoch's last batch
    run.stop_requested = True  # as the SIGINT/SIGTERM handler sets it
    with pytest.raises(Interrupted, match="stopped at step 1; checkpoint saved"):
        train_one_epoch(run)
    assert (run.state.epoch, run.state.index, run.state.step) == (1, 0, 1)
    assert checkpoint.load(run.out / "checkpoint.pt")["state"]["epoch"] == 1


def test_a_stop_between_logging_steps_logs_its_loss_without_the_last_logged_steps_signals(npz_dir, tmp_path, monkeypatch):
    """The health signals are measured at logging steps only: a stop at another step must not log the last logged
    step's signals as its own."""
    import ressl.train
    from ressl.errors import Interrupted

    run = tiny_run(npz_dir, tmp_path, log_every=2)
    step = ressl.train.train_step

    def ctrl_c_during_step_3(run, *args):
        run.stop_requested = run.state.step == 2
        return step(run, *args)

    monkeypatch.setattr(ressl.train, "train_step", ctrl_c_during_step_3)
    with pytest.raises(Interrupted, match="stopped at step 3"):
        train_one_epoch(run)
    logged = {r["step"]: r for r in map(json.loads, (run.out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    assert "teacher_entropy" in logged[2] and "loss" in logged[3] and "teacher_entropy" not in logged[3]


def test_a_run_whose_time_runs_out_between_logging_steps_logs_its_last_loss(npz_dir, tmp_path, monkeypatch):
    """--max_minutes ends the epoch at step 3 (logging every 2): that step's loss is logged, and kept as the run's
    last (final.json's), as a stop by a signal does; not the loss of step 2, nor none at all before a first log."""
    import ressl.train

    run = tiny_run(npz_dir, tmp_path, log_every=2)
    monkeypatch.setattr(ressl.train, "_late", lambda run, deadline, check=True: run.state.step >= 3)
    train_one_epoch(run, deadline=0.0)
    logged = [r for r in map(json.loads, (run.out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in logged] == [2, 3] and run.state.step == 3
    assert run.state.loss == logged[-1]["loss"] != logged[0]["loss"]


def test_the_epochs_bar_is_live_on_a_terminal_and_silent_in_a_short_runs_log(npz_dir, tmp_path, monkeypatch):
    """A log file gets a bar state a minute at most (none for an epoch shorter than that), also at the logging
    steps, whose postfix (loss, lr, images/s) would otherwise redraw the bar each time."""
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stderr, live in ((io.StringIO(), False), (Terminal(), True)):
        run = tiny_run(npz_dir, tmp_path / str(live), log_every=1)
        monkeypatch.setattr(sys, "stderr", stderr)
        train_one_epoch(run)
        monkeypatch.undo()
        written = stderr.getvalue()
        assert ("loss=" in written and "epoch 1/5" in written) if live else written == "", written


def _views_failing_after(n: int, error: Exception | None = None):
    for i in range(n):
        yield torch.full((4, 3, 8, 8), float(i)), torch.full((4, 3, 8, 8), -float(i))
    raise error or DataError("photos/cat/1.png failed to load")


@pytest.mark.parametrize("good", [2, 0])
def test_a_process_whose_images_fail_keeps_stepping_on_its_last_views_and_asks_to_stop(good):
    """Under torchrun a process cannot leave alone: after a failure it repeats its last views (blank ones of the
    right shape when none came yet) until the processes agree to stop, and records the message it will stop with."""
    run = SimpleNamespace(cfg=SimpleNamespace(batch_size=4, image_size=8), device=torch.device("cpu"), data_error=None)
    views = _outlast_data_errors(run, _views_failing_after(good))
    seen = list(itertools.islice(views, good + 3))
    assert run.data_error == "photos/cat/1.png failed to load"
    assert [float(weak[0, 0, 0, 0]) for weak, _ in seen] == [*range(good), max(good - 1, 0)] + [max(good - 1, 0)] * 2
    assert all(weak.shape == strong.shape == (4, 3, 8, 8) for weak, strong in seen)
    if good == 0:
        assert all(not weak.any() and not strong.any() for weak, strong in seen)


def test_a_loader_worker_that_dies_in_one_process_asks_every_process_to_stop():
    """Under torchrun, a loader worker killed in one process (the host's out-of-memory killer) is a stop that every
    process agrees on, as an unreadable image is; an error of the step itself is not caught."""
    run = SimpleNamespace(cfg=SimpleNamespace(batch_size=4, image_size=8), device=torch.device("cpu"), data_error=None)
    died = RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")
    seen = list(itertools.islice(_outlast_data_errors(run, _views_failing_after(1, died)), 3))
    assert len(seen) == 3 and run.data_error == ("DataLoader worker (pid(s) 4242) exited unexpectedly (if the host "
                                                 "ran out of memory: lower --workers)")
    step_failed = RuntimeError("CUDA error: an illegal memory access was encountered")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        next(_outlast_data_errors(run, _views_failing_after(0, step_failed)))


def test_a_loader_worker_that_dies_in_one_process_stops_the_run_in_one_line_with_a_checkpoint(npz_dir, tmp_path, monkeypatch):
    """A loader worker killed in a run of one process (the host's out-of-memory killer) stops it as an unreadable
    image does: with a checkpoint of the steps done and one line that says to lower --workers (no files to fix),
    instead of PyTorch's traceback and the steps since the last checkpoint lost."""
    import ressl.train
    from ressl.errors import LateDataError
    from ressl.train import _train_and_measure

    run = tiny_run(npz_dir, tmp_path, knn_every=0)
    views = ressl.train.epoch_views

    def dying(run, start):
        yield from itertools.islice(views(run, start), 2)
        raise RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")

    monkeypatch.setattr(ressl.train, "epoch_views", dying)
    with pytest.raises(LateDataError) as caught:
        _train_and_measure(run)
    assert str(caught.value) == ("DataLoader worker (pid(s) 4242) exited unexpectedly (if the host ran out of memory: "
                                 "lower --workers); a checkpoint was saved at step 2: run the same command to continue")
    assert torch.load(run.out / "checkpoint.pt", weights_only=True)["state"]["step"] == 2


def test_load_failures_are_told_from_other_errors():
    from ressl.errors import load_failure

    worker = ValueError("Caught ValueError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
                        '  File "x.py", line 1\nValueError: image file is truncated')
    assert load_failure(worker) == "image file is truncated"
    assert load_failure(RuntimeError("DataLoader worker (pid 7) is killed by signal: Killed. ")).endswith("lower --workers)")
    assert load_failure(DataError("photos/cat/1.png failed to load")) == "photos/cat/1.png failed to load"
    assert load_failure(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")) is None


# --- the loop's bookkeeping (mutation audit, fourteenth session) ------------------------------------------------


def test_the_epoch_order_is_the_epochs_own_and_new_each_epoch(npz_dir, tmp_path):
    run = tiny_run(npz_dir, tmp_path)
    first = epoch_order(run)
    run.state.step, run.state.index = 2, 2  # later in the same epoch (a resume)
    assert torch.equal(epoch_order(run), first)
    run.state.epoch, run.state.step, run.state.index = 1, 4, 0
    assert not torch.equal(epoch_order(run), first)


def test_loader_views_are_drawn_anew_each_epoch(npz_dir, tmp_path, monkeypatch):
    """With the per-image pipeline, the same images get the same views again in the same epoch, new ones the next."""
    import ressl.train

    run = tiny_run(npz_dir, tmp_path, augment_backend="torchvision", workers=0)
    order = torch.randperm(128)
    monkeypatch.setattr(ressl.train, "epoch_order", lambda run: order)  # the same images in each epoch
    first = next(iter(epoch_views(run, 0)))[0]
    assert torch.equal(next(iter(epoch_views(run, 0)))[0], first)
    run.state.epoch = 1
    assert not torch.equal(next(iter(epoch_views(run, 0)))[0], first)


def test_checkpoints_inside_an_epoch_fall_on_multiples_of_checkpoint_every(npz_dir, tmp_path, monkeypatch):
    """--checkpoint_every 2 over two epochs of 4 steps: steps 2 and 6 inside them (the loop saves; epoch ends are
    saved by pretrain)."""
    import ressl.train

    run = tiny_run(npz_dir, tmp_path, checkpoint_every=2, epochs=3)
    saved, real = [], ressl.train.save_checkpoint
    monkeypatch.setattr(ressl.train, "save_checkpoint", lambda run: saved.append(run.state.step) or real(run))
    train_one_epoch(run)
    train_one_epoch(run)
    assert saved == [2, 6]


def test_the_runs_knn_check_samples_the_bank_from_the_bank_and_the_queries_from_the_test_split(npz_dir, tmp_path, monkeypatch):
    import ressl.train
    from ressl.data import sample_split

    run = tiny_run(npz_dir, tmp_path)
    seen, real = [], ressl.train.split_features
    monkeypatch.setattr(ressl.train, "split_features", lambda backbone, split, *args, **kw: seen.append(split) or real(backbone, split, *args, **kw))
    ressl.train.evaluate_knn(run, 40)
    assert torch.equal(seen[0].images, sample_split(run.dataset.bank, 40).images)
    assert torch.equal(seen[1].images, sample_split(run.dataset.test, 40).images)


def test_a_run_stopped_inside_an_epoch_and_resumed_trains_as_the_unbroken_one(npz_dir, tmp_path):
    """Stopped one step into the second epoch (its time out), checkpointed, built again from the checkpoint: the same
    weights, optimiser, generators and place, and after the epoch the same weights, bit for bit, as a run never
    stopped. (The SIGKILL test of test_resume.py kills at a random step, sometimes an epoch's end.)"""
    import time

    from ressl.resume import save_checkpoint

    unbroken = tiny_run(npz_dir, tmp_path / "a", epochs=2, bn_groups=2)
    train_one_epoch(unbroken)
    train_one_epoch(unbroken)
    broken = tiny_run(npz_dir, tmp_path / "b", epochs=2, bn_groups=2)
    train_one_epoch(broken)
    train_one_epoch(broken, deadline=time.time() - 1)  # out of time after step 1 of epoch 2
    broken.clock -= 600  # ten minutes spent so far
    save_checkpoint(broken)
    resumed = tiny_run(npz_dir, tmp_path / "b", epochs=2, bn_groups=2)
    assert (resumed.state.epoch, resumed.state.index, resumed.state.step) == (1, 1, 5) and resumed.state == broken.state
    assert torch.equal(resumed.shuffle_generator.get_state(), broken.shuffle_generator.get_state())
    assert abs(resumed.minutes() - broken.minutes()) < 0.05 and resumed.minutes() > 9.9
    for key, value in broken.model.state_dict().items():  # the queue and its pointer included
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    a, b = broken.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k]["momentum_buffer"], b[k]["momentum_buffer"]) for k in a)
    train_one_epoch(resumed)
    assert resumed.state.step == unbroken.state.step == 8
    for key, value in unbroken.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_an_epochs_line_shows_the_loss_with_four_decimals():
    from ressl.train import loss_text

    assert (loss_text(6.729), loss_text(6.53094), loss_text(None)) == ("6.7290", "6.5309", "none yet")


def test_the_runs_knn_check_lets_another_image_stand_in_for_one_broken_since_the_scan(npz_dir, tmp_path):
    """A folder's image that breaks while the run trains: its kNN checks (the final one too) count labels, so the next
    readable image takes its row, with a warning, instead of the run failing at its end."""
    from PIL import Image

    import ressl.train
    from ressl.errors import DataWarning

    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 4)):
        for cls in ("a", "b"):
            (tmp_path / "photos" / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "photos" / split / cls / f"{i}.png")
    run = tiny_run(npz_dir, tmp_path, dataset="folder", data=str(tmp_path / "photos"), max_bad_fraction=0.5, workers=0)
    for split in ("train", "val"):
        (tmp_path / "photos" / split / "a" / "1.png").write_bytes(b"broken since the scan")
    with pytest.warns(DataWarning, match="could not decode .*1.png; it is replaced by another sample"):
        acc = ressl.train.evaluate_knn(run)
    assert acc is not None and 0 <= acc["top1"] <= 100


def test_settings_that_run_but_were_likely_not_meant_are_noted():
    """A warm-up as long as the run, a queue longer than the training set, in-memory images upscaled more than twice:
    a note each; none for the paper's CIFAR setting or the digits demo (8 px images at 16)."""
    def notes(side: int, images: int = 50_000, **values) -> str:
        split = Split(images=torch.zeros(images, 3, side, side, dtype=torch.uint8))
        dataset = Dataset("npz", split, split, None, 10, (0.5,) * 3, (0.2,) * 3)
        return " | ".join(setting_notes(config.resolve("cifar10", values), dataset))

    assert notes(32) == ""
    assert notes(8, image_size=16, queue_size=1024, batch_size=64, warmup_epochs=0) == ""
    assert notes(32, epochs=5).startswith("--warmup_epochs 5 spans the whole run of 5 epochs, so the learning rate never")
    assert notes(32, images=4000) == ("the queue (--queue_size 4,096) is longer than the training set (4,000 images), so it "
                                      "holds about 1.0 past embeddings of each image; the paper keeps it well below (4,096 of "
                                      "CIFAR's 50,000): a smaller --queue_size relates each image to more others")
    assert notes(32, images=4096) == ""
    assert notes(8, image_size=17).startswith("the images are 8 px, trained at --image_size 17: each view is upscaled 2.1 times")
    assert notes(96, image_size=64) == ""  # STL-10's images, trained smaller


def test_the_upscaling_note_goes_by_the_images_longer_side_and_not_by_a_folder_read_by_workers(tmp_path):
    """Images in memory of 8 x 20 px trained at 32: their longer side is no less than half of it, no note. A folder
    that is not held has images of sizes not known yet: no note either, whatever --image_size."""
    from ressl.folder import FolderIndex

    cfg = config.resolve("cifar10", dict(image_size=32, queue_size=64, batch_size=32))
    wide = Split(images=torch.zeros(100, 3, 8, 20, dtype=torch.uint8))
    assert setting_notes(cfg, Dataset("npz", wide, wide, None, 10, (0.5,) * 3, (0.2,) * 3)) == []
    folder = Split(folder=FolderIndex([tmp_path / f"{i}.jpg" for i in range(100)], None, None))
    big = config.resolve("cifar10", dict(image_size=224, queue_size=64, batch_size=32))
    assert setting_notes(big, Dataset("folder", folder, None, None, 0, (0.5,) * 3, (0.2,) * 3)) == []


def test_the_epoch_line_estimates_the_time_left_at_the_runs_pace():
    assert time_left(10 / 7, 7, 28) == "  (about 30 min left)"  # 10/7 minutes an epoch, 21 epochs to go
    assert time_left(6.0, 10, 200) == "  (about 19.0 h left)"
    assert time_left(0.5, 1, 2) == "  (under a minute left)"
    assert time_left(10 / 7, 7, 28, budget_left=17.0) == "  (--max_minutes stops it in 17 min, near epoch 19)"
    assert time_left(10 / 7, 7, 28, budget_left=31.0) == "  (about 30 min left)"  # the budget outlasts the run
    assert time_left(1.0, 28, 28) == time_left(None, 0, 28) == ""  # nothing left; no pace yet
    assert time_left(10 / 7, 7, 28, final_knn=2.0) == "  (about 32 min left)"  # and then the final kNN
    assert time_left(10 / 7, 7, 28, budget_left=17.0, final_knn=2.0).endswith("near epoch 19)")


def test_the_time_left_is_in_minutes_below_an_hour_and_a_half_and_none_without_a_pace():
    """Under a minute, then whole minutes up to 90, then hours; a pace of 0 (no time measured) says nothing."""
    assert time_left(1.2, 1, 2) == "  (about 1 min left)"
    assert time_left(1.0, 1, 76) == "  (about 75 min left)"
    assert time_left(1.0, 1, 92) == "  (about 1.5 h left)"
    assert time_left(0.0, 7, 28) == ""


def test_the_final_knns_minutes_come_from_the_latest_knn_scaled_to_every_image(npz_dir, tmp_path, monkeypatch):
    """A kNN of a subset of the bank and held-out images foretells the final one in proportion to the images."""
    import types

    import ressl.train

    run = tiny_run(npz_dir, tmp_path)
    assert run.dataset.bank is not None and run.dataset.test is not None
    bank, test = len(run.dataset.bank), len(run.dataset.test)
    assert min(bank, test) > 16  # a subset of 16 leaves some of each out
    clock = [0.0]

    def knn(run_, subset=None):  # a minute per 100 images embedded
        clock[0] += 60 * ((bank + test) if subset is None else min(subset, bank) + min(subset, test)) / 100
        return {"top1": 50.0}
    monkeypatch.setattr(ressl.train, "evaluate_knn", knn)
    monkeypatch.setattr(ressl.train, "time", types.SimpleNamespace(time=lambda: clock[0]))
    assert run.final_knn_minutes == 0.0
    assert timed_knn(run, subset=16) == {"top1": 50.0}
    assert run.final_knn_minutes == pytest.approx((bank + test) / 100)
    timed_knn(run)
    assert run.final_knn_minutes == pytest.approx((bank + test) / 100)
    for subset in (100, 10**6):  # more than the held-out images (64), or than both: all of them are embedded
        timed_knn(run, subset=subset)
        assert run.final_knn_minutes == pytest.approx((bank + test) / 100)
    monkeypatch.setattr(ressl.train, "evaluate_knn", lambda run_, subset=None: None)  # no kNN: the estimate stays
    timed_knn(run, subset=16)
    assert run.final_knn_minutes == pytest.approx((bank + test) / 100)


def test_the_pace_leaves_out_the_set_up_and_then_the_first_epoch():
    """The cifar10-cpu run of the twenty-third session: 0.3 min of set-up and random-init kNN, a first epoch of 0.9
    min (1.2 in all), then 0.9 min each. Its first line said "near epoch 22" at 1.2 min an epoch; it ended at 28."""
    start = [(0.0, 0.3)]
    assert epoch_pace(start) is None
    assert epoch_pace([*start, (1, 1.2)]) == pytest.approx(0.9)  # the set-up is not an epoch's
    warm = [*start, (1, 1.5), (2, 2.4), (3, 3.3)]  # a first epoch of 1.2 min (a compile), 0.9 since
    assert epoch_pace(warm[:3]) == pytest.approx(1.05)  # one epoch after the first: both count
    assert epoch_pace(warm) == pytest.approx(0.9)  # two after it: the first is left out
    assert epoch_pace([(4.5, 10.0), (5, 10.5), (6, 11.5)]) == pytest.approx(1.5 / 1.5)  # resumed inside epoch 5
