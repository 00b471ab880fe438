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
    # Every iteration reported once (none twice from before the interruption), with the uninterrupted run's totals.
    got, want = train_reports(adapters), train_reports(root / "reference")
    assert [r[:2] for r in got] == [r[:2] for r in want]
    assert [r[2] for r in got] == pytest.approx([r[2] for r in want], rel=1e-6)


def train_reports(adapters):
    import json

    entries = [json.loads(line) for line in (adapters / "metrics.jsonl").read_text().splitlines()]
    return [(e["iteration"], e["trained_tokens"], e["train_loss"]) for e in entries if "train_loss" in e]


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


def test_resumed_reports_equal_the_uninterrupted_runs(tmp_path, tiny_llama):
    """Resumed from a checkpoint between two reports (saved at 15, reported every 10): each iteration is in
    metrics.jsonl once, and the report at 20 (loss, trained tokens) equals the uninterrupted run's."""
    import json
    import shutil

    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)
    reference = tmp_path / "reference"
    options = ["--iters", "20", "--steps-per-report", "10", "--steps-per-eval", "5"]
    assert liandan(*common(tmp_path / "data", reference, tiny_llama), *options).returncode == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)  # as if the run had stopped after the checkpoint of iteration 15
    result = liandan(*common(tmp_path / "data", resumed, tiny_llama), *options, "--resume",
                     resumed / "checkpoints" / "0000015")
    assert result.returncode == 0, result.stderr

    def entries(directory):
        return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]

    expected, got = entries(reference), entries(resumed)
    assert [(e["iteration"], "val_loss" in e) for e in got] == [(e["iteration"], "val_loss" in e) for e in expected]
    for want, have in zip(expected, got):
        for key in ("train_loss", "val_loss", "trained_tokens", "tokens"):
            if key in want:
                assert have[key] == pytest.approx(want[key], rel=1e-6), (key, want["iteration"])
    assert_same(load_file(str(reference / "adapter_model.safetensors")), resumed)


def test_a_gpus_random_state_goes_into_the_checkpoint_and_back(monkeypatch):
    """LoRA dropout on a GPU draws from the GPU's generator: a checkpoint keeps its state and a resume on the same
    kind of device puts it back (faked here: this machine has no GPU); on the CPU nothing extra is saved."""
    from liandan.device import accelerator_rng_state, restore_accelerator_rng

    generator = {"state": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: generator["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: generator.update(state=state))
    saved = accelerator_rng_state(torch.device("cuda"))
    generator["state"] = torch.tensor([9, 9, 9], dtype=torch.uint8)
    restore_accelerator_rng(saved, torch.device("cuda"))
    assert generator["state"].tolist() == [1, 2, 3]
    assert accelerator_rng_state(torch.device("cpu")) == {}
    restore_accelerator_rng(saved, torch.device("cpu"))  # another kind of device: left alone
    assert generator["state"].tolist() == [1, 2, 3]
