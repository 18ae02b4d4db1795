"""glibc malloc tuning: a CPU step reuses freed memory instead of page-faulting it in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# A real workload (the strong augmentation of a CIFAR-size batch, the cifar10 recipe) in a fresh
# process; prints the minor page faults per call in steady state. With glibc's defaults (Debian
# glibc 2.36) it made ~2,400 per call, tuned 0.
PROGRAM = """
import json, resource, sys, torch
from ressl import allocator
from ressl.augment import strong_augment
tuned = allocator.keep_freed_memory()
torch.set_num_threads(1)
augment = strong_augment(32, (0.5,) * 3, (0.25,) * 3)
images = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8)
generator = torch.Generator().manual_seed(0)
for _ in range(10):
    augment(images, generator)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    augment(images, generator)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 40
print(json.dumps({"tuned": tuned, "faults": faults}))
"""


def run(**env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tuning only")
def test_tuned_process_reuses_memory_across_steps() -> None:
    tuned, default = run(RESSL_DEFAULT_MALLOC="0"), run(RESSL_DEFAULT_MALLOC="1")
    if not tuned["tuned"]:
        pytest.skip("not glibc: keep_freed_memory is a no-op here")
    if default["faults"] < 100:
        pytest.skip(f"this malloc already reuses the memory ({default['faults']} faults per call)")
    assert tuned["faults"] < 0.05 * default["faults"], (tuned, default)


def test_opt_out_leaves_malloc_alone() -> None:
    assert run(RESSL_DEFAULT_MALLOC="1")["tuned"] is False
