"""`liandan lora`: fine-tune (LoRA, DoRA or full) and/or test, with mlx_lm.lora's flags and defaults.

Recipe, top to bottom (`run`): options, checked before anything loads (config.load_config) → adapter
directory → base model → data, rendered once → train (set-up, loop, checkpoints) → test.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from liandan.config import CONFIG_ONLY, RULES, TrainConfig, check_world, flag_of, load_config
from liandan.data.formats import load_splits
from liandan.data.render import CHAT_TEMPLATE_HELP, Encoder, Rendering, make_rendering, stop_token_ids
from liandan.docs.prompt import TOP_K_HELP
from liandan.device import DTYPE_HELP, Device, pick_device
from liandan.errors import LiandanError
from liandan.models import DEFAULT_MODEL, load_model, resolve_model

def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    # Every default is None so that a YAML config can supply the value; config.TrainConfig holds the defaults,
    # which the help texts read from it.
    add, d = parser.add_argument, TrainConfig()
    add("--model", help=f"Model directory, .gguf file, Hub id, or '{DEFAULT_MODEL}' (default: the embedded model; "
                         "with --test alone, the adapter's base model)")
    add("--train", action="store_true", default=None, help="Do training")
    add("--data", help="Directory with {train, valid, test}.jsonl files")
    add("--fine-tune-type", choices=RULES["fine_tune_type"].choices, help=f"Type of fine-tuning (default: {d.fine_tune_type})")
    add("--num-layers", type=int, help=f"Number of layers to fine-tune, counted from the top (default {d.num_layers}, -1 for all)")
    add("--batch-size", type=int, help=f"Minibatch size (default {d.batch_size})")
    add("--iters", type=int, help=f"Iterations to train for (default {d.iters})")
    add("--val-batches", type=int, help=f"Number of validation batches, -1 uses the entire validation set (default {d.val_batches})")
    add("--learning-rate", type=float, help=f"Learning rate (default {d.learning_rate:g})")
    add("--steps-per-report", type=int, help=f"Training steps between loss reports (default {d.steps_per_report})")
    add("--steps-per-eval", type=int, help=f"Training steps between validations (default {d.steps_per_eval})")
    add("--resume-adapter-file", help="Start from these adapter weights (fresh optimizer)")
    add("--adapter-path", help=f"Save/load path for the adapter (default: {d.adapter_path})")
    add("--save-every", type=int, help=f"Save the adapter every N iterations (default {d.save_every})")
    add("--keep-checkpoints", type=int, metavar="N",
        help="Keep only the newest N checkpoints of this run under ADAPTER_PATH/checkpoints (default: all)")
    add("--test", action="store_true", default=None, help="Evaluate on the test set (after training, if --train)")
    add("--test-batches", type=int, help=f"Number of test batches, -1 uses the entire test set (default {d.test_batches})")
    add("--max-seq-length", type=int, help=f"Maximum sequence length in tokens (default {d.max_seq_length})")
    add("-c", "--config", help="A YAML configuration file with the training options")
    add("--grad-checkpoint", action="store_true", default=None, help="Use gradient checkpointing to reduce memory use")
    add("--seed", type=int, help=f"The PRNG seed (default {d.seed})")
    add("--grad-accumulation-steps", type=int, help=f"Micro-batches per optimizer step (default {d.grad_accumulation_steps})")
    add("--optimizer", choices=RULES["optimizer"].choices, help=f"Optimizer (default {d.optimizer})")
    add("--mask-prompt", dest="mask_prompt", action="store_true", default=None,
        help="Train on answers only (the default; accepted for mlx_lm compatibility)")
    add("--no-mask-prompt", dest="mask_prompt", action="store_false", help="Also train on prompt tokens")
    add("--long-examples", choices=RULES["long_examples"].choices,
        help="Examples over --max-seq-length: split (default for text), truncate (default for chats) or drop")
    add("--fsdp", action="store_true", default=None,
        help="Under torchrun with --fine-tune-type full: shard parameters, gradients and optimizer state (FSDP2)")
    add("--system-prompt", help="System prompt added to every chat example (and recorded for inference)")
    add("--chat-template", help=CHAT_TEMPLATE_HELP)
    add("--dtype", help=DTYPE_HELP)
    add("--overwrite", action="store_true", default=None, help="Replace an adapter already in --adapter-path")
    add("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
        help="Continue an interrupted run exactly: from the latest checkpoint in --adapter-path, or this one")
    add("--skip-nonfinite", action="store_true", default=None,
        help="Skip batches whose loss or gradient is not finite (default: stop with a message)")
    add("--trust-remote-code", action="store_true", default=None, help="Allow model code from the model directory")
    add_forgetting_options(add)
    add("--max-grad-norm", type=float, help="Clip each step's gradient to this norm (default: no clipping)")
    add("--docs", help="With --test: answer each test question from the top chunks of these documents (a folder "
                       "or a `liandan docs index`), in the layout the adapter was trained with")
    add("--top-k", type=int, help=TOP_K_HELP)
    add("--batch-order", choices=RULES["batch_order"].choices,
        help="random (default): batches are random draws (on CPU, very different lengths run as separate "
             "sub-batches, so little compute goes to padding); length: mlx_lm's batches of similar lengths")
    return parser


def add_forgetting_options(add) -> None:
    """The options of the guard against forgetting (liandan.replay, evaluate.learned_tokens_stop)."""
    d = TrainConfig()
    add("--replay-ratio", type=float,
        help="Against forgetting: base-model answers to general prompts mixed in per training example "
             f"(default {d.replay_ratio:g} for completions/chat/tools data; 0 turns it off)")
    add("--replay-prompts", help="Your own replay prompts: JSONL with a \"prompt\" field, or one prompt per line")
    add("--replay-focus", type=float,
        help="Share of the replay examples drawn from the replay prompts nearest the training prompts (0-1)")
    add("--kl-weight", type=float,
        help="Weight of the KL term that pulls replay answers toward the base model's token distribution "
             f"(default {d.kl_weight:g}; 0 = plain replay; higher keeps more of what it knew but learns slower)")
    add("--learned-prob", type=float,
        help="Against forgetting: a trained token the model already predicts with at least this probability "
             f"gets no more gradient (default {d.learned_prob:g}; 0 = off)")
    add("--protect-directions", type=int,
        help="Against forgetting: each LoRA input is kept off the K directions the base model uses most on the replay "
             f"answers (default {d.protect_directions} = off; 192 keeps more on the embedded model but needs longer training)")


def main(args: argparse.Namespace) -> int:
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "command", "func")}
    cfg = load_config(args.config, flags)
    if not cfg.train and not cfg.test:
        raise LiandanError("nothing to do: give --train, --test, or both")
    from liandan.dist import init_distributed, shutdown
    from liandan.train import TrainingInterrupted

    import torch

    from liandan.atomic import removed_if_failed

    dist = init_distributed()
    try:
        with removed_if_failed(cfg.adapter_path) if cfg.train else contextlib.nullcontext():
            return run(cfg, dist=dist)
    except torch.OutOfMemoryError as exc:  # before RuntimeError, its base class
        raise LiandanError(out_of_memory(cfg, exc)) from None
    except RuntimeError as exc:
        if "out of memory" in str(exc):  # a Mac's GPU (MPS) reports it as a plain RuntimeError
            raise LiandanError(out_of_memory(cfg, exc)) from None
        if not dist.enabled:
            raise
        # A peer died (gloo/NCCL report it as a RuntimeError here): one clear line, no traceback per rank.
        raise LiandanError(f"rank {dist.rank}: the distributed run failed ({str(exc).splitlines()[0][:200]}); "
                           "completed checkpoints are intact, no partial adapter was written") from None
    except TrainingInterrupted as stop:
        import signal
        import sys

        print(f"\nStopped at iteration {stop.iteration}; checkpoint saved in {stop.checkpoint}.\n"
              f"Resume with: {resume_command(sys.argv[1:])}", file=sys.stderr)
        return 130 if stop.signum == signal.SIGINT else 143
    finally:
        shutdown(dist)


def out_of_memory(cfg: TrainConfig, exc: Exception) -> str:
    """The one line for a GPU out-of-memory error: what to change, and that saved checkpoints are intact."""
    said = ". ".join(str(exc).split(". ")[:2])[:160]  # "CUDA out of memory. Tried to allocate 2.00 GiB"
    fixes = f"a smaller --batch-size (now {cfg.batch_size}), a lower --max-seq-length (now {cfg.max_seq_length})"
    fixes += " or fewer --num-layers" if cfg.grad_checkpoint else ", or --grad-checkpoint"
    return f"out of GPU memory ({said}); try {fixes}. Completed checkpoints are intact"


def resume_command(argv: list[str]) -> str:
    """The command that continues this run from its latest checkpoint: argv without --overwrite, --resume and
    the checkpoint --resume named (its next word unless that is an option), plus --resume."""
    import shlex

    again, skip = [], False
    for i, word in enumerate(argv):
        if skip:
            skip = False
        elif word == "--resume":
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("-")  # --resume PATH: the path goes too
        elif word != "--overwrite" and not word.startswith("--resume="):
            again.append(word)
    return f"liandan {shlex.join(again)} --resume"


@dataclass
class AdapterTarget:
    """The adapter directory: where training writes, or what --test reads."""

    path: Path
    record: dict = field(default_factory=dict)  # test only: the adapter's record (rendering, base model)
    resume_from: Path | None = None  # --resume: the checkpoint to continue


@dataclass
class Base:
    """The base model, loaded, and where it came from."""

    model: object
    tokenizer: object
    model_dir: Path  # the local Hugging Face directory (converted or downloaded)
    name: str  # what the adapter's record calls it (absolute when it is a path)
    device: Device


@dataclass
class Data:
    """The splits, rendered once with the rendering the adapter will record."""

    splits: dict  # split -> DataFile, or None when absent
    encoded: dict  # split -> EncodedSet, for the splits present
    rendering: Rendering
    encoder: Encoder
    stop_ids: list[int]
    pad_id: int
    docs_layout: dict | None = None  # the retrieval prompt layout to record (data from-docs --questions), if any


def run(cfg: TrainConfig, log=print, dist=None, results: dict | None = None) -> int:
    """The recipe: adapter directory → base model → data → train → test. `cfg` comes from load_config().
    `results`, when given, receives the test's scores (test_report's keys) for callers that show them."""
    import torch

    from liandan.data.formats import check_data_path
    from liandan.dist import Dist
    from liandan.generate import check_text

    dist = dist or Dist()
    log = log if dist.is_main else _silent  # only rank 0 talks and writes
    check_world(cfg, dist.world)
    check_data_path(cfg.data)  # a mistyped --data folder: one line now, not after the model has loaded
    if cfg.system_prompt is not None:
        check_text(cfg.system_prompt, "--system-prompt")
    target = prepare_adapter_dir(cfg, dist, log)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    log("Loading pretrained model")
    with dist.main_first():
        base = load_base(cfg)
    log("Loading datasets")
    data = load_data(cfg, base, target.record, log)
    replay = replay_examples(cfg, base, data, dist, log)
    base_known = base_knowledge(cfg, base, data, dist)  # asked before any weight changes
    if cfg.train:
        log("Training")
        model = train_model(cfg, base, data, target, dist, replay, log)
    else:
        from liandan.adapters import load_adapter

        model = load_adapter(base.model, target.path, target.record)
    if cfg.test:
        scores = test_model(cfg, model, base, data, dist, log, base_known)
        if results is not None and scores:
            results.update(scores)
    return 0


def prepare_adapter_dir(cfg: TrainConfig, dist, log) -> AdapterTarget:
    """Training: find the checkpoint to --resume, or refuse to replace another run's adapter, and check that
    checkpoints can be written. Test only: read the adapter's record (its base model is the default --model)."""
    from liandan.adapters import base_model_of, holds_adapter, read_record

    adapter_dir = Path(cfg.adapter_path)
    if not cfg.train:
        record = read_record(adapter_dir)
        cfg.model = base_model_of(adapter_dir, record, cfg.model)
        return AdapterTarget(adapter_dir, record)
    resume_from = None
    if cfg.resume:
        resume_from = _checkpoint_to_resume(cfg, adapter_dir, log)
    elif holds_adapter(adapter_dir) and not cfg.overwrite:
        raise LiandanError(f"{adapter_dir} already holds an adapter from another run; pass --resume to continue it, "
                           "--overwrite to replace it, or choose another --adapter-path")
    # --overwrite: the old run's checkpoints go only when the new run saves its first one (train._checkpoint),
    # so a typo in the data or a model that fails to load loses nothing.
    if dist.is_main:
        check_writable(adapter_dir)
    dist.barrier()
    return AdapterTarget(adapter_dir, resume_from=resume_from)


def _checkpoint_to_resume(cfg: TrainConfig, adapter_dir: Path, log) -> Path:
    from liandan.adapters import read_record
    from liandan.train import CHECKPOINTS, TRAINER_STATE, latest_checkpoint

    checkpoint = latest_checkpoint(adapter_dir) if cfg.resume == "latest" else Path(cfg.resume)
    if checkpoint is None or not (checkpoint / TRAINER_STATE).is_file():
        raise LiandanError(f"--resume: no checkpoint found in {checkpoint or adapter_dir / CHECKPOINTS}")
    record = read_record(checkpoint)
    recorded = dict(record.get("training", {}))
    if record.get("trained_dtype"):  # an unset --dtype is fp32 on a CPU, bf16 on CUDA: compare what it trained in
        recorded["dtype"] = record["trained_dtype"]
    # Continue in the batch order the run started with (runs from before --batch-order used "length").
    started_with = recorded.get("batch_order", "length")
    if started_with != cfg.batch_order:
        log(f"Note: resuming with --batch-order {started_with}, the order this run started with.")
        cfg.batch_order = started_with
    check_same_settings(cfg, recorded)
    return checkpoint


# The options that change what a run computes: resumed with others, it would silently become another run. What
# shapes the training tokens (the data, template, system prompt, --max-seq-length, masking, field names) is checked
# by content instead: train.data_fingerprint of the encoded training set, saved with each checkpoint.
RESULT_OPTIONS = ("model", "fine_tune_type", "num_layers", "batch_size", "learning_rate", "seed",
                  "grad_accumulation_steps", "optimizer", "optimizer_config", "lr_schedule", "lora_parameters",
                  "dtype", "replay_ratio", "replay_prompts", "replay_focus", "kl_weight", "learned_prob",
                  "protect_directions", "max_grad_norm")


def check_same_settings(cfg: TrainConfig, recorded: dict) -> None:
    """Refuse to resume with options that differ from the checkpoint's record (`training`), naming each one.
    --iters may grow (continuing longer), unless the learning-rate schedule decays over --iters."""
    now = cfg.to_dict()
    names = list(RESULT_OPTIONS)
    if cfg.lr_schedule.name != "constant" and len(cfg.lr_schedule.arguments or []) < 2:
        names.append("iters")  # the decay's length is --iters: another one is another schedule
    differ = [name for name in names if name in recorded and _meaning(name, recorded[name]) != _meaning(name, now[name])]
    if differ:
        said = "; ".join(f"{_option(name)} {_value(now[name])} here, {_value(recorded[name])} in the checkpoint"
                         for name in differ)
        raise LiandanError(f"--resume: {said}; resume with the same settings or start a new run")


def _meaning(name: str, value):
    """A recorded or given option as what it does: the default model by name, a path as the file it names, the
    dtype as this machine resolves it, lists and tuples alike (the record is JSON)."""
    import json
    import os

    from liandan.device import pick_device

    if name == "model":
        value = value or DEFAULT_MODEL
    if name in ("model", "replay_prompts") and value and os.path.exists(value):
        return os.path.realpath(value)
    if name == "dtype":
        return str(pick_device(value).dtype)
    return json.loads(json.dumps(value))


def _option(name: str) -> str:
    return f"{name} (config)" if name in CONFIG_ONLY else flag_of(name)


def _value(value) -> str:
    import json

    return "unset" if value is None else json.dumps(value) if isinstance(value, (str, dict, list)) else str(value)


def load_base(cfg: TrainConfig) -> Base:
    device = pick_device(cfg.dtype)
    model_dir = resolve_model(cfg.model)
    model, tokenizer = load_model(model_dir, device, cfg.trust_remote_code)
    name = cfg.model or DEFAULT_MODEL
    if Path(name).expanduser().exists():
        name = str(Path(name).expanduser().resolve())
    return Base(model, tokenizer, model_dir, name, device)


def load_data(cfg: TrainConfig, base: Base, record: dict, log) -> Data:
    """Read the splits and encode them with the adapter's recorded rendering, or a new one for training."""
    from liandan.data.batching import encode_file

    splits = load_splits(cfg.data, cfg.field_names())
    if cfg.train and splits["train"] is None:
        raise LiandanError(f"--data {cfg.data}: train.jsonl is missing")
    if cfg.test and not cfg.train and splits["test"] is None:
        raise LiandanError(f"--data {cfg.data}: test.jsonl is missing")

    docs_layout = docs_setup(cfg, record, splits, log)
    if record.get("rendering"):
        rendering = Rendering.from_dict(record["rendering"])
    else:
        first = splits["train"] or splits["test"]  # --test alone reads an adapter without a record: no train split
        rendering = make_rendering(base.tokenizer, cfg.system_prompt, cfg.chat_template, first.format == "tools")
        if cfg.train and splits["train"].format == "text":
            rendering.prompt_style = "raw"
    encoder = Encoder(base.tokenizer, rendering, cfg.mask_prompt)
    encoded = {k: encode_file(v, encoder, cfg.max_seq_length, log, cfg.long_examples)
               for k, v in splits.items() if v is not None}
    stop_ids = stop_token_ids(base.tokenizer, base.model, rendering)
    return Data(splits, encoded, rendering, encoder, stop_ids, base.tokenizer.pad_token_id, docs_layout)


def replay_examples(cfg: TrainConfig, base: Base, data: Data, dist, log) -> list:
    """The self-replay pool (liandan.replay) for chat-style training; rank 0 generates and caches it, the
    other ranks read the cache. Empty when replay does not apply."""
    if not (cfg.train and data.rendering.prompt_style == "chat" and data.splits["train"].format != "text"
            and cfg.replay_ratio > 0):
        return []
    from liandan.replay import replay_pool

    with dist.main_first():
        pool = replay_pool(base.model, base.tokenizer, data.encoder, base.model_dir, cfg.replay_prompts,
                           data.stop_ids, data.pad_id, base.device.torch_device, cfg.max_seq_length,
                           soft_targets=cfg.kl_weight > 0)
    how = "read from the cache" if pool.seconds is None else f"generated in {pool.seconds:.1f}s, cached"
    log(f"Replay: {len(pool.items)} base-model answers to {pool.prompts} general prompts ({how} in {pool.cache.parent}); "
        f"{cfg.replay_ratio:g} mixed in per training example against forgetting (--replay-ratio 0 turns this off).")
    return pool.items


def docs_setup(cfg, record: dict, splits: dict, log) -> dict | None:
    """The retrieval prompt layout: the adapter's when testing one, else the data's (`data from-docs --questions`),
    to be recorded. With --docs, each test question is asked with its retrieved chunks in that layout."""
    from liandan.docs.qa import read_layout

    layout = record.get("docs_layout") if record else read_layout(cfg.data)
    if cfg.test and cfg.docs and splits.get("test") is not None:
        from liandan.docs.prompt import DocsContext

        DocsContext.open(cfg.docs, {"docs_layout": layout}, cfg.top_k, log).apply_to_file(splits["test"])
        log(f"Test questions are asked with the top chunks of {cfg.docs}.")
    return layout



def base_knowledge(cfg: TrainConfig, base: Base, data: Data, dist):
    """Which held-out general questions the base model gets right (replay.base_retention), for --test's score."""
    if not (cfg.test and data.rendering.prompt_style == "chat" and not dist.enabled and "test" in data.encoded):
        return None
    from liandan.replay import base_retention

    return base_retention(base.model, base.tokenizer, data.encoder, base.model_dir, data.stop_ids, data.pad_id,
                          base.device.torch_device)


def train_model(cfg: TrainConfig, base: Base, data: Data, target: AdapterTarget, dist, replay: list, log):
    """Set up LoRA/DoRA/full fine-tuning, restore a checkpoint if resuming, train; returns the trained model."""
    import liandan.train as training
    from liandan.adapters import load_weights_into, make_record, setup_finetuning

    model, summary = setup_finetuning(base.model, cfg)
    log(summary)
    if cfg.resume_adapter_file:
        load_weights_into(model, Path(cfg.resume_adapter_file))
    state = None
    if target.resume_from is not None:
        load_weights_into(model, target.resume_from)
        state = training.load_trainer_state(target.resume_from)
        log(f"Resuming from {target.resume_from} (iteration {state['iteration']})")
        if "train_data" not in state:  # saved before checkpoints recorded their data and reports
            log("Note: this checkpoint comes from an earlier liandan version; the resumed run may differ from an "
                "uninterrupted one (batch order, template choice)")
        if state["iteration"] >= cfg.iters:
            raise LiandanError(f"{target.resume_from} is at iteration {state['iteration']}, already >= --iters {cfg.iters}")
    if "valid" not in data.encoded:
        log(f"Note: --data {cfg.data} has no valid.jsonl; training without validation.")
    record_at = functools.partial(make_record, cfg, base.name, data.rendering, docs_layout=data.docs_layout,
                                  trained_dtype=str(base.device.dtype).removeprefix("torch."))  # record_at(iteration)
    job = training.TrainJob(cfg, data.encoded["train"], data.encoded.get("valid"), data.pad_id, base.device.torch_device,
                            target.path, record_at, resume=state,
                            dist=dist, fsdp=cfg.fsdp and dist.enabled, replay=replay)
    result = training.train(model, job, log)
    log(f"Saved final weights to {target.path}. Loss curve: {target.path / training.LOSS_PLOT}")
    log(f"Trained {result.iterations} iterations in {result.seconds:.1f}s: {result.tokens_per_second:.1f} tokens/s, "
        f"peak memory {result.peak_memory_gb:.3f} GB")
    if result.replay_examples:
        share = result.replay_tokens / max(result.tokens, 1)
        log(f"Replay: {result.replay_examples} of the {result.examples} examples trained on were base-model answers, "
            f"{100 * share:.0f}% of the tokens (≈ {share * result.seconds:.1f}s of the training time).")
    return model


def test_model(cfg: TrainConfig, model, base: Base, data: Data, dist, log, base_known) -> dict | None:
    if dist.enabled:
        log("Note: --test runs in a single process; run `liandan lora --test --adapter-path ...` after this job.")
    elif "test" not in data.encoded:
        log(f"Note: --data {cfg.data} has no test.jsonl; skipping the test.")
    else:
        return test_report(model, base, data, cfg, log, base_known)
    return None


def _silent(*args, **kwargs) -> None:
    pass


def check_writable(directory: Path) -> None:
    """Fail before training, not after hours of it, when checkpoints cannot be written."""
    import tempfile

    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise LiandanError(f"--adapter-path {directory}: cannot write there ({exc.strerror})") from None
    free = shutil.disk_usage(directory).free
    if free < 50e6:
        raise LiandanError(f"--adapter-path {directory}: only {free / 1e6:.0f} MB free; checkpoints need more")


def covered_examples(test_file, test_set, batches: list[list[int]]) -> list:
    """The source examples of the encoded items the test batches hold, in file order. Items are not examples:
    --long-examples drop leaves some out, so the item's line finds its example."""
    by_line = {example.line: example for example in test_file.examples}
    lines = sorted({test_set.items[i].line for batch in batches for i in batch})
    return [by_line[line] for line in lines]


def test_report(model, base: Base, data: Data, cfg: TrainConfig, log, base_known=None) -> dict:
    """Test loss, perplexity, exact answers, general knowledge kept, then one sentence on what the loss means.

    base_known: replay.base_retention() of the base model, for the retention score."""
    from liandan.data.batching import eval_batches
    from liandan.evaluate import LOSS_EXPLAINED, evaluate_loss, exact_answers, perplexity

    tokenizer, encoder, device, stop_ids, pad_id = base.tokenizer, data.encoder, base.device.torch_device, data.stop_ids, data.pad_id
    test_file, test_set = data.splits["test"], data.encoded["test"]
    log("Testing")
    loss, _ = evaluate_loss(model, test_set, cfg.batch_size, cfg.test_batches, pad_id, device)
    log(f"Test loss {loss:.3f}, Test ppl {perplexity(loss):.3f}.")
    report = {"test_loss": loss, "test_ppl": perplexity(loss)}
    if test_file.format != "text":
        examples = covered_examples(test_file, test_set, eval_batches(test_set, cfg.batch_size, cfg.test_batches))
        checks = exact_answers(model, tokenizer, encoder, examples, device, stop_ids)
        exact = sum(c.exact for c in checks)
        log(f"Exact answers: {exact}/{len(checks)} (greedy generation equals the expected answer and stops).")
        for c in checks:
            if not c.exact:
                tail = "" if c.stopped else " … (did not stop)"
                log(f"  ✗ {c.prompt!r}: expected {c.expected!r}, got {c.got!r}{tail}")
        report.update(exact=exact, total=len(checks))
    if base_known is not None:
        from liandan.replay import retention

        kept = retention(model, tokenizer, encoder, base_known, stop_ids, pad_id, device)
        log(kept.summary())
        for question, reply in kept.lost:
            log(f"  ✗ forgotten: {question.question!r} → {reply.strip()[:80]!r}")
        report.update(retention_kept=kept.kept, retention_base=kept.base_correct)
    log(LOSS_EXPLAINED)
    return report
