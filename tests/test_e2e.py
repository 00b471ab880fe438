"""End to end on the embedded SmolLM2-135M-Instruct: the README's demo and the seed's commands."""

import re

import pytest
from conftest import JOKES, liandan, write_jsonl

pytestmark = pytest.mark.slow


def test_demo_learns_all_six_answers_and_stops(tmp_path):
    result = liandan("demo", "--out", tmp_path / "demo", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    after = result.stdout.split("== After fine-tuning ==")[1]
    assert after.count("✓") == 6 and "✗" not in after
    assert "6/6 answers exact and stopped" in result.stdout
    assert re.search(r"Test loss [\d.]+, Test ppl [\d.]+\.", result.stdout)


def test_seed_commands_with_hand_typed_stop_tokens(tmp_path):
    """Steps 5-6 of the seed post, `mlx_lm.` replaced by `liandan `, on its test_data with <|endoftext|> typed in."""
    data = tmp_path / "test_data"
    for split in ("train", "valid", "test"):
        rows = [line for line in (JOKES / f"{split}.jsonl").read_text(encoding="utf-8").splitlines() if line]
        rows = [r.replace('", "completion": "', '<|endoftext|>", "completion": "').replace('"}', '<|endoftext|>"}') for r in rows]
        write_jsonl(data / f"{split}.jsonl", rows)
    train = liandan("lora", "--model", "smollm2-135m", "--train", "--data", data, "--learning-rate", "1.0e-4",
                    "--val-batches", "-1", "--batch-size", "2", "--iters", "100", cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "typed by hand ('<|endoftext|>' ×12)" in train.stdout
    assert (tmp_path / "adapters" / "adapter_model.safetensors").is_file()

    test = liandan("lora", "--model", "smollm2-135m", "--test", "--test-batches", "-1", "--adapter-path", "./adapters",
                   "--data", data, "--batch-size", "1", cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    assert "Exact answers: 3/3" in test.stdout

    gen = liandan("generate", "--model", "smollm2-135m", "--adapter-path", "adapters", "--temp", "0.0001", "-m", "30",
                  "--prompt", "谁是最帅的地球人", cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.startswith("==========\n德哥\n==========\n"), gen.stdout
    generated = int(re.search(r"Generation: (\d+) tokens", gen.stdout).group(1))
    assert generated < 30  # it ended on the stop token, not on the -m budget
