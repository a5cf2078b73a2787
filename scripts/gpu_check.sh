#!/usr/bin/env bash
# The first GPU run of hf_babai in one script (docs/kernels.md, "The GPU check"): the kernel tests (the
# gpu-marked ones included) on CUDA, every format's kernel vs BF16 at M = 1, 16, 128 with the copy bandwidth, the
# engine on CUDA against the CPU, decode tokens/s of a Qwen2.5-1.5B-shaped model, and the distributed engine on
# NCCL with one rank. One JSON file per part and a
# summary under OUT_DIR; a part that fails or runs out of time is recorded as such and the next one still runs.
# Uses the python already installed there (torch + triton), hf_babai from this checkout; nothing is downloaded.
#   scripts/gpu_check.sh [OUT_DIR]              on a CUDA machine, about 6 minutes, at most 9
#                                               (default OUT_DIR: $OUT if set, else bench/results/gpu_check)
#   scripts/gpu_check.sh --dry-run OUT_DIR      on CPU: the same steps on tiny sizes in Triton's interpreter, so
#                                               the script cannot rot (tests/test_gpu_check.py runs it)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY=1
    shift
fi
PY="${PYTHON:-python3}"
DEST="${1:-${OUT:-bench/results/gpu_check}}"
mkdir -p "$DEST"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Every part records its wall time and exit status; a part past its budget is stopped (status 124).
part() {
    local name="$1" budget="$2"
    shift 2
    echo "gpu_check: $name (at most ${budget} s)"
    local start=$SECONDS
    timeout --kill-after=10 "$budget" "$@" >"$WORK/$name.stdout" 2>"$WORK/$name.stderr"
    echo "$? $((SECONDS - start))" >"$WORK/$name.status"
    tail -n 3 "$WORK/$name.stderr"
}

TESTS=(tests/test_kernels.py tests/test_kernels_nonclip.py)  # the kernel tests; the gpu-marked ones live here
if [[ $DRY == 1 ]]; then
    # no GPU even where one exists: the interpreter, tiny sizes, two kernel tests
    export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
    part tests 120 "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" --junitxml="$WORK/tests.xml" \
        -k "test_split_k_accumulates_like_one_pass or test_gpu_cuda_graph_capture"
    part kernels 120 "$PY" bench/kernel_speed.py --smoke --part kernels --out "$WORK/kernels.json"
    part engine 120 "$PY" bench/engine_device.py --tiny --out "$WORK/engine.json"
    part decode 120 "$PY" bench/kernel_speed.py --smoke --part decode --out "$WORK/decode.json"
    part distributed 120 "$PY" bench/distributed_device.py --out "$WORK/distributed.json"
else
    if ! "$PY" -c "import torch, triton; assert torch.cuda.is_available()" 2>/dev/null; then
        echo "gpu_check: needs torch with a visible CUDA device and triton ('$PY'); use --dry-run on CPU"
        exit 2
    fi
    unset TRITON_INTERPRET
    # The recorded run is of the Triton path: modules left on backend="auto" use it here (kernel_ops.py).
    export HF_BABAI_TRITON=1
    XDIST=()
    if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 4); fi  # Triton compiles in parallel
    part tests 150 "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" "${TESTS[@]}" --junitxml="$WORK/tests.xml"
    part kernels 150 "$PY" bench/kernel_speed.py --part kernels --out "$WORK/kernels.json"
    part engine 90 "$PY" bench/engine_device.py --out "$WORK/engine.json"
    part decode 90 "$PY" bench/kernel_speed.py --part decode --out "$WORK/decode.json"
    part distributed 60 "$PY" bench/distributed_device.py --out "$WORK/distributed.json"
fi
"$PY" bench/gpu_report.py "$WORK" "$DEST"
