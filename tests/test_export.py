import json

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import tiny_run
from torch import nn

from ressl.cli import main
from ressl.resume import save_checkpoint


def test_export_loads_into_torchvision_strict_and_gives_the_same_features(npz_dir, tmp_path):
    run = tiny_run(npz_dir, tmp_path, width=64, hidden_dim=32, batch_size=64, queue_size=128)
    run.model.update_teacher(0.0)
    with torch.no_grad():
        for p in run.model.student.parameters():
            p.add_(0.01 * torch.randn_like(p))  # make student and teacher differ
    save_checkpoint(run)
    out = tmp_path / "backbone.safetensors"
    assert main(["export", "--checkpoint", str(run.out / "checkpoint.pt"), "--out", str(out)]) == 0

    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)  # the small-image stem
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    net.load_state_dict(load_file(out), strict=True)

    x = torch.randn(2, 3, 16, 16)
    ours = run.model.student.backbone.eval()
    torch.testing.assert_close(net.eval()(x), ours(x.contiguous(memory_format=torch.channels_last)), rtol=1e-4, atol=1e-5)
    try:  # timm (an optional extra) uses the same key names
        import timm
    except ImportError:
        pass
    else:
        other = timm.create_model("resnet18", num_classes=0, pretrained=False)
        other.conv1, other.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
        other.load_state_dict(load_file(out), strict=True)
        torch.testing.assert_close(other.eval()(x), net(x), rtol=1e-4, atol=1e-5)
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["network"] == "student" and meta["small_stem"] == "true" and meta["maxpool"] == "false"
    assert json.loads(meta["config"])["width"] == 64
    # the inputs it expects: normalised as the run's training images (x / 255 - mean) / std
    assert json.loads(meta["mean"]) == pytest.approx(list(run.dataset.mean))
    assert json.loads(meta["std"]) == pytest.approx(list(run.dataset.std))
    assert not any(k.startswith(("module.", "backbone.", "encoder.", "fc.")) for k in load_file(out))

    teacher_file = tmp_path / "teacher.safetensors"
    assert main(["export", "--checkpoint", str(run.out / "checkpoint.pt"), "--out", str(teacher_file), "--teacher"]) == 0
    teacher = load_file(teacher_file)
    assert not torch.equal(teacher["conv1.weight"], load_file(out)["conv1.weight"])
    torch.testing.assert_close(teacher["conv1.weight"], run.model.teacher.backbone.conv1.weight.contiguous())


def test_a_path_that_the_terminal_cannot_show_is_written_escaped_after_the_export(npz_dir, tmp_path, monkeypatch):
    """On a terminal whose encoding lacks a path's letters (an ASCII locale), the export's closing line shows them
    escaped instead of failing with a traceback after the file was written."""
    import io
    import sys

    run = tiny_run(npz_dir, tmp_path)
    save_checkpoint(run)
    out = tmp_path / "рун ü.safetensors"
    terminal = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", terminal)
    assert main(["export", "--checkpoint", str(run.out / "checkpoint.pt"), "--out", str(out)]) == 0
    terminal.flush()
    assert out.is_file() and "\\u0440\\u0443\\u043d \\xfc.safetensors" in terminal.buffer.getvalue().decode("ascii")
