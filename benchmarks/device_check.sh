#!/usr/bin/env bash
# The GPU checks, one script (under 8 minutes on one H200): the accelerator tests, then the GPU
# benchmarks (benchmarks/accelerator.py), their tables printed and written to $OUT (or
# ./device_check_out). Run it whenever the device tool lends a GPU, from the repository root:
#     bash benchmarks/device_check.sh
# and record the tables in BENCHMARKS.md with the machine. The project never needs it to pass
# its tests (CI runs on CPU, where the cudnn tests skip).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-device_check_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# DEVICE_CHECK_DRY=1: the same steps on CPU with --tiny shapes (checks the script, measures nothing).
dry=${DEVICE_CHECK_DRY:-0}
export JAX_PLATFORMS=$([ "$dry" = 1 ] && echo cpu || echo cuda)   # tests/conftest.py defaults to cpu
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.6   # leave PyTorch (the peers) the rest of the GPU
py=${PYTHON:-python3}
(nvidia-smi -L 2>&1 || true) | tee "$out/machine.txt"
$py -c "import jax, flax, optax, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'transformers', transformers.__version__, jax.devices())" 2>&1 | tee -a "$out/machine.txt"

# 1. The accelerator tests: cudnn against xla (forward, gradient), the model against transformers
#    (float32 on xla at full matmul precision; bfloat16 on cudnn, the auto choice on GPU).
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 90 $py -m pytest -q -x -p no:cacheprovider \
    tests/test_attention.py tests/test_model_parity.py 2>&1 | tee "$out/tests.txt"
rc=${PIPESTATUS[0]}
echo "device_check: tests rc=$rc"

# 2. The benchmarks, each against its peer in the same run; one process and time limit per part,
#    so a slow part cannot take the others' time (70 + 140 + 90 + 80 s at most).
for part in attention:70 update:140 decode:90 engine:80; do
    name=${part%%:*}
    timeout "${part##*:}" $py benchmarks/accelerator.py --parts "$name" --reps 3 $([ "$dry" = 1 ] && echo --tiny) \
        --json "$out/$name.json" 2>&1 | tee "$out/$name.md"
    part_rc=${PIPESTATUS[0]}
    echo "device_check: $name rc=$part_rc"
    rc=$(( rc | part_rc ))
done
exit $(( rc != 0 ))
