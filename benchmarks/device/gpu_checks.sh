#!/usr/bin/env bash
# The GPU checks of docs/performance.md, one MODE per call of a lent GPU machine (each ends well
# inside the device tool's 10-minute limit). Run from the repository root:
#
#   bash benchmarks/device/gpu_checks.sh MODE
#
# MODE  all           everything that matters in ONE call within $BUDGET_S seconds (default 450):
#                     env, pytest -m gpu (at most 150 s), then ADM-256 + ResNet50 and DiT-XL/2 +
#                     SD-VAE + ResNet50 (naive, a batch sweep of the networks alone, the engine at
#                     the best batch, floor, FLOPs, peak memory), then the variants bf16-weights,
#                     checkpointing, channels-last, bf16-weights+channels-last and compile-blocks
#                     (in that order) across both workloads while the
#                     budget lasts (a variant that would not fit is skipped and recorded). Every
#                     measurement is written to $OUT as soon as it is taken.
#       env           versions, GPU, and that fiber_plugins + diffusers import (seconds)
#       tests         pytest -m gpu (tests/samplers/test_cuda.py)
#       adm           ADM-256 + ResNet50: naive, engine, floor (no variants)
#       adm-variants  ADM-256 + ResNet50: engine, floor, variants bf16-weights, channels-last,
#                     checkpointing, auto-batch (no naive)
#       adm-compile   ADM-256 + ResNet50: engine, floor, compile-blocks (inductor; its compile
#                     time is printed apart)
#       dit           DiT-XL/2 + SD-VAE + ResNet50: naive, engine, floor and the four variants
#       dit-compile   DiT-XL/2 + SD-VAE + ResNet50: engine, floor, compile-blocks
#       dinov2        ADM-256 + DINOv2 ViT-B/14: naive, engine, floor (no variants)
#       precision     benchmarks/precision_cpu.py on the GPU (Color-MNIST models, inductor)
#
# Wheels the machine lacks travel in .whl/ (benchmarks/device/fetch_wheels.sh; name .whl in the
# call's carry); they are installed into $SITE (default /tmp/site). Tables and logs go to $OUT
# (the device tool's folder that comes back), or benchmarks/results/device/ when OUT is unset.
set -euo pipefail
MODES="all | env | tests | adm | adm-variants | adm-compile | dit | dit-compile | dinov2 | precision"
MODE=${1:?"give a MODE: $MODES"}
OUT=${OUT:-benchmarks/results/device}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
case "$MODE" in
    all|env|tests|adm|adm-variants|adm-compile|dit|dit-compile|dinov2|precision) ;;
    *)
        echo "unknown MODE '$MODE'; choose $MODES" >&2
        exit 2 ;;
esac
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
HARNESS=("$PY" benchmarks/gpu_ndtm.py --out-dir "$OUT" --steps 50 --inner-steps 4)
FOUR=bf16-weights,channels-last,checkpointing,auto-batch
log() { tee "$OUT/$MODE.log"; }
env_line() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    "$PY" -c "import sys, torch, diffusers, timm, fiber_plugins as fp; \
print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', \
torch.cuda.is_available(), '| diffusers', diffusers.__version__, '| timm', timm.__version__, \
'| fiber_plugins', fp.__version__)"
}
case "$MODE" in
    all)
        START=$SECONDS
        BUDGET_S=${BUDGET_S:-450}
        {
            echo "== env"
            env_line 2>&1 || true
            echo "== pytest -m gpu (at most 150 s)"
            timeout 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rA \
                tests/samplers/test_cuda.py 2>&1 || echo "pytest exit status $?"
            LEFT=$((BUDGET_S - (SECONDS - START) - 15))
            echo "== harness, budget ${LEFT} s"
            timeout $((LEFT + 10)) "${HARNESS[@]}" \
                --workload adm256-resnet50,dit-xl2-sdvae-resnet50 \
                --batch-size 8 --samples 8 --naive-samples 1 --batch-sweep 4,8,16 \
                --floor-repeats 3 \
                --variants bf16-weights,checkpointing,channels-last,bf16-weights+channels-last,compile-blocks \
                --variants-last --budget-s "$LEFT" --tag all 2>&1 || echo "harness exit status $?"
            echo "== done in $((SECONDS - START)) s"
        } | log ;;
    env)
        (nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
         "$PY" -c "import sys, torch, diffusers, timm, fiber_plugins as fp; \
print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', \
torch.cuda.is_available(), '| diffusers', diffusers.__version__, '| timm', timm.__version__, \
'| fiber_plugins', fp.__version__)") 2>&1 | log ;;
    tests)
        "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/samplers/test_cuda.py 2>&1 | log ;;
    adm)
        "${HARNESS[@]}" --workload adm256-resnet50 --variants none --batch-size 8 --samples 8 \
            --naive-samples 1 --tag adm256-resnet50 2>&1 | log ;;
    adm-variants)
        "${HARNESS[@]}" --workload adm256-resnet50 --variants "$FOUR" --batch-size 8 \
            --samples 8 --naive-samples 0 --tag adm256-resnet50-variants 2>&1 | log ;;
    adm-compile)
        "${HARNESS[@]}" --workload adm256-resnet50 --variants compile-blocks --batch-size 8 \
            --samples 8 --naive-samples 0 --tag adm256-resnet50-compile 2>&1 | log ;;
    dit)
        "${HARNESS[@]}" --workload dit-xl2-sdvae-resnet50 --variants "$FOUR" --batch-size 16 \
            --samples 16 --naive-samples 1 --tag dit-xl2-sdvae-resnet50 2>&1 | log ;;
    dit-compile)
        "${HARNESS[@]}" --workload dit-xl2-sdvae-resnet50 --variants compile-blocks \
            --batch-size 16 --samples 16 --naive-samples 0 \
            --tag dit-xl2-sdvae-resnet50-compile 2>&1 | log ;;
    dinov2)
        "${HARNESS[@]}" --workload adm256-dinov2 --variants none --batch-size 8 --samples 8 \
            --naive-samples 1 --tag adm256-dinov2 2>&1 | log ;;
    precision)
        "$PY" benchmarks/precision_cpu.py --device cuda --compile-backend inductor \
            --out-dir "$OUT" 2>&1 | log ;;
    *)
        echo "unknown MODE '$MODE'; choose $MODES" >&2
        exit 2 ;;
esac
