"""glibc malloc tuning: a CPU step reuses freed memory instead of page-faulting it in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# A real workload (the strong augmentation of a CIFAR-size batch, the cifar10-cpu recipe: no blur) in a fresh
# process; prints the minor page faults per call in steady state. Both processes start from glibc's documented
# thresholds (128 KiB), pinned so that glibc cannot raise them itself as it goes (its dynamic mmap threshold): left
# free, the default process made 31-322 faults per call from run to run, pinned 3,091 every time. Tuned, 0 in most
# windows, but the heap may still grow once inside one (384 pages, one batch), hence 100 calls after 40 of warm-up
# (at most 2.6 per call measured).
PROGRAM = """
import json, resource, sys, torch
from ressl import allocator
from ressl.augment import strong_augment
tuned = allocator.keep_freed_memory()
torch.set_num_threads(1)
augment = strong_augment(32, (0.5,) * 3, (0.25,) * 3, blur=False)
images = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8)
generator = torch.Generator().manual_seed(0)
for _ in range(40):
    augment(images, generator)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    augment(images, generator)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 100
print(json.dumps({"tuned": tuned, "faults": faults}))
"""


GLIBC_DEFAULTS = "glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=131072"


def run(*envs: dict[str, str]) -> list[dict]:
    """PROGRAM's result in a fresh process for each of ``envs`` (added to the environment), the processes side by
    side (page faults are counted per process)."""
    procs = [subprocess.Popen([sys.executable, "-c", PROGRAM], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "GLIBC_TUNABLES": GLIBC_DEFAULTS, **env}) for env in envs]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tuning only")
def test_tuned_process_reuses_memory_across_steps() -> None:
    tuned, default = run({"RESSL_DEFAULT_MALLOC": "0"}, {"RESSL_DEFAULT_MALLOC": "1"})
    assert default["tuned"] is False  # RESSL_DEFAULT_MALLOC=1 leaves malloc alone
    if not tuned["tuned"]:
        pytest.skip("not glibc: keep_freed_memory is a no-op here")
    if default["faults"] < 100:
        pytest.skip(f"this malloc already reuses the memory ({default['faults']} faults per call)")
    # a call allocates over 2,000 pages of buffers: a tuned process faults a small fraction of one batch (384 pages)
    assert tuned["faults"] < min(10.0, 0.1 * default["faults"]), (tuned, default)
