"""Runs that survive: exact resume after SIGKILL, SIGTERM saves, atomic writes, numeric faults."""

import errno
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import TINY

from ressl import checkpoint, config
from ressl.cli import main
from ressl.errors import WriteError
from ressl.train import Run, setup


def run_of_flags(flags: list[str]) -> Run:
    """The run ``ressl pretrain FLAGS`` would set up (``--name value`` pairs), to step it from the test and then
    continue it through the command line with the same flags."""
    return setup(config.resolve(None, {k[2:]: v for k, v in zip(flags[0::2], flags[1::2])}))


def command(npz_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ressl", "pretrain", "--dataset", "npz", "--data", str(npz_dir), "--out", str(out),
            "--epochs", "8", "--checkpoint_every", "1", "--log_every", "1", *TINY, *extra]


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and any(_logged_step(line) >= step for line in metrics.read_text().splitlines()):
            return
        assert proc.poll() is None, "the run ended before it could be stopped"
        time.sleep(0.005)
    raise TimeoutError


def _logged_step(line: str) -> int:
    """The step of a line with a loss, or -1 (another record, or a line the run is still writing)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return -1
    return record.get("step", -1) if "loss" in record else -1


def losses(out: Path) -> dict[int, float]:
    """The loss logged for each step."""
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def assert_same_run(a: Path, b: Path) -> None:
    sa, sb = (torch.load(p / "checkpoint.pt", weights_only=True) for p in (a, b))
    assert sa["state"] == sb["state"]
    for key, value in sa["model"].items():
        assert torch.equal(value, sb["model"][key]), key  # bit for bit, queue and pointer included
    for key, value in sa["optimizer"]["state"].items():
        assert torch.equal(value["momentum_buffer"], sb["optimizer"]["state"][key]["momentum_buffer"])
    assert losses(a) == losses(b)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_exact(npz_dir, tmp_path):
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    assert subprocess.run(command(npz_dir, unbroken), capture_output=True, timeout=300).returncode == 0
    proc = subprocess.Popen(command(npz_dir, broken), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after = random.Random().randint(2, 20)  # a new place each run
    print(f"SIGKILL after step {kill_after}")  # pytest shows it with any failure below
    wait_for_step(broken, kill_after, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(broken / "checkpoint.pt", weights_only=True)["state"]["step"]
    assert killed_at < 32
    resumed = subprocess.run(command(npz_dir, broken), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert_same_run(unbroken, broken)
    assert not list(broken.glob(".checkpoint.pt.*"))  # no temporary file left behind
    steps = [r["step"] for r in map(json.loads, (broken / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == sorted(set(steps))  # the steps logged after the checkpoint, and retrained, have one record each


@pytest.mark.slow
def test_sigterm_saves_and_says_how_to_resume(npz_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(npz_dir, out, "--checkpoint_every", "0"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_step(out, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith(f"To resume, run the same command again: {shlex.join(command(npz_dir, out, '--checkpoint_every', '0'))}")
    state = torch.load(out / "checkpoint.pt", weights_only=True)["state"]
    assert state["step"] >= 3 and max(losses(out)) == state["step"]


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_with_loader_workers_still_saves(tmp_path):
    """A launcher or scheduler (torchrun, SLURM) signals every process of the job, loader workers too, and may signal
    again: the workers leave the signals to the main process, which stops at a step boundary with a checkpoint,
    instead of dying on a killed worker; a second SIGTERM does not cut the stop short as a second Ctrl-C does."""
    from PIL import Image

    data = tmp_path / "photos"
    for i in range(64):
        (data / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (4 * i, 100 * (i % 2), 50)).save(data / str(i % 2) / f"{i}.png")
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "ressl", "pretrain", "--dataset", "folder", "--data", str(data), "--out", str(out),
            "--epochs", "50", "--checkpoint_every", "0", "--log_every", "1", *TINY[:-2], "--workers", "2"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_step(out, 3, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # the main process and its loader workers
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "stopped at step" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["state"]["step"] >= 3


def test_torn_write_is_never_visible(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic({"model": {"w": torch.ones(3)}, "config": {}}, path)

    def crash_midway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # the process dies in the middle of the write

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic({"model": {"w": torch.zeros(3)}, "config": {}}, path)
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic({"model": {"w": torch.ones(3)}, "config": {}}, path)

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", no_space)
    with pytest.raises(WriteError, match="No space left on device"):
        checkpoint.save_atomic({"model": {"w": torch.zeros(3)}, "config": {}}, path)
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE as on Linux")
def test_a_write_that_torch_save_cannot_finish_is_a_checkpoint_write_error(tmp_path):
    """A real full disk or file size limit fails inside torch.save's zip writer, which raises a RuntimeError, not an
    OSError: it is a one-line WriteError too, and the previous checkpoint stays."""
    script = f"""
import resource, torch
from pathlib import Path
from ressl import checkpoint
path = Path({str(tmp_path / "checkpoint.pt")!r})
checkpoint.save_atomic({{"model": {{"w": torch.ones(3)}}, "config": {{}}}}, path)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
try:
    checkpoint.save_atomic({{"model": {{"w": torch.zeros(1_000_000)}}, "config": {{}}}}, path)
except checkpoint.WriteError as err:
    print("refused:", err)
print(checkpoint.load(path)["model"]["w"].tolist())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "refused: could not write checkpoint" in done.stdout and "[1.0, 1.0, 1.0]" in done.stdout, done.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def no_space_for_temporaries(monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk: the temporary file of every replacing write cannot be made (files are still appended to)."""
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", no_space)


def test_run_files_that_cannot_be_written_are_one_line_errors(tmp_path, monkeypatch):
    from ressl.meter import MetricsLog

    with pytest.raises(WriteError, match="could not write .*metrics.jsonl: No such file or directory"):
        MetricsLog(tmp_path / "gone" / "metrics.jsonl", torch.device("cpu")).write(step=1, loss=0.5)
    # a resume rewrites metrics.jsonl through a temporary file: one that cannot be made is one line too, the log intact
    log = MetricsLog(tmp_path / "metrics.jsonl", torch.device("cpu"))
    for step in (1, 2, 3):
        log.write(step=step, loss=0.5)
    no_space_for_temporaries(monkeypatch)
    with pytest.raises(WriteError, match="could not write .*metrics.jsonl: No space left on device; free disk space"):
        log.keep_until(2)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_writing_names_the_file_and_the_fix_and_lets_other_errors_through(tmp_path):
    from safetensors.torch import save_file

    expected = r"^could not write --out x: Error while serializing.*; choose another --out$"
    with pytest.raises(WriteError, match=expected), checkpoint.writing("--out x", "choose another --out"):
        save_file({"w": torch.ones(2)}, str(tmp_path / "gone" / "x.safetensors"))  # safetensors' own error
    with pytest.raises(ValueError, match="not a write"), checkpoint.writing("y"):
        raise ValueError("not a write")  # a bug, not a failed write: its traceback stays


def test_non_finite_loss_stops_with_the_step_and_keeps_the_good_checkpoint(npz_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["pretrain", "--dataset", "npz", "--data", str(npz_dir), "--out", str(out), "--checkpoint_every", "1",
            "--log_every", "1", *TINY]
    assert main(argv + ["--epochs", "1"]) == 0  # a good checkpoint at step 4
    good = checkpoint.load(out / "checkpoint.pt")
    assert main(argv + ["--epochs", "3", "--lr", "1e30"]) == 1  # continues, and blows up
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "NaN or infinite" in err and "step 5" in err and "--lr" in err and f"{out / 'checkpoint.pt'}, is kept" in err
    saved = checkpoint.load(out / "checkpoint.pt")
    assert saved["state"] == good["state"]
    assert all(torch.equal(v, good["model"][k]) for k, v in saved["model"].items())


def test_changed_configuration_is_refused_on_resume(npz_dir, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["pretrain", "--dataset", "npz", "--data", str(npz_dir), "--out", str(out), "--epochs", "1", *TINY]
    assert main(base) == 0
    capsys.readouterr()
    assert main(base + ["--width", "16"]) == 2
    assert "different width (width=8): pass --width 8 to continue it, or pass another --out for a new run" in capsys.readouterr().err
    assert main(base + ["--width", "16", "--head_bn", "true", "--resume", str(out / "checkpoint.pt"), "--out", str(tmp_path / "b")]) == 2
    assert ("different width, head_bn (width=8, head_bn=False): pass --width 8 --head_bn false to continue it, or leave out "
            "--resume for a new run") in capsys.readouterr().err
    assert main(base + ["--batch_size", "16"]) == 2  # the checkpoint's place in its epoch counts batches of the old size
    assert "different batch_size" in capsys.readouterr().err
    assert main(base + ["--image_size", "24"]) == 2  # the weights (and the normalisation) were trained at 16 px
    assert "different image_size (image_size=16)" in capsys.readouterr().err
    # the stem is compared as built: a checkpoint from before stem_maxpool existed (no max-pool after the 3x3 stem)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    del saved["config"]["stem_maxpool"]
    torch.save(saved, out / "checkpoint.pt")
    for flag in ("none", "false"):  # the same network: it goes on (here: says it is complete)
        assert main(base + ["--stem_maxpool", flag]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(base + ["--stem_maxpool", "true"]) == 2
    assert "another stem (small_stem true, stem_maxpool false): pass --small_stem true --stem_maxpool false to continue it" in (
        capsys.readouterr().err)


def test_checkpoints_of_the_older_format_resume_and_another_process_count_is_refused(npz_dir, tmp_path, capsys):
    """Checkpoints written before the augmentation's parameters came from (seed, rank, step) carried one generator
    state per process instead of the world size: they still resume, with the same number of processes only."""
    out = tmp_path / "run"
    base = ["pretrain", "--dataset", "npz", "--data", str(npz_dir), "--out", str(out), *TINY]
    assert main(base + ["--epochs", "1"]) == 0
    path = out / "checkpoint.pt"
    saved = torch.load(path, weights_only=True)
    assert saved.pop("world_size") == 1
    checkpoint.save_atomic(dict(saved, generators=[torch.Generator().get_state()] * 2), path)
    capsys.readouterr()
    assert main(base + ["--epochs", "2"]) == 2
    assert "written by 2 processes, this run has 1" in capsys.readouterr().err
    checkpoint.save_atomic(dict(saved, generators=[torch.Generator().get_state()]), path)
    assert main(base + ["--epochs", "2"]) == 0
    assert torch.load(path, weights_only=True)["state"]["epoch"] == 2


def test_resume_accepts_the_same_data_by_another_path_and_a_copy_with_a_note(npz_dir, tmp_path, capsys, monkeypatch):
    """Data copied elsewhere (a cluster job's local disk, another path every time) resumes, saying so: only the
    kind of dataset is checked, and a set that gained or lost images restarts its epoch."""
    out = tmp_path / "run"
    base = ["pretrain", "--dataset", "npz", "--out", str(out), *TINY]
    assert main(base + ["--data", str(npz_dir), "--epochs", "1"]) == 0
    monkeypatch.chdir(npz_dir.parent)
    assert main(base + ["--data", f"./{npz_dir.name}/../{npz_dir.name}", "--epochs", "2"]) == 0
    said = capsys.readouterr().out
    assert "resuming from" in said and "was trained on" not in said
    other = tmp_path / "other"
    other.mkdir()
    for name in ("train.npz", "test.npz"):
        (other / name).write_bytes((npz_dir / name).read_bytes())
    assert main(base + ["--data", str(other), "--epochs", "3"]) == 0
    said = capsys.readouterr().out
    assert f"was trained on {npz_dir}, this run reads --data {other}" in said and "resuming from" in said
    assert checkpoint.load(out / "checkpoint.pt")["state"]["epoch"] == 3


def test_a_resume_with_another_recipe_says_so_and_trains_with_it(npz_dir, tmp_path, capsys):
    """A run continued with other training values (or by a newer ressl whose defaults moved) names each change and
    trains with the new values: the optimiser's weight decay too, which its saved state would otherwise bring back."""
    out = tmp_path / "run"
    base = ["pretrain", "--dataset", "npz", "--data", str(npz_dir), "--out", str(out), *TINY]
    assert main([*base, "--epochs", "1"]) == 0
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    del saved["config"]["decay_bn_bias"]  # as a checkpoint written before the field existed
    del saved["config"]["student_bn_groups"]  # likewise, but its one group is what such a run trained with
    torch.save(saved, out / "checkpoint.pt")
    capsys.readouterr()
    assert main([*base, "--epochs", "2", "--weight_decay", "0.001"]) == 0
    said = capsys.readouterr().out
    assert "weight_decay 0.0005 -> 0.001" in said and "decay_bn_bias -> True (new since)" in said
    assert "student_bn_groups" not in said
    assert "epochs 1 -> 2" in said  # a longer schedule: the cosine stretches, the learning rate rises again
    assert [g["weight_decay"] for g in checkpoint.load(out / "checkpoint.pt")["optimizer"]["param_groups"]] == [0.001, 0.001]
    assert main([*base, "--epochs", "3", "--weight_decay", "0.001"]) == 0
    assert "another recipe; the run goes on with this one: epochs 2 -> 3\n" in capsys.readouterr().out


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_rerunning_a_complete_run_changes_nothing(npz_dir, tmp_path, capsys):
    """The same command again on a finished run: it says so and leaves final.json, the metrics, the config and
    the checkpoint as they were (no second final kNN row, no final.json without its random-init kNN)."""
    out = tmp_path / "run"
    argv = ["pretrain", "--dataset", "npz", "--data", str(npz_dir), "--out", str(out), "--epochs", "1", *TINY]
    assert main(argv) == 0
    before = _files(out)
    assert "knn_random_init" in json.loads(before["final.json"])
    capsys.readouterr()
    assert main(argv + ["--lr", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "already complete (1/1 epochs" in printed and "another recipe" not in printed  # nothing goes on with it
    assert "resuming from" not in printed  # it does not resume: the line said so before saying it was complete
    assert _files(out) == before
    # images added to its data since, or other data given by mistake: the finished run stays as it was too
    with np.load(npz_dir / "train.npz") as arrays:
        np.savez(npz_dir / "train.npz", x=arrays["x"][:96], y=arrays["y"][:96])
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "already complete (1/1 epochs" in printed and "starts over" not in printed
    assert _files(out) == before
    other = tmp_path / "copy"  # the data copied elsewhere (a job's local disk): no note of it, nothing goes on
    other.mkdir()
    for name in ("train.npz", "test.npz"):
        (other / name).write_bytes((npz_dir / name).read_bytes())
    assert main([*argv[:4], str(other), *argv[5:]]) == 0
    printed = capsys.readouterr().out
    assert "already complete (1/1 epochs" in printed and "was trained on" not in printed
    assert _files(out) == before


def test_a_continued_run_keeps_its_random_init_knn_and_its_time(npz_dir, tmp_path):
    """A run continued with more epochs reports the kNN measured before its training began, and its minutes over
    both invocations."""
    out = tmp_path / "run"
    argv = ["pretrain", "--dataset", "npz", "--data", str(npz_dir), "--out", str(out), *TINY]
    assert main(argv + ["--epochs", "1"]) == 0
    first = json.loads((out / "final.json").read_text())
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    torch.save(dict(saved, minutes=7.0), out / "checkpoint.pt")  # as if the first invocation had trained 7 minutes
    assert main(argv + ["--epochs", "2"]) == 0
    final = json.loads((out / "final.json").read_text())
    assert final["knn_random_init"] == first["knn_random_init"] and final["epochs"] == 2
    assert final["minutes"] > 7.0 and final["loss"] is not None


def test_max_minutes_count_over_every_invocation(npz_dir, tmp_path, capsys):
    """--max_minutes is the run's budget, not each invocation's: a run that has spent it trains no further."""
    out = tmp_path / "run"
    argv = ["pretrain", "--dataset", "npz", "--data", str(npz_dir), "--out", str(out), "--max_minutes", "5", *TINY]
    assert main(argv + ["--epochs", "1"]) == 0
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    torch.save(dict(saved, minutes=6.0), out / "checkpoint.pt")
    before = _files(out)
    capsys.readouterr()
    assert main(argv + ["--epochs", "3"]) == 0
    assert "its --max_minutes 5.0 are spent" in capsys.readouterr().out
    assert _files(out) == before
    # a new run from that checkpoint has no time left either, and says so before its final kNN
    assert main([*argv[:6], str(tmp_path / "again"), *argv[7:], "--epochs", "3", "--resume", str(out / "checkpoint.pt")]) == 0
    assert "no training left (its --max_minutes 5.0 are spent" in capsys.readouterr().out


def test_resume_flag_yields_to_the_runs_own_newer_checkpoint(npz_dir, tmp_path, capsys):
    """``--out B --resume A/checkpoint.pt`` run again after B has progress of its own continues B, not A."""
    a, b = tmp_path / "a", tmp_path / "b"
    base = ["pretrain", "--dataset", "npz", "--data", str(npz_dir), *TINY]
    assert main(base + ["--out", str(a), "--epochs", "1"]) == 0
    command_b = base + ["--out", str(b), "--resume", str(a / "checkpoint.pt")]
    assert main(command_b + ["--epochs", "2"]) == 0
    capsys.readouterr()
    assert main(command_b + ["--epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert "has its own checkpoint" in out and f"resuming from {b / 'checkpoint.pt'}: epoch 2" in out
    steps = [r["step"] for r in map(json.loads, (b / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == sorted(set(steps))  # no step trained twice


def test_the_printed_resume_command_is_the_command_that_ran(monkeypatch, tmp_path):
    from ressl.resume import resume_command

    monkeypatch.setattr(sys, "argv", [".venv/bin/ressl", "pretrain", "--epochs", "20", "--data", "my photos"])
    assert resume_command(tmp_path) == f"run the same command again: .venv/bin/ressl pretrain --epochs 20 --data 'my photos' --out {tmp_path}"
    monkeypatch.setattr(sys, "argv", ["/src/ressl/__main__.py", "pretrain", "--out=runs/x"])  # python -m ressl
    assert resume_command(tmp_path) == f"run the same command again: {shlex.join([sys.executable])} -m ressl pretrain --out=runs/x"
    monkeypatch.setattr(sys, "argv", ["my_script.py"])  # the Python API
    assert resume_command(tmp_path) == f"call ressl.train.pretrain again with the same configuration and out={str(tmp_path)!r}"


def test_non_finite_loss_before_any_checkpoint_says_none_was_written(npz_dir, tmp_path, capsys):
    argv = ["pretrain", "--dataset", "npz", "--data", str(npz_dir), "--out", str(tmp_path / "run"), "--log_every", "1",
            "--epochs", "1", "--lr", "1e30", *TINY]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "NaN or infinite" in err and "no checkpoint had been written yet" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_checkpoints_get_the_mode_of_any_new_file(tmp_path):
    """Not mkstemp's private 0600: with umask 022 a checkpoint is 0644, as the run's other files are."""
    import os

    previous = os.umask(0o022)
    try:
        path = tmp_path / "checkpoint.pt"
        checkpoint.save_atomic({"model": {"w": torch.ones(1)}, "config": {}}, path)
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


def test_resuming_with_fewer_epochs_than_done_is_refused(npz_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["pretrain", "--dataset", "npz", "--data", str(npz_dir), "--out", str(out), *TINY]
    assert main(argv + ["--epochs", "2"]) == 0
    before = _files(out)
    capsys.readouterr()
    assert main(argv + ["--epochs", "1"]) == 2
    assert "is at epoch 2 (+0 steps), past --epochs 1: pass --epochs 2 or more" in capsys.readouterr().err
    assert _files(out) == before
    # a checkpoint one step into epoch 2 (a run stopped there) is past --epochs 1 too: it would not train back
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    torch.save(dict(saved, state=dict(saved["state"], epoch=1, index=1, step=5)), out / "checkpoint.pt")
    before = _files(out)
    assert main(argv + ["--epochs", "1"]) == 2
    assert "is at epoch 1 (+1 steps), past --epochs 1: pass --epochs 2 or more" in capsys.readouterr().err
    assert _files(out) == before


def test_records_logged_after_the_checkpoint_are_not_kept_twice(npz_dir, tmp_path):
    """A run killed after logging steps its checkpoint does not hold retrains them: each step keeps one record."""
    out = tmp_path / "run"
    argv = ["pretrain", "--dataset", "npz", "--data", str(npz_dir), "--out", str(out), "--log_every", "1", *TINY]
    assert main(argv + ["--epochs", "1"]) == 0  # checkpoint at step 4
    with (out / "metrics.jsonl").open("a") as f:  # what a killed process had logged past it, the last line torn
        f.writelines(json.dumps({"step": s, "epoch": 1, "loss": 99.0}) + "\n" for s in (5, 6))
        f.write('{"step": 7, "epo')
    assert main(argv + ["--epochs", "2"]) == 0
    logged = losses(out)
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, 9)) and 99.0 not in logged.values()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_output_that_cannot_be_written_is_said_so_once_and_then_goes_nowhere():
    """stdout on a full disk (/dev/full: every write fails with ENOSPC): ``say`` answers False instead of raising in
    the middle of a run, and keeps answering so (a run told at its set-up stops at its first line); what follows goes
    nowhere (a plain ``print`` too), and the process exits cleanly."""
    script = ("from ressl.progress import say; import sys; print(say('a', flush=True), say('b', flush=True), file=sys.stderr); "
              "print('c', flush=True)")
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-c", script], stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "False False\n", done.stderr


@pytest.mark.slow
def test_a_closed_stdout_stops_the_run_with_a_checkpoint(npz_dir, tmp_path):
    """``ressl pretrain ... | head -2``: when the reader goes away, the run stops as on Ctrl-C, checkpoint saved."""
    out = tmp_path / "run"
    proc = subprocess.Popen(command(npz_dir, out, "--checkpoint_every", "0", "--epochs", "50"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()  # the header
    proc.stdout.close()  # the reader leaves
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "BrokenPipeError" not in err and "checkpoint saved" in err
    state = torch.load(out / "checkpoint.pt", weights_only=True)["state"]
    assert 0 < state["step"] < 50 * 4


def test_a_budget_spent_during_an_epochs_end_is_recorded(npz_dir, tmp_path, monkeypatch, capsys):
    """When the time runs out during the epoch-end kNN, after the epoch's checkpoint, a re-run still finds the
    budget spent (the checkpoint is written again), and trains nothing."""
    import time as real_time

    import ressl.train

    offset = [0.0]

    class Clock:  # the wall clock as ressl.train reads it, moved forward by the slow kNN below
        perf_counter = staticmethod(real_time.perf_counter)

        @staticmethod
        def time() -> float:
            return real_time.time() + offset[0]

    out = tmp_path / "run"
    argv = ["pretrain", "--dataset", "npz", "--data", str(npz_dir), "--out", str(out), "--epochs", "5",
            "--max_minutes", "1", "--knn_every", "1", *TINY]
    evaluate = ressl.train.evaluate_knn

    def slow_knn(run, subset=None):  # the first epoch-end check takes the rest of the minute
        if run.state.epoch == 1 and subset is not None:
            offset[0] += 61
        return evaluate(run, subset)

    monkeypatch.setattr(ressl.train, "time", Clock)
    monkeypatch.setattr(ressl.train, "evaluate_knn", slow_knn)
    assert main(argv) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["state"]["epoch"] == 1
    before = _files(out)
    capsys.readouterr()
    assert main(argv) == 0
    assert "already complete (its --max_minutes 1.0 are spent, step 4)" in capsys.readouterr().out
    assert _files(out) == before


def test_a_resume_onto_a_training_set_of_another_size_restarts_the_epoch(npz_dir, tmp_path, capsys):
    """Images deleted from (or added to) the data since the checkpoint: the place inside the epoch means nothing in
    the new order, so the epoch starts over at the step the new size gives, and the run trains on to its end."""
    import numpy as np

    from ressl.resume import save_checkpoint
    from ressl.train import train_one_epoch

    out = tmp_path / "run"
    flags = ["--dataset", "npz", "--data", str(npz_dir), "--out", str(out), *TINY, "--epochs", "2", "--log_every", "1"]
    run = run_of_flags(flags)
    assert run.steps_per_epoch == 4  # 128 images, batch 32
    train_one_epoch(run)
    train_one_epoch(run, deadline=time.time() - 1)  # one step into epoch 2, then out of time
    save_checkpoint(run)
    assert (run.state.epoch, run.state.index, run.state.step) == (1, 1, 5)
    with np.load(npz_dir / "train.npz") as arrays:
        np.savez(npz_dir / "train.npz", x=arrays["x"][:96], y=arrays["y"][:96])  # 32 images deleted: 3 steps per epoch
    capsys.readouterr()
    assert main(["pretrain", *flags]) == 0
    printed = capsys.readouterr().out
    assert "written with 128 training images, the data now holds 96: epoch 2 starts over, at step 3" in printed
    state = checkpoint.load(out / "checkpoint.pt")["state"]
    assert (state["epoch"], state["index"], state["step"]) == (2, 0, 6)
    assert json.loads((out / "final.json").read_text())["steps"] == 6


def test_an_older_checkpoint_whose_place_the_smaller_training_set_lacks_restarts_the_epoch(npz_dir, tmp_path, capsys):
    """A checkpoint written before the training set's size was saved with it: a set that lost images shows only where
    the place inside the epoch no longer exists, as index 3 (the old epoch's last step) in an epoch of 3 steps (0-2):
    the epoch starts over there too."""
    from test_train import tiny_run

    from ressl.resume import save_checkpoint

    run = tiny_run(npz_dir, tmp_path, epochs=2)
    run.state.epoch, run.state.index, run.state.step = 1, 3, 7  # before the last of epoch 2's 4 steps
    save_checkpoint(run)
    saved = torch.load(run.out / "checkpoint.pt", weights_only=True)
    del saved["train_images"]  # as an older ressl wrote it
    torch.save(saved, run.out / "checkpoint.pt")
    with np.load(npz_dir / "train.npz") as arrays:
        np.savez(npz_dir / "train.npz", x=arrays["x"][:96], y=arrays["y"][:96])  # 3 steps per epoch
    capsys.readouterr()
    resumed = tiny_run(npz_dir, tmp_path, epochs=2)
    assert (resumed.state.epoch, resumed.state.index, resumed.state.step) == (1, 0, 3)
    assert "with another number of training images, the data now holds 96: epoch 2 starts over, at step 3" in (
        capsys.readouterr().out)


def test_files_unreadable_during_training_stop_it_in_one_line_with_a_checkpoint(tmp_path, monkeypatch, capsys):
    """Images that break after the scan stop the run with the loader worker's own message, not its traceback; a
    checkpoint is saved first, and deleting the files and re-running the command trains the run to its end."""
    from PIL import Image

    import ressl.train

    data = tmp_path / "photos"
    for c in range(2):
        (data / f"class{c}").mkdir(parents=True)
        for i in range(32):
            Image.new("RGB", (16, 16), (200 * c, 40 + i, 90)).save(data / f"class{c}" / f"{i:02d}.png")
    broken = [data / "class0" / f"{i:02d}.png" for i in (3, 17)] + [data / "class1" / "30.png"]
    setup = ressl.train.setup

    def setup_then_break_files(cfg):  # after the scan has found every file readable
        run = setup(cfg)
        for path in broken:
            path.write_text("not an image any more")
        return run

    monkeypatch.setattr(ressl.train, "setup", setup_then_break_files)
    out = tmp_path / "run"
    argv = ["pretrain", "--dataset", "folder", "--data", str(data), "--out", str(out), *TINY, "--workers", "2", "--epochs", "2",
            "--hold_in_memory", "false"]  # read by the loader workers every epoch (held in memory, they could not break)
    assert main(argv) == 2
    stderr = capsys.readouterr().err
    err = stderr.replace("\r", "\n").strip().splitlines()[-1]  # after the progress bar's last state
    assert err.startswith("ressl pretrain: error: ") and "Traceback" not in stderr and "Caught" not in stderr, stderr
    assert "failed to load" in err and "a checkpoint was saved at step" in err
    assert (out / "checkpoint.pt").exists()
    monkeypatch.setattr(ressl.train, "setup", setup)
    for path in broken:
        path.unlink()
    assert main(argv) == 0
    assert checkpoint.load(out / "checkpoint.pt")["state"]["epoch"] == 2


def test_a_graphed_runs_checkpoint_holds_its_learning_rate_as_a_number(npz_dir, tmp_path, capsys):
    """A CUDA graph's run keeps the learning rate in a 0-dim device tensor, which a machine without that device
    could not load: the checkpoint holds the number, and the run resumes from it (here the graph's body runs
    eagerly on a CPU, its learning rate a tensor as on a GPU)."""
    from ressl.resume import save_checkpoint
    from ressl.train import capture_network_step, train_one_epoch

    out = tmp_path / "run"
    flags = ["--dataset", "npz", "--data", str(npz_dir), "--out", str(out), *TINY, "--epochs", "2", "--log_every", "1"]
    run = run_of_flags(flags)
    run.graph = capture_network_step(run)
    train_one_epoch(run)
    assert all(isinstance(g["lr"], torch.Tensor) for g in run.optimizer.param_groups)
    save_checkpoint(run)
    groups = torch.load(out / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [type(g["lr"]) for g in groups] == [float] * len(groups)
    assert [g["lr"] for g in groups] == [float(g["lr"]) for g in run.optimizer.param_groups] and groups[0]["lr"] > 0
    capsys.readouterr()
    assert main(["pretrain", *flags]) == 0 and "resuming from" in capsys.readouterr().out
