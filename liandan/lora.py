"""`liandan lora`: fine-tune (LoRA, DoRA or full) and/or test, with mlx_lm.lora's flags and defaults.

Recipe, top to bottom: options → model → data (rendered once) → set-up → train → save → test.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
from pathlib import Path

from liandan.data.render import CHAT_TEMPLATE_HELP
from liandan.errors import LiandanError

DESCRIPTION = "Fine-tune a model with LoRA, DoRA or full fine-tuning (mlx_lm.lora-compatible flags)."


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    # Every default is None so that a YAML config can supply the value; config.TrainConfig holds the defaults.
    add = parser.add_argument
    add("--model", help="Model directory, .gguf file, Hub id, or 'smollm2-135m' (the embedded default)")
    add("--train", action="store_true", default=None, help="Do training")
    add("--data", help="Directory with {train, valid, test}.jsonl files")
    add("--fine-tune-type", choices=["lora", "dora", "full"], help="Type of fine-tuning (default: lora)")
    add("--num-layers", type=int, help="Number of layers to fine-tune, counted from the top (default 16, -1 for all)")
    add("--batch-size", type=int, help="Minibatch size (default 4)")
    add("--iters", type=int, help="Iterations to train for (default 1000)")
    add("--val-batches", type=int, help="Number of validation batches, -1 uses the entire validation set (default 25)")
    add("--learning-rate", type=float, help="Learning rate (default 1e-5)")
    add("--steps-per-report", type=int, help="Training steps between loss reports (default 10)")
    add("--steps-per-eval", type=int, help="Training steps between validations (default 200)")
    add("--resume-adapter-file", help="Start from these adapter weights (fresh optimizer)")
    add("--adapter-path", help="Save/load path for the adapter (default: adapters)")
    add("--save-every", type=int, help="Save the adapter every N iterations (default 100)")
    add("--test", action="store_true", default=None, help="Evaluate on the test set (after training, if --train)")
    add("--test-batches", type=int, help="Number of test batches, -1 uses the entire test set (default 500)")
    add("--max-seq-length", type=int, help="Maximum sequence length in tokens (default 2048)")
    add("-c", "--config", help="A YAML configuration file with the training options")
    add("--grad-checkpoint", action="store_true", default=None, help="Use gradient checkpointing to reduce memory use")
    add("--seed", type=int, help="The PRNG seed (default 0)")
    add("--grad-accumulation-steps", type=int, help="Micro-batches per optimizer step (default 1)")
    add("--optimizer", choices=["adam", "adamw", "sgd"], help="Optimizer (default adam)")
    add("--mask-prompt", dest="mask_prompt", action="store_true", default=None,
        help="Train on answers only (the default; accepted for mlx_lm compatibility)")
    add("--no-mask-prompt", dest="mask_prompt", action="store_false", help="Also train on prompt tokens")
    add("--long-examples", choices=["truncate", "split", "drop"],
        help="Examples over --max-seq-length: split (default for text), truncate (default for chats) or drop")
    add("--fsdp", action="store_true", default=None,
        help="Under torchrun with --fine-tune-type full: shard parameters, gradients and optimizer state (FSDP2)")
    add("--system-prompt", help="System prompt added to every chat example (and recorded for inference)")
    add("--chat-template", help=CHAT_TEMPLATE_HELP)
    add("--dtype", help="float32, bfloat16 or float16 (default: fp32 on CPU, bf16 on CUDA)")
    add("--overwrite", action="store_true", default=None, help="Replace an adapter already in --adapter-path")
    add("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
        help="Continue an interrupted run exactly: from the latest checkpoint in --adapter-path, or this one")
    add("--skip-nonfinite", action="store_true", default=None,
        help="Skip batches whose loss or gradient is not finite (default: stop with a message)")
    add("--trust-remote-code", action="store_true", default=None, help="Allow model code from the model directory")
    add("--replay-ratio", type=float,
        help="Against forgetting: base-model answers to general prompts mixed in per training example "
             "(default 1 for completions/chat/tools data; 0 turns it off)")
    add("--replay-prompts", help="Your own replay prompts: JSONL with a \"prompt\" field, or one prompt per line")
    add("--kl-weight", type=float,
        help="Weight of the KL term that pulls replay answers toward the base model's token distribution "
             "(default 3; 0 = plain replay)")
    add("--max-grad-norm", type=float, help="Clip each step's gradient to this norm (default: no clipping)")
    add("--docs", help="With --test: answer each test question from the top chunks of these documents (a folder "
                       "or a `liandan docs index`), in the layout the adapter was trained with")
    add("--top-k", type=int, help="Chunks per question with --docs (default: the trained layout's, else 3)")
    add("--batch-order", choices=["random", "length"],
        help="random (default): batches are random draws (on CPU, very different lengths run as separate "
             "sub-batches, so little compute goes to padding); length: mlx_lm's batches of similar lengths")
    return parser


def main(args: argparse.Namespace) -> int:
    from liandan.config import load_config

    flags = {k: v for k, v in vars(args).items() if k not in ("config", "command", "func")}
    cfg = load_config(args.config, flags)
    if not cfg.train and not cfg.test:
        raise LiandanError("nothing to do: give --train, --test, or both")
    from liandan.dist import init_distributed, shutdown
    from liandan.train import TrainingInterrupted

    from liandan.atomic import removed_if_failed

    dist = init_distributed()
    try:
        with removed_if_failed(cfg.adapter_path) if cfg.train else contextlib.nullcontext():
            return run(cfg, dist=dist)
    except RuntimeError as exc:
        if not dist.enabled:
            raise
        # A peer died (gloo/NCCL report it as a RuntimeError here): one clear line, no traceback per rank.
        raise LiandanError(f"rank {dist.rank}: the distributed run failed ({str(exc).splitlines()[0][:200]}); "
                           "completed checkpoints are intact, no partial adapter was written") from None
    except TrainingInterrupted as stop:
        import shlex
        import signal
        import sys

        again = [a for a in sys.argv[1:] if a not in ("--overwrite", "--resume")]
        print(f"\nStopped at iteration {stop.iteration}; checkpoint saved in {stop.checkpoint}.\n"
              f"Resume with: liandan {shlex.join(again)} --resume", file=sys.stderr)
        return 130 if stop.signum == signal.SIGINT else 143
    finally:
        shutdown(dist)


def run(cfg, log=print, dist=None) -> int:
    import torch

    from liandan.dist import Dist

    dist = dist or Dist()
    if not dist.is_main:
        log = _silent  # only rank 0 talks and writes
    if dist.enabled and cfg.batch_size % dist.world:
        raise LiandanError(f"--batch-size {cfg.batch_size} is the global batch; it must be a multiple of the "
                           f"{dist.world} processes")
    if cfg.fsdp and cfg.fine_tune_type != "full":
        raise LiandanError("--fsdp shards full fine-tuning; LoRA/DoRA adapters are small and use DDP")
    from liandan.adapters import (
        FULL_WEIGHTS, PEFT_WEIGHTS, RECORD, load_adapter, load_weights_into, make_record, read_record, setup_finetuning,
    )
    from liandan.data.batching import encode_file
    from liandan.data.formats import FieldNames, load_splits
    from liandan.data.render import Encoder, Rendering, make_rendering
    from liandan.models import DEFAULT_MODEL, load_model, pick_device, resolve_model

    from liandan.train import TRAINER_STATE, latest_checkpoint, load_trainer_state

    adapter_dir = Path(cfg.adapter_path)
    record = {}
    resume_from = None
    if cfg.train and cfg.resume:
        resume_from = latest_checkpoint(adapter_dir) if cfg.resume == "latest" else Path(cfg.resume)
        if resume_from is None or not (resume_from / TRAINER_STATE).is_file():
            raise LiandanError(f"--resume: no checkpoint found in {resume_from or adapter_dir / 'checkpoints'}")
        # Continue in the batch order the run started with (runs from before --batch-order used "length").
        started_with = read_record(resume_from).get("training", {}).get("batch_order", "length")
        if started_with != cfg.batch_order:
            log(f"Note: resuming with --batch-order {started_with}, the order this run started with.")
            cfg.batch_order = started_with
    elif cfg.train:
        if any((adapter_dir / f).exists() for f in (RECORD, PEFT_WEIGHTS, FULL_WEIGHTS)) and not cfg.overwrite:
            raise LiandanError(
                f"{adapter_dir} already holds an adapter from another run; pass --resume to continue it, "
                "--overwrite to replace it, or choose another --adapter-path"
            )
        if cfg.overwrite and dist.is_main:
            shutil.rmtree(adapter_dir / "checkpoints", ignore_errors=True)
    if cfg.train:
        if dist.is_main:
            check_writable(adapter_dir)
        dist.barrier()
    else:
        record = read_record(adapter_dir)
        if cfg.model is None and record.get("base_model"):
            cfg.model = record["base_model"]

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.dtype)
    log("Loading pretrained model")
    model_dir = resolve_model(cfg.model)
    model, tokenizer = load_model(model_dir, device, bool(cfg.trust_remote_code))
    base_model = cfg.model or DEFAULT_MODEL
    if Path(base_model).expanduser().exists():
        base_model = str(Path(base_model).expanduser().resolve())

    log("Loading datasets")
    names = FieldNames(cfg.text_feature, cfg.prompt_feature, cfg.completion_feature, cfg.chat_feature)
    splits = load_splits(cfg.data, names)
    if cfg.train and splits["train"] is None:
        raise LiandanError(f"--data {cfg.data}: train.jsonl is missing")
    if cfg.test and not cfg.train and splits["test"] is None:
        raise LiandanError(f"--data {cfg.data}: test.jsonl is missing")

    docs_layout = docs_setup(cfg, record, splits, log)
    if record.get("rendering"):
        rendering = Rendering.from_dict(record["rendering"])
    else:
        rendering = make_rendering(tokenizer, cfg.system_prompt, cfg.chat_template)
        if cfg.train and splits["train"].format == "text":
            rendering.prompt_style = "raw"
    encoder = Encoder(tokenizer, rendering, cfg.mask_prompt)
    encoded = {k: encode_file(v, encoder, cfg.max_seq_length, log, cfg.long_examples)
               for k, v in splits.items() if v is not None}
    pad_id = tokenizer.pad_token_id
    from liandan.generate import stop_token_ids

    stop_ids = stop_token_ids(tokenizer, model, rendering)
    chat_style = rendering.prompt_style == "chat"
    replay = None
    if cfg.train and chat_style and splits["train"].format != "text" and cfg.replay_ratio > 0:
        replay = replay_examples(model, tokenizer, encoder, model_dir, cfg, stop_ids, pad_id, device, dist, log)
    # Which held-out general questions the base model gets right, asked before any weight changes.
    base_known = None
    if cfg.test and chat_style and not dist.enabled and "test" in encoded:
        from liandan.replay import base_retention

        base_known = base_retention(model, tokenizer, encoder, model_dir, stop_ids, pad_id, device.torch_device)

    if cfg.train:
        from liandan.train import train

        log("Training")
        model, summary = setup_finetuning(model, cfg)
        log(summary)
        if cfg.resume_adapter_file:
            load_weights_into(model, Path(cfg.resume_adapter_file))
        state = None
        if resume_from is not None:
            load_weights_into(model, resume_from)
            state = load_trainer_state(resume_from)
            log(f"Resuming from {resume_from} (iteration {state['iteration']})")
            if state["iteration"] >= cfg.iters:
                raise LiandanError(f"{resume_from} is at iteration {state['iteration']}, already >= --iters {cfg.iters}")
        if "valid" not in encoded:
            log(f"Note: --data {cfg.data} has no valid.jsonl; training without validation.")
        result = train(model, cfg, encoded["train"], encoded.get("valid"), pad_id, device.torch_device, adapter_dir,
                       lambda it: make_record(cfg, base_model, rendering, it, docs_layout), log, resume=state, dist=dist,
                       fsdp=cfg.fsdp and dist.enabled, replay=replay)
        log(f"Saved final weights to {adapter_dir}. Loss curve: {adapter_dir / 'loss.png'}")
        log(f"Trained {result.iterations} iterations in {result.seconds:.1f}s: {result.tokens_per_second:.1f} tokens/s, "
            f"peak memory {result.peak_memory_gb:.3f} GB")
        if result.replay_examples:
            share = result.replay_tokens / max(result.tokens, 1)
            log(f"Replay: {result.replay_examples} of the {result.examples} examples trained on were base-model answers, "
                f"{100 * share:.0f}% of the tokens (≈ {share * result.seconds:.1f}s of the training time).")
    elif cfg.test:
        model = load_adapter(model, adapter_dir, record) if (adapter_dir / RECORD).exists() or (adapter_dir / PEFT_WEIGHTS).exists() else model

    if cfg.test and dist.enabled:
        log("Note: --test runs in a single process; run `liandan lora --test --adapter-path ...` after this job.")
    elif cfg.test:
        if "test" not in encoded:
            log(f"Note: --data {cfg.data} has no test.jsonl; skipping the test.")
        else:
            test_report(model, tokenizer, encoder, splits["test"], encoded["test"], cfg, pad_id, device, log, stop_ids,
                        base_known)
    return 0


def replay_examples(model, tokenizer, encoder, model_dir, cfg, stop_ids, pad_id, device, dist, log) -> list:
    """The self-replay pool (liandan.replay); rank 0 generates and caches it, the other ranks read the cache."""
    from liandan.replay import replay_pool

    pool = None
    for turn in ("main", "others"):
        if (turn == "main") == dist.is_main:
            pool = replay_pool(model, tokenizer, encoder, model_dir, cfg.replay_prompts, stop_ids, pad_id,
                               device.torch_device, cfg.max_seq_length, soft_targets=cfg.kl_weight > 0)
        dist.barrier()
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


def test_report(model, tokenizer, encoder, test_file, test_set, cfg, pad_id, device, log, stop_ids,
                base_known=None) -> dict:
    """Test loss, perplexity, exact answers, general knowledge kept, then one sentence on what the loss means.

    stop_ids: the rendering's stop tokens (generate.stop_token_ids); base_known: replay.base_retention() of
    the base model, for the retention score."""
    from liandan.data.batching import eval_batches
    from liandan.evaluate import LOSS_EXPLAINED, evaluate_loss, exact_answers, perplexity

    log("Testing")
    loss, _ = evaluate_loss(model, test_set, cfg.batch_size, cfg.test_batches, pad_id, device.torch_device)
    log(f"Test loss {loss:.3f}, Test ppl {perplexity(loss):.3f}.")
    report = {"test_loss": loss, "test_ppl": perplexity(loss)}
    if test_file.format != "text":
        covered = sorted(i for b in eval_batches(test_set, cfg.batch_size, cfg.test_batches) for i in b)
        examples = [test_file.examples[i] for i in covered]
        checks = exact_answers(model, tokenizer, encoder, examples, device.torch_device, stop_ids)
        exact = sum(c.exact for c in checks)
        log(f"Exact answers: {exact}/{len(checks)} (greedy generation equals the expected answer and stops).")
        for c in checks:
            if not c.exact:
                tail = "" if c.stopped else " … (did not stop)"
                log(f"  ✗ {c.prompt!r}: expected {c.expected!r}, got {c.got!r}{tail}")
        report.update(exact=exact, total=len(checks))
    if base_known is not None:
        from liandan.replay import retention

        kept = retention(model, tokenizer, encoder, base_known, stop_ids, pad_id, device.torch_device)
        log(kept.summary())
        for question, reply in kept.lost:
            log(f"  ✗ forgotten: {question.question!r} → {reply.strip()[:80]!r}")
        report.update(retention_kept=kept.kept, retention_base=kept.base_correct)
    log(LOSS_EXPLAINED)
    return report
