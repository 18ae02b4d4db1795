#!/bin/bash
# One short GPU check (its parts before the one-step-per-call variant, plus a profile, took 152 s on an H200): the CUDA tests, the four
# benchmarks, and end to end with the eager step, with one step's views per augmentation call, with the authors' split BatchNorm
# (8 groups in both networks); then from two image folders (one held in memory, one read by loader workers); last, with
# the official per-image pipeline beside them. Runs with whatever python3 holds PyTorch (PY= names another)
# (no virtual environment needed), from the repository's root:
#
#   bash benchmarks/gpu_check.sh [DATA_DIR]     # DATA_DIR holds train.npz; default: 50,000 random 32x32 images
#
# Every stage runs under one deadline (BUDGET seconds from the start, default 450: a device lends 600 s a command), so
# that a stage that hangs costs the ones after it their time, not the whole check. A stage that fails or runs out of
# time says so, with its exit status and the end of its log. Logs go to $OUT (where set) or gpu-check-logs/ (9 files).
#
# A dry run of the script itself, on a machine without a GPU (the CUDA tests are skipped there; the numbers mean nothing):
#
#   DEVICE=cpu QUICK=--quick TRAIN_SECONDS=4 PY=.venv/bin/python bash benchmarks/gpu_check.sh
set -u
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-}
TRAIN_SECONDS=${TRAIN_SECONDS:-16}
PY=${PY:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
LOGS=${OUT:-gpu-check-logs}
mkdir -p "$LOGS"
DATA=${1:-}
T0=$(date +%s)
END=$(( T0 + ${BUDGET:-450} ))
MADE=()  # the generated data, removed at the end
trap 'rm -rf "${MADE[@]:-}"' EXIT
stamp() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }

# stage NAME LIMIT LOG COMMAND...: COMMAND's output into LOG, for at most LIMIT seconds and no later than the deadline
stage() {
    local name=$1 limit=$2 log=$3 left rc
    shift 3
    left=$(( END - $(date +%s) ))
    if [ "$left" -lt 15 ]; then
        echo "!!! $name: skipped, ${left} s left before the deadline"
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    stamp "$name (at most $limit s)"
    timeout -k 10 "$limit" "$@" > "$log" 2>&1
    rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "!!! $name: exit $rc$([ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo ", stopped at its $limit s"); the end of $log:"
        tail -n 8 "$log"
    fi
    return "$rc"
}

stamp environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOGS/env.txt"
"$PY" -c "import sys, os, torch, torchvision; print('python', sys.version.split()[0], 'torch', torch.__version__,
 'torchvision', torchvision.__version__, 'cpus', os.cpu_count())" | tee -a "$LOGS/env.txt"
"$PY" -c "from torch.utils.tensorboard import SummaryWriter" 2>&1 | tail -n 1 | sed 's/^/tensorboard: /' | tee -a "$LOGS/env.txt"
df -h /dev/shm | tail -n 1 | sed 's/^/shm: /' | tee -a "$LOGS/env.txt"
if [ -z "$DATA" ]; then  # the speed of a step does not depend on the pixels
    DATA=$(mktemp -d)
    MADE+=("$DATA")
    "$PY" -c "import numpy as np; r = np.random.default_rng(0)
for name, n in (('train', 50000), ('test', 10000)):
    np.savez('$DATA/' + name + '.npz', x=r.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y=r.integers(0, 10, n))"
    echo "data: 50,000 random uint8 32x32 images in $DATA"
fi

# the tests that need CUDA ("gpu": views made on the GPU), each at most 60 s where pytest-timeout is there
PER_TEST=$("$PY" -c "import pytest_timeout" 2>/dev/null && echo "--timeout 60")
# shellcheck disable=SC2086
stage "CUDA tests" 110 "$LOGS/pytest.log" "$PY" -m pytest -k "cuda or graph or gpu" -p no:cacheprovider -rs $PER_TEST
grep -a -E "^(E  |FAILED|ERROR)|passed|failed" "$LOGS/pytest.log" | head -30

stage "benchmarks (cifar10 preset)" 150 "$LOGS/bench.log" "$PY" -m benchmarks --device "$DEVICE" --data "$DATA" --seconds "$TRAIN_SECONDS" $QUICK
grep -a -E "ratio" "$LOGS/bench.log" | grep -a -v "^ " | head -8
grep -a -A 12 "^benchmark " "$LOGS/bench.log"

WORKERS=$(( $(nproc) - 1 ))  # loader workers where a stage has them
# end_to_end NAME LIMIT FLAGS...: the end-to-end benchmark with FLAGS (the cifar10 preset unless they name another),
# then the layout of a folder and the ratio
end_to_end() {
    local name=$1 limit=$2
    shift 2
    stage "end to end, $name" "$limit" "$LOGS/e2e_$name.log" "$PY" -m benchmarks.end_to_end --device "$DEVICE" \
        --seconds "$TRAIN_SECONDS" $QUICK "$@" && grep -a -E '^\[end_to_end\] (folder|end)' "$LOGS/e2e_$name.log" | tail -n 2
}
end_to_end eager 60 --data "$DATA" --set cuda_graph=false
end_to_end one_step_per_augment_call 60 --data "$DATA" --set augment_steps=1
end_to_end split_bn_8 60 --data "$DATA" --set bn_groups=8 --set student_bn_groups=8

# image folders, read as `ressl pretrain` reads them: 20,000 JPEGs of 64 px (one size: held in memory, as Tiny-ImageNet
# is), and 4,000 of 300-500 px (mixed sizes: decoded and cropped by loader workers, as ImageNet is)
FOLDERS=$(mktemp -d)
MADE+=("$FOLDERS")
"$PY" - "$FOLDERS" <<'PY'
import sys
from multiprocessing import Pool
from pathlib import Path
import numpy as np
from PIL import Image
def write(job):
    root, n, lo, hi, seed = job
    r = np.random.default_rng(seed)
    for i in range(n):
        h, w = r.integers(lo, hi + 1, 2)
        folder = Path(root) / f"c{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(r.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{seed}_{i}.jpg", quality=90)
root = sys.argv[1]
with Pool(16) as pool:
    pool.map(write, [(f"{root}/held/train", 1250, 64, 64, s) for s in range(16)]
             + [(f"{root}/workers/train", 250, 300, 500, 100 + s) for s in range(16)])
PY
echo "folders: $(find "$FOLDERS/held" -name '*.jpg' | wc -l) JPEGs of 64 px, $(find "$FOLDERS/workers" -name '*.jpg' | wc -l) of 300-500 px in $FOLDERS"
end_to_end folder_held 60 --preset tinyimagenet --data "$FOLDERS/held" --set dataset=folder --set workers=$WORKERS
end_to_end folder_workers 75 --preset imagenet --data "$FOLDERS/workers" --set dataset=folder --set workers=$WORKERS

end_to_end torchvision 60 --data "$DATA" --set augment_backend=torchvision --set workers=$WORKERS  # the official per-image pipeline
stamp done
