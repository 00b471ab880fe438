#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite, slow end-to-end tests included.
# Quick run without them: scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
exec .venv/bin/python -m pytest "$@"
