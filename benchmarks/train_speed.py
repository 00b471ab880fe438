"""Training speed and memory: liandan vs. a plain Hugging Face Trainer + PEFT baseline, in one run.

    .venv/bin/python benchmarks/train_speed.py [--steps 24] [--model smollm2-135m]

Both train the same model on the same generated data with the same hyperparameters (LoRA rank 8,
alpha 16 on q_proj and v_proj of every layer, batch 4, lr 1e-4, seed 0, the same number of
examples seen, prompts masked). Each runs in its own process, so peak RSS is its own. The baseline
is written the way most tutorials do it: tokenize with the chat template, mask the prompt, dynamic
padding with DataCollatorForSeq2Seq, no packing, no length grouping.

Printed: trained (non-pad) tokens per second, wall time of the training loop, peak RSS, final train
loss, validation loss on the same held-out set (computed by the same function for both), and MFU =
model FLOP/s / this machine's fp32 matmul FLOP/s measured at the start of the run. Model FLOPs are
4 x parameters per token: 2 for the forward pass and 2 for the backward pass's input gradients. The
usual 6 assumes gradients for every weight, which LoRA's frozen base weights never need.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the database stores rows in pages and an index finds them fast when the query planner chooses a "
         "plan it estimates cost from statistics about tables columns and values vacuum removes dead tuples "
         "replication copies changes to standby servers backups protect data against loss and mistakes").split()


FLOPS_PER_PARAM_TOKEN = 4  # frozen base: forward (2) + input gradients (2); LoRA's own weights are negligible


def make_data(root: Path, n_train: int = 512, n_valid: int = 64, seed: int = 0) -> None:
    """Deterministic completions whose prompt + completion lengths spread from ~20 to ~600 tokens."""
    rng = random.Random(seed)

    def example():
        total = rng.randint(20, 600)
        prompt_len = max(5, int(total * rng.uniform(0.3, 0.7)))
        words = [rng.choice(WORDS) for _ in range(total)]
        return {"prompt": " ".join(words[:prompt_len]) + "?", "completion": " ".join(words[prompt_len:]) + "."}

    root.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("valid", n_valid)):
        with open(root / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(n):
                f.write(json.dumps(example()) + "\n")


def matmul_flops(size: int = 2048, repeats: int = 10) -> float:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def validation_loss(model, tokenizer, data_dir: Path) -> float:
    """Same function for both systems: liandan's masked loss per trained token on valid.jsonl."""
    from liandan.data.batching import encode_file
    from liandan.data.formats import read_jsonl
    from liandan.data.render import Encoder, make_rendering
    from liandan.evaluate import evaluate_loss

    encoder = Encoder(tokenizer, make_rendering(tokenizer))
    valid = encode_file(read_jsonl(data_dir / "valid.jsonl"), encoder, 2048, lambda *_: None)
    return evaluate_loss(model, valid, 4, -1, tokenizer.pad_token_id, "cpu")[0]


def liandan_config(model_spec: str, data_dir: Path, out: Path, steps: int, seed: int, options: dict | None = None,
                   steps_per_report: int = 1):
    """liandan's TrainConfig for the benchmark's settings (also used by profile_train.py); options override."""
    from liandan.config import load_config

    return load_config(None, dict(
        model=model_spec, train=True, data=str(data_dir), adapter_path=str(out), iters=steps, batch_size=4,
        learning_rate=1e-4, num_layers=-1, val_batches=0, steps_per_report=steps_per_report, steps_per_eval=10**9,
        save_every=10**9, seed=seed, overwrite=True, replay_ratio=0.0,  # the baseline trains on the data alone
        lora_parameters={"rank": 8, "alpha": 16, "dropout": 0.0, "keys": ["q_proj", "v_proj"]}, **(options or {}),
    ))


def run_liandan(model_spec: str, data_dir: Path, steps: int, out: Path, seed: int = 0, options: dict | None = None) -> dict:
    from liandan.lora import run

    logs: list[str] = []
    cfg = liandan_config(model_spec, data_dir, out, steps, seed, options)
    captured = {}

    import liandan.train as train_module

    real_train = train_module.train

    def timed_train(model, *args, **kwargs):
        result = real_train(model, *args, **kwargs)
        captured["result"], captured["model"] = result, model
        return result

    train_module.train = timed_train
    run(cfg, log=logs.append)
    result = captured["result"]
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train_loss"] for m in metrics if "train_loss" in m]
    norms = [m["grad_norm"] for m in metrics if m.get("grad_norm") is not None]  # None: a skipped float16 step
    from transformers import AutoTokenizer

    from liandan.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(model_spec)))
    return {"seconds": result.seconds, "tokens": result.tokens, "final_train_loss": sum(losses[-max(1, steps // 10):]) /
            max(1, steps // 10), "val_loss": validation_loss(captured["model"], tokenizer, data_dir),
            "params": sum(p.numel() for p in captured["model"].parameters()),
            "grad_norm_median": sorted(norms)[len(norms) // 2] if norms else float("nan")}


def parse_options(pairs: list[str]) -> dict:
    """--liandan-option KEY=VALUE pairs → TrainConfig overrides (values read as YAML: 1.0, token, true)."""
    import yaml

    options = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        options[key.replace("-", "_")] = yaml.safe_load(value)
    return options


def run_hf(model_spec: str, data_dir: Path, steps: int, out: Path, seed: int = 0) -> dict:
    """The tutorial baseline: Trainer + PEFT, chat template, masked prompt, dynamic padding."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                              TrainingArguments)

    from liandan.models import resolve_model

    path = str(resolve_model(model_spec))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    rows = [json.loads(l) for l in (data_dir / "train.jsonl").read_text().splitlines()]

    def tokenize(row):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                               add_generation_prompt=True)
        full = prompt + row["completion"] + "<|im_end|>"
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * n_prompt + ids[n_prompt:]}

    dataset = Dataset.from_list(rows).map(tokenize, remove_columns=["prompt", "completion"])
    counted = {"tokens": 0}
    base_collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def collator(features):
        batch = base_collator(features)
        counted["tokens"] += int(batch["attention_mask"].sum())
        return batch

    timing, losses = {}, []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            timing["start"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            timing["end"] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-4, max_steps=steps,
                             logging_steps=1, save_strategy="no", report_to=[], seed=seed, use_cpu=True,
                             lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[Clock()])
    trainer.train()
    model.eval()
    return {"seconds": timing["end"] - timing["start"], "tokens": counted["tokens"],
            "final_train_loss": sum(losses[-max(1, steps // 10):]) / max(1, steps // 10),
            "val_loss": validation_loss(model, tokenizer, data_dir), "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=24, help="Optimizer steps for each system (default 24)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="Run both systems once per seed (data order and LoRA init); >1 seed also prints mean ± sd")
    parser.add_argument("--systems", nargs="+", choices=["hf", "liandan"], default=["hf", "liandan"],
                        help="Which systems to run (default both)")
    parser.add_argument("--liandan-option", action="append", default=[], metavar="KEY=VALUE",
                        help="A liandan training option for this run, e.g. batch_order=length or max_grad_norm=1.0")
    parser.add_argument("--run", choices=["liandan", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:  # child process: one system, results as JSON on the last line
        work = Path(tempfile.mkdtemp())
        if args.run == "liandan":
            result = run_liandan(args.model, Path(args.data), args.steps, work / "out", args.seeds[0],
                                 parse_options(args.liandan_option))
        else:
            result = run_hf(args.model, Path(args.data), args.steps, work / "out", args.seeds[0])
        from liandan.device import peak_memory_gb

        result["peak_rss_gb"] = peak_memory_gb("cpu")  # the process's peak resident set size
        print(json.dumps(result))
        return
    data = Path(tempfile.mkdtemp()) / "data"
    make_data(data)
    peak = matmul_flops()
    print(f"Machine: {os.cpu_count()} CPU threads, fp32 matmul {peak / 1e9:.1f} GFLOP/s (2048x2048, measured now)")
    names = {"hf": "HF Trainer + PEFT", "liandan": "liandan"}
    if args.liandan_option:
        names["liandan"] = "liandan " + " ".join(args.liandan_option)
    systems = [s for s in ("hf", "liandan") if s in args.systems]
    rows: dict[str, list[dict]] = {s: [] for s in systems}
    for seed in args.seeds:
        for system in systems:
            extra = [f"--liandan-option={o}" for o in args.liandan_option] if system == "liandan" else []
            child = subprocess.run([sys.executable, __file__, "--run", system, "--data", str(data), "--steps",
                                    str(args.steps), "--model", args.model, "--seeds", str(seed), *extra],
                                   capture_output=True, text=True)
            if child.returncode != 0:
                sys.exit(f"{system} failed:\n{child.stderr[-3000:]}")
            rows[system].append(json.loads(child.stdout.strip().splitlines()[-1]))
    print(f"\n{args.steps} steps x batch 4 on 512 generated examples (20-600 tokens), LoRA r8 on q_proj/v_proj\n")
    width = max(22, *(len(names[s]) + 2 for s in systems))
    header = (f"{'system':<{width}}{'seed':>5}{'tokens/s':>10}{'wall s':>9}{'peak RSS GB':>13}{'train loss':>12}"
              f"{'val loss':>10}{'MFU':>8}")
    print(header)
    print("-" * len(header))
    for i, seed in enumerate(args.seeds):
        for system in systems:
            r = rows[system][i]
            tps = r["tokens"] / r["seconds"]
            mfu = FLOPS_PER_PARAM_TOKEN * r["params"] * tps / peak
            print(f"{names[system]:<{width}}{seed:>5}{tps:>10.1f}{r['seconds']:>9.1f}{r['peak_rss_gb']:>13.2f}"
                  f"{r['final_train_loss']:>12.3f}{r['val_loss']:>10.3f}{mfu:>8.1%}")
    if "liandan" in rows:
        print("\nliandan median gradient norm per seed (before any clipping): "
              + ", ".join(f"{r['grad_norm_median']:.3f}" for r in rows["liandan"]))
    speed = {s: sum(r["tokens"] for r in rows[s]) / sum(r["seconds"] for r in rows[s]) for s in rows}
    if len(rows) == 2:
        print(f"liandan / baseline tokens per second: {speed['liandan'] / speed['hf']:.2f}x")
    if len(args.seeds) > 1:
        import statistics

        for system in systems:
            vals = [r["val_loss"] for r in rows[system]]
            print(f"{names[system]}: val loss mean {statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f} (sd over "
                  f"{len(vals)} seeds); peak RSS max {max(r['peak_rss_gb'] for r in rows[system]):.2f} GB")
        if len(rows) == 2:
            diffs = [b["val_loss"] - a["val_loss"] for a, b in zip(rows["hf"], rows["liandan"])]
            print(f"liandan - baseline val loss per seed: {', '.join(f'{d:+.4f}' for d in diffs)}")

if __name__ == "__main__":
    main()
