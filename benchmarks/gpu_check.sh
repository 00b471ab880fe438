#!/usr/bin/env bash
# GPU readiness in one command, under 8 minutes on a CUDA machine:
#   1. `liandan demo` in bf16 (liandan's default dtype on CUDA): six exact answers that stop;
#   2. benchmarks/train_speed.py: liandan vs HF Trainer + PEFT, seed 0;
#   3. benchmarks/memory_qwen.py: LoRA peak memory on a Qwen2.5-1.5B-shaped model;
#   4. benchmarks/generate_speed.py: generation on both engines;
# then one table that names the GPU. Without CUDA it fails at once: it never measures a CPU by mistake.
#
#   benchmarks/gpu_check.sh                           # on the CUDA machine
#   benchmarks/gpu_check.sh --cpu-dry-run MODEL_DIR   # every step at toy size on the CPU, with a tiny model
#                                                     # (tests/test_benchmarks.py runs this so the script cannot rot)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [ "${1:-}" = "--cpu-dry-run" ]; then
  MODEL=${2:?"gpu_check: --cpu-dry-run needs a small model directory"}
  export CUDA_VISIBLE_DEVICES=""
  GPU="none: CPU dry run"
  DEMO_EXIT="0 1"  # a tiny random model cannot learn the six answers; the demo must still run to its summary
  DEMO=(--model "$MODEL" --iters 2 --max-tokens 4)
  TRAIN=(--model "$MODEL" --steps 1)
  MEMORY=(--model "$MODEL" --iters 1)
  GENERATE=(--model "$MODEL" --tokens 4)
else
  if ! GPU=$("$PY" -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(0))" 2>/dev/null); then
    echo "gpu_check: FAILED: torch sees no CUDA device (torch.cuda.is_available() is False); install a CUDA build of" \
         "torch into the venv and check nvidia-smi. Nothing was measured." >&2
    exit 1
  fi
  DEMO=()
  DEMO_EXIT="0"
  TRAIN=(--seeds 0)
  MEMORY=(--iters 2)
  GENERATE=(--tokens 128)
fi

declare -a ROWS
FAILED=0
# step NAME SECONDS_ALLOWED "EXIT CODES" HEADLINE_REGEX COMMAND...: run it, keep its output, add one table row.
step() {
  local name=$1 limit=$2 codes=$3 pattern=$4
  shift 4
  local start=$SECONDS status=ok code=0
  timeout "$limit" "$@" >"$WORK/$name.log" 2>&1 || code=$?
  if [[ " $codes " != *" $code "* ]]; then status="FAILED (exit $code)"; FAILED=1; fi
  local headline
  headline=$(grep -E "$pattern" "$WORK/$name.log" | tr -s ' ' | paste -sd ';' -)
  [ "$status" = ok ] || headline=$(tail -n 3 "$WORK/$name.log" | tr -s ' ' | paste -sd ';' -)
  ROWS+=("| $name | $status | $((SECONDS - start)) | ${headline:-?} |")
}

step demo 150 "$DEMO_EXIT" "answers exact and stopped" "$PY" -m liandan demo --out "$WORK/demo" "${DEMO[@]}"
step train_speed 150 0 "^(HF Trainer|liandan) " "$PY" benchmarks/train_speed.py "${TRAIN[@]}"
step memory_qwen 150 0 "^(no checkpointing|--grad-checkpoint) " "$PY" benchmarks/memory_qwen.py "${MEMORY[@]}"
step generate_speed 90 0 "^(liandan|HF|llama)" "$PY" benchmarks/generate_speed.py "${GENERATE[@]}"

LLAMA_GPU=$("$PY" -c "import llama_cpp; print('yes' if llama_cpp.llama_supports_gpu_offload() else 'no (CPU build)')" 2>/dev/null \
            || echo "not installed")
echo
echo "GPU: $GPU; torch $("$PY" -c 'import torch; print(torch.__version__)'); llama.cpp GPU offload: $LLAMA_GPU"
echo
echo "| step | status | seconds | result |"
echo "| --- | --- | ---: | --- |"
printf '%s\n' "${ROWS[@]}"
if [ $FAILED = 1 ]; then
  echo "gpu_check: FAILED: a step failed (its last lines are in the table)" >&2
  exit 1
fi
