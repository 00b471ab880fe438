"""torchrun with 2 CPU processes (gloo) computes what 1 process computes with the same global batch and seed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import liandan, write_jsonl
from safetensors.torch import load_file

# Different lengths, so padding and masking differ between the two ranks' shards.
ROWS = [{"prompt": f"Question {i}: " + "tell me " * (i % 4), "completion": f"Answer {i}" + " and more" * (i % 3)}
        for i in range(8)]


# gloo on CPU processes, also on a machine with GPUs (NCCL would need a GPU per process)
CPU_ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")


def torchrun(*args, script=None):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [script] if script else ["-m", "liandan"]
    return subprocess.run(command + [str(a) for a in args], capture_output=True, text=True, timeout=300, env=CPU_ENV)


def lora_args(data, adapters, model, optimizer, lr, iters=6, extra=()):
    return ["lora", "--model", model, "--train", "--data", data, "--adapter-path", adapters, "--iters", iters,
            "--batch-size", "4", "--optimizer", optimizer, "--learning-rate", lr, "--num-layers", "-1",
            "--steps-per-report", "1", "--steps-per-eval", "1000", "--save-every", "3", "--seed", "3", *extra]


def losses(adapters: Path) -> list[float]:
    return [m["train_loss"] for m in map(json.loads, (adapters / "metrics.jsonl").read_text().splitlines())
            if "train_loss" in m]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    write_jsonl(root / "data" / "train.jsonl", ROWS)
    return root


@pytest.fixture(scope="module")
def two_process_run(data, tiny_llama_calm):
    """train(optimizer, lr) -> (adapter dir, stdout) of a 6-iteration torchrun job, run once per optimizer
    whichever test asks first."""
    done = {}

    def train(optimizer, lr):
        if optimizer not in done:
            two = data / f"two-{optimizer}"
            double = torchrun(*lora_args(data / "data", two, tiny_llama_calm, optimizer, lr))
            assert double.returncode == 0, double.stderr[-3000:]
            done[optimizer] = two, double.stdout
        return done[optimizer]

    return train


@pytest.mark.parametrize("optimizer, lr", [("sgd", "0.05"), ("adam", "0.001")])
def test_two_processes_match_one(data, tiny_llama_calm, two_process_run, optimizer, lr):
    one = data / f"one-{optimizer}"
    single = liandan(*lora_args(data / "data", one, tiny_llama_calm, optimizer, lr))
    assert single.returncode == 0, single.stderr
    two, double_stdout = two_process_run(optimizer, lr)
    a, b = load_file(str(one / "adapter_model.safetensors")), load_file(str(two / "adapter_model.safetensors"))
    if optimizer == "sgd":  # updates linear in the gradient: the adapters themselves agree
        # Up to float rounding: the all-reduce sums in another order, which some CPUs' kernels turn into a
        # relative 3e-5 after 6 steps (measured); a wrong scaling of the gradient would differ by order 1.
        for name in a:
            assert (a[name] - b[name]).norm() / a[name].norm().clamp_min(1e-12) <= 1e-4, name
    la, lb = losses(one), losses(two)
    assert len(la) == len(lb) == 6
    assert all(abs(x - y) / abs(x) <= 1e-4 for x, y in zip(la, lb)), (la, lb)
    assert double_stdout.count("Iter 6: Train loss") == 1  # rank 0 alone reports


def test_distributed_checkpoint_resumes_and_loads_in_one_process(data, tiny_llama_calm, two_process_run):
    reference, _ = two_process_run("adam", "0.001")
    resumed = data / "two-resumed"
    first = torchrun(*lora_args(data / "data", resumed, tiny_llama_calm, "adam", "0.001", iters=3))
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun(*lora_args(data / "data", resumed, tiny_llama_calm, "adam", "0.001", iters=6, extra=["--resume"]))
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = load_file(str(reference / "adapter_model.safetensors")), load_file(str(resumed / "adapter_model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    gen = liandan("generate", "--adapter-path", resumed, "-m", "3", "-p", "Question 1:")
    assert gen.returncode == 0 and gen.stdout.startswith("==========")


def test_a_crashing_rank_fails_the_job_cleanly(data, tiny_llama_calm):
    adapters = data / "crashed"
    result = torchrun(*lora_args(data / "data", adapters, tiny_llama_calm, "adam", "0.001", extra=["--save-every", "100"]),
                      script=str(Path(__file__).parent / "crash_rank.py"))
    assert result.returncode != 0
    assert "injected crash on rank 1" in result.stderr
    assert not (adapters / "adapter_model.safetensors").exists() and not list(adapters.rglob("*.safetensors"))


def test_global_batch_must_split_evenly(data, tiny_llama_calm):
    result = torchrun(*lora_args(data / "data", data / "odd", tiny_llama_calm, "adam", "0.001", extra=["--batch-size", "3"]))
    assert result.returncode != 0 and "must be a multiple of the 2 processes" in result.stderr


def test_fsdp_full_fine_tuning_matches_one_process(data, tiny_llama_calm):
    one, two = data / "full-one", data / "full-two"
    extra = ["--fine-tune-type", "full"]
    single = liandan(*lora_args(data / "data", one, tiny_llama_calm, "sgd", "0.05", iters=3, extra=extra))
    assert single.returncode == 0, single.stderr
    double = torchrun(*lora_args(data / "data", two, tiny_llama_calm, "sgd", "0.05", iters=3, extra=extra + ["--fsdp"]))
    assert double.returncode == 0, double.stderr[-3000:]
    a, b = load_file(str(one / "trained_weights.safetensors")), load_file(str(two / "trained_weights.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).norm() / a[name].norm() <= 1e-5, name
    norms = [[m["grad_norm"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "grad_norm" in m] for run in (one, two)]
    # rank 0 reports the whole model's gradient norm, not its shard's
    assert len(norms[0]) == 3 and all(abs(x - y) <= 1e-4 * x for x, y in zip(*norms)), norms


MAIN_FIRST = """
import os, sys, time
rank = int(os.environ["RANK"])
os.environ["LOCAL_RANK"] = str(rank % 2)  # four processes posing as two machines of two
from liandan.dist import init_distributed, shutdown
dist = init_distributed()
with dist.main_first():
    with open(sys.argv[1], "a") as f:
        f.write(f"{rank} enter {time.monotonic()}\\n")
    time.sleep(0.5)
    with open(sys.argv[1], "a") as f:
        f.write(f"{rank} leave {time.monotonic()}\\n")
shutdown(dist)
"""


def test_main_first_runs_rank_0_then_one_process_per_machine_then_the_rest(tmp_path):
    """The model cache is per machine: its first process fills it after rank 0, before the machine's others read it."""
    script, log = tmp_path / "main_first.py", tmp_path / "order.txt"
    script.write_text(MAIN_FIRST)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", str(script), str(log)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=CPU_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    times = {}
    for line in log.read_text().splitlines():
        rank, what, at = line.split()
        times[int(rank), what] = float(at)
    assert times[0, "leave"] < times[2, "enter"]  # rank 0, then the second machine's first process
    assert times[2, "leave"] < min(times[1, "enter"], times[3, "enter"])  # then everyone else


def test_float16_full_fine_tuning_under_ddp_and_fsdp_agree_on_overflows(data, tiny_llama_calm):
    """float16 scales the loss also on FSDP's sharded gradients: the sharded run skips the same overflowing steps as
    the replicated one, ends at the same scale and trains the same weights. (Here the overflow reaches both
    shards; ShardedGradScaler's agreement when only one shard overflows is torch's, not checked here.)"""
    import torch

    runs = {}
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
        adapters = data / f"fp16-{name}"
        result = torchrun(*lora_args(data / "data", adapters, tiny_llama_calm, "sgd", "0.05", iters=3,
                                     extra=["--fine-tune-type", "full", "--dtype", "float16", *extra]))
        assert result.returncode == 0, result.stderr[-3000:]
        state = torch.load(adapters / "checkpoints" / "0000003" / "trainer_state.pt", weights_only=True)
        runs[name] = load_file(str(adapters / "trained_weights.safetensors")), state
    (ddp, ddp_state), (fsdp, fsdp_state) = runs["ddp"], runs["fsdp"]
    assert ddp_state["grad_scaler"] == fsdp_state["grad_scaler"]
    assert ddp_state["counters"]["overflow_steps"] == fsdp_state["counters"]["overflow_steps"] < 3
    for name in ddp:
        assert (ddp[name] - fsdp[name]).norm() <= 1e-5 * ddp[name].norm(), name
