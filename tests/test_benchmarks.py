"""The benchmarks run end to end (``python -m benchmarks --quick``, one thread) on generated images and print their four ratios."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    # a window that starts inside the warm-up counts nowhere, even where it ends after it: (5,8] with 6 steps skipped
    assert stretch_totals(metrics, batch_size=3, skip_steps=6, call_starts=[0, 5, 9]) == [(0.0, 0.0, 0), (0.0, 0.0, 0), (3.0, 3 / 10.0, 1)]


_E2E_SPIED = """
import json, sys
from benchmarks import common, end_to_end

timed, totals = [], []
real_timed, real_totals = common.timed, end_to_end.stretch_totals


def spy_timed(fn, device):  # each bare step's time, as measured
    timed.append(real_timed(fn, device))
    return timed[-1]


def spy_totals(*args, **kwargs):  # each stretch's training, as read from the run's metrics.jsonl
    totals[:] = real_totals(*args, **kwargs)
    return list(totals)


common.timed, end_to_end.stretch_totals = spy_timed, spy_totals
result = end_to_end.run(end_to_end.add_flags(common.parser("", "end_to_end")).parse_args(sys.argv[1:]))
print(json.dumps(dict(ratio=result.ratio, detail=result.detail, timed=timed, totals=totals)))
"""


def test_end_to_end_ratio_is_the_median_of_each_stretchs_own_against_the_bare_steps_either_side(tmp_path):
    """The end-to-end ratio is the median, over the stretches of training with a logged window after the warm-up, of
    each one's images/s against the bare step's images/s from the median of the bare steps timed just before and
    just after it; measured by the benchmark itself (its bare steps' times and stretches' totals watched, not changed).
    64 images make 2 steps an epoch (a call, a stretch) at --quick's batch of 32: the first stretch is the warm-up's
    window alone and counts nowhere."""
    import json
    import statistics

    import numpy as np

    from benchmarks import common

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", x=rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 10, 64))
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-c", _E2E_SPIED, "--quick", "--device", "cpu", "--data", str(tmp_path), "--seconds", "2",
               "--threads", "1"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    gaps = [out["timed"][i:i + 2] for i in range(0, len(out["timed"]), 2)]  # --quick: 2 bare steps a gap
    stretches, batch = out["totals"], common.QUICK_OVERRIDES["batch_size"]
    assert len(gaps) == len(stretches) + 1 >= 4 and stretches[0] == [0.0, 0.0, 0], (gaps, stretches)
    ratios = [images / seconds / (batch / statistics.median(gaps[k] + gaps[k + 1]))
              for k, (images, seconds, _) in enumerate(stretches) if seconds > 0]
    assert out["ratio"] == pytest.approx(statistics.median(ratios), rel=1e-9), (out, ratios)
    assert f"median of {len(ratios)} stretches' ratios" in out["detail"], out["detail"]
    assert f"(range {min(ratios):.3f}-{max(ratios):.3f})" in out["detail"], out["detail"]


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


def test_the_decode_benchmark_prints_its_ratio(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    command = [sys.executable, "-m", "benchmarks.decode", "--quick", "--repeats", "1"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    match = re.search(r"^\[decode\] folder decode speed-up .*: ratio (\S+) \(target >= 2: not measured", proc.stdout, flags=re.MULTILINE)
    assert match and float(match.group(1)) > 0, proc.stdout
    assert "decoded at no less than 191 x 144" in proc.stdout and not list(tmp_path.glob("ressl-bench-photos-*"))  # removed


@pytest.mark.slow
def test_end_to_end_reads_an_image_folder_as_pretrain_does(tmp_path):
    """``--data`` a folder of images (one size: held in memory); the other benchmarks, which need train.npz, refuse it."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "images" / f"c{c}").mkdir(parents=True)
        for i in range(48):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "images" / f"c{c}" / f"{i}.png")
    env = dict(os.environ, TMPDIR=str(tmp_path))
    command = [sys.executable, "-m", "benchmarks.end_to_end", "--quick", "--device", "cpu", "--threads", "1", "--seconds", "2",
               "--data", str(tmp_path / "images"), "--set", "dataset=folder", "--set", "image_size=16", "--set", "workers=0"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "data: the image folder" in proc.stdout and "96 images in 2 classes" in proc.stdout
    assert "(training images held in memory: 0.00 GB)" in proc.stdout
    assert re.search(r"^\[end_to_end\] end to end .*: ratio \d", proc.stdout, flags=re.MULTILINE), proc.stdout
    command = [sys.executable, "-m", "benchmarks.step", "--quick", "--data", str(tmp_path / "images")]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stderr.strip().endswith(f"--data {tmp_path / 'images'}: no train.npz there"), proc.stderr


def test_data_dir_takes_a_folder_of_images_only_where_asked_and_names_what_is_missing(tmp_path):
    """end_to_end (``folders=True``) takes a directory of images as ``ressl pretrain`` reads it; a directory without
    images is refused by name, and the benchmarks that need train.npz refuse a folder of images."""
    import argparse

    from PIL import Image

    from benchmarks.common import data_dir

    (tmp_path / "images" / "c0").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "images" / "c0" / "0.png")
    (tmp_path / "empty" / "c0").mkdir(parents=True)

    def args(path: Path) -> argparse.Namespace:
        return argparse.Namespace(data=str(path), quick=True)

    assert data_dir(args(tmp_path / "images"), folders=True) == (tmp_path / "images", f"the image folder {tmp_path / 'images'}")
    with pytest.raises(SystemExit, match=r"no train.npz there and no images$"):
        data_dir(args(tmp_path / "empty"), folders=True)
    with pytest.raises(SystemExit, match=r"no train.npz there$"):
        data_dir(args(tmp_path / "images"))
