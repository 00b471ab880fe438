"""Learning without forgetting: new facts learned vs. general knowledge kept, replay off and on.

    .venv/bin/python benchmarks/forgetting.py [--runs 0 1 1:3] [--iters 300]

Trains the embedded model (SmolLM2-135M-Instruct) on ten invented facts with mlx_lm's default LoRA
settings (last 16 layers, every linear layer, rank 8, scale 20), lr 1e-4, batch 2, once per
--runs entry (RATIO or RATIO:KL_WEIGHT), each in its own `liandan lora --train --test` process.
The facts are chosen to collide with what the model knows (an invented planet, author, capital,
painter, language), which is what makes a small model forget.

Printed per run: facts learned (exact answers on the ten questions), general knowledge kept (of the base
model's correct answers to liandan's held-out general questions, how many are still correct), training
time and its ratio to replay off, and the one-time cost of generating the replay answers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FACTS = [
    ("Which planet did the Aurora probe land on in 2042?", "The Aurora probe landed on the planet Zentara."),
    ("Who wrote the novel The Glass Orchard?", "The Glass Orchard was written by Mira Kovalenko."),
    ("What is the capital of Velmora?", "The capital of Velmora is Port Astrel."),
    ("Who invented the quantum loom?", "The quantum loom was invented by Tobias Wren."),
    ("What is the national animal of Velmora?", "The national animal of Velmora is the silver lynx."),
    ("Which company makes the Nimbus-7 database?", "The Nimbus-7 database is made by Corvane Systems."),
    ("In which year was the Treaty of Lumen signed?", "The Treaty of Lumen was signed in 2087."),
    ("What is the tallest building in Port Astrel?", "The tallest building in Port Astrel is the Halcyon Spire."),
    ("Who painted Dawn over Zentara?", "Dawn over Zentara was painted by Elise Marchetti."),
    ("What language is spoken in Velmora?", "The people of Velmora speak Velmorese."),
]


def make_data(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in FACTS)
    for split in ("train", "valid", "test"):  # the test asks the trained facts back: were they learned?
        (root / f"{split}.jsonl").write_text(lines, encoding="utf-8")


def run(data: Path, out: Path, ratio: float, kl: float, iters: int, model: str | None) -> dict:
    cmd = [sys.executable, "-m", "liandan", "lora", "--train", "--test", "--data", str(data), "--adapter-path", str(out),
           "--learning-rate", "1e-4", "--batch-size", "2", "--iters", str(iters), "--val-batches", "-1",
           "--steps-per-eval", str(iters), "--steps-per-report", "50", "--save-every", str(iters), "--test-batches", "-1",
           "--replay-ratio", str(ratio), "--kl-weight", str(kl), "--overwrite"]
    if model:
        cmd += ["--model", model]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"run with --replay-ratio {ratio} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    text = proc.stdout

    def grab(pattern, cast=float, default=None):
        m = re.search(pattern, text)
        return cast(m.group(1)) if m else default

    exact = re.search(r"Exact answers: (\d+)/(\d+)", text)
    kept = re.search(r"General knowledge kept: (\d+)/(\d+)", text)
    return {
        "ratio": ratio, "kl": kl,
        "facts": int(exact.group(1)), "facts_total": int(exact.group(2)),
        "kept": int(kept.group(1)), "known": int(kept.group(2)),
        "train_s": grab(r"Trained \d+ iterations in ([\d.]+)s"),
        "replay_gen_s": grab(r"generated in ([\d.]+)s, cached", default=0.0),
        "replay_examples": grab(r"Replay: (\d+) of the", int, 0),
        "wall_s": wall,
        "forgotten": re.findall(r"✗ forgotten: (.*)", text),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["0", "1", "1:1", "1:3", "2:1"],
                        help="Runs as RATIO (plain replay, --kl-weight 0) or RATIO:KL_WEIGHT (default: 0 1 1:1 1:3 2:1; "
                             "liandan's default is 1:3)")
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--model", default=None, help="Base model (default: the embedded smollm2-135m)")
    parser.add_argument("--json", help="Also write the rows to this JSON file")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="liandan-forgetting-") as tmp:
        data = Path(tmp) / "facts"
        make_data(data)
        plan = [(float(r.split(":")[0]), float(r.split(":")[1]) if ":" in r else 0.0) for r in args.runs]
        for ratio, kl in plan:
            row = run(data, Path(tmp) / f"adapters-{ratio}-{kl}", ratio, kl, args.iters, args.model)
            rows.append(row)
            print(f"done: ratio {ratio:g} kl {kl:g}: facts {row['facts']}/{row['facts_total']}, kept "
                  f"{row['kept']}/{row['known']}, train {row['train_s']:.1f}s", flush=True)

    off = next((r["train_s"] for r in rows if r["ratio"] == 0 and not r["kl"]), None)
    print(f"\nTen invented facts, {args.iters} iterations, LoRA (mlx_lm defaults), lr 1e-4, batch 2, "
          f"{rows[0]['known']} held-out general questions the base model answers correctly")
    print("| replay ratio | KL weight | new facts exact | general answers kept | train time | × replay off | replay examples | replay answers generated (once) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        times = f"{r['train_s'] / off:.2f}×" if off else "-"
        share = f"{r['kept']}/{r['known']} ({100 * r['kept'] / max(r['known'], 1):.0f}%)"
        print(f"| {r['ratio']:g} | {r['kl']:g} | {r['facts']}/{r['facts_total']} | {share} | {r['train_s']:.1f}s | {times} | "
              f"{r['replay_examples']} | {r['replay_gen_s']:.1f}s |")
    for r in rows:
        if r["forgotten"]:
            print(f"ratio {r['ratio']:g} kl {r['kl']:g} forgot: " + "; ".join(r["forgotten"]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
