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
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from liandan.adapters import save_adapter_files
from liandan.atomic import atomic_path
from liandan.config import TrainConfig, lr_multiplier
from liandan.data.batching import EncodedSet, collate, iterate_batches
from liandan.errors import LiandanError
from liandan.evaluate import evaluate_loss, supervised_loss
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

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def make_optimizer(params, cfg: TrainConfig):
    extra = dict(cfg.optimizer_config.get(cfg.optimizer, {})) if cfg.optimizer_config else {}
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate, **extra)
    if cfg.optimizer == "adamw":
        extra.setdefault("weight_decay", 0.01)
        return torch.optim.AdamW(params, lr=cfg.learning_rate, **extra)
    return torch.optim.SGD(params, lr=cfg.learning_rate, **extra)


def train(model, cfg: TrainConfig, train_set: EncodedSet, valid_set: EncodedSet | None, pad_id: int, device,
          adapter_dir: Path, record_for, log=print) -> TrainResult:
    """Train for cfg.iters optimizer steps. `record_for(iteration)` gives the record saved with each adapter."""
    adapter_dir = Path(adapter_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg))
    batches = iterate_batches(train_set, cfg.batch_size, cfg.seed)
    metrics = open(adapter_dir / METRICS, "w", encoding="utf-8")

    def emit(entry: dict, line: str) -> None:
        metrics.write(json.dumps(entry) + "\n")
        metrics.flush()
        with tqdm.external_write_mode(file=sys.stderr):  # keeps the bar from tearing the line
            log(line)

    def validate(it: int) -> float | None:
        if valid_set is None or cfg.val_batches == 0:
            return None
        start = time.perf_counter()
        loss, _ = evaluate_loss(model, valid_set, cfg.batch_size, cfg.val_batches, pad_id, device)
        took = time.perf_counter() - start
        emit({"iteration": it, "val_loss": loss, "val_time": took}, f"Iter {it}: Val loss {loss:.3f}, Val took {took:.3f}s")
        return loss

    log(f"Starting training..., iters: {cfg.iters}")
    model.train()
    window = {"loss": 0.0, "trained": 0, "tokens": 0, "steps": 0, "start": time.perf_counter()}
    total_tokens = total_trained = 0
    last_train_loss, last_val = float("nan"), None
    started = time.perf_counter()
    # disable=None: a live bar on a terminal, none in logs and CI output.
    bar = tqdm(total=cfg.iters, desc="Training", unit="it", dynamic_ncols=True, file=sys.stderr, leave=False, disable=None)
    try:
        for it in range(1, cfg.iters + 1):
            if it == 1 or it % cfg.steps_per_eval == 0 or it == cfg.iters:
                last_val = validate(it)
            micro = [collate([train_set.items[i] for i in next(batches)[1]], pad_id, device)
                     for _ in range(cfg.grad_accumulation_steps)]
            # Normalise by the trained tokens of the whole step, so accumulation equals one big batch.
            n_step = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
            step_loss = 0.0
            for batch in micro:
                loss_sum, _ = supervised_loss(model, batch)
                (loss_sum / n_step).backward()
                step_loss += float(loss_sum.detach())
                window["tokens"] += int(batch["attention_mask"].sum())
            if not math.isfinite(step_loss):
                raise LiandanError(
                    f"iteration {it}: the loss is {step_loss}; lower --learning-rate, or check the data. "
                    f"The last saved adapter in {adapter_dir} is intact"
                )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            window["loss"] += step_loss
            window["trained"] += n_step
            window["steps"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss / n_step:.3f}")

            if it % cfg.steps_per_report == 0 or it == cfg.iters:
                elapsed = time.perf_counter() - window["start"]
                total_tokens += window["tokens"]
                total_trained += window["trained"]
                last_train_loss = window["loss"] / window["trained"]
                entry = {
                    "iteration": it,
                    "train_loss": last_train_loss,
                    "learning_rate": optimizer.param_groups[0]["lr"],
                    "it_per_sec": window["steps"] / elapsed,
                    "tokens_per_sec": window["tokens"] / elapsed,
                    "trained_tokens": total_trained,
                    "tokens": total_tokens,
                    "peak_memory_gb": peak_memory_gb(),
                }
                emit(entry, f"Iter {it}: Train loss {last_train_loss:.3f}, Learning Rate {entry['learning_rate']:.3e}, "
                     f"It/sec {entry['it_per_sec']:.3f}, Tokens/sec {entry['tokens_per_sec']:.1f}, "
                     f"Trained Tokens {total_trained}, Peak mem {entry['peak_memory_gb']:.3f} GB")
                window = {"loss": 0.0, "trained": 0, "tokens": 0, "steps": 0, "start": time.perf_counter()}

            if it % cfg.save_every == 0 or it == cfg.iters:
                save_adapter_files(model, adapter_dir, record_for(it))
                checkpoint = adapter_dir / "checkpoints" / f"{it:07d}"
                save_adapter_files(model, checkpoint, record_for(it))
                with atomic_path(checkpoint / "optimizer.pt") as tmp:
                    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "iteration": it}, tmp)
                with tqdm.external_write_mode(file=sys.stderr):
                    log(f"Iter {it}: Saved adapter weights to {adapter_dir} and {checkpoint}.")
    finally:
        bar.close()
        metrics.close()
    seconds = time.perf_counter() - started
    model.eval()
    plot_losses(adapter_dir / METRICS, adapter_dir / LOSS_PLOT)
    return TrainResult(cfg.iters, last_train_loss, last_val, seconds, total_tokens, total_trained, peak_memory_gb())


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
