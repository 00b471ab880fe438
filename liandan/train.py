"""The training loop: `train()` runs `_step()` --iters times; reports go through a `Reporter` (metrics.jsonl,
mlx_lm-style log lines, a progress bar), and checkpoints to ADAPTER_PATH/checkpoints.

Speed notes (CPU and GPU alike):
* batches are random draws by default (--batch-order random); on CPU, examples of very different lengths
  run as separate sub-batches (data.batching.padding_free_groups), so little compute goes to padding.
  --batch-order length groups similar lengths instead, as mlx_lm does;
* the LM head runs only on trained positions (see evaluate.loss_terms);
* only the last --num-layers blocks hold trainable weights, so autograd never builds a backward
  graph below the first adapted block.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

from liandan import null_space
from liandan.adapters import decoder_layers, save_adapter_files
from liandan.atomic import atomic_dir, atomic_path, atomic_write_text
from liandan.config import TrainConfig, lr_multiplier
from liandan.data.batching import EncodedSet, collate, iterate_batches, padding_free_groups, pass_cost_tokens
from liandan.device import accelerator_rng_state, peak_memory_gb, restore_accelerator_rng
from liandan.dist import Dist, wrap_for_training
from liandan.errors import LiandanError
from liandan.evaluate import evaluate_loss, loss_terms
from liandan.replay import nearest_replay, replay_indices

METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"


@dataclass
class TrainResult:
    iterations: int
    final_train_loss: float
    final_val_loss: float | None
    seconds: float
    tokens: int  # non-pad input tokens processed
    trained_tokens: int  # tokens that counted in the loss
    peak_memory_gb: float
    examples: int = 0  # examples seen (replay included)
    replay_examples: int = 0
    replay_tokens: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved before raising."""

    def __init__(self, signum: int, iteration: int, checkpoint: Path):
        super().__init__(f"interrupted at iteration {iteration}")
        self.signum, self.iteration, self.checkpoint = signum, iteration, checkpoint


class LossModule(torch.nn.Module):
    """The training forward pass as one module, so DDP/FSDP wrap exactly what is computed.

    A full fine-tune of a bf16/fp16 model (half_precision_of) runs each pass under autocast to that type. The
    block is entered per pass, never around the loop: autocast keeps the half-precision copies it casts of fp32
    weights until its outermost block exits, so one block around the loop would run every later step and
    validation with the weights of the first step. Backward runs outside it, as PyTorch advises."""

    def __init__(self, model, kl_weight: float = 0.0, learned_prob: float = 0.0, half: torch.dtype | None = None,
                 device_type: str = "cpu"):
        super().__init__()
        self.model = model
        self.kl_weight = kl_weight
        self.learned_prob = learned_prob
        self.half = half
        self.device_type = device_type

    def forward(self, input_ids, attention_mask, labels, soft_ids=None, soft_logp=None, soft_mask=None):
        """(objective to minimise, trained tokens, cross-entropy alone: what the reports show)."""
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                 "soft_ids": soft_ids, "soft_logp": soft_logp, "soft_mask": soft_mask}
        with torch.autocast(self.device_type, dtype=self.half) if self.half else nullcontext():
            ce, n, kl = loss_terms(self.model, batch, with_kl=self.kl_weight > 0, learned_prob=self.learned_prob)
        objective = ce if kl is None else ce + self.kl_weight * kl
        return objective, n, ce.detach()


CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.pt"


def make_optimizer(params, cfg: TrainConfig):
    extra = dict(cfg.optimizer_config.get(cfg.optimizer, {})) if cfg.optimizer_config else {}
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate, **extra)
    if cfg.optimizer == "adamw":
        extra.setdefault("weight_decay", 0.01)
        return torch.optim.AdamW(params, lr=cfg.learning_rate, **extra)
    return torch.optim.SGD(params, lr=cfg.learning_rate, **extra)


def checkpoint_dir(adapter_dir: Path, iteration: int) -> Path:
    return Path(adapter_dir) / CHECKPOINTS / f"{iteration:07d}"


def checkpoint_dirs(adapter_dir: Path) -> list[Path]:
    """Every checkpoint_dir under adapter_dir, oldest first; not whatever else the user put in checkpoints/."""
    return sorted((Path(adapter_dir) / CHECKPOINTS).glob("[0-9]" * 7))


def complete_checkpoints(adapter_dir: Path) -> list[Path]:
    """The checkpoints a run can resume from, oldest first (one cut short by a crash has no trainer state)."""
    return [p for p in checkpoint_dirs(adapter_dir) if (p / TRAINER_STATE).is_file()]


def latest_checkpoint(adapter_dir: Path) -> Path | None:
    found = complete_checkpoints(adapter_dir)
    return found[-1] if found else None


def load_trainer_state(checkpoint: Path) -> dict:
    # weights_only: a checkpoint is data, never code (no pickle execution).
    state = torch.load(Path(checkpoint) / TRAINER_STATE, map_location="cpu", weights_only=True)
    metrics = Path(checkpoint) / METRICS  # the reports up to the checkpoint, as they were (none in older ones)
    if metrics.is_file():
        state["metrics"] = metrics.read_text(encoding="utf-8")
    return state


def gather_states(model, optimizer, fsdp: bool) -> tuple[dict | None, dict]:
    """(trainable weights, optimizer state) as full tensors; with FSDP every rank must call this."""
    if not fsdp:
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    weights = {k: v for k, v in get_model_state_dict(model, options=options).items() if k in trainable}
    return weights, get_optimizer_state_dict(model, optimizer, options=options)


def save_checkpoint(model, optimizer_state: dict, scheduler, adapter_dir: Path, it: int, record: dict, counters: dict,
                    weights: dict | None = None, extra: dict | None = None) -> Path:
    """Adapter + optimizer + scheduler + RNG + position in the data, as one directory written atomically.
    `extra`: more of the trainer state (the report window, the training data's fingerprint)."""
    checkpoint = checkpoint_dir(adapter_dir, it)
    try:
        with atomic_dir(checkpoint) as tmp:
            save_adapter_files(model, tmp, record, weights)
            torch.save({"iteration": it, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state(), "counters": counters, **(extra or {})},
                       tmp / TRAINER_STATE)
            if (adapter_dir / METRICS).is_file():  # this run's reports so far: --resume starts from exactly these
                shutil.copyfile(adapter_dir / METRICS, tmp / METRICS)
        save_adapter_files(model, adapter_dir, record, weights)
    except OSError as exc:
        last = latest_checkpoint(adapter_dir)
        raise LiandanError(f"cannot write the checkpoint of iteration {it} in {adapter_dir}: {exc.strerror}; "
                           f"the last complete checkpoint is {last or 'none'}") from None
    return checkpoint


@dataclass
class TrainJob:
    """Everything `train` works on besides the model: the options, the data, and where results go."""

    cfg: TrainConfig
    train_set: EncodedSet
    valid_set: EncodedSet | None
    pad_id: int
    device: torch.device
    adapter_dir: Path
    record_for: Callable[[int], dict]  # iteration -> the record saved with each adapter
    # A trainer state from load_trainer_state(): the run continues exactly where it stopped (same batches,
    # optimizer moments, schedule, the CPU's RNG and the GPU's), so the result equals an uninterrupted run.
    resume: dict | None = None
    dist: Dist = field(default_factory=Dist)
    fsdp: bool = False
    replay: list = field(default_factory=list)  # base-model examples mixed in at cfg.replay_ratio (liandan.replay)


@dataclass
class Counters:
    """Totals since the run began; saved with each checkpoint, so a resumed run continues them."""

    tokens: int = 0  # non-pad input tokens processed (added at each report)
    trained: int = 0  # tokens that counted in the loss (added at each report)
    skipped_nonfinite: int = 0
    overflow_steps: int = 0  # float16: optimizer steps the loss scaler skipped (loss_scaler)
    examples: int = 0  # examples seen, replay included
    replay_examples: int = 0
    replay_tokens: int = 0


@dataclass
class Window:
    """Sums since the last report; saved with each checkpoint (less `start`), as the report's totals need them."""

    loss: float = 0.0
    trained: int = 0
    tokens: int = 0
    steps: int = 0
    seconds: float = 0.0  # spent in this window before the checkpoint it was resumed from
    start: float = field(default_factory=time.perf_counter)

    def saved(self) -> dict:
        return {"loss": self.loss, "trained": self.trained, "tokens": self.tokens, "steps": self.steps,
                "seconds": self.elapsed()}

    def elapsed(self) -> float:
        return self.seconds + time.perf_counter() - self.start


@dataclass
class TrainState:
    iteration: int = 0  # the last completed optimizer step
    counters: Counters = field(default_factory=Counters)
    window: Window = field(default_factory=Window)
    train_loss: float = float("nan")  # of the last report
    val_loss: float | None = None  # of the last validation
    saved: bool = False  # whether this process has saved a checkpoint yet


@dataclass
class _Parts:
    """What the loop runs with, built once by train()."""

    forward: torch.nn.Module  # LossModule, wrapped for DDP/FSDP
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: Iterator  # (epoch, batch indices) from data.batching.iterate_batches
    items: list  # batch index -> Encoded: the training set, then the replay examples
    pass_cost: int  # padded tokens that one more forward + backward pass costs (data.batching.pass_cost_tokens)
    scaler: torch.amp.GradScaler  # loss_scaler(): active for float16 only
    null_space: null_space.NullSpace | None = None  # re-applied after every optimizer step (--protect-directions)
    data_id: str = ""  # data_fingerprint() of the training set, saved with each checkpoint


class Reporter:
    """Where training reports go: on rank 0, metrics.jsonl, log lines and a live progress bar. Like mlx_lm's
    TrainingCallback, a subclass (or any object with these methods) can send them elsewhere."""

    def __init__(self, job: TrainJob, log=print, first: int = 1):
        main = job.dist.is_main
        self.log = log
        if main and job.resume and "metrics" in job.resume:  # the reports as the checkpoint saw them, not what a
            atomic_write_text(job.adapter_dir / METRICS, job.resume["metrics"])  # later run (--overwrite) wrote since
        elif main and job.resume:
            keep_metrics_until(job.adapter_dir / METRICS, job.resume["iteration"])
        self.metrics = open(job.adapter_dir / METRICS, "a" if job.resume else "w", encoding="utf-8") if main else None
        # disable=None: a live bar on a terminal, none in logs and CI output.
        self.bar = tqdm(total=job.cfg.iters, initial=first - 1, desc="Training", unit="it", dynamic_ncols=True,
                        file=sys.stderr, leave=False, disable=None if main else True)

    def say(self, line: str) -> None:
        with tqdm.external_write_mode(file=sys.stderr):  # keeps the bar from tearing the line
            self.log(line)

    def on_step(self, iteration: int, loss_per_token: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss_per_token:.3f}")

    def on_train_report(self, e: dict) -> None:
        self._write(e, f"Iter {e['iteration']}: Train loss {e['train_loss']:.3f}, Learning Rate {e['learning_rate']:.3e}, "
                       f"It/sec {e['it_per_sec']:.3f}, Tokens/sec {e['tokens_per_sec']:.1f}, "
                       f"Trained Tokens {e['trained_tokens']}, Peak mem {e['peak_memory_gb']:.3f} GB")

    def on_val_report(self, e: dict) -> None:
        self._write(e, f"Iter {e['iteration']}: Val loss {e['val_loss']:.3f}, Val took {e['val_time']:.3f}s")

    def _write(self, entry: dict, line: str) -> None:
        if self.metrics is None:
            return
        self.metrics.write(json.dumps(entry) + "\n")
        self.metrics.flush()
        self.say(line)

    def close(self) -> None:
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()


def keep_metrics_until(path: Path, iteration: int) -> None:
    """Resuming: drop the entries logged after the checkpoint (the resumed run logs those iterations again),
    rewriting the file atomically, so that each iteration is in it once and loss.png does not zigzag."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["iteration"] <= iteration:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short when the run was killed
    atomic_write_text(path, "".join(kept))


class _StopRequest:
    """SIGINT/SIGTERM while training: note the signal; the loop finishes the step, saves a checkpoint and stops."""

    def __enter__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self._note) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _note(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def train(model, job: TrainJob, log=print, reporter: Reporter | None = None) -> TrainResult:
    """Train for cfg.iters optimizer steps, validating, reporting and saving checkpoints on the way."""
    cfg, dist = job.cfg, job.dist
    parts = _build_parts(model, job, log)
    state = _restore(job, model, parts)
    reporter = reporter or Reporter(job, log, state.iteration + 1)
    log(f"Starting training..., iters: {cfg.iters}" + (f" (resuming after iteration {state.iteration})" if job.resume else ""))
    model.train()
    state.window.start = started = time.perf_counter()
    with _StopRequest() as stop:
        try:
            for it in range(state.iteration + 1, cfg.iters + 1):
                if it == 1 or it % cfg.steps_per_eval == 0 or it == cfg.iters:
                    state.val_loss = _validate(model, parts, job, it, reporter)
                grad_norm = _step(parts, job, state, it, reporter)
                state.iteration = it
                if (it % cfg.steps_per_report == 0 or it == cfg.iters) and state.window.steps:
                    _report(state, parts, job, grad_norm, reporter)
                stopping = dist.all_sum([1.0 if stop.signum else 0.0])[0] > 0  # every rank stops at the same step
                if it % cfg.save_every == 0 or it == cfg.iters or stopping:
                    checkpoint = _checkpoint(model, parts, job, state, reporter)
                    if stopping:
                        raise TrainingInterrupted(stop.signum or signal.SIGTERM, it, checkpoint)
        finally:
            reporter.close()
    seconds = time.perf_counter() - started
    _back_in_one_type(model, job)
    model.eval()
    c = state.counters
    if c.skipped_nonfinite:
        log(f"Skipped {c.skipped_nonfinite} batch(es) with a non-finite loss or gradient.")
    if c.overflow_steps:
        log(f"float16: {c.overflow_steps} step(s) skipped while the loss scale adjusted to the gradients "
            f"(scale now {parts.scaler.get_scale():g}).")
    if dist.is_main:
        plot_losses(job.adapter_dir / METRICS, job.adapter_dir / LOSS_PLOT)
    return TrainResult(cfg.iters, state.train_loss, state.val_loss, seconds, c.tokens, c.trained,
                       peak_memory_gb(job.device), c.examples, c.replay_examples, c.replay_tokens)


def half_precision_of(model) -> torch.dtype | None:
    """The bf16/fp16 that a full fine-tune's forward pass runs in, under autocast, while its trained weights are
    fp32 (adapters.setup_finetuning): the type of the frozen rest of the model. None otherwise; LoRA's forward
    needs no autocast, because PEFT casts each input to the adapter's own type."""
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad} & {torch.bfloat16, torch.float16}
    return next(iter(frozen)) if trained == {torch.float32} and frozen and not hasattr(model, "peft_config") else None


def loss_scaler(model, job: TrainJob) -> torch.amp.GradScaler:
    """Dynamic loss scaling for float16, as HF Trainer's fp16=True: gradients flowing back through float16
    activations often fall below its smallest normal number (6e-5) and lose their precision or vanish. The loss
    is scaled up before backward and the gradients unscaled before clipping; a step whose scaled gradients
    overflow is skipped and the scale halved. bfloat16 has float32's range and needs none (a disabled scaler
    passes everything through)."""
    fp16 = any(p.dtype == torch.float16 for p in model.parameters())
    if fp16 and job.fsdp:  # each rank holds a shard of the gradients: all must agree on an overflow
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(job.device.type)
    return torch.amp.GradScaler(job.device.type, enabled=fp16)


def _back_in_one_type(model, job: TrainJob) -> None:
    """A full fine-tune's fp32 trained weights cast back to the rest's bf16/fp16: the test and generation after
    training run without autocast."""
    half = half_precision_of(model)
    if half is None or job.fsdp:  # FSDP keeps its own copies of the weights; its runs end without a test
        return
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(half)


def _build_parts(model, job: TrainJob, log=print) -> _Parts:
    cfg = job.cfg
    loss = LossModule(model, cfg.kl_weight, cfg.learned_prob, half_precision_of(model), job.device.type)
    forward = wrap_for_training(loss, job.dist, job.fsdp, decoder_layers(model))
    params = [p for p in forward.parameters() if p.requires_grad]  # after wrapping: FSDP swaps in sharded ones
    optimizer = make_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg))
    n, replay = len(job.train_set.items), job.replay
    near = nearest_replay(job.train_set.items, replay, seed=cfg.seed) if replay and cfg.replay_focus > 0 else []
    if replay and cfg.replay_focus > 0 and not near:  # it matches prompts: untrained tokens, which these data lack
        log("Note: --replay-focus found no prompts to match (text data, or --no-mask-prompt trains every token); "
            "replay draws from the whole pool")
    batches = iterate_batches(job.train_set, cfg.batch_size, cfg.seed, replay=replay, order=cfg.batch_order,
                              pick_replay=lambda rng: replay_indices(n, len(replay), cfg.replay_ratio, rng, near,
                                                                     cfg.replay_focus))
    return _Parts(forward, params, optimizer, scheduler, batches, job.train_set.items + replay,
                  pass_cost_tokens(job.device), loss_scaler(model, job), _null_space(model, job, log),
                  data_fingerprint(job.train_set))


def data_fingerprint(train_set: EncodedSet) -> str:
    """The training tokens and labels as rendered (file, template, system prompt, --max-seq-length, masking)."""
    from array import array

    digest = hashlib.sha256()
    for item in train_set.items:  # as int64 bytes: a 50 MB dataset hashes in well under a second
        digest.update(array("q", item.input_ids).tobytes() + b"|" + array("q", item.labels).tobytes() + b";")
    return digest.hexdigest()


def _null_space(model, job: TrainJob, log) -> null_space.NullSpace | None:
    """The LoRA inputs' protected directions (--protect-directions), applied to a fresh adapter. None without
    LoRA layers (full fine-tuning, the only kind FSDP shards)."""
    space = null_space.build(model, job.replay, job.cfg.protect_directions, job.device, log)
    if space and not job.resume:  # a checkpoint's weights were projected when saved
        space.apply()
    return space


def _restore(job: TrainJob, model, parts: _Parts) -> TrainState:
    """A fresh state, or the checkpoint's: optimizer, schedule, RNG, counters and position in the data."""
    state, resume = TrainState(), job.resume
    if resume and resume.get("train_data", parts.data_id) != parts.data_id:
        raise LiandanError(f"--data {job.cfg.data}: {job.train_set.name} is not the training data the checkpoint was "
                           "trained on (its examples, or how they render: template, system prompt, --max-seq-length, "
                           "masking); resume with the same data and settings or start a new run")
    if resume and job.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, parts.optimizer, resume["optimizer"], options=StateDictOptions(full_state_dict=True))
    elif resume:
        parts.optimizer.load_state_dict(resume["optimizer"])
    if resume:
        parts.scheduler.load_state_dict(resume["scheduler"])
        if "grad_scaler" in resume:
            parts.scaler.load_state_dict(resume["grad_scaler"])
        torch.set_rng_state(resume["torch_rng"])
        restore_accelerator_rng(resume, job.device)
        known = {f.name for f in fields(Counters)}
        state.counters = Counters(**{k: v for k, v in resume.get("counters", {}).items() if k in known})
        pending = {f.name for f in fields(Window)} - {"start"}
        state.window = Window(**{k: v for k, v in resume.get("window", {}).items() if k in pending})
        state.iteration = resume["iteration"]
    for _ in range(state.iteration * job.cfg.grad_accumulation_steps):  # replay the data order up to the checkpoint
        next(parts.batches)
    return state


def _step(parts: _Parts, job: TrainJob, state: TrainState, it: int, reporter) -> float:
    """One optimizer step over cfg.grad_accumulation_steps micro-batches; returns the gradient norm."""
    cfg = job.cfg
    step_indices = [next(parts.batches)[1] for _ in range(cfg.grad_accumulation_steps)]
    _count_examples(state.counters, step_indices, parts.items, len(job.train_set.items))
    global_batches = [[parts.items[i] for i in indices] for indices in step_indices]
    n_step = sum(item.n_trained for b in global_batches for item in b)
    loss, tokens = _accumulate(parts, job, global_batches, n_step)
    state.window.tokens += int(tokens)
    parts.scaler.unscale_(parts.optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(parts.params, cfg.max_grad_norm or float("inf")))
    overflow = _overflowed(parts, grad_norm)
    if math.isfinite(loss) and (math.isfinite(grad_norm) or overflow):
        parts.scaler.step(parts.optimizer)  # skips the step on an overflow
        if overflow:
            state.counters.overflow_steps += 1
            reporter.say(f"Iter {it}: float16 gradients overflowed at loss scale {parts.scaler.get_scale():g}; "
                         "step skipped, scale halved")
        elif parts.null_space:
            parts.null_space.apply()
        _advance_schedule(parts)
        parts.optimizer.zero_grad(set_to_none=True)
        state.window.loss += loss
        state.window.trained += n_step
        state.window.steps += 1
    else:
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        if not cfg.skip_nonfinite:
            raise LiandanError(
                f"iteration {it}: the {what} is not finite; lower --learning-rate or check the data (--skip-nonfinite "
                f"skips such batches). Last good checkpoint: {latest_checkpoint(job.adapter_dir) or 'none'}"
            )
        state.counters.skipped_nonfinite += 1
        parts.optimizer.zero_grad(set_to_none=True)
        _advance_schedule(parts)
        reporter.say(f"Iter {it}: non-finite {what}, batch skipped ({state.counters.skipped_nonfinite} so far)")
    parts.scaler.update()
    reporter.on_step(it, loss / n_step)
    return grad_norm


def _overflowed(parts: _Parts, grad_norm: float) -> bool:
    """float16: non-finite gradients because the loss scale is too high, which the scaler lowers. Below a scale
    of 1 it is no longer the scale (16 halvings from 65536): the gradients are non-finite on their own, and
    --skip-nonfinite decides, as in float32, instead of skipping every step while the scale falls to 0."""
    return parts.scaler.is_enabled() and not math.isfinite(grad_norm) and parts.scaler.get_scale() >= 1.0


def _advance_schedule(parts: _Parts) -> None:
    """The learning rate follows the iteration, also past a skipped step. Skipping the first one is deliberate
    here, not the call-order mistake torch warns of."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        parts.scheduler.step()


def _accumulate(parts: _Parts, job: TrainJob, global_batches: list[list], n_step: int) -> tuple[float, float]:
    """Forward and backward over the step's micro-batches; (cross-entropy sum, input tokens) over all ranks.

    Each rank takes its share of the global batch; the loss is normalised by the trained tokens of the
    whole global step (all ranks, all micro-batches), so N processes compute what one process would."""
    dist = job.dist
    loss = tokens = 0.0
    for items in global_batches:
        mine = [items[i] for i in dist.shard(list(range(len(items))))]
        # One process: sub-batches without padding. Under torchrun every rank must run the same number
        # of backward passes (each one synchronises gradients), so each runs its share as one batch.
        for group in ([mine] if dist.enabled else padding_free_groups(mine, parts.pass_cost)):
            batch = collate(group, job.pad_id, job.device)
            objective, _, ce_sum = parts.forward(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                                 batch.get("soft_ids"), batch.get("soft_logp"), batch.get("soft_mask"))
            # DDP/FSDP average gradients over ranks; scaling by the world size turns that into the sum.
            parts.scaler.scale(objective * dist.world / n_step).backward()
            loss += float(ce_sum)  # reported: the cross-entropy, comparable with the validation loss
            tokens += int(batch["attention_mask"].sum())
    loss, tokens = dist.all_sum([loss, tokens])
    return loss, tokens


def _count_examples(counters: Counters, step_indices: list[list[int]], items: list, n_train: int) -> None:
    replayed = [i for indices in step_indices for i in indices if i >= n_train]
    counters.examples += sum(len(indices) for indices in step_indices)
    counters.replay_examples += len(replayed)
    counters.replay_tokens += sum(len(items[i].input_ids) for i in replayed)


def _validate(model, parts: _Parts, job: TrainJob, it: int, reporter) -> float | None:
    cfg = job.cfg
    if job.valid_set is None or cfg.val_batches == 0:
        return None
    start = time.perf_counter()
    loss, _ = evaluate_loss(model, job.valid_set, cfg.batch_size, cfg.val_batches, job.pad_id, job.device,
                            lambda b: parts.forward(b["input_ids"], b["attention_mask"], b["labels"])[:2])
    reporter.on_val_report({"iteration": it, "val_loss": loss, "val_time": time.perf_counter() - start})
    return loss


def _report(state: TrainState, parts: _Parts, job: TrainJob, grad_norm: float, reporter) -> None:
    """Fold the window since the last report into the counters and report it."""
    window, counters = state.window, state.counters
    elapsed = window.elapsed()
    counters.tokens += window.tokens
    counters.trained += window.trained
    state.train_loss = window.loss / window.trained
    reporter.on_train_report({
        "iteration": state.iteration,
        "train_loss": state.train_loss,
        "learning_rate": parts.optimizer.param_groups[0]["lr"],
        "grad_norm": grad_norm if math.isfinite(grad_norm) else None,  # of the report's last step, before clipping
        "it_per_sec": window.steps / elapsed,
        "tokens_per_sec": window.tokens / elapsed,
        "trained_tokens": counters.trained,
        "tokens": counters.tokens,
        "peak_memory_gb": peak_memory_gb(job.device),
    })
    state.window = Window()


def _checkpoint(model, parts: _Parts, job: TrainJob, state: TrainState, reporter) -> Path:
    """Save a checkpoint of iteration state.iteration (every rank gathers, rank 0 writes)."""
    it, adapter_dir = state.iteration, job.adapter_dir
    weights, optimizer_state = gather_states(model, parts.optimizer, job.fsdp)
    checkpoint = checkpoint_dir(adapter_dir, it)
    if job.dist.is_main:
        scaler = {"grad_scaler": parts.scaler.state_dict()} if parts.scaler.is_enabled() else {}
        save_checkpoint(model, optimizer_state, parts.scheduler, adapter_dir, it, job.record_for(it),
                        asdict(state.counters), weights, {"window": state.window.saved(), "train_data": parts.data_id,
                                                          **accelerator_rng_state(job.device), **scaler})
        if not job.resume and not state.saved:
            _remove_other_checkpoints(adapter_dir, checkpoint)
        if job.cfg.keep_checkpoints:
            _remove_older_checkpoints(adapter_dir, job.cfg.keep_checkpoints, it)
        reporter.say(f"Iter {it}: Saved adapter weights to {adapter_dir} and {checkpoint}.")
    state.saved = True
    job.dist.barrier()
    return checkpoint


def _remove_other_checkpoints(adapter_dir: Path, keep: Path) -> None:
    """A fresh run (not --resume) drops checkpoints an earlier run left here (with --overwrite, or after an earlier
    run failed before saving its adapter) only once it has saved one of its own: until then a failed start loses
    nothing; after, `--resume` must not pick up the old run's latest."""
    for old in checkpoint_dirs(adapter_dir):
        if old != keep and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def _remove_older_checkpoints(adapter_dir: Path, keep: int, iteration: int) -> None:
    """--keep-checkpoints N: a full fine-tune's checkpoint holds the weights and twice as much optimizer state,
    so a long run would fill the disk. Only complete checkpoints count: the newest N can always resume."""
    # Counted up to this iteration: after --resume of an older checkpoint, later ones of the abandoned run must not
    # push out the one just saved.
    for old in [p for p in complete_checkpoints(adapter_dir) if int(p.name) <= iteration][:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def plot_losses(metrics_path: Path, out: Path) -> None:
    """Train and validation loss against iterations, as a PNG next to the adapters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_pts, val_pts = [], []
    for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if "train_loss" in entry:
            train_pts.append((entry["iteration"], entry["train_loss"]))
        if "val_loss" in entry:
            val_pts.append((entry["iteration"], entry["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train_pts:
        ax.plot(*zip(*train_pts), label="train loss")
    if val_pts:
        ax.plot(*zip(*val_pts), "o-", label="validation loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (mean NLL per trained token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
