"""`liandan lora --train/--test`: what the reviewers found, each checked where it went wrong."""

import json

import pytest
import torch
from conftest import write_jsonl

from liandan.config import load_config
from liandan.errors import LiandanError

ROWS = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(6)]


def run_lora(logs=None, **options):
    from liandan.lora import run

    return run(load_config(None, options), log=(logs.append if logs is not None else lambda *_: None))


def options(tmp_path, tiny_llama, **extra):
    return {**dict(model=str(tiny_llama), train=True, data=str(tmp_path / "data"), adapter_path=str(tmp_path / "a"),
                   batch_size=2, iters=2, save_every=1, val_batches=0, replay_ratio=0, seed=3), **extra}


def checkpoints(adapters):
    return sorted(p.name for p in (adapters / "checkpoints").iterdir())


def test_overwrite_keeps_the_old_checkpoints_until_the_new_run_saves_one(tmp_path, tiny_llama):
    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)
    run_lora(**options(tmp_path, tiny_llama))
    adapters = tmp_path / "a"
    assert checkpoints(adapters) == ["0000001", "0000002"]
    (tmp_path / "data" / "train.jsonl").write_text('{"prompt": "q", "comp\n')  # a typo in the data
    with pytest.raises(LiandanError, match="train.jsonl:1: invalid JSON"):
        run_lora(**options(tmp_path, tiny_llama, overwrite=True))
    assert checkpoints(adapters) == ["0000001", "0000002"]
    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)
    run_lora(**options(tmp_path, tiny_llama, overwrite=True, iters=1))
    assert checkpoints(adapters) == ["0000001"]  # the old run's 0000002 must not be resumed


def test_more_layers_than_the_model_has_says_all_are_trained(tmp_path, tiny_llama):
    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)
    logs = []
    run_lora(logs, **options(tmp_path, tiny_llama, iters=1, num_layers=100))
    assert any(line.startswith("Trainable parameters:") and "(--num-layers 100: the model has 4 layers, all trained)"
               in line for line in logs), logs


def test_keep_checkpoints_keeps_the_newest_complete_ones(tmp_path, tiny_llama):
    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)
    run_lora(**options(tmp_path, tiny_llama, iters=4, keep_checkpoints=2))
    adapters = tmp_path / "a"
    assert checkpoints(adapters) == ["0000003", "0000004"]
    run_lora(**options(tmp_path, tiny_llama, iters=6, resume="latest"))  # unset: every checkpoint stays
    assert checkpoints(adapters) == ["0000003", "0000004", "0000005", "0000006"]
    (adapters / "checkpoints" / "0000007").mkdir()  # cut short (no trainer state): does not count, is not resumed
    run_lora(**options(tmp_path, tiny_llama, iters=7, resume="latest", keep_checkpoints=1))
    assert checkpoints(adapters) == ["0000007"]
    run_lora(**options(tmp_path, tiny_llama, iters=4, overwrite=True))
    assert checkpoints(adapters) == ["0000001", "0000002", "0000003", "0000004"]
    run_lora(**options(tmp_path, tiny_llama, iters=3, resume=str(adapters / "checkpoints" / "0000002"), keep_checkpoints=1))
    assert "0000003" in checkpoints(adapters)  # the abandoned run's 0000004 does not push out the one just saved


def test_a_template_error_names_the_file_and_line(tmp_path, tiny_llama):
    """Line 2's assistant turn has content null (a tool call): a template that cannot render it is the data's line 2."""
    template = tmp_path / "strict.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]
    call = [{"type": "function", "function": {"name": "get_weather", "arguments": {}}}]
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "tools": tools},
            {"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": call},
                          {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}], "tools": tools}]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    with pytest.raises(LiandanError) as error:
        run_lora(**options(tmp_path, tiny_llama, chat_template=str(template)))
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'data' / 'train.jsonl'}:2: the chat template failed to render"), message
    assert "\n" not in message


def test_test_checks_the_examples_left_after_long_ones_are_dropped(tmp_path, tiny_llama):
    long = {"prompt": "Tell me everything: " + "word " * 100, "completion": "No."}
    short = [{"prompt": f"Short question {i}?", "completion": f"Short answer {i}."} for i in (2, 3, 4)]
    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "data" / "test.jsonl", [long, *short])
    logs = []
    report = run_lora(logs, **options(tmp_path, tiny_llama, iters=1, test=True, test_batches=-1, max_seq_length=64,
                                      long_examples="drop"))
    assert report == 0
    assert any(line.startswith("Exact answers: ") and line.endswith("/3 (greedy generation equals the expected "
                                                                    "answer and stops).") for line in logs), logs
    checked = [line for line in logs if line.startswith("  ✗ ")]
    assert not any("Tell me everything" in line for line in checked)
    assert all(any(f"Short question {i}?" in line for line in checked) for i in (2, 3, 4)), checked


@pytest.mark.parametrize("argv", [
    ["lora", "--train", "--data", "d", "--resume", "a/checkpoints/0000005", "--iters", "9"],
    ["lora", "--train", "--data", "d", "--resume=a/checkpoints/0000005", "--iters", "9"],
    ["lora", "--train", "--data", "d", "--resume", "--iters", "9"],
    ["lora", "--train", "--overwrite", "--data", "d", "--iters", "9", "--resume"],
])
def test_the_resume_command_drops_the_old_checkpoint(argv):
    from liandan.lora import resume_command

    assert resume_command(argv) == "liandan lora --train --data d --iters 9 --resume"


def finetunable(tiny_llama, **settings):
    from liandan.adapters import setup_finetuning
    from liandan.models import load_model, pick_device

    model, _ = load_model(tiny_llama, pick_device())
    return setup_finetuning(model, load_config(None, {"num_layers": 1, **settings}))[0]


def lora_file(tmp_path, tiny_llama, keep=None, **settings):
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in get_peft_model_state_dict(finetunable(tiny_llama, **settings)).items()}
    path = tmp_path / "adapter.safetensors"
    save_file({k: v for i, (k, v) in enumerate(state.items()) if keep is None or i < keep}, str(path))
    return path


@pytest.mark.parametrize("make, fine_tune_type, message", [
    (lambda tmp, llama: lora_file(tmp, llama, lora_parameters={"rank": 16}), "lora",
     r": does not fit this model \(size mismatch for .*lora_A.*\); was it trained with another LoRA rank"),
    (lambda tmp, llama: (tmp / "adapter.safetensors").write_text("not weights") and tmp / "adapter.safetensors",
     "lora", ": cannot read it as safetensors weights"),
    (lambda tmp, llama: lora_file(tmp, llama), "full", r": none of its 14 tensors fits this full fine-tuning set-up"),
    (lambda tmp, llama: lora_file(tmp, llama, keep=4), "lora",
     r": does not fit this LoRA/DoRA set-up: it has no weights for 10 trained tensor\(s\)"),
])
def test_resume_adapter_file_that_does_not_fit_is_one_line(tmp_path, tiny_llama, make, fine_tune_type, message):
    from liandan.adapters import load_weights_into

    path = make(tmp_path, tiny_llama)
    model = finetunable(tiny_llama, fine_tune_type=fine_tune_type)
    with pytest.raises(LiandanError, match=message) as error:
        load_weights_into(model, path)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def test_resume_adapter_file_that_fits_loads(tmp_path, tiny_llama):
    from liandan.adapters import load_weights_into

    path = lora_file(tmp_path, tiny_llama)
    load_weights_into(finetunable(tiny_llama), path)


def test_out_of_memory_is_one_line_with_what_to_change(tmp_path, tiny_llama, monkeypatch, capsys):
    import argparse

    import torch

    import liandan.lora as lora
    import liandan.train as training
    from liandan.cli import run as cli_run

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                     "of 79.25 GiB of which 1.2 GiB is free.\nMore details")

    monkeypatch.setattr(training, "train", no_memory)
    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)
    flags = {**{name: None for name in vars(lora.build_parser(argparse.ArgumentParser()).parse_args([]))},
             **options(tmp_path, tiny_llama), "config": None}
    assert cli_run(lora.main, argparse.Namespace(**flags)) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # (in-process, the progress bars of model loading come first)
    assert err.startswith("liandan: error: out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB); try a "
                          "smaller --batch-size (now 2), a lower --max-seq-length (now 2048), or --grad-checkpoint"), err


def test_resume_refuses_other_settings_or_data(tmp_path, tiny_llama):
    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)
    run_lora(**options(tmp_path, tiny_llama))
    with pytest.raises(LiandanError, match=r"^--resume: --batch-size 3 here, 2 in the checkpoint; resume with the same "
                                           r"settings or start a new run$"):
        run_lora(**options(tmp_path, tiny_llama, resume="latest", iters=3, batch_size=3))
    with pytest.raises(LiandanError, match=r"--learning-rate 0.001 here, 1e-05 in the checkpoint; --seed 4 here, 3 in "
                                           r"the checkpoint; resume with the same settings"):
        run_lora(**options(tmp_path, tiny_llama, resume="latest", iters=3, learning_rate=1e-3, seed=4))
    with pytest.raises(LiandanError, match="train.jsonl is not the training data"):  # the rendered tokens changed
        run_lora(**options(tmp_path, tiny_llama, resume="latest", iters=3, system_prompt="Be brief."))
    import json

    from liandan.adapters import RECORD
    record_file = tmp_path / "a" / "checkpoints" / "0000002" / RECORD
    record = json.loads(record_file.read_text())
    assert record["trained_dtype"] == "float32" and record["training"]["dtype"] is None  # unset: fp32 on this CPU
    record_file.write_text(json.dumps({**record, "trained_dtype": "bfloat16"}))  # as a CUDA machine leaves it
    with pytest.raises(LiandanError, match=r'^--resume: --dtype unset here, "bfloat16" in the checkpoint; resume with'):
        run_lora(**options(tmp_path, tiny_llama, resume="latest", iters=3))
    record_file.write_text(json.dumps(record))
    from liandan.lora import check_same_settings  # the same settings written another way are the same run

    (tmp_path / "link").symlink_to(tiny_llama)
    recorded = load_config(None, options(tmp_path, tiny_llama)).to_dict()
    check_same_settings(load_config(None, options(tmp_path, tiny_llama, model=str(tmp_path / "link"), dtype="float32",
                                                  long_examples="truncate")), recorded)
    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS[::-1])
    with pytest.raises(LiandanError, match="train.jsonl is not the training data the checkpoint was trained on"):
        run_lora(**options(tmp_path, tiny_llama, resume="latest", iters=3))
    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)
    logs = []
    run_lora(logs, **options(tmp_path, tiny_llama, resume="latest", iters=3))  # continuing longer is allowed
    assert any("Resuming from" in line for line in logs) and checkpoints(tmp_path / "a")[-1] == "0000003"


def test_iters_may_grow_unless_the_schedule_decays_over_it():
    from liandan.lora import check_same_settings

    recorded = load_config(None, {"iters": 100}).to_dict()
    check_same_settings(load_config(None, {"iters": 200}), recorded)
    decaying = {"lr_schedule": {"name": "cosine_decay"}}
    recorded = load_config(None, {"iters": 100, **decaying}).to_dict()
    with pytest.raises(LiandanError, match="--iters 200 here, 100 in the checkpoint"):
        check_same_settings(load_config(None, {"iters": 200, **decaying}), recorded)


def test_length_order_trains_every_example_each_epoch():
    from liandan.data.batching import EncodedSet, iterate_batches, length_grouped_batches
    from liandan.data.render import Encoded

    batches = length_grouped_batches([10 - i for i in range(10)], 4, None)  # index 0 is the longest
    assert [sorted(b) for b in batches] == [[6, 7, 8, 9], [2, 3, 4, 5], [0, 1, 2, 3]]
    items = [Encoded([1] * (3 + i), [1] * (3 + i), i + 1) for i in range(10)]
    epochs = {}
    for epoch, batch in iterate_batches(EncodedSet("train.jsonl", "completions", items), 4, seed=0, order="length"):
        if epoch == 2:
            break
        assert len(batch) == 4
        epochs.setdefault(epoch, set()).update(batch)
    assert epochs == {0: set(range(10)), 1: set(range(10))}


def test_replay_focus_says_when_it_has_no_prompts_to_match(tmp_path, tiny_llama):
    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)
    logs = []
    run_lora(logs, **options(tmp_path, tiny_llama, replay_ratio=1, replay_focus=0.5, mask_prompt=False, iters=1))
    assert any("--replay-focus found no prompts to match" in line for line in logs)
    logs = []
    run_lora(logs, **options(tmp_path, tiny_llama, replay_ratio=1, replay_focus=0.5, iters=1, overwrite=True))
    assert not any("--replay-focus found no prompts" in line for line in logs)


def test_resume_restores_the_checkpoints_own_reports(tmp_path, tiny_llama):
    """metrics.jsonl is saved with each checkpoint: what a later run wrote there (an --overwrite start that failed
    before its first checkpoint) does not mix into the resumed run's reports."""
    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)
    run_lora(**options(tmp_path, tiny_llama, iters=3, steps_per_report=1))
    metrics = tmp_path / "a" / "metrics.jsonl"
    uninterrupted = metrics.read_text()
    metrics.write_text('{"iteration": 1, "train_loss": 99.0}\n')  # another run's report
    import shutil

    shutil.rmtree(tmp_path / "a" / "checkpoints" / "0000003")
    shutil.rmtree(tmp_path / "a" / "checkpoints" / "0000002")
    run_lora(**options(tmp_path, tiny_llama, iters=3, steps_per_report=1, resume="latest"))
    def measured(text):  # the numbers a resumed run must reproduce: not speeds, times or this process's memory
        return [{k: v for k, v in json.loads(line).items() if not any(w in k for w in ("sec", "time", "memory"))}
                for line in text.splitlines()]

    assert measured(metrics.read_text()) == measured(uninterrupted)


def test_full_fine_tuning_in_bf16_keeps_fp32_weights_so_small_steps_are_not_rounded_away(tmp_path, tiny_llama):
    """Adam moves each weight by about the learning rate per step: 1e-5 is below bf16's resolution for weights of
    this size, so a bf16 model trained directly would not move. Mixed precision keeps fp32 copies that do, and
    the model is back in bf16 for the test after training."""
    from safetensors.torch import load_file

    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "data" / "test.jsonl", ROWS[:2])
    logs = []
    run_lora(logs, **options(tmp_path, tiny_llama, fine_tune_type="full", dtype="bfloat16", learning_rate=1e-5,
                             iters=3, save_every=3, test=True))
    trained = load_file(str(tmp_path / "a" / "trained_weights.safetensors"))
    base = load_file(str(tiny_llama / "model.safetensors"))
    name = "model.layers.3.mlp.down_proj.weight"
    step = (trained[name] - base[name].to(torch.bfloat16).float()).abs()  # from the weights as loaded, in bf16
    assert trained[name].dtype == torch.float32 and base[name].abs().median() > 0.05
    assert 3e-6 < step.median() < 6e-5, step.median()  # about 3 steps of 1e-5, not 0 and not bf16's rounding
    assert any("Test loss" in line for line in logs), logs


def test_full_fine_tuning_in_bf16_validates_the_weights_as_trained_so_far(tmp_path, tiny_llama):
    """Autocast keeps its bf16 copies of the fp32 weights until its block exits: one block around the whole loop
    validated (and trained) every step with the first step's weights, so the validation loss never moved."""
    import re

    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "data" / "valid.jsonl", ROWS)
    write_jsonl(tmp_path / "data" / "test.jsonl", ROWS)
    logs = []
    run_lora(logs, **options(tmp_path, tiny_llama, fine_tune_type="full", dtype="bfloat16", learning_rate=1e-3,
                             iters=8, save_every=8, steps_per_eval=4, val_batches=-1, test=True))
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    val = [row["val_loss"] for row in rows if "val_loss" in row]
    test = float(next(re.search(r"Test loss ([\d.]+)", line).group(1) for line in logs if "Test loss" in line))
    assert len(val) == 3 and val[1] < 0.8 * val[0] and val[2] < val[1], val  # before steps 1, 4 and 8
    assert test < val[1], (val, test)  # the same rows after all 8 steps, without autocast


def _one_sgd_step(tmp_path, tiny_llama, dtype):
    """The LoRA weights after one plain SGD step (step = -lr × gradient) on long answers: the loss is divided by
    ~600 trained tokens, so the gradients flowing back through the model are small."""
    from safetensors.torch import load_file

    rows = [{"prompt": f"Tell story {i}.", "completion": " ".join(f"word{i * j % 97}" for j in range(60))}
            for i in range(4)]
    write_jsonl(tmp_path / dtype / "data" / "train.jsonl", rows)
    run_lora(**options(tmp_path / dtype, tiny_llama, dtype=dtype, optimizer="sgd", learning_rate=1.0, batch_size=4,
                       iters=1))
    state = torch.load(tmp_path / dtype / "a" / "checkpoints" / "0000001" / "trainer_state.pt", weights_only=True)
    return load_file(str(tmp_path / dtype / "a" / "adapter_model.safetensors")), state


def test_float16_training_scales_the_loss_so_small_gradients_keep_their_precision(tmp_path, tiny_llama):
    """float16 runs scale the loss, and unscale the gradients before the step: float16's SGD step is float32's, up
    to the forward pass's own rounding, not 65536 times larger; the scale is saved with the checkpoint. (What
    scaling buys is measured apart, not here: on this model, with nonzero LoRA B and a loss divided by 500
    tokens, a 16 % median gradient error against float32 unscaled, 3 % scaled; on this test's short run, 1 %
    either way.)"""
    exact, _ = _one_sgd_step(tmp_path, tiny_llama, "float32")
    half, state = _one_sgd_step(tmp_path, tiny_llama, "float16")
    steps = {name: w for name, w in exact.items() if "lora_B" in name}
    errors = sorted(float((half[n].float() - w).norm() / w.norm()) for n, w in steps.items())
    assert errors[len(errors) // 2] < 0.08, errors
    assert state["grad_scaler"]["scale"] >= 1024 and state["counters"]["overflow_steps"] == 0, state["grad_scaler"]


def test_float16_resume_continues_the_saved_loss_scale(tmp_path, tiny_llama):
    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)
    run_lora(**options(tmp_path, tiny_llama, dtype="float16", iters=1))
    path = tmp_path / "a" / "checkpoints" / "0000001" / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    state["grad_scaler"]["scale"] = 256.0  # as after several overflows
    torch.save(state, path)
    run_lora(**options(tmp_path, tiny_llama, dtype="float16", iters=2, resume="latest"))
    resumed = torch.load(tmp_path / "a" / "checkpoints" / "0000002" / "trainer_state.pt", weights_only=True)
    assert resumed["grad_scaler"]["scale"] == 256.0, resumed["grad_scaler"]


def test_float16_skips_a_step_whose_scaled_gradients_overflow(tmp_path, tiny_llama, monkeypatch, recwarn):
    """The first step's loss made huge: its scaled gradients overflow float16, so that step is skipped (counted,
    the scale halved, no torch warning about the schedule) and training goes on from the same weights."""
    import liandan.train as train_module
    from safetensors.torch import load_file

    real, calls = train_module.loss_terms, {"n": 0}

    def huge_first(model, batch, **options):
        calls["n"] += 1
        loss, n, kl = real(model, batch, **options)
        return (loss * 1e6 if calls["n"] == 1 else loss), n, kl

    monkeypatch.setattr(train_module, "loss_terms", huge_first)
    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)
    logs = []
    run_lora(logs, **options(tmp_path, tiny_llama, dtype="float16", iters=3, batch_size=6))
    assert "float16: 1 step(s) skipped while the loss scale adjusted to the gradients (scale now 32768)." in logs, logs
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message)], [str(w.message) for w in recwarn]
    weights = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert any(w.abs().sum() > 0 for name, w in weights.items() if "lora_B" in name)  # the later steps trained


def test_float16_gradients_not_finite_at_any_scale_stop_the_run(tmp_path, tiny_llama, monkeypatch):
    """NaN gradients with a finite loss (d√|b|/db at b = 0, times 0) are no scale problem: the scaler halves the
    scale for 17 steps, from 65536 to 1, and then the run stops as in float32 instead of skipping to the end."""
    import liandan.train as train_module

    real = train_module.loss_terms

    def nan_gradients(model, batch, **options):
        loss, n, kl = real(model, batch, **options)
        b = [p for name, p in model.named_parameters() if "lora_B" in name][0]
        return loss + 0.0 * b.abs().sqrt().sum(), n, kl

    monkeypatch.setattr(train_module, "loss_terms", nan_gradients)
    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)
    logs = []
    with pytest.raises(LiandanError, match=r"^iteration 18: the gradient norm is not finite"):
        run_lora(logs, **options(tmp_path, tiny_llama, dtype="float16", iters=30, save_every=100))
    assert sum("float16 gradients overflowed" in line for line in logs) == 17, logs
