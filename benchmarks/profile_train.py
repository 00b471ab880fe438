"""Where liandan's training time goes: torch.profiler over the training loop of train_speed.py's setup.

    .venv/bin/python benchmarks/profile_train.py [--steps 8] [--seed 0] [--option KEY=VALUE ...]

Same model, data and settings as benchmarks/train_speed.py (LoRA r8 on q_proj/v_proj of every layer,
batch 4, lr 1e-4, replay off). Only the training loop is profiled, not model loading. Printed: the
share of CPU time by kind of work (self time of each operator, so nothing is counted twice), the
forward / backward / optimizer split, and the operators that take the most time.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from collections import defaultdict
from pathlib import Path

from train_speed import liandan_config, make_data, parse_options

# Operator name → kind of work. Order matters: the first pattern that matches wins.
KINDS = [
    ("matrix products (linear layers, LM head)", r"aten::(mm|addmm|bmm|matmul|linear|_mkl|baddbmm)$"),
    ("attention kernel", r"scaled_dot_product|_flash_attention|_efficient_attention|softmax_backward_data"),
    ("loss (log-softmax, NLL, KL)", r"log_softmax|nll_loss|cross_entropy|logsumexp"),
    ("optimizer (Adam)", r"_foreach_|Optimizer\.step|adam"),
    ("copies, padding, layout", r"aten::(copy_|contiguous|clone|cat|index|gather|scatter|to|_to_copy|empty|zeros|fill_|"
                                 r"full|masked|where|select|slice|view|reshape|transpose|permute|expand|t|narrow)"),
    ("elementwise (RMSNorm, SiLU, rotary, residual)", r"aten::(mul|add|sub|div|pow|rsqrt|mean|silu|neg|sum|exp|sqrt|"
                                                       r"sigmoid|cos|sin|embedding)"),
]


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name):
            return kind
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="A liandan training option, as in train_speed.py's --liandan-option")
    args = parser.parse_args()

    from torch.profiler import ProfilerActivity, profile

    import liandan.train as train_module
    from liandan.lora import run

    work = Path(tempfile.mkdtemp())
    make_data(work / "data")
    cfg = liandan_config(args.model, work / "data", work / "out", args.steps, args.seed, parse_options(args.option),
                         steps_per_report=10**9)

    real_train, captured = train_module.train, {}

    def profiled_train(*a, **k):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            result = real_train(*a, **k)
        captured["prof"], captured["result"] = prof, result
        return result

    train_module.train = profiled_train
    run(cfg, log=lambda *_: None)
    prof, result = captured["prof"], captured["result"]
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{args.steps} steps, {result.tokens} tokens, {result.seconds:.1f} s under the profiler "
          f"({result.tokens / result.seconds:.1f} tokens/s; the profiler itself slows the run)\n")

    by_kind: dict[str, float] = defaultdict(float)
    for e in events:
        by_kind[kind_of(e.key)] += e.self_cpu_time_total
    print(f"{'kind of work':<50}{'share':>8}")
    for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"{kind:<50}{t / total:>8.1%}")

    # Forward/backward/optimizer: the backward pass runs inside autograd engine nodes; the optimizer step
    # is recorded as one Optimizer.step event; the rest of the loop is the forward pass and data handling.
    backward = sum(e.cpu_time_total for e in events if e.key.startswith("autograd::engine::evaluate_function"))
    optimizer = sum(e.cpu_time_total for e in events if e.key.startswith("Optimizer.step"))
    print(f"\nbackward {backward / total:.1%}, optimizer {optimizer / total:.1%}, forward and the rest "
          f"{(total - backward - optimizer) / total:.1%} of CPU time")

    print(f"\n{'operator':<48}{'self CPU s':>11}{'share':>8}{'calls':>8}")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]:
        print(f"{e.key[:47]:<48}{e.self_cpu_time_total / 1e6:>11.2f}{e.self_cpu_time_total / total:>8.1%}{e.count:>8}")


if __name__ == "__main__":
    main()
