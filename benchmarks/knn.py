"""kNN evaluation speed: weighted kNN scoring against a large feature bank / the bare matmul it cannot avoid.

kNN: ``ressl.evaluate.knn_scores`` with k=200 and 10 classes, as the evaluation runs it: the bank's
(N,) inverse norms once, then per query chunk (1,024) and bank chunk (65,536 rows) the matmul in the
bank's dtype, the block to float32 scaled by the rows' inverse norms, its top-k merged into the
running top-k, and the exp-weighted class votes. Bare: the same already-normalised queries times the
same bank chunks (``q @ bank_chunk.T`` in the bank's dtype, same chunks), nothing else. The ratio
says how close kNN evaluation runs to matmul speed: 1.0 would be a free top-k.

Sizes: on CPU a 100,000 x 2048 bank and 1,000 queries, timed with the bank in fp32 and in bf16 (both
printed); on CUDA the ImageNet-sized bank, 1,281,167 x 2048 in bf16 (5.2 GB), and 10,000 queries. The
ratio is that of the dtype ``split_features`` would store such a bank in on the device
(``ressl.evaluate.auto_store_dtype``: fp32 on CPU, bf16 for a bank this large on CUDA). Random
non-negative features (as after a ReLU) stand in for a backbone's. ``--bank N --queries M --dim F``
change the sizes.

Target <= 1.5: the inverse norms, the fp32 conversion, the top-k and its merges together add at most
half the matmul's time. Measured on the 2-core CPU with AMX, ``--threads 1``, default sizes: fp32
(the CPU's dtype) kNN 4.2 s vs matmul 3.7 s, ratio 1.12-1.16 over runs; bf16 kNN 2.2 s vs matmul
1.0 s, ratio 2.3-2.4 (AMX makes the matmul 4-5x faster while the bf16 -> fp32 conversions and the
fp32 top-k do not speed up: one reason CPU banks stay fp32). On one H200 (sixth session), bf16: kNN 0.34 s vs
matmul 0.084 s, ratio 4.0-4.1: there the top-k of each (1024, 65536) block weighs against a ~0.4 ms tensor-core
matmul. So two candidates are timed and printed beside it; the ratio reported is the default's. One takes the top-k
through group maxima (``ressl.evaluate.grouped_topk``, groups of 16 columns, same values). The other
(:func:`knn_unit_chunks`) also normalises each bank chunk once and ranks each block in the bank's dtype, so that no
float32 copy of a block is made. On this CPU, with 1,000 queries, neither is faster (the second normalises the bank
for few queries: 1.76 against 1.23 in fp32); they are meant for the GPU's 10,000.

    python -m benchmarks.knn [--device cpu|cuda] [--quick] [--bank N] [--queries M] [--dim F]
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks import common
from ressl.evaluate import auto_store_dtype, grouped_topk, knn_scores, merge_topk, weighted_votes

K, CLASSES = 200, 10
GROUPS = 16  # grouped_topk's columns per group, the candidate timed beside the default
QUERY_CHUNK, BANK_CHUNK = 1024, 65536  # knn_scores' defaults
QUICK = {"bank": 8192, "queries": 256, "dim": 128, "query_chunk": 100, "bank_chunk": 3000}  # chunks that do not divide: merges


def add_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--bank", type=int, default=None, help="bank rows (default 100,000 on CPU, 1,281,167 on CUDA)")
    parser.add_argument("--queries", type=int, default=None, help="queries (default 1,000 on CPU, 10,000 on CUDA)")
    parser.add_argument("--dim", type=int, default=None, help="feature dim (default 2048)")
    return parser


def make_bank(rows: int, dim: int, dtype: torch.dtype, device: torch.device, chunk: int = 65536) -> torch.Tensor:
    """(rows, dim) non-negative random features in ``dtype``, drawn chunk by chunk: no full fp32 copy."""
    bank = torch.empty(rows, dim, dtype=dtype, device=device)
    generator = torch.Generator(device).manual_seed(0)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        bank[start : start + n] = torch.randn(n, dim, generator=generator, device=device).abs_()
    return bank


def bare_matmul(bank: torch.Tensor, queries: torch.Tensor, query_chunk: int, bank_chunk: int) -> Callable[[], None]:
    """``q @ bank_chunk.T`` for every pair of chunks, on queries normalised (and cast) beforehand."""
    chunks = [F.normalize(queries[s : s + query_chunk].float(), dim=1).to(bank.dtype) for s in range(0, queries.shape[0], query_chunk)]

    def run() -> None:
        for q in chunks:
            for start in range(0, bank.shape[0], bank_chunk):
                q @ bank[start : start + bank_chunk].T

    return run


def knn(bank: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor, query_chunk: int, bank_chunk: int,
        topk_groups: int = 1) -> Callable[[], None]:
    return lambda: knn_scores(bank, labels, queries, CLASSES, k=K, chunk_size=query_chunk, bank_chunk_size=bank_chunk,
                              topk_groups=topk_groups)


@torch.no_grad()
def knn_unit_chunks(bank: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor, num_classes: int, k: int = K,
                    temperature: float = 0.1, query_chunk: int = QUERY_CHUNK, bank_chunk: int = BANK_CHUNK,
                    groups: int = GROUPS) -> torch.Tensor:
    """A candidate for GPUs, scores (M, C) as ``knn_scores``: the bank chunks outside, each normalised once into a
    buffer in the bank's dtype, the query chunks inside; each block's top-k taken in the bank's dtype through group
    maxima, so no float32 copy of the block is made. Per block element the default writes the bf16 product, reads it,
    writes it scaled in float32 and reads that in several radix passes; this writes and reads the bf16 product once.
    The price: normalising the bank (one pass per bank row, shared by all queries), a running top-k per query
    (M, k) and similarities rounded to the bank's dtype before ranking (bf16: 3 digits, as the product is now).
    """
    k = min(k, bank.shape[0])
    units = [F.normalize(queries[s : s + query_chunk].float(), dim=1).to(bank.dtype) for s in range(0, queries.shape[0], query_chunk)]
    best = [(torch.empty(q.shape[0], 0, device=q.device), torch.empty(q.shape[0], 0, dtype=torch.long, device=q.device)) for q in units]
    buffer = torch.empty(min(bank_chunk, bank.shape[0]), bank.shape[1], dtype=bank.dtype, device=bank.device)
    for start in range(0, bank.shape[0], bank_chunk):
        rows = bank[start : start + bank_chunk]
        chunk = buffer[: rows.shape[0]].copy_(F.normalize(rows.float(), dim=1))  # (n, F) unit rows, bank dtype
        for i, q in enumerate(units):
            sim, idx = grouped_topk(q @ chunk.T, k, groups)  # (m, k) in the bank's dtype
            best[i] = merge_topk(*best[i], sim.float(), idx + start, k)
    scores = []
    for top, idx in best:
        scores.append(weighted_votes(top, labels[idx], num_classes, temperature))
    return torch.cat(scores)


def run(args: argparse.Namespace) -> common.Result:
    device = common.device_of(args)
    cuda = device.type == "cuda"
    full = {"bank": 1_281_167 if cuda else 100_000, "queries": 10_000 if cuda else 1_000, "dim": 2048,
            "query_chunk": QUERY_CHUNK, "bank_chunk": BANK_CHUNK}
    sizes = dict(QUICK if args.quick else full)
    for name in ("bank", "queries", "dim"):
        sizes[name] = getattr(args, name, None) or sizes[name]
    rows, dim, chunks = sizes["bank"], sizes["dim"], (sizes["query_chunk"], sizes["bank_chunk"])
    chosen = auto_store_dtype(rows, dim, device)
    if args.quick and cuda:
        chosen = torch.bfloat16  # the dtype a full-size bank gets there
    dtypes = [torch.float32, torch.bfloat16] if not cuda else [chosen]  # an fp32 ImageNet bank is the slow path it replaces
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, CLASSES, (rows,), generator=generator).to(device)
    queries = torch.randn(sizes["queries"], dim, generator=generator).abs_().to(device)
    repeats = args.repeats or 3
    print(f"[knn] bank {rows:,} x {dim}, {sizes['queries']:,} queries, k={K}, {CLASSES} classes, chunks {chunks[0]} queries x "
          f"{chunks[1]} bank rows, device {device.type}, {torch.get_num_threads()} threads; dtype by auto_store_dtype: "
          f"{str(chosen).removeprefix('torch.')}", flush=True)
    times: dict[torch.dtype, dict[str, float]] = {}
    for dtype in dtypes:
        bank = make_bank(rows, dim, dtype, device)
        print(f"[knn] {str(dtype).removeprefix('torch.')} bank: {bank.numel() * bank.element_size() / 1e9:.2f} GB", flush=True)
        times[dtype] = common.side_by_side({"knn": knn(bank, labels, queries, *chunks), "matmul": bare_matmul(bank, queries, *chunks),
                                            "grouped": knn(bank, labels, queries, *chunks, topk_groups=GROUPS),
                                            "unit": functools.partial(knn_unit_chunks, bank, labels, queries, CLASSES, K, 0.1, *chunks)},
                                           device, repeats, warmup=1)
        del bank
    flop = 2 * rows * dim * sizes["queries"]
    detail = "; ".join(f"{str(d).removeprefix('torch.')}: kNN {t['knn']:.3f} s, matmul {t['matmul']:.3f} s "
                       f"({flop / t['matmul'] / 1e12:.2f} TFLOP/s), ratio {t['knn'] / t['matmul']:.2f} "
                       f"(top-k through groups of {GROUPS}: {t['grouped']:.3f} s, ratio {t['grouped'] / t['matmul']:.2f}; "
                       f"unit bank chunks: {t['unit']:.3f} s, ratio {t['unit'] / t['matmul']:.2f})"
                       for d, t in times.items())
    detail += f"; median of {repeats}"
    t = times[chosen]
    return common.report("knn", f"kNN evaluation ({str(chosen).removeprefix('torch.')} bank; kNN / matmul time)",
                         t["knn"] / t["matmul"], "<= 1.5", detail, quick=args.quick)


def main(argv: list[str] | None = None) -> int:
    return common.main(run, __doc__, "knn", add_flags, argv)


if __name__ == "__main__":
    sys.exit(main())
