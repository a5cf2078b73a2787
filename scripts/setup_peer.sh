#!/usr/bin/env bash
# Create the peer virtualenv (.venv-peer at the repo root) holding llm-compressor, the GPTQ baseline
# used by bench/peer_llmcompressor.py. llm-compressor pins an older transformers than hf_babai, so it
# cannot share .venv.
#
# Idempotent: a marker file records the install spec; when it matches, the script exits at once.
# torch is installed first from the local CPU wheel and then pinned with a constraints file, so that no
# later install can replace it with a CUDA build (which would pull GBs of nvidia-* packages).
#
# Usage: scripts/setup_peer.sh [--force]
#   PEER_PYTHON   interpreter used to create the venv (default: python3)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/.venv-peer"
PY="${PEER_PYTHON:-python3}"

TORCH_SPEC="torch==2.13.0"
# Newest llm-compressor release at the time of writing; it pulls transformers 5.17.0 and
# compressed-tensors 0.19.0 (both pinned by llmcompressor itself). Pinned here for reproducibility.
PEER_SPECS=("llmcompressor==0.14.0.1" "transformers==5.17.0" "compressed-tensors==0.19.0")
SPEC="$TORCH_SPEC ${PEER_SPECS[*]}"
MARKER="$VENV/.hf_babai_peer_complete"

if [[ "${1:-}" == "--force" ]]; then
    rm -f "$MARKER"
fi

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$SPEC" && -x "$VENV/bin/python" ]]; then
    echo "setup_peer: $VENV is complete ($SPEC)"
    exit 0
fi

echo "setup_peer: building $VENV ($SPEC)"
rm -f "$MARKER"
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
# -qq also hides the "Location ... is ignored" warnings of the configured local indexes; errors still show.
PIP=("$VPY" -m pip --disable-pip-version-check --no-input -qq)

# 1. torch first: the local CPU wheel (found through pip's find-links / local indexes).
"${PIP[@]}" install "$TORCH_SPEC"

# 2. Everything else, with torch held at 2.13.0 (the installed +cpu build satisfies ==2.13.0).
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "$TORCH_SPEC" >"$CONSTRAINTS"
"${PIP[@]}" install -c "$CONSTRAINTS" "${PEER_SPECS[@]}"

# 3. Verify: torch is still the CPU build, the stack imports, and pip sees no broken requirements.
"$VPY" - <<'EOF'
import sys

import torch

if not torch.__version__.startswith("2.13.0") or torch.version.cuda is not None:
    sys.exit(f"setup_peer: unexpected torch build {torch.__version__} (cuda={torch.version.cuda})")
import compressed_tensors
import llmcompressor
import transformers
from llmcompressor import oneshot  # noqa: F401
from llmcompressor.modifiers.quantization import GPTQModifier  # noqa: F401

print(
    f"setup_peer: torch {torch.__version__}, transformers {transformers.__version__}, "
    f"llmcompressor {llmcompressor.__version__}, compressed-tensors {compressed_tensors.__version__}"
)
EOF
"${PIP[@]}" check >/dev/null || { "${PIP[@]}" check; echo "setup_peer: pip check failed" >&2; exit 1; }

echo "$SPEC" >"$MARKER"
echo "setup_peer: done"
