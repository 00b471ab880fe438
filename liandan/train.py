"""The training loop: one readable function, mlx_lm-style reports, metrics.jsonl, checkpoints.

Speed notes (CPU and GPU alike):
* batches group examples of similar length, so padding is small;
* the LM head runs only on trained positions (see evaluate.supervised_loss);
* only the last --num-layers blocks hold trainable weights, so autograd never builds a backward
  graph below the first adapted block.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from liandan.adapters import decoder_layers, save_adapter_files
from liandan.atomic import atomic_dir, atomic_path
from liandan.config import TrainConfig, lr_multiplier
from liandan.data.batching import EncodedSet, collate, iterate_batches, padding_free_groups, pass_cost_tokens
from liandan.dist import Dist, wrap_for_training
from liandan.errors import LiandanError
from liandan.evaluate import evaluate_loss, loss_terms
from liandan.generate import peak_memory_gb

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
    """The training forward pass as one module, so DDP/FSDP wrap exactly what is computed."""

    def __init__(self, model, kl_weight: float = 0.0):
        super().__init__()
        self.model = model
        self.kl_weight = kl_weight

    def forward(self, input_ids, attention_mask, labels, soft_ids=None, soft_logp=None, soft_mask=None):
        """(objective to minimise, trained tokens, cross-entropy alone: what the reports show)."""
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                 "soft_ids": soft_ids, "soft_logp": soft_logp, "soft_mask": soft_mask}
        ce, n, kl = loss_terms(self.model, batch, with_kl=self.kl_weight > 0)
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


def latest_checkpoint(adapter_dir: Path) -> Path | None:
    found = sorted(p for p in (Path(adapter_dir) / CHECKPOINTS).glob("[0-9]" * 7) if (p / TRAINER_STATE).is_file())
    return found[-1] if found else None


def load_trainer_state(checkpoint: Path) -> dict:
    # weights_only: a checkpoint is data, never code (no pickle execution).
    return torch.load(Path(checkpoint) / TRAINER_STATE, map_location="cpu", weights_only=True)


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
                    weights: dict | None = None) -> Path:
    """Adapter + optimizer + scheduler + RNG + position in the data, as one directory written atomically."""
    checkpoint = adapter_dir / CHECKPOINTS / f"{it:07d}"
    try:
        with atomic_dir(checkpoint) as tmp:
            save_adapter_files(model, tmp, record, weights)
            torch.save({"iteration": it, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state(), "counters": counters}, tmp / TRAINER_STATE)
        save_adapter_files(model, adapter_dir, record, weights)
    except OSError as exc:
        last = latest_checkpoint(adapter_dir)
        raise LiandanError(f"cannot write the checkpoint of iteration {it} in {adapter_dir}: {exc.strerror}; "
                           f"the last complete checkpoint is {last or 'none'}") from None
    return checkpoint


def train(model, cfg: TrainConfig, train_set: EncodedSet, valid_set: EncodedSet | None, pad_id: int, device,
          adapter_dir: Path, record_for, log=print, resume: dict | None = None, dist: Dist | None = None,
          fsdp: bool = False, replay: list | None = None) -> TrainResult:
    """Train for cfg.iters optimizer steps. `record_for(iteration)` gives the record saved with each adapter.

    `resume` is a trainer state from load_trainer_state(): the run continues exactly where it stopped
    (same batches, optimizer moments, schedule and RNG), so the result equals an uninterrupted run.
    `replay` holds base-model examples mixed in at cfg.replay_ratio (liandan.replay).
    """
    adapter_dir = Path(adapter_dir)
    dist = dist or Dist()
    forward = wrap_for_training(LossModule(model, cfg.kl_weight), dist, fsdp, decoder_layers(model))
    params = [p for p in forward.parameters() if p.requires_grad]  # after wrapping: FSDP swaps in sharded ones
    optimizer = make_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg))
    first = 1
    counters = {"tokens": 0, "trained": 0, "skipped_nonfinite": 0, "replay_examples": 0, "replay_tokens": 0,
                "examples": 0}
    if resume and fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, resume["optimizer"], options=StateDictOptions(full_state_dict=True))
    elif resume:
        optimizer.load_state_dict(resume["optimizer"])
    if resume:
        scheduler.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["torch_rng"])
        counters.update(resume.get("counters", {}))
        first = resume["iteration"] + 1
    replay = replay or []
    items_of = train_set.items + replay  # batch indices past the data's own point into the replay examples
    n_train = len(train_set.items)
    batches = iterate_batches(train_set, cfg.batch_size, cfg.seed, replay=replay, replay_ratio=cfg.replay_ratio,
                               order=cfg.batch_order)
    for _ in range((first - 1) * cfg.grad_accumulation_steps):  # replay the data order up to the checkpoint
        next(batches)
    pass_cost = pass_cost_tokens(device)
    metrics = open(adapter_dir / METRICS, "a" if resume else "w", encoding="utf-8") if dist.is_main else None

    def emit(entry: dict, line: str) -> None:
        if metrics is None:
            return
        metrics.write(json.dumps(entry) + "\n")
        metrics.flush()
        with tqdm.external_write_mode(file=sys.stderr):  # keeps the bar from tearing the line
            log(line)

    def validate(it: int) -> float | None:
        if valid_set is None or cfg.val_batches == 0:
            return None
        start = time.perf_counter()
        loss, _ = evaluate_loss(model, valid_set, cfg.batch_size, cfg.val_batches, pad_id, device,
                                lambda b: forward(b["input_ids"], b["attention_mask"], b["labels"])[:2])
        took = time.perf_counter() - start
        emit({"iteration": it, "val_loss": loss, "val_time": took}, f"Iter {it}: Val loss {loss:.3f}, Val took {took:.3f}s")
        return loss

    # SIGINT/SIGTERM: finish the current step, save a checkpoint, then stop (TrainingInterrupted).
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    log(f"Starting training..., iters: {cfg.iters}" + (f" (resuming after iteration {first - 1})" if resume else ""))
    model.train()
    window = {"loss": 0.0, "trained": 0, "tokens": 0, "steps": 0, "start": time.perf_counter()}
    last_train_loss, last_val = float("nan"), None
    started = time.perf_counter()
    # disable=None: a live bar on a terminal, none in logs and CI output.
    bar = tqdm(total=cfg.iters, initial=first - 1, desc="Training", unit="it", dynamic_ncols=True, file=sys.stderr,
               leave=False, disable=None if dist.is_main else True)
    it = first - 1
    try:
        for it in range(first, cfg.iters + 1):
            if it == 1 or it % cfg.steps_per_eval == 0 or it == cfg.iters:
                last_val = validate(it)
            # Each rank takes its share of the global batch; the loss is normalised by the trained tokens of the
            # whole global step (all ranks, all micro-batches), so N processes compute what one process would.
            step_indices = [next(batches)[1] for _ in range(cfg.grad_accumulation_steps)]
            global_batches = [[items_of[i] for i in indices] for indices in step_indices]
            replayed = [i for indices in step_indices for i in indices if i >= n_train]
            counters["examples"] += sum(len(indices) for indices in step_indices)
            counters["replay_examples"] += len(replayed)
            counters["replay_tokens"] += sum(len(items_of[i].input_ids) for i in replayed)
            n_step = sum(item.n_trained for b in global_batches for item in b)
            step_loss = tokens = 0.0
            for items in global_batches:
                mine = [items[i] for i in dist.shard(list(range(len(items))))]
                # One process: sub-batches without padding. Under torchrun every rank must run the same number
                # of backward passes (each one synchronises gradients), so each runs its share as one batch.
                for group in ([mine] if dist.enabled else padding_free_groups(mine, pass_cost)):
                    batch = collate(group, pad_id, device)
                    objective, _, ce_sum = forward(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                                   batch.get("soft_ids"), batch.get("soft_logp"), batch.get("soft_mask"))
                    # DDP/FSDP average gradients over ranks; scaling by the world size turns that into the sum.
                    (objective * dist.world / n_step).backward()
                    step_loss += float(ce_sum)  # reported: the cross-entropy, comparable with the validation loss
                    tokens += int(batch["attention_mask"].sum())
            step_loss, tokens = dist.all_sum([step_loss, tokens])
            window["tokens"] += int(tokens)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf")))
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                what = "loss" if not math.isfinite(step_loss) else "gradient norm"
                if not cfg.skip_nonfinite:
                    last = latest_checkpoint(adapter_dir)
                    raise LiandanError(
                        f"iteration {it}: the {what} is not finite; lower --learning-rate or check the data "
                        f"(--skip-nonfinite skips such batches). Last good checkpoint: {last or 'none'}"
                    )
                counters["skipped_nonfinite"] += 1
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                log(f"Iter {it}: non-finite {what}, batch skipped ({counters['skipped_nonfinite']} so far)")
            else:
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                window["loss"] += step_loss
                window["trained"] += n_step
                window["steps"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss / n_step:.3f}")

            if (it % cfg.steps_per_report == 0 or it == cfg.iters) and window["steps"]:
                elapsed = time.perf_counter() - window["start"]
                counters["tokens"] += window["tokens"]
                counters["trained"] += window["trained"]
                last_train_loss = window["loss"] / window["trained"]
                entry = {
                    "iteration": it,
                    "train_loss": last_train_loss,
                    "learning_rate": optimizer.param_groups[0]["lr"],
                    "grad_norm": grad_norm,  # of the report's last step, before clipping
                    "it_per_sec": window["steps"] / elapsed,
                    "tokens_per_sec": window["tokens"] / elapsed,
                    "trained_tokens": counters["trained"],
                    "tokens": counters["tokens"],
                    "peak_memory_gb": peak_memory_gb(),
                }
                emit(entry, f"Iter {it}: Train loss {last_train_loss:.3f}, Learning Rate {entry['learning_rate']:.3e}, "
                     f"It/sec {entry['it_per_sec']:.3f}, Tokens/sec {entry['tokens_per_sec']:.1f}, "
                     f"Trained Tokens {counters['trained']}, Peak mem {entry['peak_memory_gb']:.3f} GB")
                window = {"loss": 0.0, "trained": 0, "tokens": 0, "steps": 0, "start": time.perf_counter()}

            stopping = dist.all_sum([1.0 if stop["signal"] else 0.0])[0] > 0  # every rank stops at the same step
            if it % cfg.save_every == 0 or it == cfg.iters or stopping:
                weights, optimizer_state = gather_states(model, optimizer, fsdp)
                checkpoint = adapter_dir / CHECKPOINTS / f"{it:07d}"
                if dist.is_main:
                    save_checkpoint(model, optimizer_state, scheduler, adapter_dir, it, record_for(it), counters, weights)
                    with tqdm.external_write_mode(file=sys.stderr):
                        log(f"Iter {it}: Saved adapter weights to {adapter_dir} and {checkpoint}.")
                dist.barrier()
                if stopping:
                    raise TrainingInterrupted(stop["signal"] or signal.SIGTERM, it, checkpoint)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        bar.close()
        if metrics is not None:
            metrics.close()
    seconds = time.perf_counter() - started
    model.eval()
    if counters["skipped_nonfinite"]:
        log(f"Skipped {counters['skipped_nonfinite']} batch(es) with a non-finite loss or gradient.")
    if dist.is_main:
        plot_losses(adapter_dir / METRICS, adapter_dir / LOSS_PLOT)
    return TrainResult(cfg.iters, last_train_loss, last_val, seconds, counters["tokens"], counters["trained"],
                       peak_memory_gb(), counters["examples"], counters["replay_examples"], counters["replay_tokens"])


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
