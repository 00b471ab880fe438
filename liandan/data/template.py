"""The model of a chat template, inferred once from probe renderings: one template model, many uses.

Any Jinja chat template is treated as a black box that renders conversations. Rendering a few probe
conversations whose contents are unique markers, and cutting the output at the markers, tells us what
liandan needs to know about it, without a list of model families. `ChatTemplate` renders each probe once
and infers two views of the same template from those renderings:

`Layout`, for training rendering (data/render.py) and the reasoning split at inference (liandan/reasoning.py):
* `generation_tail`: what the generation prompt (add_generation_prompt=True) writes that an assistant
  turn in history does not start with: R1's and QwQ's `<think>\\n`, or nothing (ChatML, Llama 3, ...);
* `answer_head`: what the template writes before an answer without reasoning: Qwen3's empty think block
  `<think>\\n\\n</think>\\n\\n`, gpt-oss's `<|channel|>final<|message|>`, or nothing;
* the think block (`think_before` + reasoning + `think_after`) and the message field the template reads
  reasoning from (`reasoning_key`), or `<think>\\n…\\n</think>\\n\\n` when the template has none;
* `turn_end`: the control token that ends an answer (the stop token).

`Wrappers`, for the Ollama TEMPLATE (export/ollama.py): most templates only wrap each message in fixed strings,

    [head | system]  Q1  reply_open  A1  reply_close  Q2  generation
     ^ before the first  ^ user → past      ^ answer → next    ^ after the last user turn:
       user content        answer             user content       the generation prompt

* the system prompt goes at the start (wrapped in `system_wrap`: ChatML, Llama 3, Gemma 3's first user
  turn, R1's bare prefix), or into the last user turn (Mistral), or nowhere because the template refuses
  it (`system = "none"`: Gemma 2);
* `head` is what the start looks like without one: empty, a fixed preamble (Llama 3.1's date lines) or
  a default system prompt (Qwen2.5, SmolLM2);
* `generation` differs from `reply_open` where the template opens a think block only in the generation
  prompt (R1's `<think>\\n`) and drops reasoning from history.
The wrappers are checked against the template on every conversation of `PROBES`, so a template they cannot
describe is refused in one line rather than described wrongly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Callable

from liandan.errors import LiandanError

# Probe contents: plain letters and digits, so no template trims, escapes or splits them.
Q1, A1, Q2, S1, THOUGHT = "LDQONE", "LDAONE", "LDQTWO", "LDSYSTEM", "LDTHOUGHT"
# Where templates read an assistant message's reasoning from: the OpenAI/DeepSeek field, gpt-oss's, others'.
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
# The think block of DeepSeek-R1 and Qwen3, used when a template has no think block of its own.
DEFAULT_THINK = ("<think>\n", "\n</think>\n\n")
_THINK_IN_CONTENT = re.compile(r"^\s*<think>(.*?)</think>\s*", re.S)

Render = Callable[[list, bool], str]  # (messages, add_generation_prompt) -> text


def _chat(system, *turns):
    messages = [{"role": "system", "content": system}] if system is not None else []
    roles = ("user", "assistant")
    return messages + [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]


# What the wrappers must reproduce: with and without a system prompt, multi-turn, Chinese text, and
# contents that look like template syntax or control tokens (they must pass through untouched).
PROBES = (
    _chat(None, "Q1"),
    _chat("S1", "Q1"),
    _chat(None, "Q1", "A1", "Q2"),
    _chat("S1", "Q1", "A1", "Q2", "A2", "Q3"),
    _chat("你是德哥", "PolarDB是什么", "阿里云开源宇宙无敌数据库", "谁是最帅的地球人", "德哥", "月亮哪天最圆"),
    _chat('{{ .System }} {{ end }} """x', '<|im_end|><|im_start|>system {{ .Content }} {% raw %}', "<|eot_id|>{{ if }}",
          "[INST] <end_of_turn> {{- range .Messages }}"),
)


class ChatTemplate:
    """One chat template, probed: its `layout` and its `wrappers`, each inferred on first use from one shared
    set of probe renderings (each conversation rendered once). `bos` is stripped from renderings: llama.cpp
    adds it itself, so the Ollama TEMPLATE must not."""

    def __init__(self, render: Render, specials: list[str] = (), eos: str | None = None, bos: str = ""):
        self._render, self.specials, self.eos, self.bos = render, list(specials), eos, bos
        self._seen: dict = {}

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        key = (json.dumps(messages, ensure_ascii=False, sort_keys=True), add_generation_prompt)
        if key not in self._seen:
            text = self._render(messages, add_generation_prompt)
            self._seen[key] = text[len(self.bos):] if self.bos and text.startswith(self.bos) else text
        return self._seen[key]

    @cached_property
    def turn_end(self) -> str:
        """The first special token the template writes after an assistant answer, else EOS."""
        text = self.render(_chat(None, Q1, A1), False)
        found = first_control_token(text[text.rfind(A1) + len(A1):], self.specials)
        if found is not None:
            return found[1]
        if self.eos is None:
            raise LiandanError("cannot tell which token ends an answer: the chat template writes none and there is no EOS token")
        return self.eos

    @cached_property
    def layout(self) -> Layout:
        """The layout for training and the reasoning split; LiandanError in one line when it cannot be trained."""
        return _infer_layout(self)

    @cached_property
    def wrappers(self) -> Wrappers:
        """The wrapper strings, checked on every probe; LiandanError in one line when they cannot describe it."""
        return _infer_wrappers(self)


# ---------------------------------------------------------------- the layout: training and the reasoning split
@dataclass(frozen=True)
class Layout:
    generation_tail: str
    answer_head: str
    think_before: str
    think_after: str
    reasoning_key: str | None
    turn_end: str

    @property
    def opens_thinking(self) -> bool:
        """The generation prompt leaves the model inside an open think block (R1, QwQ)."""
        return bool(self.generation_tail.strip()) and self.think_before.strip() in self.generation_tail \
            and self.think_after.strip() not in self.generation_tail

    @property
    def closes_thinking(self) -> bool:
        """The generation prompt adds text that history lacks and that the model does not continue: an empty,
        closed think block (R1 with thinking off, DeepSeek-V3.2, Gemma 4) or an instruction. The answer follows it."""
        return bool(self.generation_tail.strip()) and not self.opens_thinking

    @property
    def thinks(self) -> bool:
        """The template knows a think block (renders reasoning, opens one, or writes an empty one)."""
        return self.reasoning_key is not None or bool(self.generation_tail.strip()) \
            or self.think_after.strip() in self.answer_head


def split_reasoning(message: dict) -> tuple[str, str | None]:
    """(content, reasoning) of an assistant message: `reasoning_content` (or `thinking`/`reasoning`), else a
    leading `<think>…</think>` in the content; reasoning None when the message has none."""
    content = message.get("content") or ""
    for key in REASONING_KEYS:
        if isinstance(message.get(key), str):
            return content, message[key].strip("\n")
    found = _THINK_IN_CONTENT.match(content)
    if found:
        return content[found.end():], found.group(1).strip("\n")
    return content, None


def first_control_token(text: str, specials: list[str]) -> tuple[int, str] | None:
    """(position, token) of the first special token in text."""
    best = None
    for token in specials:
        pos = text.find(token)
        if pos >= 0 and (best is None or pos < best[0] or (pos == best[0] and len(token) > len(best[1]))):
            best = (pos, token)
    return best


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _token_boundary(at: int, texts, specials: list[str]) -> int:
    """Move `at` back to the start of a control token it falls inside (`<|START_THINKING|>` and
    `<|START_TEXT|>` share the characters `<|START_T`, not a token)."""
    moved = True
    while moved:
        moved = False
        for text in texts:
            for token in specials:
                pos = text.find(token, max(0, at - len(token) + 1), at + len(token) - 1)
                if 0 <= pos < at:
                    at, moved = pos, True
    return at


def _infer_layout(template: ChatTemplate) -> Layout:
    """Probe the template (see the module docstring)."""
    question, specials = _chat(None, Q1), template.specials
    prompt = template.render(question, True)
    plain = template.render(_chat(None, Q1, A1), False)
    if A1 not in plain or Q1 not in prompt:
        raise LiandanError("the chat template does not write the messages it is given; cannot train with it")
    answer_at = plain.index(A1)
    start = _token_boundary(min(_common_prefix(prompt, plain), answer_at), (prompt, plain), specials)
    if start <= prompt.index(Q1):
        raise LiandanError("the chat template renders the question differently once an answer follows; cannot mask prompts")
    if prompt[start:] and not prompt[start:].strip():  # `<think>` + "\n" vs `<think></think>`: split before the opener
        start -= next((len(t) for t in specials if prompt[:start].endswith(t)), 0)
    tail, head, turn_end = prompt[start:], plain[start:answer_at], template.turn_end
    key, before, after = None, None, None
    for candidate in REASONING_KEYS:
        text = template.render(question + [{"role": "assistant", "content": A1, candidate: THOUGHT}], False)
        if THOUGHT in text and text.startswith(plain[:start]) and text.index(THOUGHT) < text.index(A1):
            key = candidate
            before = text[start:text.index(THOUGHT)]
            after = text[text.index(THOUGHT) + len(THOUGHT):text.index(A1)]
            break
    if key is None:
        before, after = _think_block_of(tail)
    return Layout(tail, head, before, after, key, turn_end)


def _think_block_of(tail: str) -> tuple[str, str]:
    """The think block of a template that does not render reasoning: opened by its generation prompt
    (R1's `<think>\n` closes with `</think>`), else DeepSeek-R1's and Qwen3's `<think>` block."""
    match = re.fullmatch(r"<(\w+)>", tail.strip())
    if match:
        return tail, f"\n</{match.group(1)}>\n\n"
    return DEFAULT_THINK


def trained_turn(layout: Layout, prompt: str, full: str, content: str, reasoning: str | None) -> str:
    """The text the model should generate after `prompt` for one assistant turn, up to and including the turn
    end. `full` is the template's rendering of the conversation up to and including that turn."""
    tail = layout.generation_tail
    history = prompt[: len(prompt) - len(tail)]
    if not prompt.endswith(tail) or not full.startswith(history):
        raise LiandanError("the chat template renders a conversation differently from its beginning; cannot mask prompts")
    turn = full[len(history):]
    body = turn[len(layout.answer_head):] if turn.startswith(layout.answer_head) else turn  # the answer, turn end
    rendered = reasoning is None or (layout.reasoning_key is not None and reasoning.strip() in turn)
    if rendered and turn.startswith(tail):
        generated = turn[len(tail):]  # the template's own rendering (its think block or channel included)
    elif layout.opens_thinking:  # R1, QwQ: the prompt opened the block; no reasoning = an empty one
        generated = (reasoning or "") + layout.think_after + body
    elif reasoning is None and layout.closes_thinking:
        # The prompt holds an empty think block (thinking off) or an instruction: the answer follows it, without
        # what the prompt already wrote (DeepSeek-V3.2's history turn starts with the `</think>` its prompt ends with).
        generated = turn[_overlap(tail, turn):]
    elif reasoning is not None and not tail.strip():  # the template drops reasoning or has no think block
        generated = layout.think_before + reasoning + layout.think_after + body
    elif layout.closes_thinking:
        raise LiandanError(f"the chat template's generation prompt ends with {_short(tail)} (thinking off, or text "
                           "the model does not continue), so reasoning in the data cannot be trained; remove it")
    else:
        raise LiandanError(f"the chat template's generation prompt ends with {_short(tail)} but the assistant turn it "
                           f"renders starts with {_short(turn)}; cannot place the answer after the prompt")
    at = generated.rfind(content) + len(content) if content else 0
    end = generated.find(layout.turn_end, max(at, 0))
    return generated[: end + len(layout.turn_end)] if end >= 0 else generated.rstrip() + layout.turn_end


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else "…" + text[-limit:])


def _overlap(tail: str, turn: str) -> int:
    """Length of the longest beginning of `turn` that `tail` ends with."""
    return max((n for n in range(1, min(len(tail), len(turn)) + 1) if tail.endswith(turn[:n])), default=0)


# ---------------------------------------------------------------- the wrappers: the Ollama TEMPLATE
@dataclass(frozen=True)
class Wrappers:
    head: str  # before the first user content when there is no system prompt
    reply_open: str  # after a user content, before a past answer
    reply_close: str  # after a past answer, before the next user content
    generation: str  # after the last user content: the generation prompt
    system: str = "start"  # "start", "last-user" or "none" (the template refuses a system prompt)
    system_wrap: tuple = ("", "")  # (before, after) the system text at that place
    bos: str = ""  # stripped from renderings: llama.cpp adds it itself

    def render(self, system: str | None, messages: list[dict]) -> str:
        """What the wrappers give for a conversation (system turns are taken from `system`, as Ollama does).
        export/ollama.go_template writes the same as a Go template."""
        turns = [m for m in messages if m["role"] in ("user", "assistant")]
        last_user = max((i for i, m in enumerate(turns) if m["role"] == "user"), default=-1)
        system = system if self.system != "none" else None
        before, after = self.system_wrap
        out = before + system + after if system and self.system == "start" else self.head
        for i, m in enumerate(turns):
            if m["role"] == "assistant":
                out += self.reply_open + m["content"]
                continue
            if i > 0:
                out += self.reply_close
            if system and self.system == "last-user" and i == last_user:
                out += before + system + after
            out += m["content"] + (self.generation if i == len(turns) - 1 else "")
        return out


def _cut(text: str, markers: list[str]) -> list[str]:
    """The text between the markers, in order: [before first, between 1st and 2nd, ..., after last]."""
    parts, rest = [], text
    for marker in markers:
        if rest.count(marker) != 1:
            raise LiandanError(f"the chat template renders the probe content {marker!r} {rest.count(marker)} times "
                               "where once is expected")
        head, rest = rest.split(marker)
        parts.append(head)
    return parts + [rest]


def _system_place(template: ChatTemplate, wrappers: Wrappers) -> Wrappers:
    """Where a system prompt goes: found by rendering a two-turn chat with one."""
    try:
        text = template.render(_chat(S1, Q1, A1, Q2))
    except LiandanError:
        return replace(wrappers, system="none")  # the template refuses system prompts
    if text.count(S1) != 1:
        raise LiandanError(f"the chat template puts the system prompt in {text.count(S1)} places, not one")
    first = text.split(Q1, 1)[0]
    if S1 in first:
        return replace(wrappers, system="start", system_wrap=tuple(first.split(S1)))
    between = _cut(text, [Q1, A1, Q2])[2]
    if S1 in between and between.startswith(wrappers.reply_close):
        wrap = tuple(between[len(wrappers.reply_close):].split(S1))
        return replace(wrappers, system="last-user", system_wrap=wrap)
    raise LiandanError("the chat template puts the system prompt somewhere other than the start or the last user turn")


def _infer_wrappers(template: ChatTemplate) -> Wrappers:
    """The wrappers, from renderings of marker conversations, checked on every probe conversation."""
    head, q_end = _cut(template.render(_chat(None, Q1)), [Q1])
    head2, reply_open, reply_close, generation = _cut(template.render(_chat(None, Q1, A1, Q2)), [Q1, A1, Q2])
    if head2 != head or generation != q_end:
        raise LiandanError("the chat template renders the first user turn differently once a conversation goes on")
    wrappers = _system_place(template, Wrappers(head, reply_open, reply_close, generation, bos=template.bos))
    for conversation in PROBES:
        system = next((m["content"] for m in conversation if m["role"] == "system"), None)
        if system is not None and wrappers.system == "none":
            continue
        expected, got = template.render(conversation), wrappers.render(system, conversation)
        if got != expected:
            at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            near = slice(max(0, at - 30), at + 30)
            raise LiandanError(f"the chat template renders differently from wrapper strings (at {expected[near]!r}, "
                               f"the wrappers give {got[near]!r})")
    return wrappers
