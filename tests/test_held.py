"""An image folder's training images held in memory: decoded once, in the folder's order, only when they fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ressl.folder
import ressl.held
from ressl.data import Split, load_dataset
from ressl.decode import load_rgb
from ressl.folder import scan_folder
from ressl.held import HOLD_LIMIT, held_in_memory, hold_limit, hold_training_images, memory_limit


def _images(root: Path, classes: int = 2, per_class: int = 5, size: tuple[int, int] = (20, 16)) -> None:
    """``per_class`` noisy JPEGs of ``size`` (W, H) in each of ``classes`` folders under ``root``."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.jpg", quality=90)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_folder_of_one_size_is_held_as_its_decoded_images_in_order(tmp_path: Path, workers: int) -> None:
    _images(tmp_path)
    index = scan_folder(tmp_path)
    held = held_in_memory(Split(folder=index, max_bad_fraction=0.2), workers)
    assert held is not None and held.images is not None and held.labels is not None and held.folder is None
    assert held.images.shape == (10, 3, 16, 20) and held.max_bad_fraction == 0.2
    assert torch.equal(held.images, torch.stack([load_rgb(path) for path in index.files]))
    assert held.labels.tolist() == [0] * 5 + [1] * 5


def test_a_folder_is_not_held_when_its_images_differ_in_size_or_break_or_do_not_fit(tmp_path: Path) -> None:
    _images(tmp_path / "mixed")
    _images(tmp_path / "mixed" / "c1", classes=1, per_class=1, size=(16, 20))  # one image turned on its side
    assert held_in_memory(Split(folder=scan_folder(tmp_path / "mixed")), 0) is None
    _images(tmp_path / "broken")
    (tmp_path / "broken" / "c1" / "3.jpg").write_bytes(b"not a picture")
    assert held_in_memory(Split(folder=scan_folder(tmp_path / "broken", verify=False)), 0) is None
    _images(tmp_path / "even")
    assert held_in_memory(Split(folder=scan_folder(tmp_path / "even")), 0, limit=10 * 3 * 16 * 20 - 1) is None
    assert held_in_memory(Split(folder=scan_folder(tmp_path / "even")), 0, limit=10 * 3 * 16 * 20) is not None
    assert held_in_memory(Split(images=torch.zeros(2, 3, 4, 4, dtype=torch.uint8)), 0) is None


def test_a_whole_batch_of_another_size_is_not_held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ressl.held, "_BATCH", 2)  # the first class's two images, then the second's, turned
    _images(tmp_path / "c0", classes=1, per_class=2)
    _images(tmp_path / "c1", classes=1, per_class=2, size=(16, 20))
    assert held_in_memory(Split(folder=scan_folder(tmp_path)), 0) is None


def test_pretraining_holds_the_training_folder_and_reads_the_evaluations_from_disk(tmp_path: Path) -> None:
    _images(tmp_path / "train")
    _images(tmp_path / "val", per_class=2)
    dataset = load_dataset("folder", str(tmp_path))
    folder_split = dataset.train
    assert hold_training_images(dataset, 0, torch.device("cpu"))
    assert dataset.train.images is not None and dataset.train.images.shape == (10, 3, 16, 20)
    assert dataset.bank is folder_split and dataset.test is not None and dataset.test.folder is not None
    assert "held in memory" in dataset.describe()
    npz = tmp_path / "npz"
    npz.mkdir()
    np.savez(npz / "train.npz", x=np.zeros((4, 8, 8, 3), dtype=np.uint8), y=np.zeros(4, dtype=np.int64))
    arrays = load_dataset("npz", str(npz))
    assert not hold_training_images(arrays, 0, torch.device("cpu")) and "held in memory" not in arrays.describe()


@pytest.mark.slow
def test_a_held_folder_killed_mid_epoch_resumes_bit_for_bit(tmp_path: Path) -> None:
    """Held in memory, a folder's views are cut on the device from the run's seed alone, as CIFAR's are: a run
    killed outright (SIGKILL) and resumed ends where a run never stopped ends, weights, queue and losses alike."""
    import random
    import signal
    import subprocess
    import sys

    from test_cli import TINY
    from test_resume import assert_same_run, wait_for_step

    _images(tmp_path / "photos", per_class=32, size=(16, 16))

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "ressl", "pretrain", "--dataset", "folder", "--data", str(tmp_path / "photos"),
                "--out", str(out), "--epochs", "8", "--checkpoint_every", "1", "--log_every", "1", *TINY]

    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    whole = subprocess.run(command(unbroken), capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0 and "held in memory" in whole.stdout, whole.stdout + whole.stderr
    proc = subprocess.Popen(command(broken), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after = random.Random().randint(2, 12)  # a new place each run
    print(f"SIGKILL after step {kill_after}")
    wait_for_step(broken, kill_after, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(command(broken), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stdout + resumed.stderr
    assert_same_run(unbroken, broken)


def test_the_limit_is_shared_by_the_processes_of_a_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each process torchrun starts on a machine holds its own copy: together they keep to a quarter of its memory."""
    memory = memory_limit()
    assert memory is not None
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert hold_limit() == hold_limit(torch.device("cpu")) == min(HOLD_LIMIT, memory // 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    assert hold_limit() == min(HOLD_LIMIT, memory // 256) < HOLD_LIMIT


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_control_groups_memory_limit_lowers_the_machines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A container or a Slurm job may use less than the machine has: the least limit of the process's group, the
    groups above it and the mount's root counts (cgroup v2 and v1); "max" and v1's near-2**63 mean none."""
    import os

    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    gib = 2**30
    v2, membership = tmp_path / "v2", tmp_path / "cgroup"
    membership.write_text("0::/job_7/step_0/task_0\n")
    assert memory_limit(v2, membership) == memory  # no group files: the machine's
    _write(v2 / "job_7/step_0/task_0/memory.max", "max\n")
    _write(v2 / "job_7/memory.max", f"{3 * gib}\n")  # the job's limit, two levels up
    _write(v2 / "job_7/step_0/memory.max", f"{5 * gib}\n")
    assert memory_limit(v2, membership) == min(memory, 3 * gib)
    _write(v2 / "memory.max", f"{2 * gib}\n")  # a container's own group, seen as the root
    assert memory_limit(v2, membership) == min(memory, 2 * gib)

    v1 = tmp_path / "v1"
    membership.write_text("9:pids:/\n4:cpu,memory:/docker/abc\n1:name=systemd:/\n")
    _write(v1 / "memory/memory.limit_in_bytes", "9223372036854771712\n")  # v1's "no limit"
    assert memory_limit(v1, membership) == memory
    _write(v1 / "memory/docker/abc/memory.limit_in_bytes", f"{gib}\n")
    assert memory_limit(v1, membership) == min(memory, gib)

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(ressl.held, "memory_limit", lambda: 2 * gib)
    assert hold_limit() == gib // 2  # a quarter of the container's 2 GiB


def test_a_resume_that_reads_the_folder_otherwise_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_cli import TINY

    from ressl.cli import main

    _images(tmp_path / "photos", per_class=32, size=(16, 16))
    argv = ["pretrain", "--dataset", "folder", "--data", str(tmp_path / "photos"), "--out", str(tmp_path / "run"), *TINY]
    assert main(argv + ["--epochs", "1"]) == 0
    assert "trained on the folder" not in capsys.readouterr().out
    assert main(argv + ["--epochs", "2", "--hold_in_memory", "false"]) == 0
    said = capsys.readouterr().out
    assert ("was trained on the folder held in memory, its views cut on the device; this run has it read by loader "
            "workers, which cut its crops (--hold_in_memory)") in said
    assert main(argv + ["--epochs", "3"]) == 0
    assert "trained on the folder read by loader workers, which cut its crops; this run has it held in memory" in capsys.readouterr().out


def test_a_folder_decoded_in_several_batches_keeps_each_within_the_shared_memory_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker's decoded batch crosses /dev/shm: it keeps within ``_BATCH_BYTES`` (here three images), and the
    batches fill the held tensor one after the other, in the folder's order."""
    _images(tmp_path)
    index = scan_folder(tmp_path)
    monkeypatch.setattr(ressl.held, "_BATCH_BYTES", 3 * 3 * 16 * 20)
    sizes: list[int] = []
    together = ressl.held._together

    def noting(batch: list[tuple[torch.Tensor, int]]) -> torch.Tensor | None:
        sizes.append(len(batch))
        return together(batch)

    monkeypatch.setattr(ressl.held, "_together", noting)
    held = held_in_memory(Split(folder=index), 0)
    assert sizes == [3, 3, 3, 1]
    assert held is not None and held.images is not None
    assert torch.equal(held.images, torch.stack([load_rgb(path) for path in index.files]))


def test_a_broken_image_is_never_held_whatever_its_place_or_the_fraction_allowed(tmp_path: Path) -> None:
    """A first image that fails to decode, or a later one where ``max_bad_fraction`` would let training replace it
    by another: the folder is left to the loader workers (which replace it, warning), not held with a stand-in."""
    _images(tmp_path / "first")
    (tmp_path / "first" / "c0" / "0.jpg").write_bytes(b"not a picture")
    assert held_in_memory(Split(folder=scan_folder(tmp_path / "first", verify=False), max_bad_fraction=0.5), 0) is None
    _images(tmp_path / "later")
    (tmp_path / "later" / "c1" / "3.jpg").write_bytes(b"not a picture")
    assert held_in_memory(Split(folder=scan_folder(tmp_path / "later", verify=False), max_bad_fraction=0.5), 0) is None


def test_an_error_other_than_a_failed_image_is_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a failure to load images (a DataError, a loader worker's) means the folder is not held: another error (a
    bug) is raised, not hidden behind a folder read by workers."""
    _images(tmp_path)

    def broken(*args: object, **kwargs: object) -> torch.Tensor | None:
        raise TypeError("a bug")

    monkeypatch.setattr(ressl.folder, "load_rgb", broken)  # the dataset's decode, after the first image's
    with pytest.raises(TypeError, match="a bug"):
        held_in_memory(Split(folder=scan_folder(tmp_path)), 0)


def test_a_v1_group_of_another_controller_does_not_set_the_memory_limit(tmp_path: Path) -> None:
    """cgroup v1 places a process in a group per controller: only the memory controller's path (and those above it)
    is read for memory.limit_in_bytes, not the path of its pids or cpu group."""
    import os

    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    gib = 2**30
    v1, membership = tmp_path / "v1", tmp_path / "cgroup"
    membership.write_text("9:pids:/slurm/other\n4:memory:/docker/abc\n")
    _write(v1 / "memory/slurm/other/memory.limit_in_bytes", f"{gib}\n")  # the pids group's path, under memory/
    assert memory_limit(v1, membership) == memory
    _write(v1 / "memory/docker/memory.limit_in_bytes", f"{2 * gib}\n")
    assert memory_limit(v1, membership) == min(memory, 2 * gib)


def test_a_gpu_holds_at_most_an_eighth_of_its_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Held images are moved to the training device: a 12 GB GPU holds 1.5 GB of them, a CPU run the host's share."""
    from types import SimpleNamespace

    gib = 2**30
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(ressl.held, "memory_limit", lambda: 64 * gib)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=12 * gib))
    assert hold_limit(torch.device("cuda", 0)) == 12 * gib // 8
    assert hold_limit(torch.device("cpu")) == hold_limit() == HOLD_LIMIT


def test_a_finished_run_or_an_older_checkpoint_says_nothing_of_how_the_folder_was_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run that is complete trains no further, so how it would read the folder is not noted; nor is it for a
    checkpoint written before checkpoints recorded it (it resumes, with no note)."""
    from test_cli import TINY

    from ressl.cli import main

    _images(tmp_path / "photos", per_class=32, size=(16, 16))
    argv = ["pretrain", "--dataset", "folder", "--data", str(tmp_path / "photos"), "--out", str(tmp_path / "run"), *TINY]
    assert main(argv + ["--epochs", "1"]) == 0
    capsys.readouterr()
    assert main(argv + ["--epochs", "1", "--hold_in_memory", "false"]) == 0
    said = capsys.readouterr().out
    assert "is already complete" in said and "trained on the folder" not in said
    path = tmp_path / "run" / "checkpoint.pt"
    saved = torch.load(path, weights_only=True)
    assert saved.pop("train_in_memory") is True
    torch.save(saved, path)  # as an older ressl wrote it
    assert main(argv + ["--epochs", "2", "--hold_in_memory", "false"]) == 0
    said = capsys.readouterr().out
    assert "resuming from" in said and "trained on the folder" not in said
