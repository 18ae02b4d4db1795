import pytest

from ressl import config
from ressl.config import ConfigError


def test_every_preset_resolves():
    names = config.preset_names()
    assert {"cifar10", "cifar100", "stl10", "tinyimagenet", "imagenet", "cifar10-cpu", "digits"} <= set(names)
    for name in names:
        config.resolve(name, {})


def test_paper_defaults_in_presets():
    c = config.resolve("cifar10", {})
    assert (c.backbone, c.image_size, c.queue_size, c.ema_momentum, c.batch_size, c.epochs) == ("resnet18", 32, 4096, 0.99, 256, 200)
    assert (c.student_temperature, c.teacher_temperature) == (0.1, 0.04)
    i = config.resolve("imagenet", {})
    assert (i.backbone, i.image_size, i.queue_size, i.ema_momentum, i.lr, i.warmup_epochs) == ("resnet50", 224, 131072, 0.999, 0.05, 5)


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
