"""`liandan lora` on tiny random models: files written, options honoured, errors on one line."""

import json

import pytest
import torch
from conftest import JOKES, liandan, write_jsonl

from liandan.config import load_config
from liandan.errors import LiandanError

SEED_QA = [("PolarDB是什么", "阿里云开源宇宙无敌数据库"), ("Oracle数据库会被什么打败", "国产数据库"),
           ("为什么电动汽车比较费油", "因为电很贵"), ("哪吒的师傅是谁", "孙悟空的师傅的舅舅")]


def seed_data(tmp_path, typed_stop=True):
    """A data directory laid out like the seed's test_data, with its hand-typed <|endoftext|>."""
    end = "<|endoftext|>" if typed_stop else ""
    rows = [{"prompt": q + end, "completion": a + end} for q, a in SEED_QA]
    data = tmp_path / "test_data"
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "valid.jsonl", rows[:2])
    write_jsonl(data / "test.jsonl", rows[2:])
    return data


def run_lora(log_lines, **options):
    from liandan.lora import run

    cfg = load_config(None, options)
    return run(cfg, log=log_lines.append)


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory, tiny_qwen2):
    """The seed's training command, once: (data dir, adapter dir, the CLI's result)."""
    tmp_path = tmp_path_factory.mktemp("seed")
    data = seed_data(tmp_path)
    adapters = tmp_path / "adapters"
    result = liandan("lora", "--model", tiny_qwen2, "--train", "--data", data, "--learning-rate", "1.0e-4",
                     "--val-batches", "-1", "--batch-size", "2", "--iters", "6", "--steps-per-eval", "3",
                     "--steps-per-report", "3", "--save-every", "3", "--num-layers", "2", "--adapter-path", adapters)
    assert result.returncode == 0, result.stderr
    return data, adapters, result


def test_seed_command_trains_and_writes_everything(seed_run, tiny_qwen2):
    _, adapters, result = seed_run
    out = result.stdout
    assert "Trainable parameters:" in out and "Iter 1: Val loss" in out and "Iter 6: Train loss" in out
    assert "typed by hand ('<|endoftext|>' ×8)" in out and "'<|im_end|>'" in out
    for name in ("adapter_model.safetensors", "adapter_config.json", "liandan.json", "metrics.jsonl", "loss.png",
                 "checkpoints/0000003/adapter_model.safetensors", "checkpoints/0000006/trainer_state.pt"):
        assert (adapters / name).is_file(), name
    assert (adapters / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 160  # mlx_lm's scale 20 = alpha / rank
    # Only the last --num-layers blocks, every linear layer in them.
    layers = {int(name.split(".layers.")[1].split(".")[0]) for name in config["target_modules"]}
    assert layers == {2, 3} and len(config["target_modules"]) == 2 * 7
    record = json.loads((adapters / "liandan.json").read_text())
    assert record["rendering"]["stop_tokens"] == ["<|im_end|>"]
    assert record["base_model"] == str(tiny_qwen2.resolve()) and record["training"]["learning_rate"] == 1e-4
    metrics = [json.loads(line) for line in (adapters / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics if "train_loss" in m] == [3, 6]
    assert [m["iteration"] for m in metrics if "val_loss" in m] == [1, 3, 6]
    assert all(k in metrics[-1] for k in ("tokens_per_sec", "it_per_sec", "peak_memory_gb", "trained_tokens"))


def test_the_same_adapter_path_is_refused(seed_run, tiny_qwen2):
    data, adapters, _ = seed_run
    again = liandan("lora", "--model", tiny_qwen2, "--train", "--data", data, "--iters", "1", "--adapter-path", adapters,
                    "--batch-size", "2")
    assert again.returncode == 2 and "--overwrite" in again.stderr and len(again.stderr.strip().splitlines()) == 1


def test_test_only_takes_the_model_from_the_record(seed_run):
    data, adapters, _ = seed_run
    test = liandan("lora", "--test", "--test-batches", "-1", "--adapter-path", adapters, "--data", data, "--batch-size", "1")
    assert test.returncode == 0, test.stderr
    assert "Test loss" in test.stdout and "Test ppl" in test.stdout and "Exact answers: " in test.stdout
    assert "mean negative log-likelihood" in test.stdout and "not a count of failed examples" in test.stdout


def test_generate_with_the_trained_adapter(seed_run):
    _, adapters, _ = seed_run
    gen = liandan("generate", "--adapter-path", adapters, "--temp", "0.0001", "-m", "5", "--prompt", "谁是最帅的地球人")
    assert gen.returncode == 0, gen.stderr
    lines = gen.stdout.splitlines()
    assert lines[0] == "==========" and "==========" in lines[1:]
    assert any(l.startswith("Prompt: ") and "tokens-per-sec" in l for l in lines)
    assert any(l.startswith("Generation: ") for l in lines) and any(l.startswith("Peak memory: ") for l in lines)


@pytest.mark.parametrize("kind", ["dora", "full"])
def test_dora_and_full(tmp_path, tiny_llama, kind):
    logs = []
    data = seed_data(tmp_path, typed_stop=False)
    run_lora(logs, model=str(tiny_llama), train=True, data=str(data), fine_tune_type=kind, iters=2, batch_size=2,
             num_layers=1, adapter_path=str(tmp_path / "a"))
    record = json.loads((tmp_path / "a" / "liandan.json").read_text())
    assert record["fine_tune_type"] == kind
    if kind == "full":
        from safetensors.torch import load_file

        names = load_file(str(tmp_path / "a" / "trained_weights.safetensors")).keys()
        assert names and all(".layers.3." in n for n in names)
    else:
        assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["use_dora"] is True


def test_training_learns_an_answer_that_stops(tmp_path, tiny_llama):
    """A tiny model memorises one answer: exact, and generation ends at the trained stop token."""
    from liandan.generate import generate, load_pipeline, prompt_ids_for

    data = tmp_path / "d"
    rows = [{"prompt": "Capital of France?", "completion": "Paris is the capital."}] * 2
    write_jsonl(data / "train.jsonl", rows)
    logs = []
    # replay_ratio 0: a tiny random model's own "answers" are noise, nothing worth keeping (tests/test_replay.py)
    run_lora(logs, model=str(tiny_llama), train=True, data=str(data), iters=40, batch_size=2, learning_rate=3e-3,
             num_layers=-1, fine_tune_type="full", adapter_path=str(tmp_path / "a"), steps_per_report=10, replay_ratio=0)
    losses = [float(l.split("Train loss ")[1].split(",")[0]) for l in logs if "Train loss" in l]
    assert losses[-1] < losses[0] / 10
    pipe = load_pipeline(None, str(tmp_path / "a"))
    result = generate(pipe.model, prompt_ids_for(pipe, "Capital of France?"), 20, pipe.stop_ids, pipe.device.torch_device)
    assert pipe.tokenizer.decode(result.tokens) == "Paris is the capital." and result.stopped


def test_padding_free_groups_and_gradient_clipping(tmp_path, tiny_llama):
    """Sub-batches without padding give the padded batch's gradient; --max-grad-norm clips it. One SGD step
    from LoRA's B = 0 changes only B, by -lr × gradient, so both show in the saved adapter."""
    from safetensors.torch import load_file

    from liandan.data.batching import padding_free_groups, pass_cost_tokens
    from liandan.data.render import IGNORE, Encoded

    items = [Encoded([1] * n, [IGNORE] + [1] * (n - 1)) for n in (560, 40, 550, 45, 300)]
    groups = padding_free_groups(items, pass_cost_tokens("cpu"))
    assert [[len(x.input_ids) for x in g] for g in groups] == [[560, 550], [300], [45, 40]]
    assert len(padding_free_groups(items, pass_cost_tokens("cuda"))) == 1  # GPUs: the batch stays whole

    data = tmp_path / "d"
    write_jsonl(data / "train.jsonl", [{"prompt": "Hi?", "completion": "Yes."},
                                       {"prompt": "Tell me more?", "completion": "The database stores rows in pages "
                                        "and an index finds them fast when the query planner chooses to use it."}])

    def one_step(name, **options):
        out = tmp_path / name
        run_lora([], model=str(tiny_llama), train=True, data=str(data), iters=1, optimizer="sgd", replay_ratio=0,
                 num_layers=-1, adapter_path=str(out), steps_per_report=1, batch_size=2, **{"learning_rate": 0.1, **options})
        weights = load_file(out / "adapter_model.safetensors")
        metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        return {k: v for k, v in weights.items() if "lora_B" in k}, metrics

    # Both examples in one step: "length" pads the short one to the long one's width, "random" runs them apart.
    padded, padded_metrics = one_step("length", batch_order="length")
    apart, apart_metrics = one_step("random", batch_order="random")
    assert padded_metrics["train_loss"] == pytest.approx(apart_metrics["train_loss"], rel=1e-5)
    for key in padded:
        assert float(padded[key].abs().max()) > 1e-4
        assert torch.allclose(apart[key], padded[key], rtol=1e-4, atol=1e-7), key

    clipped, clipped_metrics = one_step("clipped", max_grad_norm=1e-3, learning_rate=1.0)
    assert clipped_metrics["grad_norm"] == pytest.approx(apart_metrics["grad_norm"], rel=1e-4)
    assert apart_metrics["grad_norm"] > 1e-2  # so the clip is in effect
    assert float(torch.cat([v.flatten() for v in clipped.values()]).norm()) == pytest.approx(1e-3, rel=1e-3)


def test_config_file_and_flag_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 8\nlearning_rate: 2.0e-4\nlora_parameters:\n  rank: 4\n  scale: 10\n"
                    "  keys: [self_attn.q_proj, self_attn.v_proj]\nlr_schedule:\n  name: cosine_decay\n"
                    "  warmup: 10\n  arguments: [2.0e-4, 100, 0]\n")
    cfg = load_config(str(path), {"batch_size": 2, "iters": None})
    assert cfg.batch_size == 2 and cfg.learning_rate == 2e-4 and cfg.iters == 1000
    assert cfg.lora_parameters.rank == 4 and cfg.lora_parameters.lora_alpha == 40
    from liandan.config import lr_multiplier

    f = lr_multiplier(cfg)
    assert f(0) == 0 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(1) and f(110) == pytest.approx(0)
    path.write_text("batch_sise: 8\n")
    with pytest.raises(LiandanError, match="unknown option.*batch_sise"):
        load_config(str(path), {})


def test_mlx_defaults():
    cfg = load_config(None, {})
    assert (cfg.num_layers, cfg.batch_size, cfg.iters, cfg.val_batches, cfg.learning_rate, cfg.steps_per_eval,
            cfg.save_every, cfg.max_seq_length) == (16, 4, 1000, 25, 1e-5, 200, 100, 2048)
    assert (cfg.lora_parameters.rank, cfg.lora_parameters.scale, cfg.lora_parameters.dropout) == (8, 20.0, 0.0)
    assert cfg.mask_prompt is True


def test_lora_keys_select_modules(tiny_llama):
    from liandan.adapters import target_modules
    from liandan.models import load_model, pick_device

    model, _ = load_model(tiny_llama, pick_device())
    cfg = load_config(None, {"num_layers": -1, "lora_parameters": {"keys": ["self_attn.q_proj", "v_proj"]}})
    names = target_modules(model, cfg)
    assert len(names) == 8 and all(n.endswith(("q_proj", "v_proj")) for n in names)


def model_without_tokenizer(path):
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")


@pytest.mark.parametrize("setup, args, message", [
    (lambda d: write_jsonl(d / "train.jsonl", ['{"prompt": "q", "completion": "a"}', '{"prompt": "q", "comp']),
     [], "train.jsonl:2: invalid JSON"),
    (lambda d: write_jsonl(d / "train.jsonl", [{"prompt": "q", "completion": "a"}] * 3), ["--batch-size", "4"],
     "train.jsonl has 3 example(s), fewer than --batch-size 4"),
    (lambda d: write_jsonl(d / "train.jsonl", [{"prompt": "q", "completion": "a"}] * 4), ["--model", "/no/such/model"],
     "model '/no/such/model' not found"),
    (lambda d: (d / "fake.gguf").write_text("not gguf"), ["--model", "{d}/fake.gguf"], "is not a GGUF file"),
    (lambda d: write_jsonl(d / "train.jsonl", [{"prompt": "q", "completion": "a"}] * 4), ["--model", "Qwen/Qwen2.5-1.5B"],
     "cannot download 'Qwen/Qwen2.5-1.5B'"),
    (lambda d: (d / "config.json").write_text("{}"), ["--model", "{d}"], "is missing weights (*.safetensors), tokenizer files"),
    (lambda d: None, ["--learning-rate", "-1"], "--learning-rate must be positive"),
    (lambda d: None, ["--max-grad-norm", "0"], "--max-grad-norm must be positive"),
    (lambda d: (d / "train.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n'), [], "train.jsonl:2: not valid UTF-8"),
    (lambda d: (d / "train.jsonl").write_text('{"text": "' + "x" * 10_000_000 + '\n'), [], "train.jsonl:1: invalid JSON"),
    (lambda d: write_jsonl(d / "train.jsonl", [{"messages": []}]), [], "train.jsonl:1: 'messages' must be a non-empty list"),
    (lambda d: write_jsonl(d / "train.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}]), [],
     "train.jsonl:1: the chat has no assistant turn"),
    (lambda d: write_jsonl(d / "train.jsonl", [{"prompt": ["a"], "completion": "b"}]), [], "'prompt' must be a string"),
    (lambda d: write_jsonl(d / "train.jsonl", [{"prompt": "q", "completion": "  "}]), [], "'completion' is empty"),
    (lambda d: model_without_tokenizer(d / "m"), ["--model", "{d}/m"], "is missing tokenizer files"),
])
def test_errors_are_one_line_exit_2(tmp_path, tiny_llama, setup, args, message):
    data = tmp_path / "data"
    data.mkdir()
    setup(data)
    args = [a.replace("{d}", str(data)) for a in args]
    if "--model" not in args:
        args += ["--model", str(tiny_llama)]
    result = liandan("lora", "--train", "--data", data, "--adapter-path", tmp_path / "a", "--iters", "1", *args)
    assert result.returncode == 2
    assert result.stderr.startswith("liandan: error: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()


def test_shipped_jokes_match_the_seed():
    from liandan.data.formats import load_splits

    splits = load_splits(JOKES)
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [6, 3, 3]
    assert splits["train"].format == "completions"
