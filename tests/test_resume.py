"""Never lose a run: kill training for real (SIGKILL, SIGINT, SIGTERM) and resume to the uninterrupted result."""

import os
import random
import re
import signal
import subprocess
import sys

import pytest
import torch
from conftest import liandan, write_jsonl
from safetensors.torch import load_file

ROWS = [{"prompt": f"Question number {i}: " + "word " * (i % 5), "completion": f"Answer {i} " + "yes " * (i % 3)}
        for i in range(10)]
ITERS = 40


def common(data, adapters, model):
    return ["lora", "--model", model, "--train", "--data", data, "--adapter-path", adapters, "--iters", ITERS,
            "--batch-size", "2", "--save-every", "5", "--steps-per-report", "1", "--steps-per-eval", "1000",
            "--learning-rate", "1e-3", "--num-layers", "-1", "--seed", "7"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("resume")
    write_jsonl(root / "data" / "train.jsonl", ROWS)
    result = liandan(*common(root / "data", root / "reference", tiny_llama))
    assert result.returncode == 0, result.stderr
    return root, load_file(str(root / "reference" / "adapter_model.safetensors"))


def interrupt_at(args, iteration, signum):
    """Run the CLI and send `signum` once it reports `iteration`; returns (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "liandan", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in proc.stdout:
        if line.startswith(f"Iter {iteration}: Train loss"):
            proc.send_signal(signum)
            break
    proc.stdout.read()
    return proc.wait(timeout=120), proc.stderr.read()


def assert_same(reference_state, directory):
    state = load_file(str(directory / "adapter_model.safetensors"))
    assert state.keys() == reference_state.keys()
    worst = max((state[k] - reference_state[k]).abs().max().item() for k in state)
    assert worst <= 1e-6, worst


@pytest.mark.parametrize("signum, code", [(signal.SIGKILL, -9), (signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_resume_after_a_real_kill_equals_the_uninterrupted_run(reference, tiny_llama, signum, code):
    root, expected = reference
    adapters = root / f"run-{signum}"
    at = random.Random(signum).randint(6, 34)
    returncode, stderr = interrupt_at(common(root / "data", adapters, tiny_llama), at, signum)
    assert returncode == code, stderr
    if signum != signal.SIGKILL:
        assert "Resume with: liandan lora" in stderr and "--resume" in stderr
        stopped = int(re.search(r"Stopped at iteration (\d+)", stderr).group(1))
        assert at <= stopped < ITERS  # the step in flight finishes, then it saves and stops
        assert (adapters / "checkpoints" / f"{stopped:07d}" / "trainer_state.pt").is_file()
    assert not list(adapters.rglob("*.tmp")) or signum == signal.SIGKILL
    resumed = liandan(*common(root / "data", adapters, tiny_llama), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from" in resumed.stdout
    assert_same(expected, adapters)


def test_resume_keeps_the_batch_order_the_run_started_with(reference, tiny_llama):
    """A run started with --batch-order length and resumed without the flag continues in length order."""
    root, _ = reference
    length = [*common(root / "data", root / "length-reference", tiny_llama), "--batch-order", "length"]
    assert liandan(*length).returncode == 0
    adapters = root / "length-run"
    returncode, stderr = interrupt_at([*common(root / "data", adapters, tiny_llama), "--batch-order", "length"], 12,
                                      signal.SIGINT)
    assert returncode == 130, stderr
    resumed = liandan(*common(root / "data", adapters, tiny_llama), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming with --batch-order length" in resumed.stdout
    assert_same(load_file(str(root / "length-reference" / "adapter_model.safetensors")), adapters)


def test_resume_needs_a_checkpoint(tmp_path, tiny_llama):
    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)
    result = liandan(*common(tmp_path / "data", tmp_path / "none", tiny_llama), "--resume")
    assert result.returncode == 2 and "--resume: no checkpoint found" in result.stderr


def test_non_finite_loss_stops_or_is_skipped(tmp_path, tiny_llama, monkeypatch):
    import liandan.train as train_module
    from liandan.config import load_config
    from liandan.errors import LiandanError
    from liandan.lora import run

    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)
    real = train_module.loss_terms
    calls = {"n": 0}

    def poisoned(model, batch, **options):
        calls["n"] += 1
        loss, n, kl = real(model, batch, **options)
        return (loss * float("nan") if calls["n"] == 4 else loss), n, kl

    monkeypatch.setattr(train_module, "loss_terms", poisoned)
    options = dict(model=str(tiny_llama), train=True, data=str(tmp_path / "data"), iters=6, batch_size=2,
                   save_every=2, val_batches=0, adapter_path=str(tmp_path / "a"))
    with pytest.raises(LiandanError, match=r"iteration 4: the loss is not finite.*checkpoints/0000002"):
        run(load_config(None, options), log=lambda *_: None)
    calls["n"] = 0
    logs = []
    run(load_config(None, dict(options, adapter_path=str(tmp_path / "b"), skip_nonfinite=True)), log=logs.append)
    assert "Skipped 1 batch(es) with a non-finite loss or gradient." in logs
    state = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values())


def test_unwritable_output_is_refused_before_training(tmp_path, tiny_llama):
    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)
    (tmp_path / "file").write_text("x")
    result = liandan(*common(tmp_path / "data", tmp_path / "file" / "adapters", tiny_llama))
    assert result.returncode == 2 and "cannot write there" in result.stderr and "Loading" not in result.stdout


def test_checkpoints_load_without_pickle_code(reference):
    root, _ = reference
    from liandan.train import latest_checkpoint, load_trainer_state

    state = load_trainer_state(latest_checkpoint(root / "reference"))  # torch.load(weights_only=True)
    assert state["iteration"] == ITERS
