import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_images
from PIL import Image

from ressl.batches import eval_batches, pretrain_batches
from ressl.data import load_dataset
from ressl.errors import DataError


def test_digits_embedded():
    ds = load_dataset("digits", None)
    assert ds.train.images.shape[1:] == (1, 8, 8) and ds.train.images.dtype == torch.uint8
    assert len(ds.train) + len(ds.test) == 1797 and ds.num_classes == 10
    assert int(ds.train.images.max()) == 255


def test_npz_directory(npz_dir):
    ds = load_dataset("npz", str(npz_dir))
    assert ds.train.images.shape == (128, 3, 16, 16) and ds.test.images.shape == (64, 3, 16, 16)
    assert ds.num_classes == 4 and ds.bank is ds.train
    assert len(ds.mean) == 3 and all(0 < s < 1 for s in ds.std)


def _tagged_npz(npz_dir):
    """The npz set with each training image's index written into its first pixel (128 images: fits a uint8)."""
    ds = load_dataset("npz", str(npz_dir))
    ds.train.images[:, 0, 0, 0] = torch.arange(len(ds.train), dtype=torch.uint8)
    return ds


def _tags(batches) -> list[list[int]]:
    return [weak[:, 0, 0, 0].tolist() for weak, _ in batches]


def test_pretrain_batches_cover_an_epoch_without_repeats(npz_dir):
    ds = _tagged_npz(npz_dir)
    seen = []
    for weak, strong in pretrain_batches(ds, 32, 16, 0.2, 0, torch.randperm(128), 0, torch.device("cpu")):
        assert weak.shape == (32, 3, 16, 16) and weak.dtype == torch.uint8
        seen += weak[:, 0, 0, 0].tolist()
    assert sorted(seen) == list(range(128))


def test_to_device_moves_only_the_splits_asked_for(npz_dir):
    """An evaluation moves its bank and test images to the GPU, not the training set it never reads (STL-10's
    105,000 unlabelled images: 2.9 GB)."""
    from ressl.data import Split, to_device

    ds = load_dataset("npz", str(npz_dir))
    ds.bank = Split(ds.train.images[:32].clone(), ds.train.labels[:32])  # a labelled subset, apart from train
    to_device(ds, torch.device("meta"), [ds.bank, ds.test])  # "meta": a device that is not the CPU, on any machine
    assert (ds.train.images.device.type, ds.bank.images.device.type, ds.test.images.device.type) == ("cpu", "meta", "meta")


class _WorkerPids(torch.utils.data.Dataset):
    """Each item: the loader worker's process id, a little later."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> int:
        import os
        import time

        time.sleep(0.2)
        return os.getpid()


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs: not gone, not a zombie waiting to be reaped."""
    status = Path(f"/proc/{pid}/status")
    try:
        return status.read_text().split("State:")[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.skipif(not hasattr(__import__("signal"), "sigwaitinfo"), reason="sigwaitinfo: Linux")
@pytest.mark.parametrize("fresh", [False, True], ids=["forked", "from_the_fork_server"])
def test_a_loader_worker_outlives_a_sigterm_from_a_launcher_and_exits_on_its_loaders(fresh):
    """A SIGTERM from another process (a launcher signalling the process group) leaves the worker working; one from
    its own main process, which ends workers that did not stop by themselves, ends it (else the interpreter's exit,
    which terminates and joins its children, waited for ever). Alike for workers forked from the main process and
    those started by the fork server (folders), whose parent process is the server."""
    import os
    import signal
    import subprocess
    import time

    from ressl.batches import fresh_workers, ignore_stop_signals, started

    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    loader = torch.utils.data.DataLoader(_WorkerPids(), batch_size=None, num_workers=1, worker_init_fn=ignore_stop_signals,
                                         prefetch_factor=1, multiprocessing_context=fresh_workers() if fresh else None)
    batches = started(loader)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before  # this process's mask as it was
    worker = int(next(batches))
    subprocess.run(["kill", "-TERM", str(worker)], check=True)  # not the worker's parent
    assert [int(pid) for pid in batches] == [worker] * 5  # it lived on, and served the rest
    batches = started(loader)
    worker = int(next(batches))
    os.kill(worker, signal.SIGTERM)  # from its parent
    deadline = time.monotonic() + 30  # a loaded machine may take its time
    while _running(worker):  # until it exits
        assert time.monotonic() < deadline, "the worker outlived its parent's SIGTERM"  # (a fork server reaps its own)
        time.sleep(0.05)
    del batches


_SERVER_PROBE = """
import os, sys, torch
from ressl.batches import worker_batches

class Parent(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        return os.getppid()  # the fork server

if __name__ == "__main__":
    [server] = [int(pid) for pid in worker_batches(Parent(), 1, 1, torch.device("cpu"))]
    status = open(f"/proc/{server}/status").read()
    print(int(status.split("SigBlk:")[1].split()[0], 16))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_the_fork_server_keeps_sigterm_and_sigint_blocked(tmp_path):
    """A launcher signals the whole process group (torchrun's killpg, SLURM): the fork server must leave the signal
    to the main process, as its workers do, or it dies and every worker with it before the run can stop cleanly.
    In a fresh process, where starting the resource tracker (which unblocks them) comes first."""
    import signal
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(_SERVER_PROBE)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    blocked = int(done.stdout.split()[-1])
    assert blocked & (1 << (signal.SIGTERM - 1)) and blocked & (1 << (signal.SIGINT - 1)), hex(blocked)


_KILLED_MAIN = """
import os, sys, time, torch
from ressl.batches import worker_batches

class Pids(torch.utils.data.Dataset):
    def __len__(self):
        return 10_000

    def __getitem__(self, i):
        time.sleep(0.01)
        return torch.tensor([os.getpid(), os.getppid()])  # the worker, and the fork server that started it

if __name__ == "__main__":
    batches, pids = worker_batches(Pids(), 1, 2, torch.device("cpu")), set()  # the loader lives on, as in a run
    while len(pids) < 2:
        pids.add(tuple(next(batches)[0].tolist()))
    print(*sorted({pid for pair in pids for pid in pair}), flush=True)
    time.sleep(600)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_the_fork_server_and_its_workers_end_with_a_main_process_killed_outright(tmp_path):
    """SIGKILL (the out-of-memory killer, ``kill -9``) gives the main process no chance to end its loader workers.
    Forked workers exit when their parent changes; the fork server's (image folders) have the server as their parent,
    which lived on while they held the pipe that keeps it alive: server and workers ran for ever."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "killed.py"
    script.write_text(_KILLED_MAIN)
    main = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        others = [int(pid) for pid in main.stdout.readline().split()]  # two workers and their server
        assert len(others) == 3 and main.pid not in others and all(_running(pid) for pid in others), others
        os.kill(main.pid, signal.SIGKILL)
        main.wait(timeout=30)
        deadline = time.monotonic() + 60  # PyTorch's workers look at their parent every 5 s
        while any(_running(pid) for pid in others):
            assert time.monotonic() < deadline, [pid for pid in others if _running(pid)]
            time.sleep(0.2)
    finally:
        main.kill()
        for pid in others if "others" in locals() else []:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


class _DataWarningAction(torch.utils.data.Dataset):
    """Each item: the action the worker's filters take on a DataWarning."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> str:
        import warnings

        from ressl.errors import DataWarning

        return next((f[0] for f in warnings.filters if issubclass(DataWarning, f[2])), "default")


def test_loader_workers_follow_the_warning_filters_of_their_process():
    """``warnings.simplefilter("ignore", DataWarning)`` in a script reaches workers started by the fork server."""
    import warnings

    from ressl.batches import worker_batches
    from ressl.errors import DataWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        assert list(worker_batches(_DataWarningAction(), None, 1, torch.device("cpu"))) == ["ignore"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        assert list(worker_batches(_DataWarningAction(), None, 1, torch.device("cpu"))) == ["error"]


_HELD = threading.Lock()  # held by the test while a loader starts its workers


class _LockFree(torch.utils.data.Dataset):
    """Each item: whether the worker could take ``_HELD`` within a second."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> bool:
        taken = _HELD.acquire(timeout=1.0)
        if taken:
            _HELD.release()
        return taken


def test_workers_that_read_files_start_fresh_not_as_copies_of_the_main_process():
    """A worker forked from the main process would hold a copy of every lock as it was at that instant: one that
    another thread held then (a queue thread of the last epoch's loader ending, a process group's threads) is held
    in the copy for ever, and the worker hangs. Workers of image folders start from the fork server instead: a lock
    held here is free there. Forked workers (in-memory sets) still share this process's state, as they should."""
    from ressl.batches import worker_batches

    cpu = torch.device("cpu")
    with _HELD:
        fresh = [bool(x) for x in worker_batches(_LockFree(), 1, 1, cpu)]
        forked = [bool(x) for x in worker_batches(_LockFree(), 1, 1, cpu, fresh=False)]
    assert fresh == [True, True] and forked == [False, False]


def test_eval_batches_in_order(npz_dir):
    ds = load_dataset("npz", str(npz_dir))
    labels = torch.cat([y for _, y in eval_batches(ds.test, 16, ds.mean, ds.std, 20, torch.device("cpu"))])
    assert torch.equal(labels, ds.test.labels)


def test_image_folder_with_train_and_val(tmp_path):
    for split, n in (("train", 6), ("val", 3)):
        for cls, colour in (("cat", (200, 0, 0)), ("dog", (0, 0, 200))):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20 + i, 24), colour).save(d / f"{i}.png")
    ds = load_dataset("folder", str(tmp_path))
    assert len(ds.train) == 12 and len(ds.test) == 6 and ds.num_classes == 2
    batches = list(pretrain_batches(ds, 4, 16, 0.2, 0, torch.randperm(12), 0, torch.device("cpu")))
    assert len(batches) == 3 and batches[0][0].shape == (4, 3, 16, 16)
    x, y = next(eval_batches(ds.test, 16, ds.mean, ds.std, 8, torch.device("cpu"), workers=0))
    assert x.shape == (6, 3, 16, 16) and y.tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("dataset,make,match", [
    ("npz", lambda p: p / "missing", "does not exist"),
    ("cifar10", lambda p: p / "missing", "does not exist"),
    ("folder", lambda p: p, "no images"),
    ("cifar10", None, "needs --data"),
])
def test_bad_data_is_a_one_line_error(tmp_path, dataset, make, match):
    with pytest.raises(DataError, match=match) as err:
        load_dataset(dataset, None if make is None else str(make(tmp_path)))
    assert "\n" not in str(err.value)


def test_npz_with_wrong_dtype(tmp_path):
    np.savez(tmp_path / "train.npz", x=np.zeros((4, 8, 8, 3), dtype=np.float32), y=np.zeros(4))
    with pytest.raises(DataError, match="uint8"):
        load_dataset("npz", str(tmp_path))


def test_pretrain_batches_resume_mid_epoch(npz_dir):
    ds = load_dataset("npz", str(npz_dir))
    order = torch.randperm(128)
    full = [w for w, _ in pretrain_batches(ds, 32, 16, 0.2, 0, order, 0, torch.device("cpu"))]
    rest = [w for w, _ in pretrain_batches(ds, 32, 16, 0.2, 0, order, 2, torch.device("cpu"))]
    assert len(full) == 4 and len(rest) == 2
    assert all(torch.equal(a, b) for a, b in zip(full[2:], rest))


def test_sample_split_is_fixed_and_keeps_labels(npz_dir):
    from ressl.data import sample_split

    ds = load_dataset("npz", str(npz_dir))
    a, b = sample_split(ds.train, 50), sample_split(ds.train, 50)
    assert len(a) == 50 and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    rows = {tuple(img.flatten().tolist()): int(y) for img, y in zip(ds.train.images, ds.train.labels)}
    assert all(rows[tuple(img.flatten().tolist())] == int(y) for img, y in zip(a.images, a.labels))
    assert sample_split(ds.train, 1000) is ds.train


def test_download_is_asked_for_and_never_implicit(tmp_path, monkeypatch):
    import torchvision

    calls = []

    class FakeCIFAR10:  # stands in for the network: records what torchvision would be asked
        def __init__(self, root, download, train):
            calls.append((root, download))
            self.data = np.zeros((4, 8, 8, 3), dtype=np.uint8)
            self.targets = [0, 1, 0, 1]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    target = tmp_path / "new" / "cifar10"
    ds = load_dataset("cifar10", str(target), download=True)
    assert target.is_dir() and len(ds.train) == 4 and all(d for _, d in calls)
    calls.clear()
    load_dataset("cifar10", str(target))
    assert calls and not any(d for _, d in calls)


def test_torchvision_backend_batches_are_finished_per_image_views(npz_dir):
    """augment_backend torchvision: workers hand over normalised float (weak, strong) pairs, one epoch's
    images exactly once, each view cut on its own (the official loader's design)."""
    from ressl.augment import torchvision_pipeline
    from ressl.batches import TwoViews

    ds = load_dataset("npz", str(npz_dir))
    kw = dict(mean=ds.mean, std=ds.std, crop_scale=(0.2, 1.0))
    views = TwoViews(torchvision_pipeline(16, strong=False, **kw), torchvision_pipeline(16, strong=True, **kw))
    batches = list(pretrain_batches(ds, 32, 16, 0.2, 0, torch.randperm(128), 1, torch.device("cpu"), views))
    assert len(batches) == 3  # from batch 1 on
    weak, strong = batches[0]
    assert weak.shape == strong.shape == (32, 3, 16, 16) and weak.dtype == torch.float32
    assert weak.min() < -0.5 and weak.max() > 0.5  # normalised, not 0..255
    assert not torch.equal(weak, strong)


def test_torchvision_backend_on_a_folder(tmp_path):
    from ressl.augment import torchvision_pipeline
    from ressl.batches import TwoViews

    for i in range(8):
        Image.new("RGB", (20 + i, 24), (40 * i, 0, 200)).save(tmp_path / f"{i}.png")
    ds = load_dataset("folder", str(tmp_path))
    pipe = torchvision_pipeline(16, strong=True, mean=ds.mean, std=ds.std)
    batches = list(pretrain_batches(ds, 4, 16, 0.2, 0, torch.randperm(8), 0, torch.device("cpu"), TwoViews(pipe, pipe)))
    assert len(batches) == 2 and batches[0][1].shape == (4, 3, 16, 16) and batches[0][1].dtype == torch.float32


def _classes(root, split_classes, n=3, size=(12, 12)):
    """``root/<split>/<class>/<i>.png``: each class a solid colour of its own (from the class name's last digit)."""
    for split, names in split_classes.items():
        for name in names:
            d = root / split / name if split else root / name
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", size, (60 * int(name[-1]) + i, 200 - 60 * int(name[-1]), 90)).save(d / f"{i}.png")


def test_an_npz_split_without_images_or_with_label_ids_is_refused_in_one_line(tmp_path):
    """An empty train.npz or test.npz says so (not a traceback from the first kNN, nor "fewer images than
    batch_size"); labels that are IDs rather than class indices (kNN's votes hold one column per number up to
    the largest) are refused before they ask for gigabytes."""
    x, y = make_images(8, 16, 2)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "test.npz", x=x[:0], y=y[:0])
    with pytest.raises(DataError, match=r"test.npz holds no images \(its x has 0 rows\): write the held-out images into it, or "
                                        r"delete it \(then no kNN or linear probe\)$"):
        load_dataset("npz", str(tmp_path))
    np.savez(tmp_path / "train.npz", x=x[:0], y=y[:0])
    with pytest.raises(DataError, match=r"train.npz holds no images \(its x has 0 rows\): write the training images into it$"):
        load_dataset("npz", str(tmp_path))
    (tmp_path / "test.npz").unlink()
    ids = np.where(y == 0, 3, 2_000_000_011)
    np.savez(tmp_path / "train.npz", x=x, y=ids)
    with pytest.raises(DataError, match=r"go up to 2,000,000,011 \(2 distinct values\): number the classes 0..1$"):
        load_dataset("npz", str(tmp_path))
    np.savez(tmp_path / "train.npz", x=x, y=np.where(y == 0, 3, 21_840))  # large but indices: taken
    assert load_dataset("npz", str(tmp_path)).num_classes == 21_841


_UNGUARDED = """
import sys
import ressl.train
from ressl import config

ressl.train.pretrain(config.resolve(None, {"dataset": "folder", "data": sys.argv[1], "out": sys.argv[2], "device": "cpu", "workers": 1,
                                               "epochs": 1, "width": 8, "image_size": 16, "batch_size": 4,
                                               "queue_size": 16, "knn_every": 0, "warmup_epochs": 0}))
"""


def test_a_script_without_a_main_guard_is_told_what_to_add_and_runs_nothing_in_its_workers(tmp_path):
    """Loader workers of image folders import the main script as they start: one without ``if __name__ ==
    "__main__":`` called pretrain again in each of them (here: refused, as the script's own run held the directory;
    with the default --out, a second run). The workers now stop there with one line that names the fix."""
    import subprocess
    import sys

    _classes(tmp_path / "photos", {"": ["c0", "c1"]}, n=4)
    script = tmp_path / "unguarded.py"
    script.write_text(_UNGUARDED)
    told = f'ressl: {script} calls ressl as it is imported, and loader workers import it as they start: put its calls ' \
           'under `if __name__ == "__main__":`\n'
    main = subprocess.Popen([sys.executable, str(script), str(tmp_path / "photos"), str(tmp_path / "run")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        said = []
        for line in main.stderr:  # up to the worker's line (the script then stops with a LateDataError), or to the end
            said.append(line)
            if line == told:
                break
        assert said and said[-1] == told, "".join(said)
        assert "ConfigError" not in "".join(said)
    finally:
        main.kill()
        main.wait(timeout=60)


def test_held_out_labels_follow_train_class_names(tmp_path):
    """val/ lacking train/'s first class: val's class1 is label 1 (train's), not 0, so kNN gets it right."""
    from ressl.evaluate import knn_accuracy

    _classes(tmp_path, {"train": ["class0", "class1", "class2"], "val": ["class1", "class2"]})
    ds = load_dataset("folder", str(tmp_path))
    bank, test = ds.bank, ds.test
    assert ds.num_classes == 3 and test.folder.classes == ["class0", "class1", "class2"]
    assert test.folder.labels == [1, 1, 1, 2, 2, 2]
    (xb, yb), (xt, yt) = (next(eval_batches(s, 8, ds.mean, ds.std, 64, torch.device("cpu"), workers=0)) for s in (bank, test))
    assert yt.tolist() == [1, 1, 1, 2, 2, 2]
    assert knn_accuracy(xb.flatten(1), yb, xt.flatten(1), yt, ds.num_classes, k=3)["top1"] == 100.0


def test_held_out_class_that_train_lacks_is_named(tmp_path):
    _classes(tmp_path, {"train": ["class0", "class1"], "test": ["class1", "class2"]})
    with pytest.raises(DataError, match="class folder class2 that .*train lacks") as err:
        load_dataset("folder", str(tmp_path))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("layout,says,evaluable", [
    ({"train": ["c0", "c1"], "val": ["c0", "c1"]}, "6 images in 2 classes in train/, 6 held-out in val/ for kNN", True),
    ({"": ["c0", "c1", "c2"]}, "9 images in 3 classes, no held-out split (train/<class>/ and val/<class>/", False),
    ({"train": ["c0", "c1"]}, "6 images in 2 classes in train/, no val/ or test/ split", False),
])
def test_describe_says_how_a_folder_was_read(tmp_path, layout, says, evaluable):
    _classes(tmp_path, layout)
    ds = load_dataset("folder", str(tmp_path))
    assert ds.describe().startswith(f"folder {tmp_path}: {says}")
    assert "\n" not in ds.describe()
    if evaluable:
        ds.evaluation_splits()
    else:
        with pytest.raises(DataError, match=r"DIR/train/<class>/\*\.jpg and DIR/val/<class>/\*\.jpg \(or DIR/test/"):
            ds.evaluation_splits()


def test_describe_flat_folder_and_in_memory_sets(tmp_path, npz_dir):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(flat / f"{i}.png")
    assert load_dataset("folder", str(flat)).describe().startswith(f"folder {flat}: 3 unlabelled images, no held-out split")
    assert load_dataset("npz", str(npz_dir)).describe() == "npz: 128 training images, 64 held-out, 4 classes"
    assert load_dataset("digits", None).describe() == "digits: 1,347 training images, 450 held-out, 10 classes"
    one = tmp_path / "one"
    one.mkdir()
    x = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    for split in ("train", "test"):
        np.savez(one / f"{split}.npz", x=x, y=np.zeros(4, dtype=np.int64))
    assert load_dataset("npz", str(one)).describe() == "npz: 4 training images, 4 held-out, 1 class"


def test_a_stray_image_in_train_is_skipped_not_unlabelling_the_set(tmp_path):
    from ressl.errors import DataWarning

    _classes(tmp_path, {"train": ["class0", "class1", "class2"], "val": ["class0", "class1"]})
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "stray.png")
    with pytest.warns(DataWarning, match=r"skipped 1 image file directly in .*train.*: stray\.png"):
        ds = load_dataset("folder", str(tmp_path))
    assert ds.bank is ds.train and ds.num_classes == 3 and len(ds.train) == 9 and ds.test is not None
    assert all(p.name != "stray.png" for p in ds.train.folder.files)


def test_a_failed_download_is_one_line_and_leaves_no_empty_folder(tmp_path, monkeypatch):
    import urllib.error

    import torchvision

    class Offline:  # torchvision's download without a network
        def __init__(self, root, download, train):
            raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    target = tmp_path / "new" / "cifar10"
    with pytest.raises(DataError, match=r"could not download cifar10 .*Name or service not known.*point --data"):
        load_dataset("cifar10", str(target), download=True)
    assert not target.exists()


def _npz(root, y_train, y_test, n=8):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "train.npz", x=rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), y=y_train)
    np.savez(root / "test.npz", x=rng.integers(0, 256, (len(y_test), 8, 8, 3), dtype=np.uint8), y=y_test)
    return root


def test_npz_labels_in_keras_layout_and_as_integral_floats(tmp_path):
    ds = load_dataset("npz", str(_npz(tmp_path / "a", np.arange(8).reshape(8, 1) % 2, np.array([[0], [1]]))))
    assert ds.train.labels.tolist() == [0, 1] * 4 and ds.test.labels.tolist() == [0, 1] and ds.num_classes == 2
    ds = load_dataset("npz", str(_npz(tmp_path / "b", np.arange(8.0) % 2, np.array([1.0, 0.0]))))
    assert ds.train.labels.dtype == torch.int64 and ds.test.labels.tolist() == [1, 0]


@pytest.mark.parametrize("y, match", [
    (np.zeros((8, 2), dtype=np.int64), r"one per image, shape \(N,\) or \(N, 1\), got \(8, 2\)"),
    (np.arange(8) + 0.5, "must be integers"),
    (np.array(list("abcdabcd")), "must be integers"),
    (np.arange(8) - 3, "found -3"),
])
def test_npz_labels_that_are_not_class_indices_are_one_line_errors(tmp_path, y, match):
    with pytest.raises(DataError, match=match):
        load_dataset("npz", str(_npz(tmp_path, y, np.array([0, 1]))))


def test_npz_unlabelled_rows_leave_the_bank_and_the_queries(tmp_path):
    """-1 marks an unlabelled image: it trains, but kNN's bank and queries are the labelled images only."""
    ds = load_dataset("npz", str(_npz(tmp_path, np.array([0, 1, -1, -1, 0, 1, -1, 0]), np.array([1, -1, 0]))))
    assert len(ds.train) == 8 and ds.bank.labels.tolist() == [0, 1, 0, 1, 0] and ds.test.labels.tolist() == [1, 0]
    assert ds.evaluation_splits() == (ds.bank, ds.test)


def test_npz_without_training_labels_says_so_when_only_the_test_split_has_them(tmp_path):
    ds = load_dataset("npz", str(_npz(tmp_path, np.full(8, -1), np.array([1, 0, 1]))))
    with pytest.raises(DataError, match=r"^nothing to evaluate on: npz: 8 training images, unlabelled, 3 held-out \(no kNN\); "
                                        r"kNN and the linear probe need labelled training images: labels y in train.npz"):
        ds.evaluation_splits()


def test_npz_test_labels_that_train_lacks_are_named(tmp_path):
    with pytest.raises(DataError, match=r"test.npz has labels 7, 100000 that no image of train.npz has"):
        load_dataset("npz", str(_npz(tmp_path, np.arange(8) % 2, np.array([0, 7, 100_000]))))


def _damage(path: Path, how: str) -> None:
    """``path``, a good .npz file, made into what a user might hand over instead."""
    raw = path.read_bytes()
    if how == "cut short":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "random bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    elif how == "text":
        path.write_text("x,y\n0,1\n")
    elif how == "a flipped byte":  # inside x.npy's data, past its header: only the zip's checksum can tell
        with __import__("zipfile").ZipFile(path) as z:
            info = z.getinfo("x.npy")
        at = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size // 2
        path.write_bytes(raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1:])
    elif how == "an .npy array":
        np.save(path.with_suffix(".npy"), np.zeros((8, 8, 8, 3), dtype=np.uint8))
        path.with_suffix(".npy").replace(path)


@pytest.mark.parametrize("part", ["train", "test"])
@pytest.mark.parametrize("how, match", [
    ("cut short", r"is not a readable \.npz file \(cut short or damaged: File is not a zip file\)"),
    ("empty", r"is not a readable \.npz file \(an empty file\)"),
    ("random bytes", r"is not a numpy \.npz file"),
    ("text", r"is not a numpy \.npz file"),
    ("a flipped byte", r"is not a readable \.npz file \(cut short or damaged: Bad CRC-32 for file 'x.npy'\)"),
    ("an .npy array", r"is a single \.npy array, not an \.npz file"),
])
def test_a_damaged_npz_file_is_a_one_line_error(tmp_path, part, how, match):
    """Never numpy's traceback (BadZipFile, EOFError), nor its advice to load the file with allow_pickle=True."""
    _npz(tmp_path, np.arange(8) % 2, np.array([0, 1]))
    _damage(tmp_path / f"{part}.npz", how)
    with pytest.raises(DataError, match=match) as err:
        load_dataset("npz", str(tmp_path))
    text = str(err.value)
    assert text.startswith(str(tmp_path / f"{part}.npz")) and "\n" not in text
    assert "allow_pickle" not in text and "np.savez(path, x=images, y=labels)" in text


def test_an_npz_object_array_is_refused_without_allow_pickle_advice(tmp_path):
    images = np.empty(2, dtype=object)
    images[:] = [np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4, 3), np.uint8)]
    np.savez(tmp_path / "train.npz", x=images, y=np.array([0, 1]))
    with pytest.raises(DataError, match="holds an object array") as err:
        load_dataset("npz", str(tmp_path))
    assert "allow_pickle" not in str(err.value)


N = 8 * 8 * 8 * 3


@pytest.mark.parametrize("x, advice", [
    (np.linspace(0, 1, N, dtype=np.float32), "(x * 255).round().astype(np.uint8)"),
    (np.linspace(0, 255, N), "x.round().astype(np.uint8)"),
    (np.linspace(0, 65535, N).round().astype(np.uint16), "(x * (255 / 65535)).round().astype(np.uint8)"),
    (np.linspace(0, 255, N).round().astype(np.int64), "x.astype(np.uint8)"),
    (np.linspace(-2, 2, N), "rescale them to 0..255 first (undo any normalisation)"),
])
def test_npz_images_of_another_dtype_get_advice_that_keeps_their_values(tmp_path, x, advice):
    """A bare x.astype(np.uint8) would make 0..1 floats black and wrap 16-bit values modulo 256; the expression the
    error gives, run on the images, keeps black black, white white and the order of the shades between."""
    x = x.reshape(8, 8, 8, 3)
    np.savez(tmp_path / "train.npz", x=x, y=np.arange(8) % 2)
    with pytest.raises(DataError, match="images must be uint8") as err:
        load_dataset("npz", str(tmp_path))
    assert advice in str(err.value) and "\n" not in str(err.value)
    if advice.startswith("rescale"):
        return
    fixed = eval(advice, {"np": np, "x": x}).ravel().astype(np.int64)  # the expression the error gives
    assert fixed[0] == 0 and fixed[-1] == 255 and (np.diff(fixed) >= 0).all()


@pytest.mark.parametrize("dataset", ["npz", "folder", "cifar10"])
def test_a_directory_without_train_npz_names_the_npz_files_it_holds(tmp_path, dataset):
    """test.npz alone, or misnamed arrays: the error says train.npz is missing (not that no images were found),
    whatever dataset name the directory arrived with (--dataset npz, --data alone, a preset)."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cifar_train.npz", x=rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8), y=np.arange(8) % 2)
    np.savez(tmp_path / "test.npz", x=rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8), y=np.array([0, 1]))
    with pytest.raises(DataError, match=r"has no train\.npz \(found cifar_train\.npz, test\.npz\)") as err:
        load_dataset(dataset, str(tmp_path))
    assert "\n" not in str(err.value)


def test_dataset_npz_on_a_folder_of_images_points_at_dataset_folder(tmp_path):
    """--dataset npz asked for arrays: a folder of images is refused, not read as images behind the user's back."""
    for i in range(3):
        Image.new("RGB", (8, 8), (80 * i, 0, 0)).save(tmp_path / f"{i}.png")
    with pytest.raises(DataError, match=r"holds images but no train\.npz: read it with --dataset folder"):
        load_dataset("npz", str(tmp_path))
    assert len(load_dataset("folder", str(tmp_path)).train) == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"has no train\.npz \(nor any \.npz file\)"):
        load_dataset("npz", str(empty))


def test_the_sets_that_download_are_the_ones_torchvision_reads():
    from ressl.config import DOWNLOADABLE
    from ressl.data import TORCHVISION_SETS

    assert set(DOWNLOADABLE) == set(TORCHVISION_SETS)


def test_download_is_suggested_only_where_the_command_has_the_flag(tmp_path):
    """pretrain has --download; knn, linear and embed do not, so their errors must not suggest it."""
    (tmp_path / "empty").mkdir()
    cases = [None, str(tmp_path / "missing"), str(tmp_path / "empty")]
    for data in cases:
        with pytest.raises(DataError, match="--download"):
            load_dataset("cifar10", data)
        with pytest.raises(DataError) as err:
            load_dataset("cifar10", data, can_download=False)
        assert "--download" not in str(err.value) and "--data" in str(err.value)


def test_evaluation_source_reads_the_runs_data_unless_told_otherwise(tmp_path):
    from PIL import Image

    from ressl.config import ConfigError
    from ressl.data import evaluation_source

    (tmp_path / "photos" / "train" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "train" / "cat" / "0.png")
    (tmp_path / "arrays").mkdir()
    (tmp_path / "arrays" / "train.npz").write_bytes(b"")
    (tmp_path / "cifar-root" / "cifar-10-batches-py").mkdir(parents=True)
    photos, arrays, root = (str(tmp_path / d) for d in ("photos", "arrays", "cifar-root"))
    assert evaluation_source("npz", arrays, None, None) == ("npz", arrays)
    assert evaluation_source("npz", arrays, "digits", None) == ("digits", None)  # not the run's arrays read as digits
    assert evaluation_source("npz", arrays, "npz", None) == ("npz", arrays)
    assert evaluation_source("cifar10", root, None, photos) == ("folder", photos)  # images, not torchvision's files
    assert evaluation_source("npz", arrays, None, photos) == ("folder", photos)  # images, not arrays
    assert evaluation_source("cifar10", root, None, arrays) == ("cifar10", arrays)
    assert evaluation_source("cifar10", None, None, root) == ("cifar10", root)
    assert evaluation_source("folder", photos, None, arrays) == ("folder", arrays)  # train.npz is read first anyway
    with pytest.raises(ConfigError, match="unknown dataset 'cifar'"):
        evaluation_source("npz", arrays, "cifar", None)


def test_an_empty_val_beside_test_leaves_test_as_the_held_out_split(tmp_path):
    _classes(tmp_path, {"train": ["class0", "class1"], "test": ["class0", "class1"]})
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "readme.txt").write_text("later")
    ds = load_dataset("folder", str(tmp_path))
    assert ds.test is not None and all(p.parent.parent.name == "test" for p in ds.test.folder.files)


def test_tiny_imagenet_layout_with_a_missing_val_image(tmp_path):
    """train/<wnid>/images/*.JPEG and val/images + val_annotations.txt; a listed file that is gone is dropped with a
    warning at load time (it used to stop the first kNN with advice that could not help)."""
    from ressl.errors import DataWarning

    for c, wnid in enumerate(("n01", "n02")):
        (tmp_path / "train" / wnid / "images").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (200 * c, 50, 9 * i)).save(tmp_path / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
    (tmp_path / "val" / "images").mkdir(parents=True)
    lines = []
    for i in range(120):
        if i != 7:  # val_7 is listed but missing
            Image.new("RGB", (8, 8), (200 * (i % 2), 50, 3)).save(tmp_path / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\tn0{1 + i % 2}\t0\t0\t8\t8")
    (tmp_path / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    with pytest.warns(DataWarning, match="val_7.JPEG"):
        ds = load_dataset("tinyimagenet", str(tmp_path))
    assert ds.bank.folder.classes == ["n01", "n02"] and len(ds.test) == 119
    assert ds.test.folder.labels[:3] == [0, 1, 0] and "val_7.JPEG" not in [p.name for p in ds.test.folder.files]


# --- which images each step trains on (mutation audit, fourteenth session) ---------------------------------------


def test_pretrain_batches_follow_the_epochs_order_step_by_step_from_start(npz_dir):
    ds, order = _tagged_npz(npz_dir), torch.randperm(128, generator=torch.Generator().manual_seed(0))
    for start in (0, 1, 3):
        got = _tags(pretrain_batches(ds, 32, 16, 0.2, 0, order, start, torch.device("cpu")))
        assert got == [order[s * 32 : (s + 1) * 32].tolist() for s in range(start, 4)], start


@pytest.mark.parametrize("loader", [False, True], ids=["in-memory", "loader"])
def test_two_processes_take_disjoint_halves_of_each_global_batch(npz_dir, monkeypatch, loader):
    """Under torchrun (its rank and world size stood in for), each process's share of a step is its own half of the
    global batch, on the in-memory path and through loader workers' views alike (resumed at batch 1 here)."""
    from ressl import dist
    from ressl.batches import TwoViews

    ds, order = _tagged_npz(npz_dir), torch.randperm(128, generator=torch.Generator().manual_seed(1))
    views = TwoViews(lambda x: x, lambda x: x) if loader else None
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(dist, "rank", lambda rank=rank: rank)
        shares.append(_tags(pretrain_batches(ds, 32, 16, 0.2, 0, order, 1, torch.device("cpu"), views=views)))
    assert len(shares[0]) == len(shares[1]) == 3
    for step, (mine, theirs) in enumerate(zip(*shares), start=1):
        assert len(mine) == len(theirs) == 16
        assert sorted(mine + theirs) == sorted(order[step * 32 : (step + 1) * 32].tolist())


def test_an_epochs_last_partial_batch_is_dropped(tmp_path):
    x, y = make_images(100, 16, 4)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    ds = load_dataset("npz", str(tmp_path))
    assert [w.shape[0] for w, _ in pretrain_batches(ds, 32, 16, 0.2, 0, torch.randperm(100), 0, torch.device("cpu"))] == [32] * 3


def test_epoch_seeds_differ_for_every_seed_and_epoch():
    from ressl.batches import epoch_seed

    assert len({epoch_seed(s, e) for s in range(20) for e in range(200)}) == 20 * 200


def test_digits_splits_keep_their_labels_and_their_statistics_are_the_training_images():
    """Every image keeps scikit-learn's label for it; the test split is held out; mean and std are the training
    images' (a few digits are drawn identically in scikit-learn's set: their rows may repeat)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    truth: dict[tuple[int, ...], set[int]] = {}
    for image, label in zip(digits.images, digits.target):
        truth.setdefault(tuple((image * (255.0 / 16.0)).round().astype(np.uint8).flatten().tolist()), set()).add(int(label))
    ds = load_dataset("digits", None)
    for split in (ds.train, ds.test):
        assert all(int(y) in truth[tuple(x.flatten().tolist())] for x, y in zip(split.images, split.labels))
    rows = lambda split: {(*x.flatten().tolist(), int(y)) for x, y in zip(split.images, split.labels)}
    assert (len(ds.train), len(ds.test)) == (1347, 450) and len(rows(ds.train) & rows(ds.test)) < 10
    x = ds.train.images.float() / 255
    assert np.allclose(ds.mean, [x.mean().item()] * 3, atol=1e-5) and np.allclose(ds.std, [x.std().item()] * 3, atol=1e-4)


def test_npz_statistics_are_the_training_images_per_channel(npz_dir):
    ds = load_dataset("npz", str(npz_dir))
    x = ds.train.images.float() / 255
    assert np.allclose(ds.mean, x.mean(dim=(0, 2, 3)).tolist(), atol=1e-5)
    assert np.allclose(ds.std, x.std(dim=(0, 2, 3)).tolist(), atol=1e-4)


def test_a_sampled_folder_split_starts_from_the_record_of_its_split(tmp_path):
    """The online kNN samples the bank: files that training found broken are passed over there too, without a new
    warning each check; what the sample finds is its own."""
    from ressl.data import Split, sample_split
    from ressl.folder import scan_folder

    for i in range(6):
        Image.new("RGB", (4, 4)).save(tmp_path / f"{i}.png")
    split = Split(folder=scan_folder(tmp_path))
    assert sample_split(split, 4)._record is None  # nothing recorded yet: the sample makes its own when asked
    split.failure_record()[:] = torch.tensor([1, 2, 1, 2, 0, 0], dtype=torch.uint8)
    sample = sample_split(split, 4)
    files = list(sample.folder.files)
    expected = [int(split.failure_record()[i]) for i, f in enumerate(split.folder.files) if f in files]
    assert sorted(set(expected)) == [0, 1, 2]  # the sample holds files of every kind (else this would show nothing)
    assert sample.failure_record().tolist() == expected
    sample.failure_record().fill_(1)
    assert split.failure_record().tolist() == [1, 2, 1, 2, 0, 0]  # not written back


def _folder_of_two_classes(root, n: int = 4):
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 12), (40 * i, 0, 0)).save(root / f"c{i % 2}" / f"{i}.png")


def test_pretraining_epochs_of_a_folder_warn_about_a_broken_file_once(tmp_path):
    """Training makes a dataset per epoch from one split: its record carries a file found broken in the first epoch to
    the next, which passes over it without a second warning."""
    import warnings

    from ressl.errors import DataWarning

    _folder_of_two_classes(tmp_path)
    ds = load_dataset("folder", str(tmp_path), False, 0.5)
    broken = ds.train.folder.files[2]
    broken.write_bytes(b"broken since the scan")
    said = []
    for _epoch in range(2):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert len(list(pretrain_batches(ds, 2, 8, 0.2, 0, torch.arange(4), 0, torch.device("cpu")))) == 2
        said.append([str(w.message) for w in seen if issubclass(w.category, DataWarning)])
    assert len(said[0]) == 1 and broken.name in said[0][0] and said[1] == []
    assert ds.train.failure_record().tolist() == [0, 0, 1, 0]


class _PairIfLockFree:
    """A folder's views: a pair of images, all ones where the worker could take ``_HELD`` within a second, else zeros."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        taken = _HELD.acquire(timeout=1.0)
        if taken:
            _HELD.release()
        return torch.full((2, 3, 4, 4), float(taken))


def test_pretraining_workers_of_a_folder_start_fresh_not_as_copies_of_the_main_process(tmp_path):
    """The loader workers of a folder's pretraining start from the fork server: a lock held here (by another thread
    at the instant of a fork) is free there, and they do not hang before their first image."""
    _folder_of_two_classes(tmp_path)
    ds = load_dataset("folder", str(tmp_path))
    with _HELD:
        pairs = [weak for weak, _ in pretrain_batches(ds, 2, 8, 0.2, 1, torch.arange(4), 0, torch.device("cpu"),
                                                      views=_PairIfLockFree())]
    assert len(pairs) == 2 and all(bool((p == 1).all()) for p in pairs)
