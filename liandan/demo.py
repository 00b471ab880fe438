"""`liandan demo`: the seed blog post's six joke answers, learned and stopped, on the embedded model.

Answers before training, LoRA with the seed's settings (lr 1e-4, batch 2), 200 iterations, liandan's
forgetting guard plus protected directions (the options printed with the command), test loss, then answers
after training, each checked to be exact and to stop.
"""

from __future__ import annotations

import argparse
import shutil
from importlib import resources
from pathlib import Path

from liandan.data.formats import SPLITS
from liandan.errors import LiandanError
from liandan.models import DEFAULT_MODEL

QUESTIONS_FILE = "train.jsonl"
# --protect-directions for a demo of 200 iterations or more: it keeps the capital of France and 149-154 of 158
# general answers instead of 143-148, and still learns all six jokes in 200 iterations (3 seeds); with fewer it
# learns too slowly (README, "Learning without forgetting"), so shorter demos train without it.
PROTECT_DIRECTIONS, PROTECT_FROM_ITERS = 192, 200


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", default="liandan-demo", help="Working directory for data and adapters (default: liandan-demo)")
    parser.add_argument("--model", default=None, help=f"Base model (default: the embedded {DEFAULT_MODEL})")
    parser.add_argument("--iters", type=int, default=200, help="Training iterations (default 200)")
    parser.add_argument("--max-tokens", type=int, default=30, help="Token budget per answer (default 30)")
    return parser


def example_dir(name: str = "jokes") -> Path:
    return Path(str(resources.files("liandan") / "examples" / name))


def check_demo_dir(out: Path) -> None:
    """The demo replaces only an earlier demo's run: --out may hold nothing but data/ with the shipped files and
    adapters/. Anything else is the user's, and the demo would overwrite their data and adapter."""
    if not out.exists():
        return
    if not out.is_dir():
        raise LiandanError(f"--out {out} is a file; choose a folder for the demo")
    shipped = {f"{split}.jsonl" for split in SPLITS}
    for entry in out.iterdir():
        if entry.name not in ("data", "adapters") and not entry.name.startswith("."):  # .DS_Store and the like
            raise LiandanError(f"--out {out} holds {entry.name}, so it is not an earlier demo's folder; choose another --out")
    for path in (out / "data").iterdir() if (out / "data").is_dir() else ():
        if path.name.startswith("."):
            continue
        if path.name not in shipped or path.read_bytes() != (example_dir() / path.name).read_bytes():
            raise LiandanError(f"{path} is not the demo's own data; choose another --out (the demo writes data/ and "
                               "adapters/ there)")


def main(args: argparse.Namespace) -> int:
    from liandan.config import load_config, lora_flags
    from liandan.data.formats import read_jsonl
    from liandan.generate import generate, load_pipeline, prompt_ids_for
    from liandan.lora import run

    out = Path(args.out)
    data_dir = out / "data"
    adapter_dir = out / "adapters"
    check_demo_dir(out)
    data_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        shutil.copyfile(example_dir() / f"{split}.jsonl", data_dir / f"{split}.jsonl")
    qa = [(e.messages[0]["content"], e.messages[1]["content"]) for e in read_jsonl(data_dir / QUESTIONS_FILE).examples]
    print(f"Demo data (the seed's jokes, no stop tokens typed in): {data_dir}")

    def ask(pipe, title: str) -> int:
        print(f"\n== {title} ==")
        good = 0
        for question, expected in qa:
            result = generate(pipe.model, prompt_ids_for(pipe, question), args.max_tokens, pipe.stop_ids, pipe.device.torch_device)
            answer = pipe.tokenizer.decode(result.tokens)
            ok = result.stopped and answer.strip() == expected
            good += ok
            mark = "✓" if ok else "✗"
            print(f"{mark} {question} → {answer.strip()!r}{'' if result.stopped else ' … (did not stop)'}")
        return good

    before = load_pipeline(args.model, None)
    ask(before, "Before fine-tuning")
    del before

    protect = PROTECT_DIRECTIONS if args.iters >= PROTECT_FROM_ITERS else 0
    options = {
        "model": args.model, "train": True, "test": True, "data": str(data_dir), "adapter_path": str(adapter_dir),
        "learning_rate": 1e-4, "batch_size": 2, "val_batches": -1, "iters": args.iters, "steps_per_eval": 50,
        "steps_per_report": 25, "save_every": args.iters, "test_batches": -1, "overwrite": True,
        **({"protect_directions": protect} if protect else {}),
    }
    print(f"\n== Fine-tuning: liandan lora {' '.join(lora_flags(options))} ==")
    run(load_config(None, options))

    after = load_pipeline(args.model, str(adapter_dir))
    good = ask(after, "After fine-tuning")
    print(f"\n{good}/{len(qa)} answers exact and stopped. Adapter: {adapter_dir}  (try: liandan generate "
          f"--adapter-path {adapter_dir} -p \"{qa[0][0]}\")")
    return 0 if good == len(qa) else 1
