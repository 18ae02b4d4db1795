"""Evaluation of frozen backbone features: weighted kNN and the linear probe."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ressl import dist
from ressl.batches import PAD_LABEL, crops_decode_size, epoch_seed, eval_batches, rank_block, rows_per_rank, worker_batches
from ressl.errors import LateDataError, load_failure
from ressl.precision import autocast, autocast_dtype
from ressl.progress import bar as progress_bar
from ressl.schedule import cosine_lr
from ressl.views import draw_seed

if TYPE_CHECKING:
    from ressl.config import Config
    from ressl.data import Dataset, Split


# An fp32 feature bank larger than this is kept in bf16 on CUDA (``split_features``' "auto"): the
# 1.28M x 2048 ImageNet bank is 10.5 GB in fp32, 5.2 GB in bf16. bf16 keeps fp32's exponent range
# (features are unnormalised), its 8-bit mantissa moves cosine similarities by ~1e-3, and bf16
# matmuls run on the tensor cores. On CPU the bank stays fp32: memory is plentiful there and fast
# bf16 matmul depends on the processor.
BF16_BANK_BYTES = 2 * 1024**3

StoreDtype = torch.dtype | Callable[[int], torch.dtype] | None  # a dtype, or feature dim -> dtype


def auto_store_dtype(rows: int, feature_dim: int, device: torch.device) -> torch.dtype:
    """bf16 for a CUDA bank of ``rows`` x ``feature_dim`` whose fp32 copy would exceed ``BF16_BANK_BYTES``, else fp32."""
    large = rows * feature_dim * 4 > BF16_BANK_BYTES
    return torch.bfloat16 if device.type == "cuda" and large else torch.float32


@torch.no_grad()
def extract_features(
    backbone: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype | None = None,
    store_dtype: StoreDtype = None, rows: int | None = None, progress: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features (N, F) and labels (N,) of every batch, in order.

    ``dtype`` (e.g. ``torch.bfloat16``) runs the backbone under autocast. The features are stored, and
    gathered, in ``store_dtype`` (default float32); a callable is given the feature dim F at the first
    batch and returns the dtype. ``rows``, the number of rows the batches hold, lets the features go
    straight into one (rows, F) tensor: the bank's memory once, not a list plus its concatenation.
    Under ``torchrun`` each rank extracts its own batches and the results are gathered. ``progress``, the number of
    images all processes embed together, shows a progress bar over them (:func:`_embedding_bar`).
    """
    was_training = backbone.training
    backbone.eval()
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    store, bank, filled = store_dtype, None, 0
    failure: str | None = None
    bar = None if progress is None else _embedding_bar(progress)
    try:
        for images, y in batches:
            with autocast(images.device, dtype):
                f = backbone(images.contiguous(memory_format=torch.channels_last))
            if callable(store):  # decided at the first batch, once the feature dim is known
                store = store(f.shape[1])
            if bank is None and rows is not None:
                bank = torch.empty(rows, f.shape[1], dtype=store or torch.float32, device=f.device)
            if bank is not None:
                bank[filled : filled + f.shape[0]] = f
            else:
                feats.append(f.to(store or torch.float32))
            filled += f.shape[0]
            labels.append(y)
            if bar is not None:  # rank 0 counts for all: the processes take equal shares (only the last one padded)
                bar.update(min(filled * dist.world_size(), bar.total) - bar.n)
    except Exception as err:  # an image that broke after the scan, a loader worker that died
        failure = load_failure(err)
        if failure is None:
            raise
    finally:
        backbone.train(was_training)
        if bar is not None:
            bar.close()
    _agree_on_failure(failure, next(backbone.parameters(), torch.empty(0)).device)
    mine = bank[:filled] if bank is not None else torch.cat(feats)
    features, labels_all = dist.all_gather_cat(mine), dist.all_gather_cat(torch.cat(labels))
    keep = labels_all != PAD_LABEL  # rows that only padded a process's share
    real = int(keep.sum())
    if bool(keep[:real].all()):  # one process, or padding only after the last image (the last share's): no copy
        return features[:real], labels_all[:real]
    return features[keep], labels_all[keep]


def _embedding_bar(images: int) -> Any:
    """A progress bar over ``images`` being embedded (ImageNet's bank: minutes), on the main process only
    (:func:`ressl.progress.bar`: in a log, a state a minute); none is open beside it (training's bar closes with its
    epoch, before the kNN check). None on the other processes."""
    if not dist.is_main():
        return None
    return progress_bar(total=images, desc=f"embedding {images:,} images", unit="img")


def _agree_on_failure(failure: str | None, device: torch.device) -> None:
    """Under torchrun, before the features are gathered: if any process's images failed to load, every process
    stops with the messages of all that did, instead of the others waiting for them in the gather. In one process,
    its own failure, a :class:`LateDataError` of one line (not a loader worker's traceback)."""
    if dist.any_rank(failure is not None, device):
        raise LateDataError("\n".join(dist.messages_of_all(failure)))


def split_features(
    backbone: nn.Module, split: Split, image_size: int, mean: tuple[float, ...], std: tuple[float, ...],
    batch_size: int, device: torch.device, dtype: torch.dtype | None, workers: int = 4,
    store_dtype: torch.dtype | Literal["auto"] = "auto", stand_in: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, F) and labels (N,) of every image of ``split``, in order, as every evaluation computes them.

    ``store_dtype="auto"``: bf16 for a large bank on CUDA, else float32 (:func:`auto_store_dtype`).
    Pass ``torch.float32`` where the features must be fp32 (the linear probe, files written to disk).
    ``stand_in``: a folder's image that broke since the scan is replaced, where rows need not name their files
    (:func:`ressl.batches.eval_batches`).
    """
    chosen: StoreDtype
    if isinstance(store_dtype, torch.dtype):
        chosen = store_dtype
    elif store_dtype == "auto":  # the feature dim is known at the first batch
        chosen = lambda feature_dim: auto_store_dtype(len(split), feature_dim, device)
    else:
        raise ValueError(f"store_dtype: a torch.dtype or 'auto', not {store_dtype!r}")
    batches = eval_batches(split, image_size, mean, std, batch_size, device, workers, stand_in)
    return extract_features(backbone, batches, dtype, chosen, rows=rows_per_rank(len(split)), progress=len(split))


@torch.no_grad()
def inverse_norms(bank: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """1 / ||row|| (N,) in float32 of ``bank`` (N, F), as ``F.normalize`` divides (eps 1e-12).

    A bf16/fp16 bank goes to float32 ``chunk_size`` rows at a time through one reused buffer: never
    a whole fp32 copy (``vector_norm(dtype=float32)`` makes one; a bf16 norm keeps only 3 digits),
    and no fresh allocation per chunk (on CPU each would page-fault its memory anew).
    """
    inv = torch.empty(bank.shape[0], device=bank.device)
    buffer = None if bank.dtype == torch.float32 else torch.empty(min(chunk_size, bank.shape[0]), bank.shape[1], device=bank.device)
    for start in range(0, bank.shape[0], chunk_size):
        rows = bank[start : start + chunk_size]
        if buffer is not None:
            rows = buffer[: rows.shape[0]].copy_(rows)
        torch.linalg.vector_norm(rows, dim=1, out=inv[start : start + rows.shape[0]])
    return inv.clamp_min_(1e-12).reciprocal_()


def nearest_cosine(
    q: torch.Tensor, bank: torch.Tensor, inv_norms: torch.Tensor, k: int, chunk_size: int = 65536, topk_groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities (m, k) float32 and bank indices (m, k) of the ``k`` rows of ``bank`` (N, F) nearest
    to the unit-norm queries ``q`` (m, F), most similar first; ``inv_norms`` (N,) from :func:`inverse_norms`.

    The bank goes through in chunks of ``chunk_size`` rows, keeping a running top-k, so memory is
    O(m * chunk_size) whatever N. Each block is a matmul in the bank's dtype (bf16/fp16 on the tensor
    cores); the product then goes to float32 and is scaled by the rows' inverse norms in one op.
    ``topk_groups`` > 1 picks each block's top-k through :func:`grouped_topk` (same values).
    """
    best_sim = torch.empty(q.shape[0], 0, device=q.device)
    best_idx = torch.empty(q.shape[0], 0, dtype=torch.long, device=q.device)
    for start in range(0, bank.shape[0], chunk_size):
        block = q @ bank[start : start + chunk_size].T  # (m, n) in the bank's dtype
        sim = block * inv_norms[start : start + chunk_size]  # cosines, float32 (promoted by the fp32 norms)
        sim, idx = grouped_topk(sim, k, topk_groups)
        best_sim, best_idx = merge_topk(best_sim, best_idx, sim, idx + start, k)
    return best_sim, best_idx


def merge_topk(best_sim: torch.Tensor, best_idx: torch.Tensor, sim: torch.Tensor, idx: torch.Tensor, k: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of a running top-k (m, k') and a block's (m, k'') similarities with their global indices:
    at most 2k candidates per row, largest first."""
    sim, idx = torch.cat([best_sim, sim], dim=1), torch.cat([best_idx, idx], dim=1)
    best_sim, pos = sim.topk(min(k, sim.shape[1]), dim=1)
    return best_sim, idx.gather(1, pos)


def grouped_topk(x: torch.Tensor, k: int, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest values of each row of ``x`` (m, n) and their columns, largest first, as ``x.topk(k)``.

    With ``groups`` > 1 (and n a multiple of it, at least ``k * groups``) the top-k goes through the maxima of
    groups of ``groups`` adjacent columns. If a group holds one of a row's k largest values v, at most k - 1
    values exceed v, so at most k - 1 groups have a larger maximum: the group is among the k with the largest
    maxima (ties there keep enough values equal to v). Only the members of those k groups compete: one pass to
    take the maxima, then top-k's over n / groups and k * groups columns instead of one over n. The values are
    those of ``x.topk``; among equal values the columns chosen may differ.
    """
    m, n = x.shape
    if groups <= 1 or n % groups or n < k * groups:
        return x.topk(min(k, n), dim=1)
    best = x.view(m, n // groups, groups).amax(dim=2).topk(k, dim=1).indices  # (m, k) groups
    members = (best.unsqueeze(2) * groups + torch.arange(groups, device=x.device)).view(m, k * groups)
    values, pos = x.gather(1, members).topk(k, dim=1)
    return values, members.gather(1, pos)


@torch.no_grad()
def knn_scores(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
    k: int = 200, temperature: float = 0.1, chunk_size: int = 1024, bank_chunk_size: int = 65536, topk_groups: int = 1,
) -> torch.Tensor:
    """Weighted kNN class scores (M, C) float32 of ``queries`` (M, F) against ``bank`` (N, F) with labels (N,).

    Features are L2-normalised; each of the ``k`` most similar bank entries votes for its class with
    weight ``exp(similarity / temperature)`` (Wu et al. 2018, the protocol of the paper's code).
    Queries go through in chunks of ``chunk_size`` and the bank in chunks of ``bank_chunk_size`` rows,
    so memory is O(chunk_size * bank_chunk_size) beyond the bank itself, whatever N and M. The bank
    is neither normalised nor copied: it may be kept in bf16/fp16 (half the memory, tensor-core
    matmuls); the similarities are compared and weighted in float32. ``topk_groups``: see :func:`nearest_cosine`
    (a candidate for GPUs, where one top-k over a wide block is slow; 1, plain ``topk``, until measured there).
    """
    inv_norms = inverse_norms(bank)  # (N,) float32
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, queries.shape[0], chunk_size):
        q = F.normalize(queries[start : start + chunk_size].float(), dim=1).to(bank.dtype)
        top_sim, top_idx = nearest_cosine(q, bank, inv_norms, k, bank_chunk_size, topk_groups)  # (m, k)
        scores.append(weighted_votes(top_sim, bank_labels[top_idx], num_classes, temperature))
    return torch.cat(scores)


def weighted_votes(top_sim: torch.Tensor, top_labels: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    """Class scores (m, C): each of a query's neighbours, similarity (m, k) and label (m, k), votes for its class with
    weight ``exp(similarity / temperature)``."""
    votes = torch.zeros(top_sim.shape[0], num_classes, device=top_sim.device)
    return votes.scatter_add_(1, top_labels, (top_sim / temperature).exp())


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Percent of rows of ``scores`` (M, C) whose label (M,) is among the top-k classes, for each k of ``ks`` below
    C (top-1 always): a top-k of k >= C classes is 100% whatever the scores, and is left out."""
    classes = scores.shape[1]
    ranked = scores.topk(min(max(ks), classes), dim=1).indices  # (M, k)
    hits = ranked == labels[:, None]

    def share(hit: torch.Tensor) -> float:  # of whole rows, without float noise; no rows: no accuracy
        return 100.0 * int(hit.sum()) / len(labels) if len(labels) else math.nan

    return {f"top{k}": share(hits[:, :k].any(dim=1)) for k in ks if k == 1 or k < classes}


def accuracy_text(accuracy: dict[str, float], num_classes: int) -> str:
    """``top-1 X%  top-5 Y%``; with 5 classes or fewer, top-1 alone (every label is among the top 5: always 100%)."""
    text = f"top-1 {accuracy['top1']:.2f}%"
    if num_classes == 1:
        return text + "  (1 class: every guess is right, so this says nothing; evaluate on labels of several classes)"
    return text + (f"  top-5 {accuracy['top5']:.2f}%" if "top5" in accuracy else f"  ({num_classes} classes: no top-5)")


def knn_accuracy(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
    num_classes: int, k: int = 200, temperature: float = 0.1,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of the weighted kNN classifier (:func:`knn_scores`), and the ``k`` it used:
    at most the bank's size (a larger ``k`` takes every row, and saying so keeps results comparable)."""
    used = min(k, bank.shape[0])
    return {**topk_accuracy(knn_scores(bank, bank_labels, queries, num_classes, used, temperature), query_labels), "k": used}


Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # epoch -> (features (B, F), labels (B,))


def linear_probe(
    train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, test_labels: torch.Tensor,
    num_classes: int, epochs: int = 100, lr: float = 0.1, batch_size: int = 256, weight_decay: float = 0.0,
    seed: int = 0, progress: bool = False, train_batches: Batches | None = None,
) -> dict[str, float]:
    """A linear classifier on frozen features (F): SGD momentum 0.9, cosine decay, the paper's 100 epochs.

    By default it trains on ``train_features`` computed once, without augmentation: each epoch costs
    a matmul instead of a backbone pass (the fast path). ``train_batches(epoch)`` replaces them with
    fresh features per epoch (e.g. of augmented images, :func:`augmented_batches`), in batches of any size: SGD
    takes them ``batch_size`` at a time, and the cosine schedule follows the images seen. Features are
    standardised with the clean training features' mean and std (a BatchNorm without affine, as MoCo
    v3's probe), which makes one learning rate work across backbones. Features stored in bf16/fp16
    are converted to float32 a batch at a time.
    """
    mean, std = train_features.mean(0).float(), train_features.std(0).float().clamp_min(1e-6)
    generator = torch.Generator().manual_seed(seed)
    classifier = nn.Linear(train_features.shape[1], num_classes)
    with torch.no_grad():  # initialised as nn.Linear does, from the seed: the same checkpoint gives the same accuracy
        bound = 1.0 / math.sqrt(train_features.shape[1])
        classifier.weight.uniform_(-bound, bound, generator=generator)
        classifier.bias.uniform_(-bound, bound, generator=generator)
    classifier = classifier.to(train_features.device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    total = epochs * train_features.shape[0]  # images over the whole probe: the schedule's clock

    def cached(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(train_features.shape[0], generator=generator).to(train_features.device)
        for start in range(0, train_features.shape[0], batch_size):
            idx = order[start : start + batch_size]
            yield train_features[idx], train_labels[idx]

    epoch_iter: Iterable[int] = range(epochs)
    if progress and dist.is_main():
        epoch_iter = progress_bar(epoch_iter, desc="linear probe", unit="epoch")
    seen = 0
    for epoch in epoch_iter:
        for x, y in _rebatched((train_batches or cached)(epoch), batch_size):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(min(seen, total - 1), total, lr)
            loss = F.cross_entropy(classifier((x.float() - mean) / std), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += x.shape[0]
    with torch.no_grad():
        return topk_accuracy(classifier((test_features.float() - mean) / std), test_labels)


def _rebatched(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` of any sizes, as batches of ``size`` (the epoch's last one what remains)."""
    held: list[tuple[torch.Tensor, torch.Tensor]] = []
    count = 0
    for x, y in batches:
        held.append((x, y))
        count += x.shape[0]
        while count >= size:
            xs, ys = torch.cat([h[0] for h in held]), torch.cat([h[1] for h in held])
            yield xs[:size], ys[:size]
            held, count = [(xs[size:], ys[size:])], count - size
    if count:
        yield torch.cat([h[0] for h in held]), torch.cat([h[1] for h in held])


PROBE_CROP_MIN_SCALE = 0.08  # linear probe crops from this share of the image up: MoCo's and the official ReSSL protocol


def augmented_batches(
    backbone: nn.Module, split: Split, image_size: int, mean: tuple[float, ...], std: tuple[float, ...],
    batch_size: int, device: torch.device, dtype: torch.dtype | None, seed: int = 0, workers: int = 4,
    crop_min_scale: float = PROBE_CROP_MIN_SCALE, flip: bool = True,
) -> Batches:
    """Per epoch, frozen-backbone features of the training images under RandomResizedCrop(crop_min_scale-1) and,
    with ``flip``, a horizontal flip (``ressl linear --augment``: 0.08, the linear protocol's, and the run's own ``flip``:
    digits are not flipped), in a random order drawn from ``seed`` and the epoch.

    In-memory images are cropped batched on the device; folders are cropped by loader workers. Under torchrun each
    process embeds its share of the epoch's order (its crops drawn from a seed of its own) and every process gets
    all of them, batch by batch (:func:`_gathered`): each of N processes embeds 1/N of every epoch.
    """
    from torchvision.transforms import v2

    from ressl.augment import eval_transform, weak_augment
    from ressl.folder import ImageFolderDataset

    augment = weak_augment(image_size, mean, std, crop_scale=(crop_min_scale, 1.0), flip_p=0.5 if flip else 0.0)
    folder_crop = v2.Compose([v2.RandomResizedCrop(image_size, scale=(crop_min_scale, 1.0), antialias=True),
                              v2.RandomHorizontalFlip(0.5 if flip else 0.0)])

    @torch.no_grad()
    def embed(images: torch.Tensor) -> torch.Tensor:
        with autocast(device, dtype):
            return backbone(images.contiguous(memory_format=torch.channels_last)).float()

    def share(order: torch.Tensor, draws: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This process's rows of the epoch's ``order`` (the last padded with ``PAD_LABEL`` rows), embedded."""
        rows, pad = rank_block(len(split))
        mine = order[rows]
        if split.images is not None:
            assert split.labels is not None
            for start in range(0, len(mine), batch_size):
                idx = mine[start : start + batch_size]  # the images may be on the device, their labels on the CPU
                images, labels = split.images[idx.to(split.images.device)], split.labels[idx.to(split.labels.device)]
                padding = pad[start : start + batch_size]
                if padding.any():  # the last process's last batch: no copy (nor wait) for the others
                    labels = torch.where(padding.to(labels.device), PAD_LABEL, labels)
                yield embed(augment(images.to(device), draws)), labels.to(device)
            return
        ds = ImageFolderDataset(split.folder, transform=folder_crop, max_bad_fraction=split.max_bad_fraction,  # type: ignore[arg-type]
                                record=split.failure_record(), decode_size=crops_decode_size(image_size, crop_min_scale))
        start = 0
        for x, y in worker_batches(torch.utils.data.Subset(ds, mine.tolist()), batch_size, workers, device, draws):
            y = torch.where(pad[start : start + len(y)], PAD_LABEL, y)
            start += len(y)
            yield embed(eval_transform(x.to(device), image_size, mean, std)), y.to(device)

    def epoch_batches(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        order = torch.randperm(len(split), generator=generator)  # the same in every process
        # rank 0 goes on drawing its crops from the epoch's generator, as one process does; the others from their own
        draws = generator if dist.rank() == 0 else torch.Generator().manual_seed(draw_seed((seed, epoch), dist.rank()))
        backbone.eval()
        return _gathered(share(order, draws), device)

    return epoch_batches


def _gathered(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], device: torch.device
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` of features (B, F) and labels (B,) as they are in one process; under torchrun, every process's
    i-th batch put together in rank order, less the ``PAD_LABEL`` rows (a collective: every process has as many
    batches, of equal sizes). A batch that fails to load in one process (:func:`ressl.errors.load_failure`) stops all
    of them there, with the messages of every process that failed, instead of the others waiting in the gather."""
    if not dist.is_distributed():
        try:
            yield from batches
        except Exception as err:  # as below, in one line, not as a loader worker's traceback
            failure = load_failure(err)
            if failure is None:
                raise
            raise LateDataError(failure) from None
        return
    while True:
        batch: tuple[torch.Tensor, torch.Tensor] | None = None
        failure: str | None = None
        try:
            batch = next(batches)
        except StopIteration:
            pass
        except Exception as err:  # an image that broke since the scan, a loader worker that died
            failure = load_failure(err)
            if failure is None:
                raise
        _agree_on_failure(failure, device)
        if batch is None:
            return
        features, labels = dist.all_gather_cat(batch[0]), dist.all_gather_cat(batch[1])
        keep = labels != PAD_LABEL
        yield features[keep], labels[keep]


# --- evaluating a checkpoint ------------------------------------------------------------------


Normalisation = tuple[tuple[float, ...], tuple[float, ...]]  # per-channel (mean, std) on the 0..1 scale


def load_trained(path: str, teacher: bool = False, device: torch.device | None = None) -> tuple[nn.Module, Config, Normalisation | None]:
    """The student's (or teacher's) backbone of a checkpoint, in eval mode, the run's configuration, and the
    normalisation of its training images (None in checkpoints before it was kept)."""
    from ressl import checkpoint, config
    from ressl.model import model_from_config

    state = checkpoint.load(path)
    try:
        cfg = config.from_dict(state["config"])
    except config.ConfigError as err:  # a checkpoint edited by hand, or of another version
        raise checkpoint.CheckpointError(f"{path}: {err}; is it a ressl checkpoint.pt of this version?") from None
    try:
        model = model_from_config(cfg)
        model.load_state_dict(state["model"])
    except (RuntimeError, ValueError, KeyError) as err:
        detail = " ".join(line.strip() for line in str(err).strip().splitlines())[:200]  # PyTorch's keys follow its first line
        raise checkpoint.CheckpointError(f"{path}: its weights do not fit its own configuration ({detail}); "
                                         "is it a ressl checkpoint.pt of this version?") from None
    backbone = (model.teacher if teacher else model.student).backbone
    saved = state.get("normalisation")
    normalisation = (tuple(saved["mean"]), tuple(saved["std"])) if isinstance(saved, dict) else None
    return backbone.to(device or torch.device("cpu")).eval(), cfg, normalisation


def load_for_evaluation(path: str, teacher: bool, device: torch.device, dataset: str | None, data: str | None,
                        download: bool | None = None, max_bad_fraction: float | None = None) -> tuple[nn.Module, Config, Dataset]:
    """A checkpoint's backbone and configuration, and the data to evaluate it on (``ressl.data.evaluation_source``:
    the run's unless ``dataset``/``data`` say otherwise), normalised as the run's training images were. Without
    that, other data would be normalised by its own statistics (npz arrays, digits), unlike what the network saw.
    ``max_bad_fraction`` (of an image folder's files that may be unreadable): the run's unless given."""
    from ressl.data import evaluation_source, load_dataset, same_data_everywhere

    backbone, cfg, normalisation = load_trained(path, teacher, device)
    ds = load_dataset(*evaluation_source(cfg.dataset, cfg.data, dataset, data), cfg.download if download is None else download,
                      cfg.max_bad_fraction if max_bad_fraction is None else max_bad_fraction,
                      can_download=False)  # knn, linear, embed and report have no --download to suggest
    same_data_everywhere(ds, device)
    if normalisation is not None:
        ds = dataclasses.replace(ds, mean=normalisation[0], std=normalisation[1])
    return backbone, cfg, ds


def checkpoint_features(
    backbone: nn.Module, cfg: Config, ds: Dataset, split: Split, device: torch.device, batch_size: int = 512,
    workers: int = 4, store_dtype: torch.dtype | Literal["auto"] = "auto", stand_in: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features (N, F) and labels (N,) of ``split``, in its order, as the run's kNN checks compute them: at its
    image size, normalised with ``ds``'s statistics, in its precision and memory format. ``store_dtype``: see
    :func:`split_features` (float32 for features written to disk or fitted by the linear probe), and ``stand_in``."""
    if cfg.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return split_features(backbone, split, cfg.image_size, ds.mean, ds.std, batch_size, device,
                          autocast_dtype(cfg.precision, device), workers, store_dtype, stand_in)


def evaluate_checkpoint(
    path: str, protocol: str, data: str | None = None, dataset: str | None = None, teacher: bool = False,
    device: str = "auto", batch_size: int = 512, workers: int = 4, k: int | None = None, temperature: float | None = None,
    epochs: int = 100, lr: float = 0.1, weight_decay: float = 0.0, augment: bool = False,
    crop_min_scale: float = PROBE_CROP_MIN_SCALE, max_bad_fraction: float | None = None,
    say: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """``protocol`` is ``knn`` or ``linear`` (``augment``: each epoch RandomResizedCrop(``crop_min_scale``-1), the
    linear protocol's 0.08 by default, and flips where the run flipped; else cached features);
    the dataset defaults to the one in the checkpoint's configuration, and the kNN's ``k`` and ``temperature`` to
    those of the run's own kNN checks (``knn_k``, ``knn_temperature``). A kNN result also holds the two used (``k`` at
    most the bank's size); both hold the number of ``classes``. ``max_bad_fraction``: the run's unless given.
    ``say`` hears what is under way (the CLI prints it to stderr)."""
    from ressl.data import to_device

    dev = dist.resolve_device(device)
    backbone, cfg, ds = load_for_evaluation(path, teacher, dev, dataset, data, max_bad_fraction=max_bad_fraction)
    bank_split, test_split = ds.evaluation_splits()  # or a DataError naming the layout needed
    if say is not None:  # the features take a while on a CPU (CIFAR-10: ~20 s) before anything else is printed
        say(f"embedding {len(bank_split):,} training and {len(test_split):,} test images ...")
    to_device(ds, dev, [bank_split, test_split])
    store: torch.dtype | Literal["auto"] = "auto" if protocol == "knn" else torch.float32  # the probe trains on fp32 features
    # rows count by their labels here: an image that broke since the scan is replaced, with a warning
    bank, bank_y = checkpoint_features(backbone, cfg, ds, bank_split, dev, batch_size, workers, store, stand_in=True)
    test, test_y = checkpoint_features(backbone, cfg, ds, test_split, dev, batch_size, workers, store, stand_in=True)
    if protocol == "knn":
        k = cfg.knn_k if k is None else k
        temperature = cfg.knn_temperature if temperature is None else temperature
        if say is not None and k > bank.shape[0]:
            say(f"k {k:,} is more than the {bank.shape[0]:,} images of the bank: every one is a neighbour (k {bank.shape[0]:,})")
        return {**knn_accuracy(bank, bank_y, test, test_y, ds.num_classes, k, temperature), "temperature": temperature,
                "classes": ds.num_classes}
    dtype = autocast_dtype(cfg.precision, dev)
    train_batches = augmented_batches(backbone, bank_split, cfg.image_size, ds.mean, ds.std, batch_size, dev, dtype, workers=workers,
                                      crop_min_scale=crop_min_scale, flip=cfg.flip) if augment else None
    probe = linear_probe(bank, bank_y, test, test_y, ds.num_classes, epochs, lr, weight_decay=weight_decay, progress=True,
                         train_batches=train_batches)
    return {**probe, "classes": ds.num_classes}
