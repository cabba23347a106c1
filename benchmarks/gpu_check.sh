#!/usr/bin/env bash
# The GPU check of lossd: install, start the server on CUDA, run the benchmark against it.
# Meant to finish in under 5 minutes on a machine with an NVIDIA GPU and its driver.
#
#   benchmarks/gpu_check.sh                # a fresh .venv-gpu with PyPI's torch (CUDA on Linux)
#   PYTHON=python3 benchmarks/gpu_check.sh # reuse a Python that already has a CUDA torch
#
# Writes bench-results/gpu/bench.json and bench.png (OUT=... to change) and prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results/gpu}
PORT=${PORT:-50061}
mkdir -p "$OUT"

if [ -n "${PYTHON:-}" ]; then
    # An existing environment: add lossd and whatever of its dependencies is missing.
    "$PYTHON" -m pip install --quiet --no-deps -e . || "$PYTHON" -m pip install --quiet -e .
    py=$PYTHON
else
    python3 -m venv .venv-gpu
    .venv-gpu/bin/pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
    .venv-gpu/bin/pip install --quiet -e ".[bench]"
    py=.venv-gpu/bin/python
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

"$py" -m lossd.cli serve --host 127.0.0.1 --port "$PORT" --device cuda:0 --state-dir "" \
    --shared-memory --log-level WARNING > "$OUT/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT

# The benchmark waits until the server answers, then times in process (on this GPU too)
# against unary, stream and shared memory.
"$py" - <<PY
import torch
from lossd.client import LossClient
with LossClient("127.0.0.1:$PORT", retries=30) as client:
    print("server up:", len(client.list_losses()), "losses")
PY
"$py" -m lossd.cli bench --server "127.0.0.1:$PORT" --local-device cuda \
    --repeats "${REPEATS:-10}" --out "$OUT" \
    | tee "$OUT/table.txt"
