#!/usr/bin/env bash
# On a lent GPU machine: serve hf_babai's exports (compressed-tensors 4/3-bit, GPTQ 4-bit) of a random-weight
# SmolLM2-shaped model with vLLM and compare greedy tokens with transformers (bench/serve_check.py). Uses the
# python already installed there; if vLLM is not importable it says so and does nothing else.
#   scripts/gpu_serve_check.sh [OUT_DIR]     (default: bench/results; writes serve_check_<gpu>.json)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${1:-bench/results}"
if ! "$PY" -c "import vllm" 2>/dev/null; then
    echo "gpu_serve_check: vLLM is not installed here ('$PY -c \"import vllm\"' fails); nothing to check"
    exit 0
fi
if ! "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "gpu_serve_check: no CUDA device visible to torch; vLLM needs one"
    exit 0
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" bench/serve_check.py prepare "$WORK"
for name in $("$PY" -c "import sys; sys.path.insert(0, 'bench'); import serve_check; print(*serve_check.EXPORTS)"); do
    # one process per export: vLLM does not release the GPU between engines in one process
    timeout 300 "$PY" bench/serve_check.py serve "$WORK" "$name" || echo "gpu_serve_check: vLLM failed on $name"
done
GPU="$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")"
mkdir -p "$OUT"
"$PY" bench/serve_check.py compare "$WORK" | tee "$OUT/serve_check_$GPU.json"
