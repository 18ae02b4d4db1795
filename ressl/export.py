"""Backbone export: the student's (or teacher's) ResNet alone, in torchvision's key names, as safetensors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ressl.checkpoint import new_file_mode, writing
from ressl.config import check_output
from ressl.evaluate import load_trained


def export_backbone(checkpoint_path: str, out: str | Path, teacher: bool = False) -> dict[str, str]:
    """Write the backbone of ``checkpoint_path`` to ``out`` (``.safetensors``); return its metadata.

    Keys are torchvision's (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...), with no ``module.``
    or ``backbone.`` prefix and no ``fc``: load it into ``torchvision.models.resnet18()`` after setting
    ``fc = nn.Identity()`` (and the small-image stem, without its max-pool, where the run used them: metadata
    ``small_stem`` and ``maxpool``). The run's configuration
    is stored as JSON in the file's metadata. An ``out`` that cannot be written raises :class:`ConfigError`
    before the checkpoint is read, or :class:`ressl.checkpoint.WriteError` when the write itself fails.
    """
    out = check_output(out, "--out", file_example="backbone.safetensors")  # before the (slow) load
    backbone, cfg, normalisation = load_trained(checkpoint_path, teacher)
    tensors = {k: v.detach().to(memory_format=torch.contiguous_format).contiguous().cpu() for k, v in backbone.state_dict().items()}
    metadata = {
        "format": "pt",
        "architecture": cfg.backbone,
        "width": str(cfg.width),
        "small_stem": str(backbone.conv1.kernel_size == (3, 3)).lower(),  # 3x3/1 instead of torchvision's 7x7/2
        "maxpool": str(not isinstance(backbone.maxpool, torch.nn.Identity)).lower(),
        "network": "teacher" if teacher else "student",
        "config": json.dumps(cfg.to_dict()),
    }
    if normalisation is not None:  # what inputs the backbone expects: (x / 255 - mean) / std per channel
        metadata.update(mean=json.dumps(list(normalisation[0])), std=json.dumps(list(normalisation[1])))
    with writing(f"--out {out}", "choose another --out"):
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out), metadata=metadata)
        os.chmod(out, new_file_mode())  # readable as the user's other files are (the writer may leave 0600)
    return metadata
