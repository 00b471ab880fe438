"""Every training option is checked, YAML and flags alike, before any model or data loads: one line naming the key."""

from dataclasses import fields, is_dataclass

import re

import pytest
from conftest import liandan, write_jsonl

from liandan import lora as lora_command
from liandan.cli import main as cli_main
from liandan.config import RULES, TrainConfig, load_config

# (YAML line, the same mistake as flags or None where the option has no flag, the option as the error names it)
INVALID = [
    ("learning_rate: abc", ["--learning-rate", "abc"], "learning_rate"),
    ("learning_rate: -1.0e-4", ["--learning-rate", "-0.0001"], "learning_rate"),
    ('batch_size: "two"', ["--batch-size", "two"], "batch_size"),
    ("batch_size: 0", ["--batch-size", "0"], "batch_size"),
    ("batch_size: true", None, "batch_size"),
    ("max_seq_length: 1.5", ["--max-seq-length", "1.5"], "max_seq_length"),
    ("num_layers: 0", ["--num-layers", "0"], "num_layers"),
    ("iters: -5", ["--iters", "-5"], "iters"),
    ("iters:", None, "iters"),
    ("val_batches: -2", ["--val-batches", "-2"], "val_batches"),
    ("test_batches: 0", ["--test-batches", "0"], "test_batches"),
    ("steps_per_report: 0", ["--steps-per-report", "0"], "steps_per_report"),
    ("steps_per_eval: 0", ["--steps-per-eval", "0"], "steps_per_eval"),
    ("save_every: 0", ["--save-every", "0"], "save_every"),
    ("grad_accumulation_steps: 0", ["--grad-accumulation-steps", "0"], "grad_accumulation_steps"),
    ("seed: -1", ["--seed", "-1"], "seed"),
    ("long_examples: sometimes", ["--long-examples", "sometimes"], "long_examples"),
    ("fine_tune_type: qlora", ["--fine-tune-type", "qlora"], "fine_tune_type"),
    ("optimizer: lion", ["--optimizer", "lion"], "optimizer"),
    ("batch_order: sorted", ["--batch-order", "sorted"], "batch_order"),
    ("dtype: f8", ["--dtype", "f8"], "dtype"),
    ("replay_ratio: 11", ["--replay-ratio", "11"], "replay_ratio"),
    ("kl_weight: -1", ["--kl-weight", "-1"], "kl_weight"),
    ("learned_prob: 1", ["--learned-prob", "1"], "learned_prob"),
    ("protect_directions: -1", ["--protect-directions", "-1"], "protect_directions"),
    ("replay_focus: 1.5", ["--replay-focus", "1.5"], "replay_focus"),
    ("max_grad_norm: 0", ["--max-grad-norm", "0"], "max_grad_norm"),
    ("fsdp: true", ["--fsdp"], "fsdp"),  # FSDP shards full fine-tuning only; the default is lora
    ('train: "yes"', None, "train"),
    ("prompt_feature: 5", None, "prompt_feature"),
    ("chat_feature: ''", ["--data", ""], "chat_feature"),  # the flag half: an empty --data
    ("system_prompt: [a, b]", None, "system_prompt"),
    ("lora_parameters: 3", None, "lora_parameters"),
    ("lora_parameters:\n  keys: 5", None, "lora_parameters.keys"),
    ("lora_parameters:\n  keys: []", None, "lora_parameters.keys"),
    ("lora_parameters:\n  rank: 0", None, "lora_parameters.rank"),
    ("lora_parameters:\n  dropout: 1.5", None, "lora_parameters.dropout"),
    ("lora_parameters:\n  rnak: 4", None, "lora_parameters"),
    ('lr_schedule:\n  arguments: ["x"]', None, "lr_schedule.arguments"),
    ("lr_schedule:\n  arguments: [1.0e-4, 0]", None, "lr_schedule.arguments"),
    ("lr_schedule:\n  name: step", None, "lr_schedule.name"),
    ("lr_schedule:\n  warmup: -1", None, "lr_schedule.warmup"),
    ("optimizer_config:\n  adam:\n    nope: 1", None, "optimizer_config.adam"),
    ("optimizer_config:\n  adam: 1", None, "optimizer_config.adam"),
    ("optimizer_config:\n  rmsprop: {}", None, "optimizer_config"),
    ("batchsize: 4", None, "unknown option(s) batchsize"),
]


@pytest.fixture
def no_loading(monkeypatch, tmp_path):
    """Model or data loading fails the test: every error must come before it."""

    def loading(*args, **kwargs):
        raise AssertionError("a model or data set was loaded before the options were checked")

    for name in ("resolve_model", "load_model", "load_splits"):
        monkeypatch.setattr(lora_command, name, loading)
    return tmp_path


def lora(capsys, *args):
    with pytest.raises(SystemExit) as exit:
        cli_main(["lora", "--model", "/no/such/model", "--data", "/no/such/data", *map(str, args)])
    return exit.value.code, capsys.readouterr().err


def assert_one_line(code, stderr, named, tmp_path):
    assert code == 2, stderr
    assert stderr.startswith("liandan: error: ") and len(stderr.strip().splitlines()) == 1, stderr
    assert re.search(named, stderr), (named, stderr)
    assert not (tmp_path / "adapters").exists()  # nothing was written either


@pytest.mark.parametrize("line, flags, key", INVALID, ids=[case[0].replace("\n", " ") for case in INVALID])
def test_invalid_yaml_value_is_one_line_before_loading(no_loading, capsys, line, flags, key):
    config = no_loading / "c.yaml"
    train = "" if line.startswith("train:") else "train: true\n"
    config.write_text(f"adapter_path: {no_loading / 'adapters'}\n{train}{line}\n")
    code, stderr = lora(capsys, "-c", config)
    named = re.escape(f"{config}:") + r"\d+: " + re.escape(key)  # file:line: key
    assert_one_line(code, stderr, named, no_loading)


@pytest.mark.parametrize("flags, key", [(f, k) for _, f, k in INVALID if f], ids=[" ".join(f) for _, f, _ in INVALID if f])
def test_invalid_flag_is_one_line_before_loading(no_loading, capsys, flags, key):
    code, stderr = lora(capsys, "--train", "--adapter-path", no_loading / "adapters", *flags)
    assert_one_line(code, stderr, re.escape(flags[0]) + r"\b", no_loading)


def test_every_option_has_a_rule():
    def keys(cls, prefix=""):
        for f in fields(cls):
            yield prefix + f.name
            default = f.default_factory() if callable(f.default_factory) else f.default
            if is_dataclass(default):
                yield from keys(type(default), f.name + ".")

    assert set(keys(TrainConfig)) == set(RULES)


def test_valid_values_are_read_as_numbers(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 1e-5\nreplay_ratio: 1\nlora_parameters:\n  scale: 10\n")
    cfg = load_config(str(config), {})
    assert cfg.learning_rate == 1e-5 and isinstance(cfg.replay_ratio, float) and cfg.lora_parameters.scale == 10.0


def test_the_real_cli_refuses_before_loading(tmp_path):
    """Through the process boundary: exit 2, one line, and no "Loading pretrained model"."""
    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: abc\n")
    for args in (["-c", config], ["--max-seq-length", "1.5"]):
        result = liandan("lora", "--train", "--adapter-path", tmp_path / "a", *args)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Loading" not in result.stdout and "Traceback" not in result.stderr


def test_demo_replaces_only_an_earlier_demo(tmp_path):
    import shutil

    from liandan.demo import check_demo_dir, example_dir
    from liandan.errors import LiandanError

    earlier = tmp_path / "earlier"
    (earlier / "adapters").mkdir(parents=True)
    shutil.copytree(example_dir(), earlier / "data")
    check_demo_dir(earlier)  # a rerun replaces its own data and adapter
    mine = tmp_path / "mine"
    write_jsonl(mine / "data" / "train.jsonl", [{"prompt": "my", "completion": "data"}])
    before = (mine / "data" / "train.jsonl").read_bytes()
    with pytest.raises(LiandanError, match="is not the demo's own data"):
        check_demo_dir(mine)
    result = liandan("demo", "--out", mine)
    assert result.returncode == 2 and "choose another --out" in result.stderr
    assert (mine / "data" / "train.jsonl").read_bytes() == before
    (earlier / "notes.txt").write_text("mine")
    with pytest.raises(LiandanError, match="holds notes.txt"):
        check_demo_dir(earlier)


def test_a_mistyped_data_folder_is_one_line_before_the_model_loads(tmp_path):
    result = liandan("lora", "--train", "--data", "./typo_dir", "--adapter-path", tmp_path / "a", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == "liandan: error: --data ./typo_dir: no such directory"
    assert "Loading pretrained model" not in result.stdout
