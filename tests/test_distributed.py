"""Two processes with the gloo backend on CPU: the global queue, SyncBN, shuffle-BN, torchrun end to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import warnings
from datetime import timedelta
from multiprocessing import forkserver
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from conftest import make_images
from PIL import Image
from test_cli import TINY
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ressl import EmbeddingQueue, build_model, dist, relational_loss
from ressl.config import ConfigError
from ressl.data import load_dataset, same_data_everywhere
from ressl.errors import DataError, StoppedWithRankZero, WriteError
from ressl.model import SplitBatchNorm

pytestmark = pytest.mark.distributed
WORLD = 2


def _join(rank: int, tmp: str) -> None:
    """Join the two processes' gloo group; a collective that one process never reaches fails after two minutes (a
    test that fails), not gloo's default half hour (a suite that hangs)."""
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD,
                                  timeout=timedelta(minutes=2))


def _run_worker(rank: int, fn, tmp: str) -> None:
    """``fn(rank, tmp)``, then leave the group together: a process that exits while gloo's threads still
    serve its peer dies with SIGABRT ("terminate called without an active exception")."""
    fn(rank, tmp)
    torch_dist.barrier()
    torch_dist.destroy_process_group()


def start(fn, args: tuple, nprocs: int = WORLD) -> None:
    """``fn(rank, *args)`` in ``nprocs`` processes, until all end. They are forked from this one (a spawned process
    imports torch and these tests again: some 5 s each time on 2 cores), but only while it runs no other thread: a
    copy would keep a lock that another thread held at that instant (conftest stops tqdm's monitor thread)."""
    method = "fork" if threading.active_count() == 1 else "spawn"
    mp.start_processes(_as_a_new_process, args=(fn, *args), nprocs=nprocs, join=True, start_method=method)


def _as_a_new_process(rank: int, fn, *args) -> None:
    """``fn(rank, *args)``, without the fork server this process may have copied from the tests' process: it is not
    this copy's child (starting loader workers from it fails), so this one starts its own, as a new process does."""
    server = forkserver._forkserver
    if server._forkserver_alive_fd is not None:
        os.close(server._forkserver_alive_fd)
    server.__init__()
    fn(rank, *args)


def spawn(fn, tmp_path: Path) -> list:
    start(_run_worker, (fn, str(tmp_path)))
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


# --- gathering ---------------------------------------------------------------------------------


def _gather_worker(rank: int, tmp: str) -> None:
    _join(rank, tmp)
    mine = torch.arange(6, dtype=torch.bfloat16).view(3, 2) + 10 * rank  # (3, 2) rows of this rank
    gathered = {"single": dist.all_gather_cat(mine)}
    torch_dist.all_gather_single = None  # as in torch versions before it: the gather into views of the result
    gathered["views"] = dist.all_gather_cat(mine)
    torch.save(gathered, f"{tmp}/rank{rank}.pt")


def test_gathered_rows_come_in_rank_order_with_either_collective(tmp_path):
    expected = torch.cat([torch.arange(6, dtype=torch.bfloat16).view(3, 2) + 10 * r for r in range(WORLD)])
    for result in spawn(_gather_worker, tmp_path):
        for how in ("single", "views"):
            assert result[how].dtype == torch.bfloat16 and torch.equal(result[how], expected), how


def _maxima_worker(rank: int, tmp: str) -> None:
    _join(rank, tmp)
    big = float(2**24 + 1)  # not a float32
    torch.save(dist.max_each([big + rank, -big - rank, 3.0 * (1 - rank)], torch.device("cpu")), f"{tmp}/rank{rank}.pt")


def test_collective_maxima_are_exact_for_counts_above_2_to_the_24(tmp_path):
    """``max_each`` compares counts across processes (a folder's images, its classes): exact beyond float32's 2^24."""
    big = float(2**24 + 1)
    for result in spawn(_maxima_worker, tmp_path):
        assert result == [big + WORLD - 1, -big, 3.0]


# --- rank 0's writes ---------------------------------------------------------------------------


def write_tensorboard_events() -> None:
    raise OSError(28, "No space left on device")


def _run_files(rank: int, tmp: str) -> dict:
    """What becomes of the run's own files on process ``rank`` (test_a_write_that_fails_on_rank_0_stops_every_process_at_once)."""
    import ressl.train
    from ressl import config
    from ressl.embed import embed
    from ressl.meter import MetricsLog
    from ressl.resume import save_checkpoint

    cpu, seen = torch.device("cpu"), {}
    values = dict(dataset="npz", out=f"{tmp}/run", image_size=16, width=8, hidden_dim=32, out_dim=16, batch_size=32,
                  queue_size=64, epochs=1, precision="fp32", channels_last=False, knn_k=10, device="cpu", workers=0)
    try:  # each process its own copy of --data (a job's local disks), one of them with more images
        ressl.train.setup(config.resolve(None, dict(values, data=f"{tmp}/data{rank}")))
    except ConfigError as err:
        seen["set-up"] = str(err)
    run = ressl.train.setup(config.resolve(None, dict(values, data=f"{tmp}/data")))
    save_checkpoint(run)
    if rank == 0:  # a line logged by rank 0 alone (after an error, where the others may be elsewhere): no collective
        try:
            run.log.write(agree=False, step=1, loss=0.5)
            seen["alone"] = dist.max_each([1.0], cpu)[0]
        except StoppedWithRankZero:  # a collective of its own would meet rank 1's below
            seen["alone"] = "StoppedWithRankZero"
    else:
        seen["alone"] = dist.max_each([5.0], cpu)[0]
    (Path(tmp) / "unreadable.jsonl").mkdir(exist_ok=True)  # a log that rank 0 cannot read back to rewrite it
    (Path(tmp) / "a_file").touch()  # where embed's --out would need a folder
    for what, write in (("log rewrite", lambda: MetricsLog(Path(tmp) / "unreadable.jsonl", cpu).keep_until(-1)),
                        ("features", lambda: embed(str(run.out / "checkpoint.pt"), None, f"{tmp}/a_file/f.npy", device="cpu",
                                                   workers=0))):
        try:
            write()
            seen[what] = "done"
        except (OSError, WriteError, StoppedWithRankZero) as err:
            seen[what] = type(err).__name__
    return seen


def _write_worker(rank: int, tmp: str) -> None:
    _join(rank, tmp)
    outcomes, writers = [], []

    def write(fails: bool) -> None:
        writers.append(rank)
        if fails:
            raise WriteError("could not write checkpoint: No space left on device")
        return "written"

    for fails, agree in ((False, True), (True, True), (True, False)):  # no agreement after an error: others may be elsewhere
        try:
            outcomes.append(dist.main_writes(lambda fails=fails: write(fails), torch.device("cpu"), agree))
        except (WriteError, StoppedWithRankZero) as err:
            outcomes.append(type(err).__name__)
    try:  # any error of rank 0's write (TensorBoard's own OSError, a host out of memory) stops every process too
        dist.main_writes(lambda: write_tensorboard_events(), torch.device("cpu"))
    except (OSError, StoppedWithRankZero) as err:
        outcomes.append(type(err).__name__)
    try:  # processes that loaded different copies of the data (a job's local disks) refuse to start, all of them
        data = SimpleNamespace(train=range(64), bank=range(50) if rank else None, test=range(20 + rank), num_classes=10 + rank)
        same_data_everywhere(data, torch.device("cpu"))
    except ConfigError as err:
        outcomes.append(str(err))
    torch.save({"outcomes": outcomes, "writers": writers, "run files": _run_files(rank, tmp)}, f"{tmp}/rank{rank}.pt")


def test_a_write_that_fails_on_rank_0_stops_every_process_at_once(tmp_path):
    """Rank 0 alone writes the run's files; every process learns at once whether it could, so that none goes on to
    wait for rank 0 in its next collective (NCCL: 30 minutes): rank 0 raises its error, the others stop silently. So
    do a log rewrite and embed's features; a metrics line that rank 0 writes alone (after an error) waits for no other
    process; set-up refuses copies of the data that differ between processes, on all of them."""
    for name, n in (("data0", 64), ("data1", 96), ("data", 64)):
        (tmp_path / name).mkdir()
        x, y = make_images(n, 16, 4)
        np.savez(tmp_path / name / "train.npz", x=x, y=y)
    rank_0, rank_1 = spawn(_write_worker, tmp_path)
    files = {"set-up": "the processes loaded different data (training images 64 to 96, labelled 64 to 96; -1: none): give "
                       "every machine the same copy of --data", "alone": 5.0}
    assert rank_0.pop("run files") == {**files, "log rewrite": "IsADirectoryError", "features": "WriteError"}
    assert rank_1.pop("run files") == {**files, "log rewrite": "StoppedWithRankZero", "features": "StoppedWithRankZero"}
    different = ("the processes loaded different data (labelled -1 to 50, held-out 20 to 21, classes 10 to 11; -1: none): give "
                 "every machine the same copy of --data")
    assert rank_0 == {"outcomes": ["written", "WriteError", "WriteError", "OSError", different], "writers": [0, 0, 0]}
    assert rank_1 == {"outcomes": [None, "StoppedWithRankZero", None, "StoppedWithRankZero", different], "writers": []}


# --- the queue ---------------------------------------------------------------------------------


def _queue_worker(rank: int, tmp: str) -> None:
    _join(rank, tmp)
    torch.manual_seed(0)  # the same random initial queue on every rank
    queue = EmbeddingQueue(12, 3)
    for step in range(3):  # each rank pushes its own batch of 2 rows per step
        queue.push(torch.full((2, 3), 10.0 * step + rank))
    torch.save({"queue": queue.queue, "pointer": queue.pointer}, f"{tmp}/rank{rank}.pt")


def test_every_rank_holds_the_same_queue_as_one_process(tmp_path):
    results = spawn(_queue_worker, tmp_path)
    torch.testing.assert_close(results[0]["queue"], results[1]["queue"], rtol=0, atol=0)
    torch.manual_seed(0)
    single = EmbeddingQueue(12, 3)
    for step in range(3):  # one process with the global batch: rank 0's rows, then rank 1's
        single.push(torch.cat([torch.full((2, 3), 10.0 * step + r) for r in range(WORLD)]))
    torch.testing.assert_close(results[0]["queue"], single.queue, rtol=0, atol=0)
    assert int(results[0]["pointer"]) == int(single.pointer) == 0


def _training_step_worker(rank: int, tmp: str) -> None:
    import ressl.train
    from ressl import config

    _join(rank, tmp)
    values = dict(dataset="npz", data=f"{tmp}/data", out=f"{tmp}/run", image_size=16, width=8, hidden_dim=32, out_dim=16,
                  batch_size=32, queue_size=64, epochs=1, precision="fp32", channels_last=False, device="cpu", workers=0,
                  checkpoint_every=0)
    run = ressl.train.setup(config.resolve(None, values))
    weak, strong = next(iter(ressl.train.epoch_views(run, 0)))
    seen: list[torch.Tensor] = []
    ressl.train.train_step(run, weak, strong, lambda loss, student, teacher: seen.append(teacher.clone()))
    torch.save({"queue": run.model.queue.queue, "teacher": seen[0]}, f"{tmp}/rank{rank}.pt")


def test_a_training_step_pushes_the_teacher_batches_of_every_process(tmp_path):
    """train_step, not only the queue: after one step each process's queue starts with rank 0's teacher batch,
    then rank 1's, and the two queues are equal."""
    (tmp_path / "data").mkdir()
    x, y = make_images(128, 16, 4)
    np.savez(tmp_path / "data" / "train.npz", x=x, y=y)
    zero, one = spawn(_training_step_worker, tmp_path)
    torch.testing.assert_close(zero["queue"], one["queue"], rtol=0, atol=0)
    torch.testing.assert_close(zero["queue"][:32], torch.cat([zero["teacher"], one["teacher"]]), rtol=0, atol=0)


# --- SyncBN: 2 x B/2 equals 1 x B ---------------------------------------------------------------


# float64: in float32 the reduction order alone moves first-layer gradients by ~1e-4 through 20 BatchNorms
def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(8, 3, 16, 16, generator=g).double(), torch.randn(8, 3, 16, 16, generator=g).double(),
            torch.randn(32, 16, generator=g).double())


def _model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", 16, width=8, hidden_dim=32, out_dim=16, queue_size=32, head_bn=True).double()


def _step(model, student_forward, strong, weak, queue) -> torch.Tensor:
    student = student_forward(strong)
    with torch.no_grad():
        teacher = model.teacher(weak)
    loss = relational_loss(student, teacher, torch.nn.functional.normalize(queue, dim=1))
    loss.backward()
    return loss.detach()


def _syncbn_worker(rank: int, tmp: str) -> None:
    _join(rank, tmp)
    strong, weak, queue = _data()
    model = dist.convert_sync_batchnorm(_model())
    ddp = DistributedDataParallel(model.student)
    half = slice(rank * 4, (rank + 1) * 4)
    loss = _step(model, ddp, strong[half], weak[half], queue)
    torch_dist.all_reduce(loss)
    grads = [p.grad for p in model.student.parameters()]
    torch.save({"loss": loss / WORLD, "grads": grads}, f"{tmp}/rank{rank}.pt")


def test_syncbn_two_halves_equal_one_whole_batch(tmp_path):
    results = spawn(_syncbn_worker, tmp_path)
    strong, weak, queue = _data()
    model = _model()
    loss = _step(model, model.student, strong, weak, queue)
    for r in results:
        torch.testing.assert_close(r["loss"], loss, rtol=1e-5, atol=1e-5)
        for g_dist, p in zip(r["grads"], model.student.parameters()):
            torch.testing.assert_close(g_dist, p.grad, rtol=1e-4, atol=1e-5)


# --- shuffle-BN ---------------------------------------------------------------------------------


class Recorder(nn.Module):
    """Embeds an image as its mean value; remembers what it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.mean(dim=(1, 2, 3)))
        return x.mean(dim=(1, 2, 3))[:, None].expand(-1, 2)


def _shuffle_worker(rank: int, tmp: str) -> None:
    _join(rank, tmp)
    weak = (100 * rank + torch.arange(8.0))[:, None, None, None].expand(8, 1, 2, 2).contiguous()
    teacher = Recorder()
    everyone = dist.shuffled_forward(teacher, weak, torch.Generator().manual_seed(0))
    torch.save({"seen": teacher.seen[0], "everyone": everyone}, f"{tmp}/rank{rank}.pt")


def test_shuffle_bn_mixes_processes_and_restores_order(tmp_path):
    results = spawn(_shuffle_worker, tmp_path)
    for rank, r in enumerate(results):
        from_self = (r["seen"] // 100 == rank).sum().item()
        assert 0 < from_self < 8, "each teacher batch must mix images from both processes"
        expected = torch.cat([100 * k + torch.arange(8.0) for k in range(WORLD)])
        torch.testing.assert_close(r["everyone"][:, 0], expected)  # back in rank order
    seen = torch.cat([r["seen"] for r in results])
    assert sorted(seen.tolist()) == sorted(torch.cat([100 * k + torch.arange(8.0) for k in range(WORLD)]).tolist())


def _buffers_worker(rank: int, tmp: str) -> None:
    _join(rank, tmp)
    bn = nn.BatchNorm2d(3)
    bn(torch.randn(4, 3, 2, 2) + 10 * rank)  # running statistics of this process's own batch
    dist.broadcast_buffers(bn)
    torch.save({"mean": bn.running_mean, "var": bn.running_var, "count": bn.num_batches_tracked}, f"{tmp}/rank{rank}.pt")


def test_broadcast_buffers_gives_every_rank_rank_0s_statistics(tmp_path):
    """Evaluations under torchrun embed with the BatchNorm statistics the checkpoint holds (rank 0's), not each
    process's own: the final kNN of a torchrun run is that of ``ressl knn`` on its checkpoint."""
    zero, one = spawn(_buffers_worker, tmp_path)
    for key in zero:
        assert torch.equal(zero[key], one[key]), key
    assert zero["mean"].abs().max() < 5  # rank 0's batch (about 0), not rank 1's (about 10)


def _first_worker(rank: int, tmp: str) -> None:
    _join(rank, tmp)
    marks = Path(tmp)

    def load() -> str:  # sees whether rank 0's call has run, and leaves a mark of its own
        seen = (marks / "called0").exists()
        (marks / f"called{rank}").write_text("x")
        return f"rank {rank}, rank 0 had run: {seen}"

    shared = dist.rank_0_first(load, share=True)
    torch_dist.barrier()
    called = sorted(p.name for p in marks.glob("called*"))
    torch_dist.barrier()  # every rank has read the marks before rank 0 removes them
    if rank == 0:
        (marks / "called0").unlink()
    own = dist.rank_0_first(load)
    errors = []
    for share in (True, False):
        try:
            dist.rank_0_first(lambda: _fails(rank), share=share)
        except DataError as err:
            errors.append(str(err))
    folder = Path(tmp) / "photos"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ds = load_dataset("folder", str(folder))
    torch.save(dict(shared=shared, called=called, own=own, errors=errors, warned=len(seen),
                    files=[str(p) for p in ds.train.folder.files], labels=ds.train.folder.labels), f"{tmp}/rank{rank}.pt")


def _slow_scan_worker(rank: int, tmp: str) -> None:
    import time
    from datetime import timedelta

    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD,
                                  timeout=timedelta(seconds=2))  # the default group's collectives give up after 2 s

    def slow_scan() -> str:
        time.sleep(4)
        return "scanned"

    torch.save(dist.rank_0_first(slow_scan, share=True), f"{tmp}/rank{rank}.pt")


def test_the_others_wait_longer_than_the_groups_timeout_while_rank_0_scans(tmp_path):
    """Rank 0 alone scans a folder (ImageNet on a slow disk may take long): the others wait for it in a group of their
    own, whose collectives are patient, not in the default group, whose timeout is meant for a training step."""
    assert spawn(_slow_scan_worker, tmp_path) == ["scanned", "scanned"]


def _fails(rank: int) -> None:
    raise DataError(f"raised by rank {rank}")


def test_rank_0_first_shares_a_scan_and_orders_a_download(tmp_path):
    """A folder is scanned by rank 0 alone and every process gets its list; a download runs on rank 0 before the
    others read; what rank 0 raises, every process raises."""
    for cls in ("cat", "dog"):
        (tmp_path / "photos" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / "photos" / cls / f"{i}.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "stray.png")
    zero, one = spawn(_first_worker, tmp_path)
    assert zero["shared"] == one["shared"] == "rank 0, rank 0 had run: False"
    assert zero["called"] == one["called"] == ["called0"]  # with share, rank 1 never ran it
    assert zero["own"] == "rank 0, rank 0 had run: False" and one["own"] == "rank 1, rank 0 had run: True"
    assert zero["errors"] == one["errors"] == ["raised by rank 0"] * 2
    assert zero["files"] == one["files"] and len(zero["files"]) == 6 and zero["labels"] == one["labels"]
    assert (zero["warned"], one["warned"]) == (1, 0)  # the stray image: only the scanning process saw it


def _turns_worker(rank: int, tmp: str) -> None:
    """Three processes on two machines: rank 0 alone on the first; ranks 1 and 2 on the second (local ranks 0 and 1)."""
    os.environ["LOCAL_RANK"] = str({0: 0, 1: 0, 2: 1}[rank])
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=3,
                                  timeout=timedelta(minutes=2))
    marks = Path(tmp)

    def download() -> list[str]:  # what had been downloaded when this process's turn came
        seen = sorted(p.name for p in marks.glob("downloaded*"))
        (marks / f"downloaded{rank}").write_text("x")
        return seen

    seen = dist.rank_0_first(download)
    raised = {}
    for failing in (0, 1, 2):
        def fails(failing: int = failing) -> str:
            (marks / f"tried{failing}-{rank}").write_text("x")
            if rank == failing:
                raise DataError(f"rank {rank} could not download")
            return "downloaded"
        try:
            raised[failing] = dist.in_machine_turns(fails)
        except DataError as err:
            raised[failing] = str(err)
    torch_dist.barrier()
    tried = sorted(p.name for p in marks.glob("tried*"))
    torch.save(dict(turn=dist.machine_turn(), seen=seen, raised=raised, tried=tried), f"{tmp}/rank{rank}.pt")
    torch_dist.barrier()
    torch_dist.destroy_process_group()


def test_downloads_run_rank_0_first_then_one_process_per_machine_then_the_rest(tmp_path):
    """A torchvision download into ``--data``: rank 0 first (a root all machines share: the others find its files),
    then the first process of each other machine (a root on each machine's own disk: one download each, never two
    processes writing one directory at once), then the rest; a failure in any turn stops every process with its
    message, and no later turn runs."""
    start(_turns_worker, (str(tmp_path),), nprocs=3)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(3)]
    assert [r["turn"] for r in results] == [0, 1, 2]
    assert [r["seen"] for r in results] == [[], ["downloaded0"], ["downloaded0", "downloaded1"]]
    for r in results:
        assert r["raised"] == {0: "rank 0 could not download", 1: "rank 1 could not download", 2: "rank 2 could not download"}
    assert results[0]["tried"] == ["tried0-0", "tried1-0", "tried1-1", "tried2-0", "tried2-1", "tried2-2"]


def _failing_batches(rank: int, fails_on: set[int]):
    """Two batches of 2 images; on the ranks in ``fails_on`` the second one fails to load."""
    yield torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)
    if rank in fails_on:
        raise DataError(f"image {rank} failed to load")
    yield torch.ones(2, 3, 8, 8), torch.ones(2, dtype=torch.long)


def _extract_worker(rank: int, tmp: str) -> None:
    from ressl.errors import LateDataError
    from ressl.evaluate import extract_features

    _join(rank, tmp)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    said = []
    for fails_on in ({1}, {0, 1}):
        try:
            extract_features(backbone, _failing_batches(rank, fails_on))
        except LateDataError as err:
            said.append(str(err))
    features, labels = extract_features(backbone, _failing_batches(rank, set()))  # the group still works
    torch.save(dict(said=said, rows=len(features), labels=labels.tolist()), f"{tmp}/rank{rank}.pt")


def test_an_image_failing_on_one_rank_stops_every_rank_with_its_message(tmp_path):
    """An evaluation whose images fail to load on some processes only: every process stops with the messages of
    those that failed (rank 0 prints them), instead of the others waiting for them in the gather, or dying."""
    zero, one = spawn(_extract_worker, tmp_path)
    assert zero["said"] == one["said"] == [
        "[rank 1] image 1 failed to load",
        "[rank 0] image 0 failed to load\n[rank 1] image 1 failed to load",
    ]
    assert zero["rows"] == one["rows"] == 8 and zero["labels"] == [0, 0, 1, 1] * 2  # rank 0's rows, then rank 1's


def _augmented_worker(rank: int, tmp: str) -> None:
    from ressl.data import Split
    from ressl.errors import LateDataError
    from ressl.evaluate import augmented_batches
    from ressl.folder import scan_folder

    _join(rank, tmp)
    ramp = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8).expand(7, 3, 8, 8) * 4  # 7 alike images: a crop shows
    common = dict(image_size=8, mean=(0.0,) * 3, std=(1.0,) * 3, batch_size=2, device=torch.device("cpu"), dtype=None)
    epochs = augmented_batches(nn.Flatten(), Split(ramp.contiguous(), torch.arange(7)), **common)
    batches = [[(f, y) for f, y in epochs(epoch)] for epoch in range(2)]
    folder = scan_folder(Path(tmp) / "photos")
    # loader workers started by the fork server, in processes of a group (whose threads made forked workers hang)
    from_folder = [y.tolist() for _, y in augmented_batches(nn.Flatten(), Split(folder=folder), **common, workers=1)(0)]
    (Path(tmp) / "photos" / "cat" / "0.png").write_bytes(b"broken since the scan")
    said = []
    for workers in (0, 1):
        try:
            list(augmented_batches(nn.Flatten(), Split(folder=folder, max_bad_fraction=0.0), **common, workers=workers)(0))
        except LateDataError as err:
            said.append(str(err))
    torch.save(dict(labels=[[y.tolist() for _, y in epoch] for epoch in batches], from_folder=from_folder,
                    features=[torch.cat([f for f, _ in epoch]) for epoch in batches], said=said), f"{tmp}/rank{rank}.pt")


def test_an_augmented_linear_probe_epoch_is_embedded_in_shares_and_given_to_every_process(tmp_path):
    """``linear --augment`` under torchrun: each process embeds its share of the epoch's images, with crops of its
    own, and every process trains on all of them, each once per epoch (the padding of the last share dropped); an
    image that fails to load in one process stops them all with its message instead of leaving the others waiting."""
    for cls in ("cat", "dog"):
        (tmp_path / "photos" / cls).mkdir(parents=True)
        for i in range(4 if cls == "cat" else 3):  # 7: the last share padded
            Image.new("RGB", (8, 8)).save(tmp_path / "photos" / cls / f"{i}.png")
    zero, one = spawn(_augmented_worker, tmp_path)
    assert zero["labels"] == one["labels"] and all(torch.equal(a, b) for a, b in zip(zero["features"], one["features"]))
    for epoch in zero["labels"]:
        assert [len(y) for y in epoch] == [4, 3]  # two processes' batches of 2, less one padding row at the end
        assert sorted(label for batch in epoch for label in batch) == list(range(7))
    assert zero["labels"][0] != zero["labels"][1]  # a new order each epoch
    first = zero["features"][0]
    assert not torch.equal(first[:2], first[2:4])  # rank 1 crops its alike images otherwise than rank 0
    assert zero["from_folder"] == one["from_folder"] and [len(y) for y in zero["from_folder"]] == [4, 3]  # a folder's too
    assert sorted(label for batch in zero["from_folder"] for label in batch) == [0] * 4 + [1] * 3
    assert zero["said"] == one["said"] and len(zero["said"]) == 2  # without loader workers, and with
    assert all(said.startswith("[rank ") and "0.png" in said for said in zero["said"])


def _embed_worker(rank: int, tmp: str) -> None:
    from ressl.data import Split
    from ressl.evaluate import split_features

    _join(rank, tmp)
    n = 7  # not a multiple of the 2 processes: rank 1's block ends with a padding row
    split = Split(images=torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, 4, 4).contiguous(),
                  labels=torch.arange(n) % 3)
    brightness = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, 3): each image's mean, its index here
    features, labels = split_features(brightness, split, 4, (0.0,) * 3, (1 / 255,) * 3, 2, torch.device("cpu"), None, workers=0)
    torch.save(dict(rows=features[:, 0].round().tolist(), labels=labels.tolist()), f"{tmp}/rank{rank}.pt")


def test_features_of_every_process_come_back_in_the_splits_order(tmp_path):
    """Under torchrun each process embeds a share of the images; the gathered rows are in the split's order (embed
    writes them beside a list of their files), padding dropped."""
    zero, one = spawn(_embed_worker, tmp_path)
    assert zero == one == dict(rows=[0, 1, 2, 3, 4, 5, 6], labels=[0, 1, 2, 0, 1, 2, 0])


def _loader_views_worker(rank: int, tmp: str) -> None:
    from ressl.augment import torchvision_pipeline
    from ressl.batches import TwoViews, pretrain_batches
    from ressl.data import Dataset, Split

    _join(rank, tmp)
    torch.manual_seed(0)  # as setup seeds every process alike
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    train = Split(images=image.expand(8, 3, 16, 16).contiguous(), labels=torch.zeros(8, dtype=torch.long))
    ds = Dataset("same image", train, None, None, 1, (0.5,) * 3, (0.25,) * 3)
    views = TwoViews(torchvision_pipeline(8, strong=False, mean=ds.mean, std=ds.std),
                     torchvision_pipeline(8, strong=True, mean=ds.mean, std=ds.std))
    drawn = {}
    for workers in (0, 1):
        for seed in (5, 5, 6):
            weak, strong = next(pretrain_batches(ds, 4, 8, 0.2, workers, torch.arange(8), 0, torch.device("cpu"), views, seed))
            drawn.setdefault(workers, []).append(torch.cat([weak, strong]))
    torch.save(drawn, f"{tmp}/rank{rank}.pt")


def test_loader_views_are_drawn_apart_on_each_process_and_again_from_the_same_seed(tmp_path):
    """``augment_backend torchvision``: every process draws its own crops and colours (with loader workers or
    without), not those of rank 0 for its k-th image; the same epoch seed draws the same views again."""
    zero, one = spawn(_loader_views_worker, tmp_path)
    for workers in (0, 1):
        assert not torch.equal(zero[workers][0], one[workers][0])
        for views in (zero[workers], one[workers]):
            assert torch.equal(views[0], views[1]) and not torch.equal(views[0], views[2])


def _exists_worker(rank: int, tmp: str) -> None:
    from ressl.config import ConfigError
    from ressl.resume import exists_everywhere

    _join(rank, tmp)
    shared, own = Path(tmp) / "shared.pt", Path(tmp) / f"own{rank}.pt"
    shared.touch()
    if rank == 0:
        own.touch()  # as a run directory on rank 0's local disk: the other machine cannot see it
    torch_dist.barrier()
    seen = [exists_everywhere(shared, torch.device("cpu")), exists_everywhere(Path(tmp) / "nowhere.pt", torch.device("cpu"))]
    try:
        exists_everywhere(own, torch.device("cpu"))
    except ConfigError as err:
        seen.append(str(err))
    torch.save(seen, f"{tmp}/rank{rank}.pt")


def test_a_run_directory_that_some_processes_cannot_see_is_refused_on_all(tmp_path):
    """One process resuming while another starts afresh would train apart: every process sees the checkpoint, or none
    does, or all refuse (--out on a disk that not every machine shares)."""
    zero, one = spawn(_exists_worker, tmp_path)
    assert zero[:2] == one[:2] == [True, False]
    assert "exists for some processes and not for others" in zero[2] and "every machine of the job shares" in one[2]


def _stop_worker(rank: int, tmp: str) -> None:
    from test_train import tiny_run

    import ressl.meter
    import ressl.train

    _join(rank, tmp)
    stopped = {}
    for case, check_seconds in (("every log step", 1e9), ("every step", 0.0)):
        ressl.meter.STOP_CHECK_SECONDS = check_seconds  # how long a stop may wait: here, as long as the slowest step
        run = tiny_run(f"{tmp}/data", Path(tmp) / case, epochs=1, log_every=4, workers=0, checkpoint_every=0)
        step = ressl.train.train_step

        def sigterm_on_rank_0_during_step_6(run, *args, step=step):
            run.stop_requested = run.stop_requested or (rank == 0 and run.state.step == 5)
            return step(run, *args)

        ressl.train.train_step = sigterm_on_rank_0_during_step_6
        try:
            ressl.train.train_one_epoch(run)
        except ressl.train.Interrupted:
            stopped[case] = run.state.step
        ressl.train.train_step = step
    torch.save(stopped, f"{tmp}/rank{rank}.pt")


def test_a_stop_is_agreed_within_seconds_of_steps_not_only_at_logging_steps(tmp_path):
    """SIGTERM reaches one process during step 6: both stop together, at the next logging step (8) when steps are as
    long as the allowed wait, at once (6) when they are longer; a launcher's SIGKILL follows its SIGTERM by ~30 s."""

    (tmp_path / "data").mkdir()
    x, y = make_images(512, 16, 4)
    np.savez(tmp_path / "data" / "train.npz", x=x, y=y)
    zero, one = spawn(_stop_worker, tmp_path)
    assert zero == one == {"every log step": 8, "every step": 6}


def _pooled_failures_worker(rank: int, tmp: str) -> None:
    from test_train import tiny_run

    import ressl.train
    from ressl.errors import LateDataError

    _join(rank, tmp)
    found = {"apart": [{0: 1, 1: 1}, {2: 1}], "within": [{0: 1, 3: 2, 4: 2}, {4: 1}]}  # 1: failed, 2: read in part
    outcome = {}
    for case, codes in found.items():
        run = tiny_run(f"{tmp}/photos", Path(tmp) / case, dataset="folder", batch_size=16, queue_size=32, epochs=1,
                       log_every=4, workers=0, checkpoint_every=0, max_bad_fraction=0.05, hold_in_memory=False)
        for i, code in codes[rank].items():
            run.dataset.train.failure_record()[i] = code
        try:
            ressl.train.train_one_epoch(run)
            outcome[case] = (run.state.step, run.dataset.train.failure_record()[:6].tolist())
        except LateDataError as err:
            outcome[case] = (run.state.step, str(err))
    torch.save(outcome, f"{tmp}/rank{rank}.pt")


def test_processes_pool_the_image_files_they_found_broken(tmp_path):
    """Each process's loader workers read a share of a folder: the processes pool the files they found broken as they
    agree on stopping. 3 of 40 broken in all (2 found by one process, 1 by the other) pass --max_bad_fraction 0.05,
    which neither process's own count does: both stop at the first agreement with one message. 2 of 40 do not; one of
    them (4) failed in one process and decoded in part in the other (a file that changed): it counts as failed, in
    both, while 3, decoded in part in one, is known as such in both. Each process then passes over 0 and 4."""
    for c in range(2):
        (tmp_path / "photos" / f"c{c}").mkdir(parents=True)
        for i in range(20):
            Image.new("RGB", (16, 16), (200 * c, 10 * i, 90)).save(tmp_path / "photos" / f"c{c}" / f"{i:02d}.png")
    zero, one = spawn(_pooled_failures_worker, tmp_path)
    assert zero == one, (zero, one)
    step, message = zero["apart"]
    assert step == 1 and message.startswith("3 of 40 images failed to load (") and "max_bad_fraction (now 0.05)" in message
    assert zero["within"] == (2, [1, 0, 0, 2, 1, 0])


def _held_worker(rank: int, tmp: str) -> None:
    """Whether each process holds the folder's training images, when both can and when one cannot (its limit too
    small: another machine's memory, a file it alone failed to read)."""
    from ressl.held import hold_training_images

    _join(rank, tmp)
    outcome = {}
    for case, limits in (("both", (2**30, 2**30)), ("one", (2**30, 1))):
        dataset = load_dataset("folder", f"{tmp}/photos")
        held = hold_training_images(dataset, 0, torch.device("cpu"), limit=limits[rank])
        outcome[case] = (held, dataset.train.images is not None, dataset.train.folder is not None, "held in memory" in dataset.describe())
    torch.save(outcome, f"{tmp}/rank{rank}.pt")


def test_a_folder_is_held_only_where_every_process_can_hold_it(tmp_path):
    """Under torchrun the processes agree on holding a folder's training images: where one cannot, none does, and all
    read the folder through loader workers alike (one process's crops cut on the device, another's by workers, would
    still train, but not as one run of either kind)."""
    for c in range(2):
        (tmp_path / "photos" / f"c{c}").mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (16, 12), (200 * c, 30 * i, 90)).save(tmp_path / "photos" / f"c{c}" / f"{i}.png")
    for outcome in spawn(_held_worker, tmp_path):
        assert outcome == {"both": (True, True, False, True), "one": (False, False, True, False)}, outcome


def test_grouped_forward_emulates_shuffle_bn_on_one_device():
    """One forward pass of the teacher over its shuffled batch, whose split BatchNorm (4 groups of 2) normalises
    each random pair apart: of two images, the brighter comes out at +1, the other at -1, in the input's order."""
    recorder = Recorder()
    teacher = nn.Sequential(_Saw(recorder), SplitBatchNorm(1, groups=4), nn.Flatten(), nn.Linear(4, 1, bias=False))
    nn.init.constant_(teacher[-1].weight, 0.25)  # the mean of the 2 x 2 normalised pixels
    weak = torch.arange(8.0)[:, None, None, None].expand(8, 1, 2, 2).contiguous()
    out = dist.grouped_forward(teacher.train(), weak, dist.draw_shuffle(8, torch.Generator().manual_seed(0), weak.device))[:, 0]
    [seen] = recorder.seen  # one pass over all 8 images
    order = seen.long()
    assert order.tolist() != list(range(8))  # shuffled
    partner = {int(order[j]): int(order[j + 4 if j < 4 else j - 4]) for j in range(8)}  # groups: positions j, j + 4
    expected = torch.tensor([1.0 if i > partner[i] else -1.0 for i in range(8)])
    torch.testing.assert_close(out, expected, atol=1e-3, rtol=0)
    assert int(teacher[1].num_batches_tracked) == 1  # the running statistics move once, by the groups' mean


class _Saw(nn.Module):
    """Passes images on unchanged; tells ``recorder`` the order it saw them in (their mean values)."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.recorder(x)
        return x


@pytest.mark.parametrize("in_srun", [False, True])
def test_slurm_variables_start_a_group_only_in_an_srun_task(monkeypatch, in_srun):
    """The batch script of a job with 2 tasks has SLURM_NTASKS=2 and SLURM_PROCID=0 too: a process started there
    runs alone; srun's tasks (SLURM_STEP_NUM_TASKS) join a group whose address is the step's first node."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST"):
        monkeypatch.setenv(name, "")  # recorded, so that what the call sets is undone after the test (and run in an
        monkeypatch.delenv(name)  # srun step of its own, the test starts from none of its variables)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1" if in_srun else "0")
    monkeypatch.setenv("SLURM_LOCALID", "1" if in_srun else "0")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[01-04]")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    if in_srun:
        monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
        monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[03-04]")
    dist._slurm_to_torchrun_env()
    if not in_srun:
        assert "WORLD_SIZE" not in os.environ
        return
    assert [os.environ[k] for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")] == ["2", "1", "1", "gpu03", "29734"]


@pytest.mark.parametrize(("visible", "expected"), [(8, 3), (1, 0)])
def test_each_process_takes_its_gpu_also_when_it_sees_only_its_own(monkeypatch, visible, expected):
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert dist.local_device_index() == expected


def test_slurm_node_list():
    assert dist.first_host("gpu[03-05,07],cpu1") == "gpu03"
    assert dist.first_host("node7") == "node7"
    assert dist.first_host("rack[1-2]-node[01-04],login1") == "rack1-node01"  # every bracket of the first entry
    assert dist.first_host("a[1-2]b,c") == "a1b" and dist.first_host(" x[7,9] ") == "x7"


# --- torchrun end to end ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, cwd: Path, script: str | None = None) -> subprocess.CompletedProcess:
    """``torchrun -m ressl ARGS`` on two processes; with ``script``, that Python source (which wraps ``ressl.cli.main``
    around a fault it injects) runs instead, from a file in ``cwd``."""
    # TMPDIR: torchrun leaves a log directory (torchelastic_*) in the temporary folder; here it goes with the test's
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1]), "TMPDIR": str(cwd)}
    program = ["-m", "ressl"]
    if script is not None:
        path = cwd / "injected_fault.py"
        path.write_text(script)
        program = [str(path)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port", str(free_port()),
           *program, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.slow
def test_torchrun_pretrain_resume_and_knn(npz_dir, tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", "--dataset", "npz", "--data", str(npz_dir), "--out", str(out), *TINY]
    done = torchrun(*args, "--epochs", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [p.name for p in out.glob("*.pt")] == ["checkpoint.pt"]
    assert done.stdout.count("kNN top-1") == 1  # rank 0 alone prints
    assert "batch 32 (2 processes x 16)" in done.stdout
    resumed = torchrun(*args, "--epochs", "2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    assert torch.load(out / "checkpoint.pt", weights_only=True)["state"]["epoch"] == 2

    knn_two = torchrun("knn", "--checkpoint", str(out / "checkpoint.pt"), "--k", "10", cwd=tmp_path)
    assert knn_two.stderr.count("ressl knn: embedding") == 1, knn_two.stderr  # rank 0 speaks
    assert knn_two.returncode == 0, knn_two.stderr[-2000:]
    knn_one = subprocess.run([sys.executable, "-m", "ressl", "knn", "--checkpoint", str(out / "checkpoint.pt"), "--k", "10"],
                             capture_output=True, text=True, timeout=300)
    two = json.loads(knn_two.stdout.strip().splitlines()[-1])
    one = json.loads(knn_one.stdout.strip().splitlines()[-1])
    assert two == pytest.approx(one, abs=1e-6)
    # the run's own final kNN, measured by both processes, is that of its checkpoint (rank 0's BatchNorm statistics)
    final = json.loads((out / "final.json").read_text())["knn"]
    assert final == pytest.approx({k: one[k] for k in ("top1", "k")}, abs=1e-6)  # 4 classes: no top-5


@pytest.mark.slow
def test_torchrun_max_minutes_stops_every_process_together_and_a_rerun_changes_nothing(npz_dir, tmp_path):
    """The processes agree that the time is up (none waits in a collective for one that stopped), and the same
    command on the finished run returns on every process without training or writing."""
    out = tmp_path / "run"
    args = ["pretrain", "--dataset", "npz", "--data", str(npz_dir), "--out", str(out), *TINY, "--epochs", "500",
            "--max_minutes", "0.03", "--log_every", "1"]
    done = torchrun(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stopping after 0.03 minutes" in done.stdout
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    again = torchrun(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already complete (its --max_minutes 0.03 are spent" in again.stdout
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == files


@pytest.mark.slow
def test_torchrun_user_mistake_is_reported_once(tmp_path):
    """Both processes refuse the command; the terminal shows the error once, first, before torchrun's own report of
    a failed child (its launcher's traceback and summary, which are torchrun's, not ours)."""
    done = torchrun("pretrain", "--queue_size", "100", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr.count("ressl pretrain: error: ") == 1, done.stderr[-2000:]
    assert done.stderr.startswith("ressl pretrain: error: queue_size 100 is not a multiple")
    assert not (tmp_path / "run").exists()


BREAK_AFTER_SCAN = """
import sys
from pathlib import Path

import ressl.train
from ressl.cli import main

setup = ressl.train.setup
broken = Path(sys.argv.pop(1))


def setup_then_break(cfg):  # after the scan has found every file readable
    run = setup(cfg)
    broken.write_text("not an image any more")
    return run


ressl.train.setup = setup_then_break
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_torchrun_image_broken_after_the_scan_stops_every_process_with_one_message_and_a_checkpoint(tmp_path):
    """An image that breaks during a torchrun run fails to load in one process only. The others do not die in a
    collective (gloo's "Connection closed by peer") or hang (NCCL): all stop together at the next logging step, with
    a checkpoint, and rank 0 prints the failing process's message (or the pooled records', naming the same file); deleting the file and re-running finishes the run."""
    data = tmp_path / "photos"
    for c in range(2):
        (data / f"class{c}").mkdir(parents=True)
        for i in range(64):
            Image.new("RGB", (16, 16), (200 * c, 40 + i, 90)).save(data / f"class{c}" / f"{i:02d}.png")
    broken = data / "class0" / "05.png"
    out = tmp_path / "run"
    args = ["pretrain", "--dataset", "folder", "--data", str(data), "--out", str(out), *TINY, "--epochs", "2",
            "--max_bad_fraction", "0", "--log_every", "3", "--hold_in_memory", "false"]  # read by the loader workers
    failed = torchrun(str(broken), *args, cwd=tmp_path, script=BREAK_AFTER_SCAN)
    assert failed.returncode != 0
    errors = [line for line in failed.stderr.splitlines() if line.startswith("ressl pretrain: error: ")]
    assert len(errors) == 1, failed.stderr[-3000:]
    # the failing process's own message, or the pooled records' when they are merged before its error arrives
    assert errors[0].startswith(("ressl pretrain: error: [rank ", "ressl pretrain: error: 1 of 128 images failed to load")), errors
    assert str(broken) in errors[0], errors
    assert "a checkpoint was saved at step" in errors[0]
    assert "Connection closed" not in failed.stderr and "[rank0]:" not in failed.stderr and "[rank1]:" not in failed.stderr
    assert (out / "checkpoint.pt").exists()
    broken.unlink()
    finished = torchrun(*args, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert json.loads((out / "final.json").read_text())["epochs"] == 2


NAN_ON_RANK_1 = """
import os
import sys

import ressl.train
from ressl.cli import main

relational_loss, calls = ressl.train.relational_loss, []


def nan_at_step_2_on_rank_1(*args, **kwargs):
    calls.append(1)
    loss = relational_loss(*args, **kwargs)
    return loss * float("nan") if len(calls) == 2 and os.environ["RANK"] == "1" else loss


ressl.train.relational_loss = nan_at_step_2_on_rank_1
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_torchrun_nan_in_one_process_stops_every_process_with_one_message(npz_dir, tmp_path):
    """A loss that becomes NaN in one process at a logged step (the others' still finite there, their weights NaN
    only after the gradients' all-reduce): every process stops at that step, and the error is printed once."""
    args = ["pretrain", "--dataset", "npz", "--data", str(npz_dir), "--out", str(tmp_path / "run"), *TINY, "--epochs", "2",
            "--log_every", "2"]
    done = torchrun(*args, cwd=tmp_path, script=NAN_ON_RANK_1)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("ressl pretrain: error: ")]
    assert len(errors) == 1 and "NaN or infinite at step 2" in errors[0], done.stderr[-3000:]
    assert "Connection closed" not in done.stderr and "[rank0]:" not in done.stderr and "[rank1]:" not in done.stderr


FULL_DISK_ON_RANK_0 = """
import os
import sys

import torch

from ressl.cli import main

save = torch.save


def full_disk_on_rank_0(obj, f, *args, **kwargs):
    if os.environ["RANK"] == "0":
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0")
    return save(obj, f, *args, **kwargs)


torch.save = full_disk_on_rank_0
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_torchrun_checkpoint_that_rank_0_cannot_write_stops_every_process_in_one_line_each(npz_dir, tmp_path):
    """Rank 0 alone writes checkpoints: when it cannot (a full disk), it says so in one line, and the others, whose
    next collective finds it gone, stop without a traceback."""
    args = ["pretrain", "--dataset", "npz", "--data", str(npz_dir), "--out", str(tmp_path / "run"), *TINY, "--epochs", "2"]
    done = torchrun(*args, cwd=tmp_path, script=FULL_DISK_ON_RANK_0)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("ressl pretrain: error: ")]
    assert len(errors) == 1 and "could not write checkpoint" in errors[0], done.stderr[-3000:]
    assert "[rank0]:" not in done.stderr and "[rank1]:" not in done.stderr, done.stderr[-3000:]
