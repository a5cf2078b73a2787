#!/usr/bin/env bash
# The test command (README, .ci/run): set up (the package, then the real loaders and llm-compressor that check the
# exports, each in its own environment), then lint, build the docs strictly and run every default test.
#   scripts/test.sh [--latest] [pytest args...]    --latest: against the newest releases (.venv-latest)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
if [[ "${1:-}" == "--latest" ]]; then
    shift
    bash scripts/setup.sh --latest
    VENV=.venv-latest
else
    bash scripts/setup.sh
fi
bash scripts/setup_loaders.sh
bash scripts/setup_peer.sh
"$VENV/bin/ruff" check .
SITE="$(mktemp -d)"
trap 'rm -rf "$SITE"' EXIT
"$VENV/bin/mkdocs" build --strict --quiet --site-dir "$SITE"
"$VENV/bin/python" -m pytest -q --durations=15 "$@"
