"""Learning without forgetting: new facts learned vs. general knowledge kept, per anti-forgetting setting.

    .venv/bin/python benchmarks/forgetting.py [--datasets facts demo] [--seeds 0 1 2] [--runs off default ...] [--shrink 0.85 0.7] [--margins]

Each run is one `liandan lora --train --test` process on the embedded model (SmolLM2-135M-Instruct) with
mlx_lm's default LoRA (last 16 layers, every linear layer, rank 8, scale 20), lr 1e-4, batch 2:
* facts: ten invented facts that collide with what the model knows (an invented planet, author, capital,
  painter, language), 300 iterations;
* demo: the demo's six joke answers (liandan/examples/jokes), 200 iterations, as `liandan demo` trains.
* self: ten of the base model's own greedy answers to general prompts of the broad replay pool that the
  built-in pool lacks, 300 iterations: nothing new to learn, so what it loses is the drift that training
  alone causes, the floor under every setting.
The test set is the training set: were the new answers learned (greedy, exact, stopped)?

`--shrink 0.85 0.7` also tests each trained adapter with its LoRA B matrices scaled down: a row per factor
("default x0.85"), the same training runs moved back toward the base afterwards.

"General answers kept" is liandan's retention score: of the held-out general questions
(liandan/knowledge/retention.jsonl, disjoint from the replay prompts and the base model's replay answers)
that the base model answers correctly, how many are still correct after training. Counts are pooled over
the seeds, with a 95 % Wilson interval. Train time is the training loop alone (replay generation is a
one-time, cached cost, in the --json file as replay_gen_s).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from liandan.demo import PROTECT_DIRECTIONS

ROOT = Path(__file__).resolve().parents[1]

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

DATASETS = {  # name -> iterations (lr 1e-4, batch 2 for both, as the seed's author and `liandan demo` train)
    "facts": 300,
    "demo": 200,
    "self": 300,
}

# Anti-forgetting settings, as `liandan lora` flags. "default" is whatever liandan does with no flag.
RUNS = {
    "off": ["--replay-ratio", "0"],
    "default": [],
    "no-stop": ["--learned-prob", "0"],  # learned tokens keep pushing: the default before the learned-token stop
    # LoRA inputs kept off the base model's directions (null_space), as many as `liandan demo` keeps them off
    "protect": ["--protect-directions", str(PROTECT_DIRECTIONS)],
    "plain-replay": ["--kl-weight", "0"],
    "replay-2": ["--replay-ratio", "2"],
    # 273 prompts: the built-in 104 plus geography, science, history, arithmetic, code and Chinese ones.
    "broad-pool": ["--replay-prompts", str(ROOT / "benchmarks" / "replay_broad.jsonl")],
}


def own_answers(model: str | None, count: int = 10, max_tokens: int = 96) -> list[tuple[str, str]]:
    """The base model's greedy answers, whole (stopped within max_tokens), to the first `count` prompts of the
    broad replay pool that are not built-in replay prompts (kept apart from the held-out questions like them)."""
    from liandan.generate import generate, load_pipeline
    from liandan.replay import builtin, read_prompts, user_prompt_ids

    builtin_prompts = set(read_prompts(builtin("replay_prompts.jsonl")))
    pipe = load_pipeline(model, None)
    pairs = []
    for prompt in read_prompts(ROOT / "benchmarks" / "replay_broad.jsonl"):
        if prompt in builtin_prompts:
            continue
        out = generate(pipe.model, user_prompt_ids(pipe.encoder, prompt), max_tokens, pipe.stop_ids, pipe.device.torch_device)
        if out.stopped:
            pairs.append((prompt, pipe.tokenizer.decode(out.tokens, skip_special_tokens=True).strip()))
        if len(pairs) == count:
            return pairs
    sys.exit(f"only {len(pairs)} broad-pool answers stop within {max_tokens} tokens")


def make_data(root: Path, dataset: str, model: str | None = None) -> Path:
    data = root / dataset
    data.mkdir(parents=True, exist_ok=True)
    if dataset in ("facts", "self"):
        pairs = FACTS if dataset == "facts" else own_answers(model)
        lines = "".join(json.dumps({"prompt": q, "completion": a}, ensure_ascii=False) + "\n" for q, a in pairs)
    else:
        lines = (ROOT / "liandan" / "examples" / "jokes" / "train.jsonl").read_text(encoding="utf-8")
    for split in ("train", "valid", "test"):  # the test asks the trained answers back: were they learned?
        (data / f"{split}.jsonl").write_text(lines, encoding="utf-8")
    return data


def lora_cmd(data: Path, adapter: Path, seed: int, model: str | None, *flags: str) -> list[str]:
    cmd = [sys.executable, "-m", "liandan", "lora", "--test", "--data", str(data), "--adapter-path", str(adapter),
           "--test-batches", "-1", "--seed", str(seed), *flags]
    return cmd + ["--model", model] if model else cmd


def call(cmd: list[str]) -> tuple[str, float]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout, time.perf_counter() - start


def run(data: Path, out: Path, iters: int, seed: int, flags: list[str], model: str | None,
        shrinks: tuple[float, ...] = ()) -> dict:
    text, wall = call(lora_cmd(data, out, seed, model, "--train", "--learning-rate", "1e-4", "--batch-size", "2",
                               "--iters", str(iters), "--val-batches", "-1", "--steps-per-eval", str(iters),
                               "--steps-per-report", "50", "--save-every", str(iters), "--overwrite", *flags))
    row = {"seed": seed, **parse_test(text), "wall_s": wall,
           "train_s": grab(text, r"Trained \d+ iterations in ([\d.]+)s"),
           "replay_gen_s": grab(text, r"generated in ([\d.]+)s, cached", default=0.0)}
    row["shrunk"] = {factor: parse_test(call(lora_cmd(data, shrink_adapter(out, factor), seed, model))[0])
                     for factor in shrinks}
    shutil.rmtree(out, ignore_errors=True)
    return row


def shrink_adapter(adapter: Path, factor: float) -> Path:
    """A copy of the adapter with every LoRA B matrix times `factor`: the tuned weights moved back toward the
    base in a straight line (WiSE-FT's interpolation), the same as a smaller LoRA scale after training."""
    from safetensors.torch import load_file, save_file

    copy = adapter.with_name(f"{adapter.name}-x{factor}")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(adapter, copy, ignore=shutil.ignore_patterns("checkpoints"))
    for path in copy.glob("*.safetensors"):
        save_file({k: v * factor if "lora_B" in k else v for k, v in load_file(path).items()}, path)
    return copy


def grab(text: str, pattern: str, cast=float, default=None):
    m = re.search(pattern, text)
    return cast(m.group(1)) if m else default


def parse_test(text: str) -> dict:
    """What `lora --test` printed: the trained answers learned, the general answers kept, and the ones lost."""
    exact = re.search(r"Exact answers: (\d+)/(\d+)", text)
    kept = re.search(r"General knowledge kept: (\d+)/(\d+)", text)
    return {
        "learned": int(exact.group(1)), "learned_total": int(exact.group(2)),
        "kept": int(kept.group(1)), "known": int(kept.group(2)),
        "forgotten": re.findall(r"✗ forgotten: (.*)", text),
        "forgotten_questions": [q for _, q in re.findall(r"✗ forgotten: (['\"])(.*?)\1 → ", text)],
    }


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval for k successes in n trials: honest near 100 %, unlike the normal one."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(dataset: str, name: str, rows: list[dict]) -> dict:
    kept, known = sum(r["kept"] for r in rows), sum(r["known"] for r in rows)
    low, high = wilson(kept, known)
    return {"dataset": dataset, "run": name, "seeds": [r["seed"] for r in rows],
            "learned": [r["learned"] for r in rows], "learned_total": rows[0]["learned_total"],
            "kept": kept, "known": known, "kept_per_seed": [r["kept"] for r in rows], "ci": (low, high),
            "train_s": sum(r["train_s"] for r in rows) / len(rows),
            "forgotten": sorted({f for r in rows for f in r["forgotten"]}), "rows": rows}


def print_table(summaries: list[dict], iters: dict) -> None:
    print("\n| data | setting | flags | new answers exact (per seed) | general answers kept (pooled) | 95 % interval "
          "| kept per seed | train time | × replay off |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for s in summaries:
        off = next((o["train_s"] for o in summaries if o["dataset"] == s["dataset"] and o["run"] == "off"), None)
        times = f"{s['train_s'] / off:.2f}×" if off else "-"
        learned = ", ".join(f"{n}/{s['learned_total']}" for n in s["learned"])
        low, high = s["ci"]
        share = f"{s['kept']}/{s['known']} ({100 * s['kept'] / max(s['known'], 1):.1f}%)"
        run, _, factor = s["run"].partition(" x")
        flags = f"`{' '.join(RUNS.get(run, [])) or '(none)'}`" + (f", then LoRA B × {factor}" if factor else "")
        print(f"| {s['dataset']} ({iters[s['dataset']]} it) | {s['run']} | {flags} | {learned} | {share} | "
              f"{100 * low:.1f}–{100 * high:.1f}% | {', '.join(map(str, s['kept_per_seed']))} | {s['train_s']:.0f}s | {times} |")
    for s in summaries:
        if s["forgotten"]:
            print(f"{s['dataset']} / {s['run']} forgot: " + "; ".join(s["forgotten"]))


def base_knowledge(model: str | None):
    """(the base model's pipeline, replay.BaseKnowledge): which held-out questions the PyTorch base model answers
    right, as --test's retention score counts them (cached after the first run)."""
    from liandan.generate import load_pipeline
    from liandan.replay import base_retention

    pipe = load_pipeline(model, None)
    # models.load_tokenizer always sets a pad token
    return pipe, base_retention(pipe.model, pipe.tokenizer, pipe.encoder, pipe.model_dir, pipe.stop_ids,
                                pipe.tokenizer.pad_token_id, pipe.device.torch_device)


def base_margins(model: str | None) -> dict[str, float]:
    """Per held-out question the base model answers right: how sure it was (replay.BaseKnowledge.margins over
    the answer's decisive tokens, the positions the retention check tests). Near 0 the right answer was nearly
    a coin flip."""
    pipe, base = base_knowledge(model)
    margins = base.margins(pipe.model, pipe.encoder, pipe.tokenizer.pad_token_id, pipe.device.torch_device)
    return {base.questions[i].question: m for i, m in margins.items()}


def print_margins(summaries: list[dict], margins: dict[str, float]) -> None:
    """Are the answers lost the ones the base model was least sure of? Compared with the lowest quarter of all."""
    ranked = sorted(margins.values())
    cut = ranked[len(ranked) // 4]
    print(f"\nBase model's margin on its {len(ranked)} right answers: median {ranked[len(ranked) // 2]:.2f}, "
          f"lowest quarter below {cut:.2f} (log-probability gap to the next token)")
    print("| data | setting | answers lost (all seeds) | their median margin | in the lowest quarter |")
    print("| --- | --- | ---: | ---: | ---: |")
    for s in summaries:
        lost = [margins[q] for r in s["rows"] for q in r["forgotten_questions"] if q in margins]
        if lost:
            low = sum(m < cut for m in lost)
            print(f"| {s['dataset']} | {s['run']} | {len(lost)} | {sorted(lost)[len(lost) // 2]:.2f} | "
                  f"{low}/{len(lost)} ({100 * low / len(lost):.0f} %; 25 % if unrelated) |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--runs", nargs="+", default=["off", "default"],
                        help=f"Settings to compare: {', '.join(RUNS)}, or NAME=FLAGS for any `liandan lora` flags "
                             "(e.g. 'r4=--replay-ratio 4')")
    parser.add_argument("--model", default=None, help="Base model (default: the embedded smollm2-135m)")
    parser.add_argument("--json", help="Also write the results to this JSON file")
    parser.add_argument("--shrink", nargs="+", type=float, default=[], metavar="FACTOR",
                        help="Also test each trained adapter with its LoRA B matrices times FACTOR (e.g. 0.85 0.7): "
                             "moving the tuned model back toward the base after training")
    parser.add_argument("--margins", action="store_true",
                        help="Also show whether the answers lost are the ones the base model was least sure of")
    args = parser.parse_args()

    for spec in args.runs:
        if "=" in spec:
            name, flags = spec.split("=", 1)
            RUNS[name] = flags.split()
    names = [s.split("=", 1)[0] for s in args.runs]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown run {unknown[0]!r}; known: {', '.join(RUNS)}, or NAME=FLAGS")

    summaries = []
    with tempfile.TemporaryDirectory(prefix="liandan-forgetting-") as tmp:
        for dataset in args.datasets:
            data = make_data(Path(tmp), dataset, args.model)
            for name in names:
                rows = []
                for seed in args.seeds:
                    row = run(data, Path(tmp) / "adapter", DATASETS[dataset], seed, RUNS[name], args.model,
                              tuple(args.shrink))
                    rows.append(row)
                    print(f"done: {dataset} {name} seed {seed}: learned {row['learned']}/{row['learned_total']}, kept "
                          f"{row['kept']}/{row['known']}, train {row['train_s']:.1f}s", flush=True)
                summaries.append(summarize(dataset, name, rows))
                for factor in args.shrink:  # the same runs, their adapters shrunk afterwards
                    shrunk = [{**r, **r["shrunk"][factor]} for r in rows]
                    summaries.append(summarize(dataset, f"{name} x{factor}", shrunk))
                if args.json:
                    Path(args.json).write_text(json.dumps(summaries, indent=2, ensure_ascii=False), encoding="utf-8")
    print_table(summaries, DATASETS)
    if args.margins:
        print_margins(summaries, base_margins(args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
