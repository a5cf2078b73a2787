#!/usr/bin/env bash
# The test command against the newest release of every dependency (torch aside), in .venv-latest: run it before
# scripts/lock.sh moves the pins, or whenever a dependency released, to see what the next lock would break.
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash scripts/test.sh --latest "$@"
