"""Learning without forgetting: self-replay while training, and a retention score when testing.

Fine-tuning a small model on a few new facts overwrites what it knew: trained on ten invented facts,
SmolLM2-135M keeps under a third of its correct answers to held-out general questions. Mixing in the base
model's *own* answers to general prompts ("self-replay", plus a KL term toward its token distribution)
keeps most of them at about 1.2x the training time (benchmarks/forgetting.py; the README's forgetting
table has the figures): those answers already have a low loss, so they pull back only where training
starts to drift. liandan does this by default for chat-style data; `--replay-ratio 0`
turns it off.

* The base answers are generated once per (model, rendering, prompt set) and cached under
  `<cache>/replay/`, so later runs and `--resume` reuse exactly the same replay examples.
* Generation is batched with transformers' `generate` (left padding): about 22 s for the 104 built-in
  prompts on a 2-core CPU.
* The retention score asks held-out general questions (`knowledge/retention.jsonl`, disjoint from the
  replay prompts) before and after fine-tuning, and counts how many of the base model's correct answers
  are still correct.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch

from liandan.data.formats import parse_json
from liandan.data.render import IGNORE, Encoded
from liandan.errors import LiandanError

REPLAY_PROMPTS = "replay_prompts.jsonl"
RETENTION_QUESTIONS = "retention.jsonl"
REPLAY_MAX_TOKENS = 32  # longer base answers are trained on their first 32 tokens (no stop token): bounded cost
RETENTION_MAX_TOKENS = 40
KL_TOPK = 16  # the base distribution kept per replay position: the 16 likeliest tokens carry nearly all its mass
CACHE_VERSION = 2


def builtin(name: str) -> Path:
    return Path(str(resources.files("liandan") / "knowledge" / name))


# ---------------------------------------------------------------- prompt files
def read_prompts(path: Path) -> list[str]:
    """Replay prompts: JSONL with a "prompt" (or "question") field per line, or plain text, one per line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise LiandanError(f"--replay-prompts {path}: file not found") from None
    except UnicodeDecodeError:
        raise LiandanError(f"--replay-prompts {path}: not UTF-8 text") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        if path.suffix == ".jsonl" or line.startswith("{"):
            value = parse_json(line.encode("utf-8"), f"{path}:{number}")  # limits, file:line errors
            text = value.get("prompt", value.get("question")) if isinstance(value, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise LiandanError(f"{path}:{number}: expected an object with a non-empty \"prompt\" string")
            prompts.append(text.strip())
        else:
            prompts.append(line)
    if not prompts:
        raise LiandanError(f"--replay-prompts {path}: no prompts in the file")
    return prompts


@dataclass
class Question:
    question: str
    answers: list[str]  # any of these, found in the reply, makes it correct


def read_questions(path: Path) -> list[Question]:
    questions = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            value = json.loads(line)
            questions.append(Question(value["question"], list(value["answers"])))
    return questions


def is_correct(reply: str, answers: list[str]) -> bool:
    """An expected answer appears in the reply (case-insensitive; Latin words and numbers as whole words)."""
    reply = reply.lower()
    for answer in answers:
        answer = answer.lower()
        if answer.isascii():
            if re.search(r"(?<![a-z0-9])" + re.escape(answer) + r"(?![a-z0-9])", reply):
                return True
        elif answer in reply:
            return True
    return False


# ---------------------------------------------------------------- batched greedy answers
@dataclass
class Answer:
    tokens: list[int]  # generated ids, stop token excluded
    stopped: bool  # ended on a stop token within the budget
    topk_ids: list[list[int]] | None = None  # per generated position (stop included): the k likeliest tokens
    topk_logp: list[list[float]] | None = None  # ... and their log-probabilities


@torch.no_grad()
def greedy_answers(model, prompts_ids: list[list[int]], max_new_tokens: int, stop_ids: list[int], pad_id: int,
                   device, batch_size: int = 64, topk: int = 0) -> list[Answer]:
    """Greedy answers for many prompts at once: transformers' generate with left padding.
    topk > 0 also keeps the k likeliest tokens and their log-probabilities at each step (for --kl-weight)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(stop_ids),
                              pad_token_id=pad_id, return_dict_in_generate=True, output_logits=bool(topk))
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts_ids)), key=lambda i: len(prompts_ids[i]))  # similar lengths, little padding
    answers: list[Answer | None] = [None] * len(prompts_ids)
    stops = set(stop_ids)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(prompts_ids[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            p = prompts_ids[i]
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        if topk:  # step by step: stacking all steps' full-vocabulary logits first would double the memory
            steps = [step.float().log_softmax(-1).topk(topk, dim=-1) for step in out.logits]
            top_logp = torch.stack([t.values for t in steps], 1).cpu()  # batch × steps × k
            top_ids = torch.stack([t.indices for t in steps], 1).cpu()
        for r, i in enumerate(rows):
            tokens, stopped = [], False
            for token in out.sequences[r, width:].tolist():
                if token in stops:
                    stopped = True
                    break
                tokens.append(token)
            answers[i] = Answer(tokens, stopped)
            if topk:
                n_steps = len(tokens) + stopped
                answers[i].topk_ids = top_ids[r, :n_steps].tolist()
                answers[i].topk_logp = [[round(v, 4) for v in row] for row in top_logp[r, :n_steps].tolist()]
    model.train(was_training)
    return answers


# ---------------------------------------------------------------- cache
def model_fingerprint(model_dir: Path) -> str:
    """Identifies a model directory's weights: its config plus the names, sizes and times of its weight files."""
    from liandan.models import weight_files

    model_dir = Path(model_dir)
    h = hashlib.sha256(str(model_dir.resolve()).encode())
    config = model_dir / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for f in weight_files(model_dir):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _cache_path(kind: str, model_dir: Path, rendering, prompts: list[str], max_tokens: int) -> Path:
    from liandan.models import cache_root

    key = json.dumps([CACHE_VERSION, kind, model_fingerprint(model_dir), rendering.to_dict(), prompts, max_tokens],
                     ensure_ascii=False, sort_keys=True)
    return cache_root() / "replay" / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


def user_prompt_ids(encoder, text: str) -> list[int]:
    """Token ids of a one-message user turn followed by the assistant header, as at generation time."""
    return encoder.prompt_ids([{"role": "user", "content": text}])


def cached_answers(kind: str, model, encoder, model_dir: Path, prompts: list[str], max_tokens: int,
                   stop_ids: list[int], pad_id: int, device, topk: int = 0) -> tuple[list[Answer], float | None, Path]:
    """The base model's greedy answers to prompts, from the cache or generated now (then cached).

    Returns (answers, seconds spent generating or None when read from the cache, cache file)."""
    from liandan.atomic import atomic_write_text

    path = _cache_path(kind, model_dir, encoder.rendering, prompts, max_tokens)
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            answers = [Answer(**a) for a in saved["answers"]]
            if saved.get("prompts") == prompts and (not topk or all(a.topk_ids is not None for a in answers)):
                return answers, None, path
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is regenerated
    start = time.perf_counter()
    prompt_ids = [user_prompt_ids(encoder, p) for p in prompts]
    answers = greedy_answers(model, prompt_ids, max_tokens, stop_ids, pad_id, device, topk=topk)
    seconds = time.perf_counter() - start
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"prompts": prompts, "seconds": seconds,
                                            "answers": [asdict(a) for a in answers]}, ensure_ascii=False))
    except OSError:
        pass  # a read-only cache costs time on the next run, nothing else
    return answers, seconds, path


# ---------------------------------------------------------------- replay examples
@dataclass
class ReplayPool:
    items: list[Encoded]
    prompts: int
    seconds: float | None  # generation time now, None when cached
    cache: Path


def replay_pool(model, tokenizer, encoder, model_dir: Path, prompts_file: str | None, stop_ids: list[int],
                pad_id: int, device, max_seq_length: int, soft_targets: bool = False) -> ReplayPool:
    """Training examples made of the base model's own answers to the replay prompts (prompt masked).
    soft_targets: also keep the base model's top-k distribution at each answer position (--kl-weight)."""
    prompts = read_prompts(Path(prompts_file)) if prompts_file else read_prompts(builtin(REPLAY_PROMPTS))
    answers, seconds, cache = cached_answers("replay", model, encoder, model_dir, prompts, REPLAY_MAX_TOKENS,
                                             stop_ids, pad_id, device, topk=KL_TOPK if soft_targets else 0)
    stop_id = tokenizer.convert_tokens_to_ids(encoder.rendering.stop_tokens[0])
    items = []
    for prompt, answer in zip(prompts, answers):
        if not answer.tokens:
            continue  # an empty answer would only teach the model to stop at once
        prompt_ids = user_prompt_ids(encoder, prompt)
        # The base model's own token ids, not a re-tokenised text: exactly what it produces.
        answer_ids = answer.tokens + ([stop_id] if answer.stopped else [])
        ids = (prompt_ids + answer_ids)[:max_seq_length]
        labels = ([IGNORE] * len(prompt_ids) + answer_ids)[:max_seq_length]
        item = Encoded(ids, labels, 0)
        if item.n_trained:
            # answer_ids[j] was chosen from topk[j]; after truncation only the first n_trained remain.
            if soft_targets:
                item.soft = (answer.topk_ids[:item.n_trained], answer.topk_logp[:item.n_trained])
            items.append(item)
    return ReplayPool(items, len(prompts), seconds, cache)


def replay_indices(n_train: int, pool_size: int, ratio: float, rng, focus: list[int] = (),
                   focus_share: float = 0.0) -> list[int]:
    """Replay examples for one epoch: round(ratio × n_train) of them (at least one), cycling through a shuffled pool.
    With `focus` (nearest_replay), that share of them cycles through the focus positions instead."""
    if ratio <= 0 or pool_size == 0:
        return []
    count = max(1, round(ratio * n_train))
    n_focus = round(focus_share * count) if focus else 0
    return _cycle(list(focus), n_focus, rng) + _cycle(list(range(pool_size)), count - n_focus, rng)


def _cycle(positions: list[int], count: int, rng) -> list[int]:
    chosen: list[int] = []
    while len(chosen) < count:
        order = list(positions)
        rng.shuffle(order)
        chosen += order[: count - len(chosen)]
    return chosen


def nearest_replay(train: list[Encoded], pool: list[Encoded], per_example: int = 3, sample: int = 2048,
                   seed: int = 0) -> list[int]:
    """For each training prompt (up to `sample` of them), the `per_example` replay prompts nearest to it:
    those sharing its rarer tokens (tf-idf cosine over the prompts' token ids, idf from the pool).

    Why: training pulls hardest on questions shaped like the trained ones. Ten invented facts ("What is the
    capital of Velmora?") made the model answer other capitals with the invented one; replaying the base
    model's answers to prompts near the trained ones guards those first (benchmarks/forgetting.py). Token
    ids need no word splitting, so every language the tokenizer knows works alike; the pool is a few
    hundred prompts, so a dense matrix over its vocabulary is small."""
    prompts = [_prompt_tokens(item) for item in pool]
    vocab = {t: i for i, t in enumerate(sorted({t for p in prompts for t in p}))}
    if not vocab or not train:
        return []
    df = torch.zeros(len(vocab))
    for p in prompts:
        df[[vocab[t] for t in set(p)]] += 1
    idf = torch.log((len(pool) + 1) / (df + 1))
    pool_matrix = torch.nn.functional.normalize(_bags(prompts, vocab) * idf, dim=1)
    picked = train if len(train) <= sample else random.Random(seed).sample(train, sample)
    queries = _bags([_prompt_tokens(item) for item in picked], vocab) * idf
    scores = queries @ pool_matrix.T
    top = scores.topk(min(per_example, len(pool)), dim=1)
    return [int(j) for row, vals in zip(top.indices, top.values) for j, v in zip(row, vals) if v > 0]


def _prompt_tokens(item: Encoded) -> list[int]:
    return [t for t, label in zip(item.input_ids, item.labels) if label == IGNORE]


def _bags(token_lists: list[list[int]], vocab: dict[int, int]) -> torch.Tensor:
    """Token counts per list over `vocab` (tokens outside it dropped)."""
    bags = torch.zeros(len(token_lists), len(vocab))
    for row, tokens in enumerate(token_lists):
        for t in tokens:
            if t in vocab:
                bags[row, vocab[t]] += 1
    return bags


# ---------------------------------------------------------------- retention
@dataclass
class Retention:
    questions: list[Question]
    base: list[bool]
    after: list[bool]
    replies: list[str]  # after fine-tuning; "" where the base model's answer was reproduced (or never right)

    @property
    def base_correct(self) -> int:
        return sum(self.base)

    @property
    def kept(self) -> int:
        return sum(b and a for b, a in zip(self.base, self.after))

    @property
    def lost(self) -> list[tuple[Question, str]]:
        return [(q, r) for q, b, a, r in zip(self.questions, self.base, self.after, self.replies) if b and not a]

    def summary(self) -> str:
        share = f" ({100 * self.kept / self.base_correct:.0f}%)" if self.base_correct else ""
        return (f"General knowledge kept: {self.kept}/{self.base_correct}{share} of the base model's correct answers "
                f"to {len(self.questions)} held-out general questions.")


def answer_replies(model, tokenizer, encoder, questions: list[Question], stop_ids, pad_id, device) -> list[str]:
    prompt_ids = [user_prompt_ids(encoder, q.question) for q in questions]
    answers = greedy_answers(model, prompt_ids, RETENTION_MAX_TOKENS, stop_ids, pad_id, device)
    return [tokenizer.decode(a.tokens, skip_special_tokens=True) for a in answers]


@dataclass
class BaseKnowledge:
    questions: list[Question]
    correct: list[bool]  # per question: did the base model answer it correctly
    decisive: list[list[int]]  # per correct answer: its tokens up to and including the expected words, else []

    def margins(self, model, encoder, pad_id: int, device) -> dict[int, float]:
        """Per question the base model answered right (by index): how surely `model` still gives that answer,
        as decisive_margins over its decisive tokens. Above 0 it still does; for the base model itself, a
        margin near 0 means its right answer was nearly a coin flip."""
        known = [i for i, ok in enumerate(self.correct) if ok]
        if not known:
            return {}
        prompts = [user_prompt_ids(encoder, self.questions[i].question) for i in known]
        return dict(zip(known, decisive_margins(model, prompts, [self.decisive[i] for i in known], pad_id, device)))


def decisive_prefix(tokenizer, tokens: list[int], expected: list[str]) -> list[int]:
    """The base answer's tokens up to the one after the expected words first appear (that token closes the word:
    "24" must not go on to "240"). A model that still produces this prefix greedily still answers right."""
    for k in range(1, len(tokens) + 1):
        if is_correct(tokenizer.decode(tokens[:k], skip_special_tokens=True), expected):
            closed = tokens[: k + 1]
            if is_correct(tokenizer.decode(closed, skip_special_tokens=True), expected):
                return closed
    return list(tokens)


def base_retention(model, tokenizer, encoder, model_dir: Path, stop_ids, pad_id, device) -> BaseKnowledge:
    """Which held-out questions the base model answers correctly (cached like the replay answers)."""
    questions = read_questions(builtin(RETENTION_QUESTIONS))
    answers, _, _ = cached_answers("retention", model, encoder, model_dir, [q.question for q in questions],
                                   RETENTION_MAX_TOKENS, stop_ids, pad_id, device)
    correct = [is_correct(tokenizer.decode(a.tokens, skip_special_tokens=True), q.answers)
               for q, a in zip(questions, answers)]
    decisive = [decisive_prefix(tokenizer, a.tokens, q.answers) if ok else []
                for q, a, ok in zip(questions, answers, correct)]
    return BaseKnowledge(questions, correct, decisive)


@torch.no_grad()
def decisive_margins(model, prompts_ids: list[list[int]], continuations: list[list[int]], pad_id: int, device,
                     batch_size: int = 32) -> list[float]:
    """Per prompt: how surely greedy decoding produces this continuation, as the smallest gap over its positions
    between the continuation token's logit and the best other token's (log-probabilities differ by the same).
    Above 0, greedy decoding produces it. One teacher-forced forward pass instead of token-by-token generation,
    several times cheaper; the LM head runs on the continuation positions only, as in training."""
    from liandan.data.batching import collate
    from liandan.evaluate import trained_logits

    was_training = model.training
    model.eval()
    items = [Encoded(p + c, [IGNORE] * len(p) + c, 0) for p, c in zip(prompts_ids, continuations)]
    margins: list[float] = []
    for start in range(0, len(items), batch_size):
        batch = collate(items[start : start + batch_size], pad_id, device)  # right padding: causal, pads unseen
        logits, targets, rows = trained_logits(model, batch)
        # The best other token is the first or the second likeliest: topk(2) instead of a vocabulary-sized copy.
        top = logits.topk(2, dim=-1)
        best_other = torch.where(top.indices[:, 0] == targets, top.values[:, 1], top.values[:, 0])
        gaps = logits.gather(1, targets[:, None])[:, 0].float() - best_other.float()
        smallest = torch.full((len(batch["labels"]),), float("inf"), device=logits.device)
        margins += smallest.scatter_reduce(0, rows, gaps, reduce="amin").tolist()
    model.train(was_training)
    return margins


def retention(model, tokenizer, encoder, base: BaseKnowledge, stop_ids, pad_id, device) -> Retention:
    """How many of the base model's correct answers the trained model still gives. Where it still produces the base
    answer's decisive prefix the answer is kept without generating; only the others are generated and checked."""
    # An exact tie (margin 0) counts as changed, whichever token greedy decoding would pick: that answer is then
    # generated and checked, so a tie costs time, never a wrong verdict.
    changed = [i for i, m in base.margins(model, encoder, pad_id, device).items() if m <= 0]
    after, replies = list(base.correct), [""] * len(base.questions)  # kept unless shown otherwise below
    for i, reply in zip(changed, answer_replies(model, tokenizer, encoder, [base.questions[i] for i in changed],
                                                stop_ids, pad_id, device) if changed else []):
        after[i], replies[i] = is_correct(reply, base.questions[i].answers), reply
    return Retention(base.questions, base.correct, after, replies)
