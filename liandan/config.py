"""Training options: mlx_lm.lora's names and defaults, read from a YAML file and overridden by flags.

Precedence: built-in defaults < YAML config (-c/--config) < flags given on the command line.
Every option's type and range is in RULES, checked by validate() before any model or data loads;
an error names the option as the user gave it (`--batch-size`, or `config.yaml:3: batch_size`).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields

import yaml

from liandan.data.formats import FieldNames
from liandan.device import DTYPES
from liandan.errors import LiandanError


@dataclass
class LoraParameters:
    rank: int = 8
    scale: float = 20.0  # mlx_lm's multiplier; PEFT's lora_alpha = scale * rank
    dropout: float = 0.0
    keys: list[str] | None = None  # module name suffixes (e.g. "self_attn.q_proj"); None = every linear layer
    alpha: float | None = None  # PEFT-style alternative to scale

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else self.scale * self.rank


@dataclass
class LRSchedule:
    name: str = "constant"  # constant | cosine_decay | linear_decay
    warmup: int = 0
    warmup_init: float = 0.0
    arguments: list | None = None  # mlx_lm style: cosine_decay [init_lr, decay_steps, end_lr]


@dataclass
class TrainConfig:
    model: str | None = None
    train: bool = False
    data: str = "data/"
    fine_tune_type: str = "lora"
    num_layers: int = 16
    batch_size: int = 4
    iters: int = 1000
    val_batches: int = 25
    learning_rate: float = 1e-5
    steps_per_report: int = 10
    steps_per_eval: int = 200
    resume_adapter_file: str | None = None
    adapter_path: str = "adapters"
    save_every: int = 100
    keep_checkpoints: int | None = None  # the newest N under checkpoints/; None keeps every one
    test: bool = False
    test_batches: int = 500
    max_seq_length: int = 2048
    grad_checkpoint: bool = False
    seed: int = 0
    grad_accumulation_steps: int = 1
    optimizer: str = "adam"
    optimizer_config: dict = field(default_factory=dict)
    lr_schedule: LRSchedule = field(default_factory=LRSchedule)
    lora_parameters: LoraParameters = field(default_factory=LoraParameters)
    mask_prompt: bool = True
    prompt_feature: str = FieldNames.prompt
    completion_feature: str = FieldNames.completion
    text_feature: str = FieldNames.text
    chat_feature: str = FieldNames.chat
    system_prompt: str | None = None
    chat_template: str | None = None  # a .jinja file or a built-in name (chatml, plain) instead of the model's template
    long_examples: str | None = None  # truncate | split | drop; default: split text, truncate chats
    dtype: str | None = None
    overwrite: bool = False
    resume: str | None = None  # "latest" or a checkpoint directory: continue a run exactly
    skip_nonfinite: bool = False
    fsdp: bool = False  # under torchrun, full fine-tuning shards parameters/gradients/optimizer (FSDP2)
    trust_remote_code: bool = False
    # Self-replay against forgetting (liandan.replay): base-model answers to general prompts mixed into
    # chat-style training, this many per training example; 0 turns it off.
    # Defaults chosen with benchmarks/forgetting.py (README, "Learning without forgetting"): a larger KL weight
    # keeps more general answers but learns the new ones slower.
    replay_ratio: float = 1.0
    replay_prompts: str | None = None  # a file of one's own replay prompts (JSONL "prompt" or one per line)
    replay_focus: float = 0.0  # share of replay drawn from the prompts nearest the training ones (replay.nearest_replay)
    docs: str | None = None  # --test with retrieval: a folder of documents or a saved index (liandan.docs)
    top_k: int | None = None  # chunks per question with --docs (default: the recorded layout's, else docs.prompt.DEFAULT_TOP_K)
    kl_weight: float = 3.0  # pull replay positions toward the base model's own distribution (KL); 0 = plain replay
    # A trained token already predicted with at least this probability gets no more gradient (0 = off):
    # once an answer is learned, pushing it further only drifts the weights (evaluate.learned_tokens_stop).
    # 0.8 rather than 0.5: the same retention on the benchmark, with a wider lead for the learned token
    # where quantization shifts the probabilities.
    learned_prob: float = 0.8
    # Each LoRA input kept off the K directions the base model uses most on the replay examples (liandan.null_space);
    # 0 = off. Off by default: 192 keeps clearly more (the demo 96 % instead of 92 %) but learns slower, and the seed
    # post's 100-iteration command then gets 1 of 3 answers exact instead of 3 (benchmarks/forgetting.py, README).
    protect_directions: int = 0
    max_grad_norm: float | None = None  # clip the gradient norm of each step (HF Trainer's 1.0); None = no clipping
    # "random": every batch is a random draw of examples (as in HF Trainer); on CPU, examples of very different
    # lengths run as separate sub-batches so little compute goes to padding. "length": mlx_lm's batches of similar
    # lengths in random order. benchmarks/train_speed.py: "length" ended 0.3–0.6 % higher in validation loss
    # on 3 of 3 seeds (a batch of four short examples gives a noisy step with the weight of a full one).
    batch_order: str = "random"

    def to_dict(self) -> dict:
        return asdict(self)

    def field_names(self) -> FieldNames:
        return FieldNames(self.text_feature, self.prompt_feature, self.completion_feature, self.chat_feature)


# ---------------------------------------------------------------- what each option accepts
@dataclass(frozen=True)
class Rule:
    """An option's type, its range (a test and the words for it) or choices, and whether None (unset) is allowed."""

    kind: type  # int, float, bool, str, list (of text), dict
    range: tuple | None = None  # (test(value) -> bool, "what it must be")
    choices: tuple = ()
    optional: bool = False


_POSITIVE = (lambda v: v > 0, "positive")
_NOT_NEGATIVE = (lambda v: v >= 0, "zero or more")
_ALL_OR_POSITIVE = (lambda v: v == -1 or v > 0, "positive or -1 (all)")
_NOT_EMPTY = (lambda v: v != "", "non-empty text")

# Every option of TrainConfig and its nested tables, checked by validate() before any model or data loads.
RULES = {
    "model": Rule(str, optional=True),
    "train": Rule(bool),
    "data": Rule(str, _NOT_EMPTY),
    "fine_tune_type": Rule(str, choices=("lora", "dora", "full")),
    "num_layers": Rule(int, _ALL_OR_POSITIVE),
    "batch_size": Rule(int, _POSITIVE),
    "iters": Rule(int, _POSITIVE),
    "val_batches": Rule(int, (lambda v: v >= -1, "0 or more, or -1 (all)")),
    "learning_rate": Rule(float, _POSITIVE),
    "steps_per_report": Rule(int, _POSITIVE),
    "steps_per_eval": Rule(int, _POSITIVE),
    "resume_adapter_file": Rule(str, _NOT_EMPTY, optional=True),
    "adapter_path": Rule(str, _NOT_EMPTY),
    "save_every": Rule(int, _POSITIVE),
    "keep_checkpoints": Rule(int, _POSITIVE, optional=True),
    "test": Rule(bool),
    "test_batches": Rule(int, _ALL_OR_POSITIVE),
    "max_seq_length": Rule(int, _POSITIVE),
    "grad_checkpoint": Rule(bool),
    "seed": Rule(int, (lambda v: 0 <= v < 2**63, "between 0 and 2^63-1")),
    "grad_accumulation_steps": Rule(int, _POSITIVE),
    "optimizer": Rule(str, choices=("adam", "adamw", "sgd")),  # train.make_optimizer builds them
    "optimizer_config": Rule(dict),  # {optimizer: {keyword: value}}, checked by _check_optimizer_config
    "lr_schedule": Rule(LRSchedule),
    "lr_schedule.name": Rule(str, choices=("constant", "cosine_decay", "linear_decay")),
    "lr_schedule.warmup": Rule(int, _NOT_NEGATIVE),
    "lr_schedule.warmup_init": Rule(float, _NOT_NEGATIVE),
    "lr_schedule.arguments": Rule(list, (lambda v: len(v) <= 3 and all(_is_number(x) for x in v)
                                         and (len(v) < 2 or v[1] > 0),
                                         "a list of up to 3 numbers [initial lr, decay steps > 0, end lr]"),
                                  optional=True),
    "lora_parameters": Rule(LoraParameters),
    "lora_parameters.rank": Rule(int, _POSITIVE),
    "lora_parameters.scale": Rule(float, _POSITIVE),
    "lora_parameters.dropout": Rule(float, (lambda v: 0 <= v < 1, "at least 0 and below 1")),
    "lora_parameters.keys": Rule(list, (lambda v: v and all(isinstance(k, str) and k for k in v),
                                        "a non-empty list of module names (e.g. [self_attn.q_proj, v_proj])"),
                                 optional=True),
    "lora_parameters.alpha": Rule(float, _POSITIVE, optional=True),
    "mask_prompt": Rule(bool),
    "prompt_feature": Rule(str, _NOT_EMPTY),
    "completion_feature": Rule(str, _NOT_EMPTY),
    "text_feature": Rule(str, _NOT_EMPTY),
    "chat_feature": Rule(str, _NOT_EMPTY),
    "system_prompt": Rule(str, optional=True),
    "long_examples": Rule(str, choices=("truncate", "split", "drop"), optional=True),  # data.batching.encode_file
    "dtype": Rule(str, choices=tuple(DTYPES), optional=True),
    "overwrite": Rule(bool),
    "resume": Rule(str, _NOT_EMPTY, optional=True),
    "skip_nonfinite": Rule(bool),
    "fsdp": Rule(bool),
    "trust_remote_code": Rule(bool),
    "replay_ratio": Rule(float, (lambda v: 0 <= v <= 10, "between 0 and 10 (replay examples per training example)")),
    "replay_prompts": Rule(str, _NOT_EMPTY, optional=True),
    "replay_focus": Rule(float, (lambda v: 0 <= v <= 1, "between 0 and 1 (a share of the replay examples)")),
    "kl_weight": Rule(float, _NOT_NEGATIVE),
    "learned_prob": Rule(float, (lambda v: 0 <= v < 1, "at least 0 and below 1 (a probability; 0 = off)")),
    "protect_directions": Rule(int, (lambda v: v >= 0, "0 or more (0 = off)")),
    "max_grad_norm": Rule(float, _POSITIVE, optional=True),
    "batch_order": Rule(str, choices=("random", "length")),
    "chat_template": Rule(str, _NOT_EMPTY, optional=True),
    "docs": Rule(str, _NOT_EMPTY, optional=True),
    "top_k": Rule(int, _POSITIVE, optional=True),
}
CONFIG_ONLY = ("optimizer_config", "lr_schedule", "lora_parameters")  # set in YAML (or from Python) only, no flag
_KIND_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "text", list: "a list",
               dict: "a mapping", LoraParameters: "a mapping", LRSchedule: "a mapping"}


def flag_of(name: str) -> str:
    """An option's `liandan lora` flag: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def lora_flags(options: dict) -> list[str]:
    """TrainConfig field names and values -> `liandan lora` flags (True: a bare flag; False/None: left out)."""
    flags = []
    for name, value in options.items():
        if name == "mask_prompt":
            flags += [] if value else ["--no-mask-prompt"]
        elif value is True:
            flags.append(flag_of(name))
        elif value is not None and value is not False and value != "":
            flags += [flag_of(name), str(value)]
    return flags


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Names:
    """How an error names an option: as the user gave it (`--batch-size`, or `file.yaml:3: batch_size`)."""

    def __init__(self, path: str | None = None, lines: dict | None = None, from_yaml: set | None = None):
        self.path, self.lines, self.from_yaml = path, lines or {}, from_yaml or set()

    def __call__(self, key: str) -> str:
        if key.split(".")[0] in self.from_yaml:
            line = self.lines.get(key, self.lines.get(key.split(".")[0]))
            return f"{self.path}{f':{line}' if line else ''}: {key}"
        return key if "." in key or key in CONFIG_ONLY else flag_of(key)


def _checked(key: str, value, name):
    """The value, converted where that loses nothing (an integer for a number); an error naming the key otherwise."""
    rule = RULES[key]
    if value is None:
        if rule.optional:
            return None
        raise LiandanError(f"{name(key)} must be {_KIND_WORDS[rule.kind]}, got nothing (null)")
    if rule.kind is float and _is_number(value):
        value = float(value)
        if not math.isfinite(value):
            raise LiandanError(f"{name(key)} must be a finite number, got {value!r}")
    elif rule.kind is int and isinstance(value, bool) or not isinstance(value, rule.kind):
        kind = rule.range[1] if rule.kind is list else _KIND_WORDS[rule.kind]  # the list's words say what it holds
        raise LiandanError(f"{name(key)} must be {kind}, got {value!r}")
    if rule.choices and value not in rule.choices:
        raise LiandanError(f"{name(key)} must be one of {', '.join(rule.choices)}, got {value!r}")
    if rule.range and not rule.range[0](value):
        raise LiandanError(f"{name(key)} must be {rule.range[1]}, got {value!r}")
    return value


def validate(cfg: TrainConfig, name=None) -> TrainConfig:
    """Check every option's type and range, and the options that depend on each other: the one place,
    run before any model or data loads. `name(key)` words the option as the user gave it."""
    name = name or _Names()
    for key in RULES:
        owner, _, attr = key.rpartition(".")
        target = getattr(cfg, owner) if owner else cfg
        setattr(target, attr, _checked(key, getattr(target, attr), name))
    _check_optimizer_config(cfg, name)
    if cfg.fsdp and cfg.fine_tune_type != "full":
        raise LiandanError(f"{name('fsdp')} shards full fine-tuning; LoRA/DoRA adapters are small and use DDP "
                           "(give --fine-tune-type full, or leave --fsdp out)")
    return cfg


def check_world(cfg: TrainConfig, world: int) -> None:
    """Under torchrun: the global batch must split evenly over the processes."""
    if world > 1 and cfg.batch_size % world:
        raise LiandanError(f"--batch-size {cfg.batch_size} is the global batch; it must be a multiple of the "
                           f"{world} processes")


def _check_optimizer_config(cfg: TrainConfig, name) -> None:
    """optimizer_config: {adam|adamw|sgd: {keyword: value}}; the chosen optimizer is built once on a dummy tensor
    so that a wrong keyword or value is refused now, not after the model has loaded."""
    for optimizer, options in cfg.optimizer_config.items():
        key = f"optimizer_config.{optimizer}"
        if optimizer not in RULES["optimizer"].choices:
            raise LiandanError(f"{name('optimizer_config')}: {optimizer!r} must be one of {', '.join(RULES['optimizer'].choices)}")
        if not isinstance(options, dict):
            raise LiandanError(f"{name(key)} must be a mapping of keyword: value, got {options!r}")
        if optimizer == cfg.optimizer and options:
            from liandan.train import make_optimizer

            import torch

            try:
                make_optimizer([torch.zeros(1, requires_grad=True)], cfg)
            except (TypeError, ValueError) as exc:
                raise LiandanError(f"{name(key)}: {str(exc).splitlines()[0]}") from None


def _build(cls, values: dict, where: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise LiandanError(f"{where}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**values)


class _Loader(yaml.SafeLoader):
    """Safe YAML (no python tags) that reads 1e-5 as a number, as mlx_lm's loader does (YAML 1.1 wants 1.0e-5)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(path: str) -> tuple[dict, dict[str, int]]:
    """The YAML config and the line of each option in it ("lora_parameters.keys" for nested ones)."""
    try:
        with open(path, encoding="utf-8") as f:
            loader = _Loader(f)
            try:
                node = loader.get_single_node()
                loaded = loader.construct_document(node) if node is not None else {}
            finally:
                loader.dispose()
    except FileNotFoundError:
        raise LiandanError(f"config file {path} not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise LiandanError(f"{path}{line}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(loaded, dict):
        raise LiandanError(f"{path}: expected a mapping of option: value")
    lines: dict[str, int] = {}

    def note(mapping, prefix: str) -> None:
        for key_node, value_node in mapping.value:
            if isinstance(key_node, yaml.ScalarNode):
                lines[prefix + key_node.value] = key_node.start_mark.line + 1
                if isinstance(value_node, yaml.MappingNode) and not prefix:
                    note(value_node, key_node.value + ".")

    if isinstance(node, yaml.MappingNode):
        note(node, "")
    return loaded or {}, lines


def load_config(path: str | None, flags: dict) -> TrainConfig:
    """Merge defaults, the YAML file and the flags the user actually typed (not None), then validate."""
    values, lines = read_yaml(path) if path else ({}, {})
    typed = {k: v for k, v in flags.items() if v is not None}
    name = _Names(path, lines, set(values) - set(typed))
    values.update(typed)
    for key, cls in _NESTED.items():
        if key in values and not isinstance(values[key], cls):
            if not isinstance(values[key], dict):
                raise LiandanError(f"{name(key)} must be a mapping, got {values[key]!r}")
            values[key] = _build(cls, values[key], name(key))
    unknown = sorted(set(values) - {f.name for f in fields(TrainConfig)})
    where = f"{path}:{lines[unknown[0]]}" if unknown and unknown[0] in lines else (path or "config")
    return validate(_build(TrainConfig, values, where), name)


_NESTED = {"lora_parameters": LoraParameters, "lr_schedule": LRSchedule}


def lr_multiplier(cfg: TrainConfig):
    """Return f(step) -> factor of cfg.learning_rate, for torch's LambdaLR (step counts from 0)."""
    sched = cfg.lr_schedule
    base = cfg.learning_rate
    args = list(sched.arguments or [])
    peak = float(args[0]) if args else base
    decay_steps = int(args[1]) if len(args) > 1 else cfg.iters
    end = float(args[2]) if len(args) > 2 else 0.0

    def factor(step: int) -> float:
        if sched.warmup and step < sched.warmup:
            lr = sched.warmup_init + (peak - sched.warmup_init) * step / sched.warmup
        else:
            t = min(max(step - sched.warmup, 0), decay_steps) / max(decay_steps, 1)
            if sched.name == "cosine_decay":
                lr = end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t))
            elif sched.name == "linear_decay":
                lr = peak + (end - peak) * t
            else:
                lr = peak
        return lr / base

    return factor

