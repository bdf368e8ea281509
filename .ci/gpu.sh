#!/usr/bin/env bash
# GPU checks and benchmarks, for a lent CUDA machine (the device tool); CI never runs this.
#
#   bash .ci/gpu.sh env tests kernels        # stages run in the order given
#   KERNEL_ARGS="--ops fused_linear_ce logprobs" bash .ci/gpu.sh kernels
#   TESTS="tests/kernels tests/test_model.py" TEST_K="apply or gpu" bash .ci/gpu.sh tests
#
# Stages: env (device, versions), tests (every kernel test natively on the GPU, the `gpu`-marked ones
# too), kernels (kernels.bench.bench_kernels), sweep (kernels.bench.sweep_lm_head), tune (kernels.bench.tune_kernels:
# launch parameters of RMSNorm and rotary), pretrain (pretrain.bench_throughput, ours vs HF GLM),
# dpo / ppo (align.bench.*; ppo needs POLICY=<folder with a tokenizer>).
# Logs and CSVs go under $OUT (set by the device tool; runs/gpu otherwise). Wheels the machine lacks
# (Liger-Kernel for the comparison columns) are installed from .whl/ when that folder is there.
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
# The code imports as glmwb.<folder>; without installing anything, a linked tree lays the folders out under
# that namespace as the wheel does (the repository root stays on the path for the tests package).
rm -rf build/gpu && mkdir -p build/gpu/glmwb
for d in kernels pretrain annotation rewards align ui recipes; do ln -s "$PWD/$d" "build/gpu/glmwb/$d"; done
export PYTHONPATH=$PWD/build/gpu:$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0
run() {  # run NAME TIMEOUT CMD...: tee the output to $OUT/NAME.log, remember a failure, go on
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" = 0 ] || status=1
}
for stage in "$@"; do
    case $stage in
    env)
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
        $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
        $PY -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" \
            || echo "liger-kernel: not installed"
        git log -1 --format='commit %h %cd' 2>/dev/null || true
        ;;
    tests)
        run tests_kernels "${TESTS_TIMEOUT:-300}" $PY -m pytest -q -p no:cacheprovider -m "gpu or not slow" \
            -n "${TEST_WORKERS:-4}" ${TESTS:-tests/kernels} ${TEST_K:+-k "$TEST_K"}
        ;;
    kernels)
        run bench_kernels "${BENCH_TIMEOUT:-480}" $PY -m glmwb.kernels.bench.bench_kernels --out "$OUT/kernels" ${KERNEL_ARGS:-}
        ;;
    sweep)
        run sweep_lm_head "${BENCH_TIMEOUT:-300}" $PY -m glmwb.kernels.bench.sweep_lm_head ${SWEEP_ARGS:-}
        ;;
    tune)
        run tune_kernels "${BENCH_TIMEOUT:-420}" $PY -m glmwb.kernels.bench.tune_kernels --out "$OUT/tune" ${TUNE_ARGS:-}
        ;;
    pretrain)
        run bench_throughput "${BENCH_TIMEOUT:-300}" $PY -m glmwb.pretrain.bench_throughput --device cuda --dtype bf16 \
            --hidden-size 2048 --num-layers 8 --head-dim 128 --num-heads 16 --num-kv-heads 2 \
            --intermediate-size 5632 --vocab-size 32768 --batch-size 8 --seq-len 1024 --out "$OUT/throughput.json" \
            ${PRETRAIN_ARGS:-}
        ;;
    dpo)
        run bench_dpo "${BENCH_TIMEOUT:-300}" $PY -m glmwb.align.bench.bench_dpo --device cuda --dtype bfloat16 \
            --hidden 1024 --layers 8 --vocab 32768 --pairs 32 --max-len 1024 --row-tokens 2048 --steps 6 \
            --csv "$OUT/dpo_packed_vs_padded.csv" ${DPO_ARGS:-}
        ;;
    ppo)
        run bench_ppo "${BENCH_TIMEOUT:-300}" $PY -m glmwb.align.bench.bench_ppo --device cuda --policy "${POLICY:?POLICY=folder}" \
            --out "$OUT/ppo_step.csv" ${PPO_ARGS:-}
        ;;
    *)
        echo "unknown stage $stage (env tests kernels sweep tune pretrain dpo ppo)" >&2
        status=2
        ;;
    esac
done
exit $status
