"""The run directory: what may start or continue in an --out, one ressl pretrain at a time, and its final.json."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_images
from PIL import Image
from test_cli import TINY
from test_resume import no_space_for_temporaries

from ressl.cli import main


def pretrain(npz_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--dataset", "npz", "--data", str(npz_dir), "--out", str(out), *TINY, *extra]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_final_json_older_than_the_checkpoint_is_measured_again(npz_dir, tmp_path, capsys):
    """A run stopped after its last checkpoint but before its final kNN (Ctrl-C, a scheduler's kill) left the
    final.json of its previous invocation, or one cut short: the same command measures the final kNN and writes it."""
    out = tmp_path / "run"
    assert main(pretrain(npz_dir, out, "--epochs", "1")) == 0
    older = (out / "final.json").read_text()
    assert main(pretrain(npz_dir, out, "--epochs", "2")) == 0
    newer = json.loads((out / "final.json").read_text())
    assert newer["steps"] == 2 * json.loads(older)["steps"]
    for stale in (older, ""):  # the previous invocation's results; a write cut short
        (out / "final.json").write_text(stale)
        (out / ".final.json.tmp").write_text(older[:10])  # what a process killed while writing it leaves
        capsys.readouterr()
        assert main(pretrain(npz_dir, out, "--epochs", "2")) == 0
        said = capsys.readouterr().out
        assert "already complete" not in said and "no training left" in said
        assert not (out / ".final.json.tmp").exists()
        again = json.loads((out / "final.json").read_text())
        assert again["steps"] == newer["steps"] and again["knn"] == newer["knn"]
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert sum(r["step"] == newer["steps"] and "knn_top1" in r for r in records) == 1  # logged once, not per measure
    capsys.readouterr()
    assert main(pretrain(npz_dir, out, "--epochs", "2")) == 0  # now it is complete
    assert "already complete" in capsys.readouterr().out


def test_training_on_removes_the_final_json_of_fewer_steps(npz_dir, tmp_path):
    out = tmp_path / "run"
    assert main(pretrain(npz_dir, out, "--epochs", "1")) == 0
    argv = [sys.executable, "-m", "ressl", *pretrain(npz_dir, out, "--epochs", "50", "--log_every", "1")]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while (out / "final.json").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        assert not (out / "final.json").exists()  # while it trains, the run has no final results
    finally:
        proc.kill()
        proc.wait()


def test_an_out_holding_something_else_is_refused_and_left_alone(npz_dir, tmp_path, capsys):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "config.yaml").write_text("learning_rate: 3\n")  # the user's own file
    assert main(pretrain(npz_dir, mine, "--epochs", "1")) == 2
    assert "holds a config.yaml that is not a ressl run's" in one_line_error(capsys)
    assert main(pretrain(tmp_path / "nowhere", mine, "--epochs", "1")) == 2  # refused before the data is read
    assert "holds a config.yaml that is not a ressl run's" in one_line_error(capsys)
    (mine / "config.yaml").write_text("backbone: resnet50\nepochs: 90\n")  # another project's, with a key alike
    assert main(pretrain(tmp_path / "nowhere", mine, "--epochs", "1")) == 2
    assert "holds a config.yaml that is not a ressl run's" in one_line_error(capsys)
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml"]
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "metrics.jsonl").write_text('{"mine": 1}\n')  # a log of the user's own, no run beside it
    assert main(pretrain(npz_dir, logs, "--epochs", "1")) == 2
    assert "holds a metrics.jsonl but no run's config.yaml" in one_line_error(capsys)
    assert (logs / "metrics.jsonl").read_text() == '{"mine": 1}\n'
    finished = tmp_path / "finished"
    assert main(pretrain(npz_dir, finished, "--epochs", "1")) == 0
    (finished / "checkpoint.pt").unlink()  # its results stay; training again would replace them
    before = (finished / "final.json").read_text()
    capsys.readouterr()
    assert main(pretrain(npz_dir, finished, "--epochs", "1")) == 2
    assert "holds a finished run's final.json but no checkpoint.pt" in one_line_error(capsys)
    assert (finished / "final.json").read_text() == before


def test_a_run_stopped_before_its_first_checkpoint_starts_again_with_one_log(npz_dir, tmp_path):
    out = tmp_path / "run"
    assert main(pretrain(npz_dir, out, "--epochs", "1")) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["out"] == str(out)  # the resolved configuration
    (out / "checkpoint.pt").unlink()
    (out / "final.json").unlink()  # what a run killed in its first epoch leaves: config.yaml and metrics.jsonl
    assert main(pretrain(npz_dir, out, "--epochs", "1")) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(0) == 1  # the random-init kNN once, no record twice


def test_a_second_pretrain_on_the_same_out_is_refused_while_the_first_runs(npz_dir, tmp_path, capsys):
    out = tmp_path / "run"
    hold = ("import sys, time, torch; from pathlib import Path; from ressl import rundir; "
            "rundir.claim(Path(sys.argv[1]), torch.device('cpu')); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert main(pretrain(npz_dir, out, "--epochs", "1")) == 2
        assert f"another ressl pretrain is running with --out {out}" in one_line_error(capsys)
        assert not (out / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(pretrain(npz_dir, out, "--epochs", "1")) == 0  # the lock ends with its process


def test_a_run_that_fails_to_start_leaves_its_directory_free(npz_dir, tmp_path, capsys, monkeypatch):
    """The Python API goes on after a failed start: the lock must not outlive it (another process would be refused)."""
    out = tmp_path / "run"
    assert main(pretrain(npz_dir, out, "--epochs", "1")) == 0
    (out / "checkpoint.pt").unlink()
    (out / "final.json").unlink()
    capsys.readouterr()
    with monkeypatch.context() as full_disk:  # the run's files cannot be written: set-up fails after the lock was taken
        no_space_for_temporaries(full_disk)
        assert main(pretrain(npz_dir, out, "--epochs", "1")) == 1
    assert "could not write" in one_line_error(capsys)
    claim = ("import sys, torch; from pathlib import Path; from ressl import rundir; "
             "print(rundir.claim(Path(sys.argv[1]), torch.device('cpu')))")
    done = subprocess.run([sys.executable, "-c", claim, str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr


def test_empty_paths_are_refused_not_read_as_the_current_directory(capsys):
    """``--data "$DATA"`` with DATA unset would read (and scan) the current directory."""
    for argv, said in ((["pretrain", "--data", ""], "data is empty"), (["pretrain", "--out", " "], "out is empty")):
        assert main(argv) == 2, argv
        assert said in one_line_error(capsys)
    for argv, said in ((["pretrain", "--preset", ""], "argument --preset: is empty"),
                       (["knn", "--checkpoint", "c.pt", "--data", ""], "argument --data: is empty"),
                       (["embed", "--checkpoint", "", "--data", "d", "--out", "f.npy"], "argument --checkpoint: is empty")):
        with pytest.raises(SystemExit) as exit_:  # argparse's own errors
            main(argv)
        assert exit_.value.code == 2 and said in one_line_error(capsys)


def test_a_default_out_that_cannot_be_made_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("a file where the default runs/ directory goes")
    assert main(["pretrain", "--epochs", "1"]) == 2
    assert "runs is a file, not a directory" in one_line_error(capsys)


def test_an_out_inside_the_image_folder_it_reads_is_refused(tmp_path, capsys):
    x, _ = make_images(8, 16, 2)
    for i, image in enumerate(x):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    assert main(["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "run"), *TINY]) == 2
    assert "is inside --data" in one_line_error(capsys)


def test_an_out_beside_the_folders_a_run_reads_is_allowed_one_inside_them_refused(tmp_path, monkeypatch):
    """With train/ (and val/) the run reads only those: runs/ beside them is fine; inside them, by an absolute or a
    relative path, the run's own images would be read as training images."""
    from ressl import config
    from ressl.rundir import check_outside_data

    data = tmp_path / "photos"
    for part in ("train/cat", "train/dog", "val/cat"):
        (data / part).mkdir(parents=True)
    cfg = config.resolve(None, {"dataset": "folder", "data": str(data)})
    check_outside_data(data / "runs" / "first", cfg)
    for out in (data / "train" / "run", data / "val" / "cat" / "run"):
        with pytest.raises(config.ConfigError, match="is inside --data"):
            check_outside_data(out, cfg)
    monkeypatch.chdir(data / "train")
    with pytest.raises(config.ConfigError, match="--out run is inside --data"):
        check_outside_data(Path("run"), cfg)


def test_a_new_out_is_made_with_the_folders_above_it(tmp_path):
    """``--out runs/2026/first`` where ``runs/`` does not exist yet: every folder on the way is made, and locked."""
    from ressl import rundir

    out = tmp_path / "runs" / "2026" / "first"
    try:
        assert rundir.claim(out, torch.device("cpu")) is True and (out / rundir.LOCK_NAME).is_file()
    finally:
        rundir.release(out)


def test_memory_that_cannot_be_had_is_one_line_naming_what_to_lower(npz_dir, tmp_path, capsys):
    argv = pretrain(npz_dir, tmp_path / "run", "--queue_size", str(2**50))  # a queue of 2**57 bytes
    assert main(argv) == 1
    err = one_line_error(capsys)
    assert "out of memory (tried to allocate " in err and " GB): lower --batch_size (or --queue_size" in err


def test_a_finished_run_reruns_complete_with_another_number_of_processes(npz_dir, tmp_path, capsys):
    """The process count must match to go on training (the views depend on the rank), not to find nothing left."""
    out = tmp_path / "run"
    assert main(pretrain(npz_dir, out, "--epochs", "1")) == 0
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    torch.save(dict(saved, world_size=2), out / "checkpoint.pt")  # as a 2-process torchrun job writes it
    capsys.readouterr()
    assert main(pretrain(npz_dir, out, "--epochs", "1")) == 0
    assert "already complete" in capsys.readouterr().out
    assert main(pretrain(npz_dir, out, "--epochs", "2")) == 2  # training on would draw other views: refused
    assert "was written by 2 processes, this run has 1" in one_line_error(capsys)
    torch.save(dict(saved, world_size=2, minutes=6.0), out / "checkpoint.pt")  # its time spent, by the checkpoint's minutes
    assert main(pretrain(npz_dir, out, "--epochs", "2", "--max_minutes", "5")) == 0
    assert "its --max_minutes 5.0 are spent" in capsys.readouterr().out

