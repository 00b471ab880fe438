#!/usr/bin/env bash
# Set up (first run only) and run the demo: the seed's six jokes on the embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/liandan demo "$@"
