"""Evaluation of frozen backbone features: weighted kNN and the linear probe."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ressl import dist
from ressl.data import PAD_LABEL
from ressl.schedule import cosine_lr

if TYPE_CHECKING:
    from ressl.config import Config


@torch.no_grad()
def extract_features(
    backbone: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features (N, F) in float32 and labels (N,) of every batch, in order.

    ``dtype`` (e.g. ``torch.bfloat16``) runs the backbone under autocast; the features are stored
    in float32. Under ``torchrun`` each rank extracts its own batches and the results are gathered.
    """
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for images, y in batches:
        with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            f = backbone(images.contiguous(memory_format=torch.channels_last))
        feats.append(f.float())
        labels.append(y)
    backbone.train(was_training)
    features, labels_all = dist.all_gather_cat(torch.cat(feats)), dist.all_gather_cat(torch.cat(labels))
    keep = labels_all != PAD_LABEL  # rows that only padded a process's share
    return features[keep], labels_all[keep]


def knn_scores(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
    k: int = 200, temperature: float = 0.1, chunk_size: int = 1024,
) -> torch.Tensor:
    """Weighted kNN class scores (M, C) of ``queries`` (M, F) against ``bank`` (N, F) with labels (N,).

    Features are L2-normalised; each of the ``k`` most similar bank entries votes for its class with
    weight ``exp(similarity / temperature)`` (Wu et al. 2018, the protocol of the paper's code).
    Queries go through in chunks so memory is O(chunk_size * N) whatever the number of queries.
    The bank may be kept in bf16/fp16 to halve its memory; similarities are accumulated by matmul.
    """
    bank = F.normalize(bank, dim=1)
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, queries.shape[0], chunk_size):
        q = F.normalize(queries[start : start + chunk_size], dim=1).to(bank.dtype)
        sim = (q @ bank.T).float()  # (m, N)
        top_sim, top_idx = sim.topk(k, dim=1)  # (m, k)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, bank_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Percent of rows of ``scores`` (M, C) whose label (M,) is among the top-k classes."""
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # (M, k)
    hits = ranked == labels[:, None]
    return {f"top{k}": 100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def knn_accuracy(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
    num_classes: int, k: int = 200, temperature: float = 0.1,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of the weighted kNN classifier."""
    return topk_accuracy(knn_scores(bank, bank_labels, queries, num_classes, k, temperature), query_labels)


def linear_probe(
    train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, test_labels: torch.Tensor,
    num_classes: int, epochs: int = 100, lr: float = 0.1, batch_size: int = 256, weight_decay: float = 0.0,
    seed: int = 0, progress: bool = False,
) -> dict[str, float]:
    """A linear classifier trained on frozen, cached features (F): SGD momentum 0.9, cosine decay.

    The paper's protocol (100 epochs, SGD, cosine) on features computed once, without augmentation:
    each epoch costs a matmul instead of a backbone pass. Features are standardised with the
    training set's mean and std first (a BatchNorm without affine, as MoCo v3's probe), which makes
    one learning rate work across backbones.
    """
    mean, std = train_features.mean(0), train_features.std(0).clamp_min(1e-6)
    x_train, x_test = (train_features - mean) / std, (test_features - mean) / std
    classifier = nn.Linear(x_train.shape[1], num_classes).to(x_train.device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(x_train.shape[0] / batch_size)
    total = epochs * steps_per_epoch
    epoch_iter: Iterable[int] = range(epochs)
    if progress:
        from tqdm import tqdm

        epoch_iter = tqdm(epoch_iter, desc="linear probe", unit="epoch", leave=False)
    step = 0
    for _ in epoch_iter:
        order = torch.randperm(x_train.shape[0], generator=generator).to(x_train.device)
        for start in range(0, x_train.shape[0], batch_size):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total, lr)
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(classifier(x_train[idx]), train_labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    with torch.no_grad():
        return topk_accuracy(classifier(x_test), test_labels)


# --- evaluating a checkpoint ------------------------------------------------------------------


def load_backbone(path: str, teacher: bool = False, device: torch.device | None = None) -> tuple[nn.Module, "Config"]:
    """The student's (or teacher's) backbone of a checkpoint, in eval mode, and the run's configuration."""
    from ressl import checkpoint, config
    from ressl.model import build_model

    state = checkpoint.load(path)
    cfg = config.from_dict(state["config"])
    model = build_model(cfg.backbone, cfg.image_size, cfg.width, cfg.hidden_dim, cfg.out_dim, cfg.queue_size, cfg.head_bn, cfg.small_stem)
    model.load_state_dict(state["model"])
    backbone = (model.teacher if teacher else model.student).backbone
    return backbone.to(device or torch.device("cpu")).eval(), cfg


def evaluate_checkpoint(
    path: str, protocol: str, data: str | None = None, dataset: str | None = None, teacher: bool = False,
    device: str = "auto", batch_size: int = 512, workers: int = 4, k: int = 200, temperature: float = 0.1,
    epochs: int = 100, lr: float = 0.1, weight_decay: float = 0.0,
) -> dict[str, float]:
    """``protocol`` is ``knn`` or ``linear``; the dataset defaults to the one in the checkpoint's configuration."""
    from ressl.data import eval_batches, load_dataset, to_device
    from ressl.folder import DataError
    from ressl.train import autocast_dtype, resolve_device

    dev = resolve_device(device)
    if dist.init_from_env(dev.type) and dev.type == "cuda":
        dev = torch.device("cuda", dist.local_rank())
    backbone, cfg = load_backbone(path, teacher, dev)
    ds = load_dataset(dataset or cfg.dataset, data if data is not None else cfg.data, cfg.download)
    if ds.bank is None or ds.test is None:
        raise DataError(f"{ds.name} at {data or cfg.data} has no labelled train and test splits to evaluate on: pass --data with both")
    to_device(ds, dev)
    if cfg.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    dtype = autocast_dtype(cfg.precision, dev)
    feats = {}
    for name, split in (("bank", ds.bank), ("test", ds.test)):
        batches = eval_batches(split, cfg.image_size, ds.mean, ds.std, batch_size, dev, workers)
        feats[name] = extract_features(backbone, batches, dtype)
    (bank, bank_y), (test, test_y) = feats["bank"], feats["test"]
    if protocol == "knn":
        return knn_accuracy(bank, bank_y, test, test_y, ds.num_classes, k, temperature)
    return linear_probe(bank, bank_y, test, test_y, ds.num_classes, epochs, lr, weight_decay=weight_decay, progress=True)
