"""kNN over a large bank: chunked over queries and bank, bf16 storage, the automatic storage dtype."""

from __future__ import annotations

import io
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ressl import evaluate, progress
from ressl.data import Split
from ressl.evaluate import auto_store_dtype, extract_features, knn_accuracy, knn_scores, linear_probe, split_features


def reference_knn(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                  k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Class scores (M, C) and neighbour indices (M, k) from the formula: both sides normalised, the full
    (M, N) cosine matrix, its top-k, ``exp(sim / temperature)`` summed per class. In float64."""
    sim = F.normalize(queries.double(), dim=1) @ F.normalize(bank.double(), dim=1).T
    top_sim, top_idx = sim.topk(min(k, bank.shape[0]), dim=1)
    scores = torch.zeros(queries.shape[0], num_classes, dtype=torch.float64)
    scores.scatter_add_(1, bank_labels[top_idx], (top_sim / temperature).exp())
    return scores, top_idx


def clusters(centres: torch.Tensor, n: int, noise: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, F) non-negative features (as after a ReLU) around ``centres`` (C, F), and their labels (n,)."""
    labels = torch.randint(0, centres.shape[0], (n,), generator=g)
    return (centres[labels] + noise * torch.randn(n, centres.shape[1], generator=g)).relu(), labels


@pytest.mark.parametrize("topk_groups", [1, 4])
@pytest.mark.parametrize("chunk_size, bank_chunk_size", [(1024, 65536), (7, 5), (16, 13), (50, 64), (3, 199), (5, 80)])
def test_chunked_knn_equals_the_formula(chunk_size, bank_chunk_size, topk_groups):
    # N = 199 and M = 23 are divided by none of the chunk sizes; k = 20 exceeds bank chunks of 5 and 13; with
    # 4 groups, bank chunks of 80 go through grouped_topk (80 = 4 x 20) and the ragged last one (39) through topk
    bank, queries = torch.randn(199, 12), torch.randn(23, 12)
    labels = torch.randint(0, 5, (199,))
    expected, expected_idx = reference_knn(bank, labels, queries, 5, k=20, temperature=0.1)
    scores = knn_scores(bank, labels, queries, 5, k=20, temperature=0.1, chunk_size=chunk_size, bank_chunk_size=bank_chunk_size,
                        topk_groups=topk_groups)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-5)
    inv = evaluate.inverse_norms(bank, chunk_size=bank_chunk_size)
    _, idx = evaluate.nearest_cosine(F.normalize(queries, dim=1), bank, inv, 20, bank_chunk_size, topk_groups)
    assert torch.equal(idx.sort(dim=1).values, expected_idx.sort(dim=1).values)  # the same neighbours


@pytest.mark.parametrize("groups", [2, 8, 16])
@pytest.mark.parametrize("ties", [False, True])
def test_grouped_topk_gives_the_values_of_topk(groups, ties):
    """The top-k through group maxima has the values of ``topk``, also with many equal values (integers 0-4, where
    groups tie at the boundary), and its columns hold those values."""
    g = torch.Generator().manual_seed(groups)
    x = torch.randint(0, 5, (64, 512), generator=g).float() if ties else torch.randn(64, 512, generator=g)
    for k in (1, 7, 32):
        values, columns = evaluate.grouped_topk(x, k, groups)
        assert torch.equal(values, x.topk(k, dim=1).values)
        assert torch.equal(x.gather(1, columns), values)
        assert (columns.sort(dim=1).values.diff(dim=1) > 0).all()  # no column twice


def test_grouped_topk_misses_nothing_hidden_in_one_group():
    """All of a row's largest values inside a single group, the case a top-k per group would cut short."""
    x = torch.zeros(2, 64)
    x[0, 8:16] = torch.arange(1.0, 9.0)  # group 1 (of 8 columns) holds the 8 largest
    x[1, 3] = 5.0
    values, columns = evaluate.grouped_topk(x, 8, 8)
    assert torch.equal(values[0], torch.arange(8.0, 0.0, -1.0)) and set(columns[0].tolist()) == set(range(8, 16))
    assert values[1, 0] == 5.0 and columns[1, 0] == 3


def test_k_larger_than_the_bank_takes_every_row():
    bank, queries, labels = torch.randn(9, 4), torch.randn(5, 4), torch.randint(0, 3, (9,))
    expected, _ = reference_knn(bank, labels, queries, 3, k=9, temperature=0.07)
    scores = knn_scores(bank, labels, queries, 3, k=200, temperature=0.07, chunk_size=2, bank_chunk_size=4)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-5)


def test_knn_accuracy_reports_the_k_it_used_at_most_the_bank():
    """``--k 100000`` on a bank of 9 takes all 9, and says 9: results name the neighbours that voted."""
    bank, queries, labels = torch.randn(9, 4), torch.randn(5, 4), torch.randint(0, 3, (9,))
    query_labels = torch.randint(0, 3, (5,))
    every = evaluate.knn_accuracy(bank, labels, queries, query_labels, 3, k=100_000)
    assert every == evaluate.knn_accuracy(bank, labels, queries, query_labels, 3, k=9) and every["k"] == 9
    assert evaluate.knn_accuracy(bank, labels, queries, query_labels, 3, k=4)["k"] == 4


def test_bf16_bank_predicts_as_fp32_and_is_neither_changed_nor_copied():
    g = torch.Generator().manual_seed(0)
    centres = 4 * torch.rand(10, 32, generator=g)
    bank32, labels = clusters(centres, 40000, 0.5, g)
    queries, query_labels = clusters(centres, 64, 0.5, g)
    bank = bank32.bfloat16()
    before = bank.clone()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        scores = knn_scores(bank, labels, queries, 10, k=20, chunk_size=16, bank_chunk_size=1024)
    assert scores.dtype == torch.float32
    assert bank.dtype == torch.bfloat16 and torch.equal(bank, before)
    fp32 = knn_scores(bank32, labels, queries, 10, k=20)
    assert (scores.argmax(1) == fp32.argmax(1)).float().mean() >= 0.98
    assert (scores.argmax(1) == query_labels).all()
    # no op allocates anything bank-sized: neither a normalised copy (bf16, 2.6 MB) nor an fp32 one
    # (5.1 MB); the largest is the fp32 buffer the norms go through (4096 x 32 x 4 B = 0.5 MB)
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < biggest < bank.numel() * bank.element_size() // 2, biggest


def test_auto_store_dtype_is_bf16_only_for_a_large_bank_on_cuda(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # a device object needs no GPU
    imagenet = (1_281_167, 2048)  # 10.5 GB in fp32
    assert auto_store_dtype(*imagenet, cuda) == torch.bfloat16
    assert auto_store_dtype(*imagenet, cpu) == torch.float32
    assert auto_store_dtype(50_000, 512, cuda) == torch.float32  # CIFAR-10, ResNet-18: 100 MB
    monkeypatch.setattr(evaluate, "BF16_BANK_BYTES", 1000)  # the threshold is read at each call
    assert auto_store_dtype(10, 26, cuda) == torch.bfloat16  # 10 x 26 x 4 B = 1040 B > 1000
    assert auto_store_dtype(10, 25, cuda) == torch.float32  # exactly 1000 is not over
    assert auto_store_dtype(10, 26, cpu) == torch.float32


class TinyBackbone(nn.Module):
    """(B, 3, S, S) images -> (B, 6) features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def batches(n: int = 10, b: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    images, labels = torch.randn(n, 3, 8, 8), torch.arange(n)
    return [(images[s : s + b], labels[s : s + b]) for s in range(0, n, b)]


def test_extract_features_stores_in_the_dtype_asked_for():
    backbone, data = TinyBackbone(), batches()
    f32, y = extract_features(backbone, data)
    bf16, y2 = extract_features(backbone, data, store_dtype=torch.bfloat16)
    assert f32.dtype == torch.float32 and bf16.dtype == torch.bfloat16 and bf16.shape == f32.shape == (10, 6)
    assert torch.equal(y, y2) and torch.equal(bf16, f32.bfloat16())
    dims = []
    decided, _ = extract_features(backbone, data, store_dtype=lambda dim: dims.append(dim) or torch.float16)
    assert decided.dtype == torch.float16 and dims == [6]  # asked once, with the feature dim


def test_extract_features_fills_one_preallocated_bank():
    """Given the row count, the features land in one (rows, F) tensor, returned as is: no list, no copy."""
    backbone, data = TinyBackbone(), batches()
    listed, y = extract_features(backbone, data, store_dtype=torch.bfloat16)
    bank, y2 = extract_features(backbone, data, store_dtype=torch.bfloat16, rows=12)  # room for 12, 10 come
    assert torch.equal(bank, listed) and torch.equal(y, y2) and bank.shape == (10, 6)
    assert bank.untyped_storage().nbytes() == 12 * 6 * 2  # a view of the one tensor allocated up front


def _dying(data: list[tuple[torch.Tensor, torch.Tensor]], error: Exception):
    yield from data
    raise error


def test_a_loader_worker_that_dies_while_embedding_is_one_line_with_a_hint():
    """In one process as under torchrun: a loader worker that died (the host's out-of-memory killer) ends the
    embedding with a LateDataError of one line that names the fix (the command line prints it without a traceback);
    an error that is not a load failure passes through as it was."""
    from ressl.errors import LateDataError

    died = RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")
    said = "DataLoader worker (pid(s) 4242) exited unexpectedly (if the host ran out of memory: lower --workers)"
    for embed in (lambda b: extract_features(TinyBackbone(), b), lambda b: list(evaluate._gathered(b, torch.device("cpu")))):
        with pytest.raises(LateDataError) as caught:
            embed(_dying(batches(), died))
        assert str(caught.value) == said
        with pytest.raises(ValueError, match="not a load failure"):
            embed(_dying(batches(), ValueError("not a load failure")))


def test_split_features_decides_from_the_whole_split(monkeypatch):
    split = Split(torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8), torch.arange(10))
    args = (TinyBackbone(), split, 8, (0.5,) * 3, (0.25,) * 3, 4, torch.device("cpu"), None, 0)
    feats, labels = split_features(*args)
    assert feats.dtype == torch.float32 and feats.shape == (10, 6) and torch.equal(labels, torch.arange(10))
    asked = []
    monkeypatch.setattr(evaluate, "auto_store_dtype", lambda *a: asked.append(a) or torch.bfloat16)
    feats, _ = split_features(*args)
    assert feats.dtype == torch.bfloat16 and asked == [(10, 6, torch.device("cpu"))]
    feats, _ = split_features(*args, store_dtype=torch.float32)
    assert feats.dtype == torch.float32 and len(asked) == 1  # an explicit dtype is not second-guessed


class Terminal(io.StringIO):
    """A stderr that is a terminal."""

    def isatty(self) -> bool:
        return True


def test_split_features_shows_a_progress_bar_live_on_a_terminal_and_in_logs_only_for_long_work(monkeypatch, capsys):
    """On a terminal the images being embedded are counted (ImageNet's bank takes minutes); in captured output and
    logs (not a terminal) nothing is written for work done within ``LOG_SECONDS``, and the bar is gone once the
    features are (``leave=False``). Longer work (here: LOG_SECONDS 0) shows its states in a log too."""
    split = Split(torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8), torch.arange(10))
    args = (TinyBackbone(), split, 8, (0.5,) * 3, (0.25,) * 3, 4, torch.device("cpu"), None, 0)
    quiet, _ = split_features(*args)
    assert capsys.readouterr().err == ""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    shown, _ = split_features(*args)
    text = terminal.getvalue()
    assert "embedding 10 images:" in text and "0/10" in text and "img/s" in text
    assert text.split("\r")[-1].strip() == ""  # the last thing written clears the line
    assert torch.equal(shown, quiet)
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setattr(progress, "LOG_SECONDS", 0.0)
    split_features(*args)
    assert "embedding 10 images:" in log.getvalue() and "4/10" in log.getvalue()  # batches of 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_split_features_on_cuda_stores_a_large_bank_in_bf16(monkeypatch):
    monkeypatch.setattr(evaluate, "BF16_BANK_BYTES", 100)
    split = Split(torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8), torch.arange(10))
    feats, _ = split_features(TinyBackbone().cuda(), split, 8, (0.5,) * 3, (0.25,) * 3, 4, torch.device("cuda"), None, 0)
    assert feats.dtype == torch.bfloat16 and feats.is_cuda


def test_linear_probe_accepts_bf16_features():
    x = torch.randn(400, 10)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    xb = x.bfloat16()
    acc = linear_probe(xb[:300], y[:300], xb[300:], y[300:], num_classes=2, epochs=20, lr=0.1, batch_size=64)
    assert acc["top1"] > 90


def test_the_vote_temperature_is_used():
    """One class-1 neighbour at cosine 1 against two class-0 ones at 0.6: a sharp vote (T 0.1) follows the nearest,
    a flat one (T 1) the majority."""
    bank, labels = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]]), torch.tensor([1, 0, 0])
    query, label = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    assert knn_accuracy(bank, labels, query, label, 2, k=3, temperature=0.1)["top1"] == 100.0
    assert knn_accuracy(bank, labels, query, label, 2, k=3, temperature=1.0)["top1"] == 0.0
