#!/bin/bash
# One short GPU check (its parts before the one-step-per-call variant, plus a profile, took 152 s on an H200): the CUDA tests, the four
# benchmarks, and end to end with the eager step, with one step's views per augmentation call, with the authors' split BatchNorm
# (8 groups in both networks), and with the official per-image pipeline beside them. Runs with whatever python3 holds PyTorch
# (no virtual environment needed), from the repository's root:
#
#   bash benchmarks/gpu_check.sh [DATA_DIR]     # DATA_DIR holds train.npz; default: 50,000 random 32x32 images
#
# Logs go to $OUT (where set) or gpu-check-logs/; the last lines of each are printed.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
LOGS=${OUT:-gpu-check-logs}
mkdir -p "$LOGS"
DATA=${1:-}
T0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }

stamp environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOGS/env.txt"
python3 -c "import sys, os, torch, torchvision; print('python', sys.version.split()[0], 'torch', torch.__version__,
 'torchvision', torchvision.__version__, 'cpus', os.cpu_count())" | tee -a "$LOGS/env.txt"
if [ -z "$DATA" ]; then  # the speed of a step does not depend on the pixels
    DATA=$(mktemp -d)
    python3 -c "import numpy as np; r = np.random.default_rng(0)
for name, n in (('train', 50000), ('test', 10000)):
    np.savez('$DATA/' + name + '.npz', x=r.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y=r.integers(0, 10, n))"
    echo "data: 50,000 random uint8 32x32 images in $DATA"
fi

stamp "CUDA tests"
timeout 150 python3 -m pytest -k "cuda or graph" -p no:cacheprovider -rs > "$LOGS/pytest.log" 2>&1
grep -E "^(E  |FAILED|ERROR)|passed|failed" "$LOGS/pytest.log" | head -30

stamp "benchmarks (cifar10 preset)"
timeout 240 python3 -m benchmarks --device cuda --data "$DATA" > "$LOGS/bench.log" 2>&1
grep -a -v -e '%|' -e '^\[' "$LOGS/bench.log" | tail -11

for variant in "eager:--set cuda_graph=false" "one_step_per_augment_call:--set augment_steps=1" "split_bn_8:--set bn_groups=8 --set student_bn_groups=8" "torchvision:--set augment_backend=torchvision --set workers=$(( $(nproc) - 1 ))"; do
    name=${variant%%:*}
    stamp "end to end, $name"
    # shellcheck disable=SC2086
    timeout 90 python3 -m benchmarks.end_to_end --device cuda --data "$DATA" --seconds 16 ${variant#*:} > "$LOGS/e2e_$name.log" 2>&1
    grep -a '^\[end_to_end\] end' "$LOGS/e2e_$name.log" | tail -1
done
stamp done
