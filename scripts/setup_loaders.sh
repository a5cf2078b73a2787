#!/usr/bin/env bash
# Installs the real loaders that check hf_babai's exports (integration_tests/test_serving_loaders.py):
#   .loaders/compressed-tensors-<v>/  compressed-tensors <v> (+ loguru), one folder per version, put on PYTHONPATH
#                                     of a child process that runs on .venv's torch and transformers. The versions
#                                     are the one vLLM 0.34 pins and the newest release tested.
#   .venv-gptqmodel/                  GPTQModel 7.6.0 + optimum (transformers' GPTQ path) in a venv of their own
#                                     (their pins are not ours; GPTQModel 7.7 needs a CUDA torch), on the local CPU
#                                     torch 2.13.0.
# The llm-compressor environment for the format diff is scripts/setup_peer.sh. Idempotent: a marker per target.
#
# Usage: scripts/setup_loaders.sh [--force]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CT_VERSIONS=(0.17.0 0.20.1)
LOGURU=loguru==0.7.3
GPTQMODEL="gptqmodel==7.6.0 optimum==2.3.0"
TORCH=torch==2.13.0
[[ "${1:-}" == "--force" ]] && rm -rf .loaders .venv-gptqmodel/.hf_babai_complete

PIP_FLAGS=(-q --disable-pip-version-check --no-input)
for v in "${CT_VERSIONS[@]}"; do
    dir=.loaders/compressed-tensors-$v
    if [[ ! -f $dir/.complete ]]; then
        rm -rf "$dir"
        "$PY" -m pip install "${PIP_FLAGS[@]}" --no-deps --target "$dir" "compressed-tensors==$v" "$LOGURU"
        echo "compressed-tensors==$v $LOGURU" >"$dir/.complete"
    fi
    echo "setup_loaders: $dir ready"
done

V=.venv-gptqmodel
MARK="$V/.hf_babai_complete"
if [[ ! -f $MARK || "$(cat "$MARK")" != "$TORCH $GPTQMODEL" ]]; then
    [[ -x $V/bin/python ]] || "$PY" -m venv "$V"
    "$V/bin/python" -m pip install "${PIP_FLAGS[@]}" "$TORCH"
    PIN="$(mktemp)"
    trap 'rm -f "$PIN"' EXIT
    echo "$TORCH" >"$PIN"
    "$V/bin/python" -m pip install "${PIP_FLAGS[@]}" -c "$PIN" $GPTQMODEL
    "$V/bin/python" -c "import torch, gptqmodel; assert torch.version.cuda is None, torch.__version__"
    echo "$TORCH $GPTQMODEL" >"$MARK"
fi
echo "setup_loaders: $V ready ($GPTQMODEL)"
