"""The command line end to end, in subprocesses as a user runs it."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ressl.cli import main

TINY = ["--image_size", "16", "--width", "8", "--hidden_dim", "32", "--out_dim", "16", "--batch_size", "32",
        "--queue_size", "64", "--knn_k", "10", "--precision", "fp32", "--workers", "0"]


def ressl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ressl", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.slow
def test_pretrain_then_knn_and_linear(npz_dir, tmp_path):
    out = tmp_path / "run"
    done = ressl("pretrain", "--dataset", "npz", "--data", str(npz_dir), "--out", str(out), "--epochs", "2", *TINY)
    assert done.returncode == 0, done.stderr
    assert "kNN of the randomly initialised encoder" in done.stdout and "kNN top-1" in done.stdout
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "final.json"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    named = {"loss", "lr", "ema_momentum", "images_per_s", "queue_fill", "teacher_entropy", "student_entropy",
             "student_std", "teacher_std"}
    assert logged and all(named <= set(r) for r in logged)
    k = 64  # queue size in TINY: relation entropies lie in [0, log K]
    assert all(0 <= r["teacher_entropy"] <= math.log(k) + 1e-4 and 0 <= r["student_std"] <= 1 for r in logged)
    assert [r["queue_fill"] for r in logged][-1] == 1.0
    final = json.loads((out / "final.json").read_text())
    assert final["epochs"] == 2 and 0 <= final["knn"]["top1"] <= 100

    state = torch.load(out / "checkpoint.pt", weights_only=True)  # plain data only
    assert state["config"]["epochs"] == 2 and state["config"]["dataset"] == "npz"

    knn = ressl("knn", "--checkpoint", str(out / "checkpoint.pt"), "--k", "10")
    assert knn.returncode == 0, knn.stderr
    assert json.loads(knn.stdout.splitlines()[-1])["top1"] == pytest.approx(final["knn"]["top1"], abs=0.01)
    linear = ressl("linear", "--checkpoint", str(out / "checkpoint.pt"), "--epochs", "3")
    assert linear.returncode == 0, linear.stderr
    assert 0 <= json.loads(linear.stdout.splitlines()[-1])["top1"] <= 100


@pytest.mark.slow
def test_user_mistake_is_one_line_without_traceback(tmp_path):
    done = ressl("pretrain", "--preset", "cifar10", "--data", str(tmp_path / "nowhere"))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "does not exist" in done.stderr and "--data" in done.stderr


def bad(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("argv,message", [
    (["pretrain", "--preset", "cifar11"], "did you mean 'cifar10'"),
    (["pretrain", "--queue_size", "100"], "not a multiple"),
    (["pretrain", "--image_size", "4"], "too small"),
    (["pretrain", "--epochs", "many"], "epochs must be an integer"),
    (["knn", "--checkpoint", "nowhere.pt"], "does not exist"),
])
def test_bad_input_exit_2(argv, message, capsys):
    assert message in bad(argv, capsys)


def test_unknown_flag_suggests_the_right_one(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "--epoch", "3"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--epochs" in err and len(err.splitlines()) == 1


def test_empty_folder_and_unreadable_checkpoint(tmp_path, capsys):
    assert "no images" in bad(["pretrain", "--dataset", "folder", "--data", str(tmp_path)], capsys)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert "cannot read checkpoint" in bad(["knn", "--checkpoint", str(junk)], capsys)


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "payload": Path("x")}, evil)  # an arbitrary pickled object
    assert "refusing to load" in bad(["knn", "--checkpoint", str(evil)], capsys)


@pytest.mark.slow
def test_folder_of_broken_and_odd_images_pretrains_to_the_end(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 4)):
        for cls in ("a", "b"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
    odd = tmp_path / "train" / "a"
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(odd / "cmyk.jpg")
    Image.new("RGBA", (20, 20), (255, 0, 0, 128)).save(odd / "rgba.png")
    Image.new("P", (20, 20), 3).save(odd / "palette.png")
    Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)).save(odd / "gray16.png")
    Image.new("L", (20, 20), 77).save(odd / "gray.png")
    (odd / "empty.jpg").write_bytes(b"")
    (odd / "notes.png").write_text("not an image")
    whole = (tmp_path / "train" / "b" / "0.jpg").read_bytes()
    (tmp_path / "train" / "b" / "cut.jpg").write_bytes(whole[: len(whole) // 2])  # truncated: decoded in part

    out = tmp_path / "run"
    argv = ["pretrain", "--dataset", "folder", "--data", str(tmp_path), "--out", str(out), "--epochs", "2",
            "--batch_size", "8", "--queue_size", "32", "--image_size", "16", "--width", "8", "--hidden_dim", "32",
            "--out_dim", "16", "--knn_k", "5", "--precision", "fp32", "--workers", "0"]
    assert main(argv) == 2  # 2 unreadable of 32 files is over the default 1%
    assert "max_bad_fraction" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="empty.jpg"):
        assert main(argv + ["--max_bad_fraction", "0.1"]) == 0
    final = json.loads((out / "final.json").read_text())
    assert final["epochs"] == 2 and "knn" in final


def test_tensorboard_events_when_installed(npz_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["pretrain", "--dataset", "npz", "--data", str(npz_dir), "--out", str(out), "--epochs", "1", *TINY]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "teacher_entropy", "student_std", "knn_top1"} <= tags
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events.Scalars("loss")[-1].value == pytest.approx([r["loss"] for r in logged if "loss" in r][-1])


@pytest.mark.slow
def test_linear_probe_with_augmentation(npz_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["pretrain", "--dataset", "npz", "--data", str(npz_dir), "--out", str(out), "--epochs", "1", *TINY]) == 0
    done = ressl("linear", "--checkpoint", str(out / "checkpoint.pt"), "--epochs", "3", "--augment")
    assert done.returncode == 0, done.stderr
    assert 0 <= json.loads(done.stdout.splitlines()[-1])["top1"] <= 100
