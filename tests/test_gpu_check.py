"""benchmarks/gpu_check.sh: its CPU dry run goes through every step, and without CUDA the real run refuses."""

import os
import subprocess
import sys

import pytest
from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def run(*args, env=None):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=1500,
                          env=dict(os.environ, PYTHON=sys.executable, **(env or {})))


@pytest.mark.slow  # four benchmark processes, each loading transformers (130 s on a quiet 2-core machine)
def test_cpu_dry_run_runs_every_step_and_prints_one_table(tiny_llama):
    proc = run("--cpu-dry-run", tiny_llama)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0].strip("| ") for r in rows] == ["demo", "train_speed", "memory_qwen", "generate_speed"]
    for row in rows:
        name, status, seconds, headline = [c.strip() for c in row.strip("|").split(" | ")]
        assert status == "ok" and int(seconds) >= 0 and headline not in ("", "?"), row
    assert "GPU: none: CPU dry run" in proc.stdout


def test_without_cuda_it_fails_loudly_instead_of_measuring_the_cpu():
    proc = run(env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 1 and "FAILED: torch sees no CUDA device" in proc.stderr and "| step |" not in proc.stdout
