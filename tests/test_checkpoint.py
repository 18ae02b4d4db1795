"""checkpoint.load: what it refuses (damaged files) and what it lets through (a checkpoint as torch.save wrote it)."""

import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ressl import checkpoint
from ressl.errors import CheckpointError


def _save(path: Path) -> dict:
    """A small checkpoint of the shape ressl writes: weights, configuration and loop state."""
    state = {"model": {"weight": torch.arange(4096, dtype=torch.float32), "bias": torch.zeros(16)},
             "config": {"dataset": "npz", "epochs": 2}, "state": {"epoch": 1}}
    checkpoint.save_atomic(state, path)
    return state


def _data_offset(path: Path, entry: str) -> tuple[str, int, int]:
    """(name, offset in the file, size) of the stored bytes of the first entry whose name ends with ``entry``."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(entry))
    with path.open("rb") as f:  # the local header's own name and extra lengths (they may differ from the central one's)
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    assert info.compress_type == zipfile.ZIP_STORED  # torch.save stores tensors uncompressed
    return info.filename, info.header_offset + 30 + name_len + extra_len, info.file_size


def test_a_checkpoint_as_written_passes_its_checksums(tmp_path):
    path = tmp_path / "checkpoint.pt"
    state = _save(path)
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None  # torch.save writes each entry's CRC-32
    loaded = checkpoint.load(path)
    assert torch.equal(loaded["model"]["weight"], state["model"]["weight"]) and loaded["state"] == {"epoch": 1}


@pytest.mark.parametrize("entry", ["data/0", "data.pkl"])
def test_flipped_bytes_inside_a_checkpoint_are_refused(tmp_path, entry):
    """torch.load itself checks no checksum: flipped bytes inside a tensor load silently as wrong weights (kNN then
    reports a garbage accuracy). The zip's CRC-32 catches them, in a one-line error naming the damaged entry."""
    path = tmp_path / "checkpoint.pt"
    _save(path)
    name, start, size = _data_offset(path, entry)
    raw = bytearray(path.read_bytes())
    middle = start + size // 2
    raw[middle:middle + 4] = bytes(b ^ 0xFF for b in raw[middle:middle + 4])
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} is damaged \(entry {name} fails its checksum\)") as err:
        checkpoint.load(path)
    assert "\n" not in str(err.value)


def test_a_checkpoint_cut_short_is_called_damaged_not_foreign(tmp_path):
    """A copy or download that stopped leaves a zip without the directory at its end: not "written by something
    else", but damaged, to be copied again. A file of another kind is still told apart."""
    path = tmp_path / "checkpoint.pt"
    _save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"is damaged \(cut short: its end is missing") as err:
        checkpoint.load(path)
    assert "\n" not in str(err.value) and "copy it again" in str(err.value)
    path.write_text("name: not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a file written by torch.save"):
        checkpoint.load(path)


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_replaced_file_keeps_its_content_when_the_new_one_fails(tmp_path, failure):
    """``replaced`` (features, reports and their plots, checkpoints): a write that fails or is interrupted midway
    leaves the earlier file whole and no temporary file behind; one that finishes replaces it."""
    path = tmp_path / "features.npy"
    path.write_bytes(b"the earlier features")
    with pytest.raises(type(failure)), checkpoint.replaced(path) as f:
        f.write(b"half of the new")
        raise failure
    assert path.read_bytes() == b"the earlier features" and [p.name for p in tmp_path.iterdir()] == ["features.npy"]
    with checkpoint.replaced(path) as f:
        f.write(b"the new features")
    assert path.read_bytes() == b"the new features" and [p.name for p in tmp_path.iterdir()] == ["features.npy"]


def test_a_replaced_file_keeps_its_mode_and_a_link_to_it_stays_a_link(tmp_path):
    target = tmp_path / "big_disk" / "features.npy"
    target.parent.mkdir()
    target.write_bytes(b"old")
    target.chmod(0o640)
    link = tmp_path / "features.npy"
    link.symlink_to(target)
    with checkpoint.replaced(link) as f:
        f.write(b"new")
    assert link.is_symlink() and target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == 0o640


def test_only_temporaries_a_killed_write_left_are_removed(tmp_path):
    """``replaced``'s temporaries are hidden (``.checkpoint.pt.XXXX.tmp``): the cleanup at a run's start removes those,
    never the run's own files or a file of the user's that merely ends in ``.tmp``."""
    for name in (".checkpoint.pt.k2f9x.tmp", ".final.json.tmp", "checkpoint.pt", "metrics.jsonl", "notes.tmp", ".keep"):
        (tmp_path / name).write_text("x")
    (tmp_path / ".cache.tmp").mkdir()  # a directory: not a temporary file
    checkpoint.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache.tmp", ".keep", "checkpoint.pt", "metrics.jsonl", "notes.tmp"]


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"), OSError(30, "Read-only file system")])
def test_a_temporary_that_cannot_be_removed_is_left(tmp_path, monkeypatch, error):
    """The cleanup is best effort (another user's file in a shared run directory, a run directory on a disk mounted
    read-only to look at it): a run still starts."""
    (tmp_path / ".final.json.tmp").write_text("x")

    def refused(self, missing_ok=False):
        raise error

    monkeypatch.setattr(Path, "unlink", refused)
    checkpoint.remove_stale_temporaries(tmp_path)
    assert (tmp_path / ".final.json.tmp").exists()


def test_random_number_states_come_back_from_a_checkpoint(tmp_path):
    """torch's, numpy's (a cached Gaussian included) and Python's generators continue as if never stopped."""
    np.random.standard_normal()  # numpy now holds the second of a pair of Gaussians
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic({"model": {}, "config": {}, "rng": checkpoint.rng_states()}, path)
    expected = torch.rand(4), np.random.standard_normal(3), np.random.rand(2), random.random()
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    checkpoint.set_rng_states(checkpoint.load(path)["rng"])
    assert torch.equal(torch.rand(4), expected[0])
    assert np.array_equal(np.random.standard_normal(3), expected[1]) and np.array_equal(np.random.rand(2), expected[2])
    assert random.random() == expected[3]


@pytest.mark.parametrize("state", [{"config": {"lr": 0.1}, "state_dict": {"w": torch.ones(2)}}, {"model": {"w": torch.ones(2)}}])
def test_a_torch_file_without_model_and_config_is_not_a_ressl_checkpoint(tmp_path, state):
    """Another program's checkpoint (its weights under ``state_dict``) is refused in one line, not a KeyError later."""
    path = tmp_path / "other.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"is not a ressl checkpoint \(no 'model' and 'config'\)"):
        checkpoint.load(path)
