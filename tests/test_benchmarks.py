"""The benchmarks run end to end (``python -m benchmarks --quick``, one thread) on generated images and print their four ratios."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmarks_quick_prints_four_ratios(tmp_path):
    env = dict(os.environ, RESSL_BENCH_DATA="random", TMPDIR=str(tmp_path))  # never reads /work/shared
    command = [sys.executable, "-m", "benchmarks", "--quick", "--device", "cpu", "--data", "random", "--threads", "1"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "random uint8" in out  # says which data it used
    assert "step/s" not in proc.stderr + out  # no training progress bar between the ratios
    ratios = {}
    for name in ("step", "augment", "end_to_end", "knn"):
        match = re.search(rf"^\[{name}\] .*: ratio (\S+) \(target", out, flags=re.MULTILINE)
        assert match, f"no ratio line for {name}:\n{out}"
        ratios[name] = float(match.group(1))
    assert all(math.isfinite(r) and r > 0 for r in ratios.values()), ratios
    table = out[out.index("benchmark "):]
    for words in ("step overhead", "augmentation speed-up", "end to end", "kNN evaluation"):
        assert words in table
    assert "NOT met" not in out and " NO\n" not in table and table.count(" n/a\n") == 4  # toy sizes: no verdict


def test_a_mistake_is_one_line_and_exit_code_2(tmp_path):
    env = dict(os.environ, RESSL_BENCH_DATA="random", TMPDIR=str(tmp_path))
    command = [sys.executable, "-m", "benchmarks.step", "--quick", "--set", "epochs=zero"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "python -m benchmarks.step: error: epochs must be an integer, got 'zero'"], proc.stderr


def test_paired_ratios_median_and_quartiles():
    """Each pair's ratio counts, not the ratio of the medians: a slow pair (host busy for both) moves neither."""
    from benchmarks.common import paired_ratio, ratio_quartiles

    full, bare = [11.0, 22.0, 13.0, 14.0, 100.0], [10.0, 20.0, 10.0, 10.0, 100.0]  # ratios 1.1 1.1 1.3 1.4 1.0
    assert paired_ratio(full, bare) == pytest.approx(1.1)
    assert ratio_quartiles(full, bare) == pytest.approx((1.1, 1.3))
    assert ratio_quartiles([3.0], [2.0]) == (1.5, 1.5)


def test_end_to_end_stretches_count_their_own_windows(tmp_path):
    """Each call of the training loop (a stretch between bare steps) gets the logged windows it ran: a window starts
    at the previous logged step or at its call's start, whichever is later; the warm-up's windows count nowhere."""
    import json

    from benchmarks.end_to_end import stretch_totals

    records = [dict(step=2, images_per_s=1.0), dict(step=4, images_per_s=2.0), dict(step=5, images_per_s=4.0),
               dict(step=7, knn_top1=0.5), dict(step=8, images_per_s=8.0), dict(step=10, images_per_s=10.0)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    # calls start at steps 0, 5 and 9: windows (0,2] (2,4] (4,5] | (5,8] | (9,10]; the first window is the warm-up
    totals = stretch_totals(metrics, batch_size=3, skip_steps=2, call_starts=[0, 5, 9])
    assert totals == [(9.0, 6 / 2.0 + 3 / 4.0, 3), (9.0, 9 / 8.0, 3), (3.0, 3 / 10.0, 1)]
    assert stretch_totals(metrics, batch_size=3, skip_steps=6, call_starts=[0, 5, 9])[0] == (0.0, 0.0, 0)


@pytest.mark.parametrize("query_chunk, bank_chunk, groups", [(7, 64, 4), (50, 80, 4), (23, 199, 1), (5, 13, 4)])
def test_knn_candidate_with_unit_bank_chunks_scores_as_the_formula(query_chunk, bank_chunk, groups):
    """The GPU candidate timed beside ``knn_scores`` computes the same weighted kNN: fp32 bank, chunks that do not
    divide N = 199 or M = 23, blocks through group maxima (64 and 80 columns) and through plain top-k (13 < k x 4)."""
    import torch

    from benchmarks.knn import knn_unit_chunks
    from tests.test_knn import reference_knn

    g = torch.Generator().manual_seed(0)
    bank, queries, labels = torch.randn(199, 12, generator=g), torch.randn(23, 12, generator=g), torch.randint(0, 5, (199,), generator=g)
    expected, _ = reference_knn(bank, labels, queries, 5, k=20, temperature=0.1)
    scores = knn_unit_chunks(bank, labels, queries, 5, k=20, temperature=0.1, query_chunk=query_chunk, bank_chunk=bank_chunk,
                             groups=groups)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(bank, torch.randn(199, 12, generator=torch.Generator().manual_seed(0)))  # the bank is not changed
