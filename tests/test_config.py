import dataclasses
import re

import pytest
import torch

from ressl import config
from ressl.config import ConfigError


def test_every_preset_resolves():
    names = config.preset_names()
    assert {"cifar10", "cifar100", "stl10", "tinyimagenet", "imagenet", "cifar10-cpu", "digits"} <= set(names)
    for name in names:
        config.resolve(name, {})


def test_download_is_refused_for_every_set_torchvision_does_not_fetch():
    """--download would be ignored there (a folder, arrays, ImageNet's own files): refused, naming the sets it fetches."""
    for dataset in config.DATASETS:
        values = {"dataset": dataset, "download": True}
        if dataset in config.DOWNLOADABLE:
            assert config.resolve(None, values).download
        else:
            with pytest.raises(ConfigError, match=f"^--download fetches cifar10, cifar100, stl10 only .*, not {dataset}: "):
                config.resolve(None, values)


def test_paper_defaults_in_presets():
    c = config.resolve("cifar10", {})
    assert (c.backbone, c.image_size, c.queue_size, c.ema_momentum, c.batch_size, c.epochs) == ("resnet18", 32, 4096, 0.99, 256, 200)
    assert (c.student_temperature, c.teacher_temperature) == (0.1, 0.04)
    i = config.resolve("imagenet", {})
    assert (i.backbone, i.image_size, i.queue_size, i.ema_momentum, i.lr, i.warmup_epochs) == ("resnet50", 224, 131072, 0.999, 0.05, 5)


def test_the_stem_of_each_preset_is_the_official_codes():
    """3x3/1 stem everywhere below ImageNet; its max-pool dropped for CIFAR, kept for STL-10 and Tiny-ImageNet."""
    from ressl.model import model_from_config

    for name, small, pooled in [("cifar10", True, False), ("cifar100", True, False), ("stl10", True, True),
                                ("tinyimagenet", True, True), ("imagenet", False, True)]:
        net = model_from_config(config.resolve(name, {"width": 8, "hidden_dim": 16})).student.backbone
        assert (net.conv1.kernel_size == (3, 3), not isinstance(net.maxpool, torch.nn.Identity)) == (small, pooled), name


def test_command_line_strings_are_typed():
    c = config.resolve("cifar10", {"epochs": "3", "lr": "0.1", "head_bn": "true", "small_stem": "none"})
    assert c.epochs == 3 and c.lr == 0.1 and c.head_bn is True and c.small_stem is None


@pytest.mark.parametrize(
    "preset,values,match",
    [
        ("nope", {}, "unknown preset"),
        ("cifar10", {"epoch": 3}, "did you mean 'epochs'"),
        ("cifar10", {"epochs": "three"}, "epochs must be an integer"),
        ("cifar10", {"lr": "fast"}, "lr must be a number"),
        ("cifar10", {"queue_size": 1000}, "queue_size 1000 is not a multiple"),
        ("cifar10", {"image_size": 4}, "too small"),
        ("imagenet", {"image_size": 16, "small_stem": "false"}, "too small"),
        ("stl10", {"image_size": 8}, "too small .* or use --stem_maxpool false"),  # its max-pool halves them once more
        ("cifar10", {"teacher_temperature": 0}, "must be positive"),
        ("cifar10", {"augment_backend": "pil"}, "augment_backend must be batched or torchvision"),
        ("cifar10", {"augment_steps": 0}, "augment_steps must be at least 1"),
    ],
)
def test_bad_values_are_one_line_errors(preset, values, match):
    with pytest.raises(ConfigError, match=match) as err:
        config.resolve(preset, values)
    assert "\n" not in str(err.value)


def test_round_trip_through_saved_dict(tmp_path):
    c = config.resolve("cifar10", {"epochs": 7})
    config.save(c, tmp_path / "config.yaml")
    import yaml

    assert config.from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text())) == c


@pytest.mark.parametrize(
    "values,match",
    [
        ({"weight_decay": -1}, "weight_decay must be 0 or more"),
        ({"warmup_epochs": -3}, "warmup_epochs must be 0 or more"),
        ({"max_minutes": -1}, "max_minutes must be 0 or more"),
        ({"checkpoint_every": -5}, "checkpoint_every must be 0 or more"),
        ({"knn_every": -1}, "knn_every must be 0 or more"),
        ({"knn_subset": 0}, "knn_subset must be positive"),
        ({"max_bad_fraction": 5}, r"max_bad_fraction must be in \[0, 1\]"),
        ({"max_bad_fraction": -0.1}, r"max_bad_fraction must be in \[0, 1\]"),
        ({"workers": -1}, "workers must be 0 or more"),
        ({"seed": -1}, "seed must be 0 or more"),
        ({"sgd_momentum": -1}, r"sgd_momentum must be in \[0, 1\)"),
        ({"sgd_momentum": 1}, r"sgd_momentum must be in \[0, 1\)"),
        ({"device": "gpu"}, "device must be auto, cpu, cuda or cuda:N"),
        ({"device": "cuda:x"}, "device must be auto, cpu, cuda or cuda:N"),
        ({"lr": "nan"}, "lr must be a finite number"),
        ({"max_minutes": "inf"}, "max_minutes must be a finite number or none"),
    ],
)
def test_out_of_range_values_are_one_line_errors(values, match):
    with pytest.raises(ConfigError, match=match) as err:
        config.resolve("digits", values)
    assert "\n" not in str(err.value)


def test_zero_and_none_keep_their_meanings():
    c = config.resolve("digits", {"max_minutes": "none", "checkpoint_every": 0, "knn_every": 0, "sgd_momentum": 0,
                                  "weight_decay": 0, "warmup_epochs": 0, "workers": 0, "max_bad_fraction": 1})
    assert c.max_minutes is None and c.checkpoint_every == 0 and c.knn_every == 0 and c.sgd_momentum == 0
    assert config.resolve("digits", {"max_minutes": 0}).max_minutes == 0
    for device in ("auto", "cpu", "cuda", "cuda:1"):  # parsed only: no GPU is needed to resolve
        assert config.resolve("digits", {"device": device}).device == device


def test_relative_data_and_resume_are_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = config.resolve(None, {"dataset": "npz", "data": "../data/split", "resume": "run/checkpoint.pt"})
    assert c.data == str((tmp_path.parent / "data" / "split").resolve())
    assert c.resume == str((tmp_path / "run" / "checkpoint.pt").resolve())
    assert config.resolve("digits", {}).data is None and config.resolve("digits", {}).resume is None
    config.save(c, tmp_path / "config.yaml")
    import yaml

    assert config.from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text())) == c


def test_check_output(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is an existing file, not a directory"):
        config.check_output(tmp_path / "file", "--out")
    with pytest.raises(ConfigError, match="is a directory: give a file name"):
        config.check_output(tmp_path, "--out", file_example="backbone.safetensors")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        config.check_output(tmp_path / "file" / "deeper" / "x.npy", "--out", file_example="x.npy")
    assert config.check_output(tmp_path / "new" / "run", "--out") == tmp_path / "new" / "run"  # parents are made later
    (tmp_path / "old.npy").write_text("x")
    assert config.check_output(tmp_path / "old.npy", "--out", file_example="x.npy") == tmp_path / "old.npy"  # overwritten
    with pytest.raises(ConfigError, match="exists and is not a .npy file: it would be overwritten"):
        config.check_output(tmp_path / "file", "--out", file_example="x.npy")


@pytest.mark.parametrize("values,message", [
    ({"batch_size": 1, "queue_size": 64}, "gives 1 image to each BatchNorm: it needs at least 2"),
    ({"batch_size": 64, "bn_groups": 64}, "gives 1 image to each BatchNorm group (bn_groups 64)"),
    ({"batch_size": 64, "student_bn_groups": 64}, "gives 1 image to each BatchNorm group (student_bn_groups 64)"),
    ({"batch_size": 64, "student_bn_groups": 3}, "student_bn_groups 3 must be at least 1 and divide the per-process batch 64"),
    ({"seed": 2**32}, "seed must be below 2**32"),
    ({"device": "cpu:1"}, "device must be auto, cpu, cuda or cuda:N"),
    ({"device": "mps"}, "device must be auto, cpu, cuda or cuda:N"),
    ({"data": "/tmp"}, "dataset digits is scikit-learn's embedded set and reads no --data"),  # the demo's recipe on them
])
def test_values_that_would_fail_mid_run_are_refused_up_front(values, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.resolve("digits", values)


def test_bn_groups_is_refused_where_shuffle_bn_already_runs_across_processes():
    cfg = config.resolve("digits", {"bn_groups": 2})
    config.validate(cfg, world_size=1)
    with pytest.raises(ConfigError, match="emulates shuffle-BN on one device"):
        config.validate(cfg, world_size=2)
    config.validate(config.resolve("digits", {"bn_groups": 2, "teacher_bn": "local"}), world_size=2)


@pytest.mark.parametrize("name", ["bn_groups", "student_bn_groups"])
def test_bn_groups_are_refused_beside_sync_batchnorm_across_processes(name):
    cfg = config.resolve("digits", {name: 2, "teacher_bn": "sync"})
    config.validate(cfg, world_size=1)  # in one process sync BatchNorm is a plain one
    with pytest.raises(ConfigError, match=f"{name} 2 normalises groups of each process's batch apart; --teacher_bn sync"):
        config.validate(cfg, world_size=2)
    config.validate(config.resolve("digits", {name: 2, "teacher_bn": "local"}), world_size=2)  # groups per process


def test_out_expands_the_home_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert config.resolve("digits", {"out": "~/runs/x"}).out == str(tmp_path / "runs" / "x")


def test_an_unknown_dataset_name_is_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown dataset 'cifar' \(did you mean cifar10\?\)"):
        config.resolve(None, {"dataset": "cifar"})
    with pytest.raises(ConfigError, match="unknown dataset 'nope'; choose one of digits"):
        config.resolve(None, {"dataset": "nope", "data": "photos"})


def test_a_yaml_file_is_a_preset_and_a_runs_config_yaml_repeats_the_run(tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text("lr: 0.1\nepochs: 3\n")
    cfg = config.resolve(str(own), {"epochs": 5})
    assert (cfg.lr, cfg.epochs) == (0.1, 5)  # flags still override
    run = config.resolve("cifar10-cpu", {"data": str(tmp_path), "out": str(tmp_path / "run"), "seed": 3})
    config.save(run, tmp_path / "config.yaml")
    again = config.resolve(str(tmp_path / "config.yaml"), {})
    assert again.out is None and dataclasses.replace(again, out=run.out) == run  # everything but where it lives


@pytest.mark.parametrize("text,message", [
    ("lr: [0.1", "cannot read preset file"),
    ("- lr\n- 0.1\n", "must hold 'field: value' lines, found a list"),
    ("learning_rate: 0.1\n", "unknown field 'learning_rate' in preset file"),
])
def test_bad_preset_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.resolve(str(path), {})
    with pytest.raises(ConfigError, match="does not exist"):
        config.resolve(str(tmp_path / "missing.yaml"), {})


def test_every_field_says_what_it_is_for_the_help():
    """``ressl pretrain --help`` shows each field's comment in Config: none may lack one, continuation lines join."""
    notes = config.field_notes()
    assert set(notes) == set(config.FIELDS)
    assert notes["augment_steps"].endswith("those steps share the jitter order (jitter_order batch)")


def test_the_backbones_a_configuration_may_name_are_those_the_model_builds():
    from ressl.model import BACKBONES

    assert sorted(config.CHOICES["backbone"]) == sorted(BACKBONES)
