"""Training options: mlx_lm.lora's names and defaults, read from a YAML file and overridden by flags.

Precedence: built-in defaults < YAML config (-c/--config) < flags given on the command line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import yaml

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
    prompt_feature: str = "prompt"
    completion_feature: str = "completion"
    text_feature: str = "text"
    chat_feature: str = "messages"
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
    # Defaults from benchmarks/forgetting.py: ratio 1 + KL 3 kept 31/32 general answers and all 10 new facts.
    replay_ratio: float = 1.0
    replay_prompts: str | None = None  # a file of one's own replay prompts (JSONL "prompt" or one per line)
    docs: str | None = None  # --test with retrieval: a folder of documents or a saved index (liandan.docs)
    top_k: int | None = None  # chunks per question with --docs (default: the recorded layout's, else 3)
    kl_weight: float = 3.0  # pull replay positions toward the base model's own distribution (KL); 0 = plain replay
    max_grad_norm: float | None = None  # clip the gradient norm of each step (HF Trainer's 1.0); None = no clipping
    # "random": every batch is a random draw of examples (as in HF Trainer); on CPU, examples of very different
    # lengths run as separate sub-batches so little compute goes to padding. "length": mlx_lm's batches of similar
    # lengths in random order. benchmarks/train_speed.py: "length" ended 0.3% higher in validation loss on
    # 3 of 3 seeds (a batch of four short examples gives a noisy step with the weight of a full one).
    batch_order: str = "random"

    def to_dict(self) -> dict:
        return asdict(self)


_NESTED = {"lora_parameters": LoraParameters, "lr_schedule": LRSchedule}


def _build(cls, values: dict, where: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise LiandanError(f"{where}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**values)


def load_config(path: str | None, flags: dict) -> TrainConfig:
    """Merge defaults, the YAML file and the flags the user actually typed (not None)."""
    values: dict = {}
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise LiandanError(f"config file {path} not found") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise LiandanError(f"{path}{line}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(loaded, dict):
            raise LiandanError(f"{path}: expected a mapping of option: value")
        values.update(loaded)
    values.update({k: v for k, v in flags.items() if v is not None})
    for key, cls in _NESTED.items():
        if key in values and not isinstance(values[key], cls):
            if not isinstance(values[key], dict):
                raise LiandanError(f"{path or 'config'}: '{key}' must be a mapping")
            values[key] = _build(cls, values[key], f"{path or 'config'}: {key}")
    cfg = _build(TrainConfig, values, path or "config")
    _validate(cfg)
    return cfg


def _validate(cfg: TrainConfig) -> None:
    if cfg.fine_tune_type not in ("lora", "dora", "full"):
        raise LiandanError(f"--fine-tune-type {cfg.fine_tune_type}: expected lora, dora or full")
    if cfg.optimizer not in ("adam", "adamw", "sgd"):
        raise LiandanError(f"--optimizer {cfg.optimizer}: expected adam, adamw or sgd")
    for name in ("batch_size", "iters", "steps_per_report", "steps_per_eval", "save_every",
                 "grad_accumulation_steps", "max_seq_length"):
        if getattr(cfg, name) <= 0:
            raise LiandanError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.learning_rate <= 0:
        raise LiandanError(f"--learning-rate must be positive, got {cfg.learning_rate}")
    if cfg.lr_schedule.name not in ("constant", "cosine_decay", "linear_decay"):
        raise LiandanError(f"lr_schedule.name {cfg.lr_schedule.name!r}: expected constant, cosine_decay or linear_decay")
    if not 0 <= cfg.replay_ratio <= 10:
        raise LiandanError(f"--replay-ratio must be between 0 and 10 (replay examples per training example), got {cfg.replay_ratio}")
    if cfg.max_grad_norm is not None and cfg.max_grad_norm <= 0:
        raise LiandanError(f"--max-grad-norm must be positive, got {cfg.max_grad_norm}")
    if cfg.batch_order not in ("random", "length"):
        raise LiandanError(f"--batch-order {cfg.batch_order}: expected random or length")
    if cfg.kl_weight < 0:
        raise LiandanError(f"--kl-weight must not be negative, got {cfg.kl_weight}")
    if cfg.lora_parameters.rank <= 0:
        raise LiandanError(f"lora_parameters.rank must be positive, got {cfg.lora_parameters.rank}")


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
                import math

                lr = end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t))
            elif sched.name == "linear_decay":
                lr = peak + (end - peak) * t
            else:
                lr = peak
        return lr / base

    return factor

