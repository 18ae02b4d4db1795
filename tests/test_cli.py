"""The command line end to end, in subprocesses as a user runs it."""

import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

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
    assert "(or add --download)" in done.stderr  # read as the preset's cifar10 (a torchvision set), not as a folder


def test_a_preset_keeps_its_dataset_when_data_is_given(tmp_path, capsys):
    """--preset cifar10 --data DIR reads DIR as CIFAR-10 (npz arrays or torchvision's files), as the README's commands
    do; --data alone names the data by what the directory holds."""
    (tmp_path / "cifar10").mkdir()
    err = bad(["pretrain", "--preset", "cifar10", "--data", str(tmp_path / "cifar10")], capsys)
    assert "cifar10 not found in" in err and "--download" in err
    assert "no images found" in bad(["pretrain", "--data", str(tmp_path / "cifar10")], capsys)
    Image.new("RGB", (8, 8)).save(tmp_path / "cifar10" / "cat.png")  # a preset's dataset with a folder of one's own images
    err = bad(["pretrain", "--preset", "cifar10", "--data", str(tmp_path / "cifar10")], capsys)
    assert "holds image files: for your own images pass --dataset folder" in err and "--download" not in err
    err = bad(["pretrain", "--data", str(tmp_path / "cifar10"), "--download"], capsys)  # it would be ignored
    assert err.endswith("--download fetches cifar10, cifar100, stl10 only (pass --dataset or --preset with one of them), not "
                        "folder: otherwise leave out --download")


def test_data_of_a_preset_file_without_a_dataset_is_named_by_what_it_holds(tmp_path, capsys):
    """A preset file that names no dataset leaves it to the data, as --data alone does: npz arrays or a folder."""
    (tmp_path / "empty").mkdir()
    preset = tmp_path / "mine.yaml"
    preset.write_text("epochs: 1\n")
    assert "no images found" in bad(["pretrain", "--preset", str(preset), "--data", str(tmp_path / "empty")], capsys)
    preset.write_text(f"epochs: 1\ndata: {tmp_path / 'empty'}\n")
    assert "no images found" in bad(["pretrain", "--preset", str(preset)], capsys)
    (tmp_path / "empty" / "train.npz").write_bytes(b"")
    assert "train.npz is not a readable .npz file (an empty file)" in bad(["pretrain", "--preset", str(preset)], capsys)


def test_a_preset_files_out_and_resume_are_noted_as_unused(tmp_path, capsys, monkeypatch):
    """A preset file (e.g. a run's config.yaml) never sets where a run lives or what it continues: it says so,
    unless the flags set them."""
    monkeypatch.chdir(tmp_path)  # the default --out, runs/..., is never made: the data fails first
    (tmp_path / "empty").mkdir()
    preset = tmp_path / "mine.yaml"
    old, ckpt = tmp_path / "old", tmp_path / "old" / "checkpoint.pt"
    preset.write_text(f"data: {tmp_path / 'empty'}\nout: {old}\nresume: {ckpt}\n")
    assert main(["pretrain", "--preset", str(preset)]) == 2
    said, err = capsys.readouterr()
    assert "no images found" in err
    assert f"note: {preset} sets out: {old} and resume: {ckpt}, which a preset file never does" in said
    assert "this run goes to runs/folder-" in said
    assert main(["pretrain", "--preset", str(preset), "--out", str(tmp_path / "new")]) == 2
    assert f"note: {preset} sets resume: {ckpt}, which" in capsys.readouterr().out
    assert main(["pretrain", "--preset", str(preset), "--out", str(tmp_path / "new"), "--resume", str(ckpt)]) == 2
    assert "note" not in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


def bad(argv, capsys, code: int = 2) -> str:
    assert main(argv) == code
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


def parse_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("variable", ["LOCAL_RANK", "SLURM_LOCALID"])
def test_only_the_first_process_of_a_machine_reports_a_user_mistake(variable, monkeypatch, capsys):
    """Under torchrun or srun every process makes the same mistake: the machine's first reports it, the others
    exit with the same code in silence (a terminal shows it once, not once per GPU)."""
    monkeypatch.setenv(variable, "1")
    assert main(["pretrain", "--queue_size", "100"]) == 2
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "--epoch", "3"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(variable, "0")
    assert "not a multiple" in bad(["pretrain", "--queue_size", "100"], capsys)
    assert "did you mean --epochs?" in parse_error(["pretrain", "--epoch", "3"], capsys)


def test_flag_of_another_subcommand_is_named_as_such(capsys):
    err = parse_error(["pretrain", "--checkpoint", "x"], capsys)
    assert err.startswith("ressl pretrain: error: unrecognized arguments: --checkpoint x")
    assert "--checkpoint is a flag of ressl knn, linear, export and embed" in err and "did you mean" not in err
    assert err.endswith("see ressl pretrain --help")
    err = parse_error(["knn", "--checkpoint", "x", "--epochs", "3"], capsys)
    assert "--epochs is a flag of ressl pretrain and linear" in err and err.startswith("ressl knn: error:")


def test_suggestions_come_from_the_subcommands_own_flags(capsys):
    assert "did you mean --temperature?" in parse_error(["knn", "--checkpoint", "x", "--temprature", "1"], capsys)
    assert "--max_points" not in parse_error(["knn", "--checkpoint", "x", "--max_point", "5"], capsys)  # report's flag


def test_common_slips_in_evaluation_commands_are_named(capsys):
    err = parse_error(["knn", "runs/c10/checkpoint.pt"], capsys)
    assert "required: --checkpoint (give the checkpoint with its flag: --checkpoint runs/c10/checkpoint.pt)" in err
    assert "give the checkpoint" not in parse_error(["knn", "--data", "d"], capsys)
    assert "give the checkpoint" not in parse_error(["export", "--out", "backbone.pt"], capsys)  # a flag's value
    err = parse_error(["embed", "--checkpoint", "x.pt", "--split", "val", "--out", "f.npy"], capsys)
    assert "invalid choice 'val' (a val/ folder, like test/ or test.npz, is the test split: --split test)" in err


def test_a_mistyped_required_flag_is_named_beside_the_one_missing(capsys):
    err = parse_error(["knn", "--checkpont", "runs/c10/checkpoint.pt"], capsys)
    assert "required: --checkpoint (--checkpont: did you mean --checkpoint?)" in err
    err = parse_error(["export", "--checkpoint", "a.pt", "--ot=b.safetensors"], capsys)
    assert "required: --out (--ot: did you mean --out?)" in err
    assert "did you mean" not in parse_error(["knn", "--zebra", "1"], capsys)  # unknown, and like no required flag


def test_mistyped_command_is_suggested(capsys):
    err = parse_error(["pretrian"], capsys)
    assert "unknown command 'pretrian' (did you mean pretrain?)" in err and "see ressl --help" in err


def test_version_and_help_texts(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == "ressl 0.1.0"
    with pytest.raises(SystemExit):
        main(["knn", "--help"])
    assert "Weighted kNN accuracy" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the digits demo preset applies" in text
    assert "--epochs VALUE the paper's schedule for its headline tables. int, default 200 (digits demo: 100)" in text
    assert "--width VALUE channels of the first stage;" in text and "int, default 64 (digits demo: 16)" in text
    assert "--teacher_temperature VALUE sharper teacher relation (paper, Sec. 4). float, default 0.04" in text


@pytest.mark.parametrize("argv,message", [
    (["pretrain", "--device", "gpu"], "device must be auto, cpu, cuda or cuda:N"),
    (["pretrain", "--sgd_momentum", "-1"], "sgd_momentum must be in [0, 1)"),
    (["pretrain", "--max_bad_fraction", "5"], "max_bad_fraction must be in [0, 1]"),
    (["pretrain", "--knn_subset", "0"], "knn_subset must be positive"),
    (["knn", "--checkpoint", "nowhere.pt", "--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["knn", "--checkpoint", "nowhere.pt", "--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    (["knn", "--checkpoint", "nowhere.pt", "--k", "0"], "--k must be at least 1, got 0"),
    (["knn", "--checkpoint", "nowhere.pt", "--temperature", "0"], "--temperature must be positive"),
    (["knn", "--checkpoint", "nowhere.pt", "--workers", "-1"], "--workers must be at least 0"),
    (["linear", "--checkpoint", "nowhere.pt", "--lr", "-1"], "--lr must be positive"),
    (["linear", "--checkpoint", "nowhere.pt", "--epochs", "0"], "--epochs must be at least 1"),
    (["linear", "--checkpoint", "nowhere.pt", "--weight_decay", "-1"], "--weight_decay must be 0 or more"),
    (["linear", "--checkpoint", "nowhere.pt", "--crop_min_scale", "0"], "--crop_min_scale must be in (0, 1], got 0.0"),
    (["linear", "--checkpoint", "nowhere.pt", "--crop_min_scale", "0.2"], "--crop_min_scale sets the crops of --augment"),
    (["embed", "--checkpoint", "nowhere.pt", "--data", ".", "--out", "f.npy", "--batch_size", "0"], "--batch_size must be at least 1"),
    (["linear", "--checkpoint", "nowhere.pt", "--max_bad_fraction", "2"], "--max_bad_fraction must be in [0, 1], got 2.0"),
    (["knn", "--checkpoint", "nowhere.pt", "--max_bad_fraction", "-0.1"], "--max_bad_fraction must be in [0, 1], got -0.1"),
    (["report", "nowhere", "--device", "gpu"], "--device must be auto"),
    (["pretrain", "--resume", "nowhere.pt"], "pass a run's checkpoint, RUN_DIR/checkpoint.pt"),
])
def test_out_of_range_flags_exit_2(argv, message, capsys):
    assert message in bad(argv, capsys)


def test_unusable_paths_are_one_line_errors(tmp_path, capsys):
    existing = tmp_path / "notes.txt"
    existing.write_text("x")
    assert "is an existing file, not a directory" in bad(["pretrain", "--out", str(existing)], capsys)
    assert "is a directory: give a file name" in bad(["export", "--checkpoint", "nowhere.pt", "--out", str(tmp_path)], capsys)
    assert "is a file, not a directory" in bad(["export", "--checkpoint", "nowhere.pt", "--out", str(existing / "b.safetensors")], capsys)
    assert "is a directory: give a file name" in bad(["embed", "--checkpoint", "nowhere.pt", "--data", ".", "--out", str(tmp_path)], capsys)
    err = bad(["knn", "--checkpoint", str(tmp_path)], capsys)
    assert "is a directory: pass the checkpoint.pt inside it" in err
    err = bad(["pretrain", "--resume", str(tmp_path)], capsys)
    assert "is a directory" in err and "--checkpoint" not in err  # pretrain has no --checkpoint


@pytest.fixture
def untrained_checkpoint(npz_dir, tmp_path, monkeypatch):
    """A checkpoint of an untrained tiny model whose run kept its own kNN settings and a relative --data."""
    from ressl import config
    from ressl.model import model_from_config

    monkeypatch.chdir(npz_dir.parent)
    cfg = config.resolve(None, {"dataset": "npz", "data": npz_dir.name, "image_size": 16, "width": 8, "hidden_dim": 32,
                                "out_dim": 16, "batch_size": 32, "queue_size": 64, "knn_k": 7, "knn_temperature": 0.2,
                                "precision": "fp32", "workers": 0})
    model = model_from_config(cfg)
    path = tmp_path / "run" / "checkpoint.pt"
    path.parent.mkdir()
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # another working directory: the stored --data must still be found
    return path


def test_export_and_embed_never_overwrite_a_runs_own_files(untrained_checkpoint, capsys):
    """--out naming the checkpoint (or any existing file of another kind) is refused; the file is untouched."""
    run = untrained_checkpoint.parent
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    ck = str(untrained_checkpoint)
    assert "exists and is not a .safetensors file" in bad(["export", "--checkpoint", ck, "--out", ck], capsys)
    assert "exists and is not a .npy file" in bad(["embed", "--checkpoint", ck, "--data", ".", "--out", str(run / "metrics.jsonl")], capsys)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    out = run / "backbone.safetensors"
    for _ in range(2):  # an existing export is replaced, as asked
        assert main(["export", "--checkpoint", ck, "--out", str(out)]) == 0
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask  # shared as the user's other files are, not 0600


def test_a_checkpoint_whose_weights_do_not_fit_its_configuration_is_one_line(untrained_checkpoint, tmp_path, capsys):
    saved = torch.load(untrained_checkpoint, weights_only=True)
    saved["config"]["width"] = 16  # as if edited by hand
    edited = tmp_path / "edited.pt"
    torch.save(saved, edited)
    err = bad(["knn", "--checkpoint", str(edited)], capsys)
    assert "its weights do not fit its own configuration (Error(s) in loading state_dict for ReSSL: size mismatch for" in err
    assert "do not fit" in bad(["export", "--checkpoint", str(edited), "--out", str(tmp_path / "b.safetensors")], capsys)
    saved["config"]["widht"] = saved["config"].pop("width")  # a field this version does not know: the file is named
    torch.save(saved, edited)
    assert bad(["knn", "--checkpoint", str(edited)], capsys).startswith(f"ressl knn: error: {edited}: unknown field 'widht'")


def test_knn_defaults_to_the_runs_own_k_and_temperature(untrained_checkpoint, capsys):
    from ressl.evaluate import evaluate_checkpoint

    common = ["knn", "--checkpoint", str(untrained_checkpoint), "--device", "cpu", "--workers", "0"]
    assert main(common) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("knn (k 7, temperature 0.2): top-1")
    result = json.loads(lines[-1])
    assert (result["k"], result["temperature"]) == (7, 0.2)
    expected = evaluate_checkpoint(str(untrained_checkpoint), "knn", device="cpu", workers=0, k=7, temperature=0.2)
    assert result == pytest.approx({**expected, "temperature": 0.2})  # top-1 alone: 4 classes have no top-5
    assert main([*common, "--k", "3"]) == 0  # a flag overrides the run's value
    assert capsys.readouterr().out.strip().splitlines()[-2].startswith("knn (k 3, temperature 0.2)")


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
    assert re.search(r"epoch 2/2  loss \d+\.\d{4}  ", capsys.readouterr().out)
    evaluate = ["--checkpoint", str(out / "checkpoint.pt"), "--workers", "0", "--device", "cpu"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["knn", *evaluate]) == 0  # the run's max_bad_fraction, 0.1
        assert main(["knn", *evaluate, "--max_bad_fraction", "0"]) == 2  # or the one given
        assert "max_bad_fraction" in capsys.readouterr().err
        assert main(["embed", *evaluate, "--out", str(tmp_path / "f.npy"), "--max_bad_fraction", "0"]) == 2  # embed too
        assert "max_bad_fraction" in capsys.readouterr().err
        assert main(["embed", *evaluate, "--out", str(tmp_path / "f.npy"), "--max_bad_fraction", "0.2"]) == 0


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
def test_a_run_shorter_than_its_warm_up_or_its_queue_says_so(npz_dir, tmp_path, capsys):
    """A one-epoch trial of a paper recipe (5 warm-up epochs) would never reach its learning rate, and a queue longer
    than the training set holds each image several times: each says so."""
    argv = ["pretrain", "--dataset", "npz", "--data", str(npz_dir), *TINY, "--epochs", "1"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    said = capsys.readouterr().out
    assert "--warmup_epochs 5 spans the whole run of 1 epoch," in said
    assert "queue" not in said
    assert main([*argv, "--out", str(tmp_path / "b"), "--warmup_epochs", "0.5", "--queue_size", "320"]) == 0
    said = capsys.readouterr().out
    assert "warmup_epochs" not in said
    assert "note: the queue (--queue_size 320) is longer than the training set (128 images), so it holds about 2.5 " in said


def test_linear_probe_with_augmentation(npz_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["pretrain", "--dataset", "npz", "--data", str(npz_dir), "--out", str(out), "--epochs", "1", *TINY]) == 0
    done = ressl("linear", "--checkpoint", str(out / "checkpoint.pt"), "--epochs", "3", "--augment")
    assert done.returncode == 0, done.stderr
    assert 0 <= json.loads(done.stdout.splitlines()[-1])["top1"] <= 100


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_resumes_and_its_checkpoint_takes_an_augmented_linear_probe(npz_dir, tmp_path):
    """On CUDA: a run continued from its checkpoint (whose random-number states must reach the CPU generators), and
    ``linear --augment`` on in-memory images kept on the device with their labels on the CPU."""
    out = tmp_path / "run"
    argv = ["pretrain", "--dataset", "npz", "--data", str(npz_dir), "--out", str(out), *TINY, "--device", "cuda"]
    assert main([*argv, "--epochs", "1"]) == 0
    assert main([*argv, "--epochs", "2"]) == 0
    assert json.loads((out / "final.json").read_text())["epochs"] == 2
    done = ressl("linear", "--checkpoint", str(out / "checkpoint.pt"), "--epochs", "2", "--augment", "--device", "cuda")
    assert done.returncode == 0, done.stderr
    assert 0 <= json.loads(done.stdout.splitlines()[-1])["top1"] <= 100


def test_under_a_launcher_export_is_written_once_and_report_is_refused(untrained_checkpoint, tmp_path, monkeypatch, capsys):
    """Started by torchrun on several processes: export (which joins no group) writes its file from rank 0 alone, and
    report, which runs in one process, says so instead of every process writing the same files."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    out = tmp_path / "backbone.safetensors"
    assert main(["export", "--checkpoint", str(untrained_checkpoint), "--out", str(out)]) == 0
    assert not out.exists() and capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["export", "--checkpoint", str(untrained_checkpoint), "--out", str(out)]) == 0
    assert out.exists()
    assert main(["report", str(untrained_checkpoint.parent)]) == 2
    assert "ressl report runs in one process" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no file can be created")
def test_export_to_an_unwritable_place_is_one_line(untrained_checkpoint, capsys):
    # check_output passes it (/proc is a directory); the write itself fails: exit 1, as every failed write
    err = bad(["export", "--checkpoint", str(untrained_checkpoint), "--out", "/proc/backbone.safetensors"], capsys, code=1)
    assert err.startswith("ressl export: error: could not write --out /proc/backbone.safetensors: ")
    assert err.endswith("; choose another --out")


def test_a_second_ctrl_c_says_whether_a_checkpoint_exists(tmp_path, monkeypatch, capsys):
    """KeyboardInterrupt (a second Ctrl-C) ends with a line that names the checkpoint only when there is one."""
    import ressl.train

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(ressl.train, "pretrain", interrupted)
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip().endswith("ressl pretrain: interrupted; no checkpoint was written yet")
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"")
    assert main(["pretrain", "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip().endswith(f"interrupted; the last checkpoint is {out / 'checkpoint.pt'}")


def test_data_without_dataset_is_named_after_what_it_holds(npz_dir, tmp_path):
    """--data alone: train.npz makes it an npz set, anything else a folder; never the digits' name and statistics."""
    import yaml

    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(npz_dir), "--out", str(out), "--epochs", "1", *TINY]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["dataset"] == "npz"


# Runs the command line with any import of torch raising KeyboardInterrupt, as a Ctrl-C during torch's seconds of
# import does: a command that needs no torch ends as usual, one that does must say "interrupted" (no traceback).
WITHOUT_TORCH = """
import sys
class CtrlCOnTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise KeyboardInterrupt
sys.meta_path.insert(0, CtrlCOnTorch())
from ressl.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("argv,code,said", [
    (["--help"], 0, "usage: ressl"),
    (["pretrain", "--help"], 0, "--queue_size"),
    (["pretrain", "--epochs", "0"], 2, "epochs must be positive, got 0"),
    (["pretrain", "--backbone", "resnet19"], 2, "backbone must be resnet18, resnet34 or resnet50, got 'resnet19'"),
    (["pretrain", "--preset", "cifar11"], 2, "unknown preset 'cifar11'"),
    (["pretrain", "--queu_size", "9"], 2, "did you mean --queue_size?"),
    (["knn", "--checkpoint", "c.pt", "--k", "0"], 2, "--k must be at least 1, got 0"),
    (["pretrain", "--out", "run"], 130, "ressl pretrain: interrupted; no checkpoint was written yet"),
    (["knn", "--checkpoint", "c.pt"], 130, "ressl knn: interrupted"),
])
def test_mistakes_are_said_before_torch_loads_and_a_ctrl_c_while_it_loads_is_an_interruption(argv, code, said, tmp_path):
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *argv], capture_output=True, text=True, cwd=tmp_path,
                          timeout=60)
    assert done.returncode == code, done.stderr
    assert said in done.stdout + done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()  # nothing was written before torch
