"""The wrapper strings of a chat template around each turn, inferred from probe renderings.

A Jinja chat template is a program; most of them only wrap each message in fixed strings. Rendering
a few probe conversations whose contents are unique markers and cutting the output at the markers
recovers those strings, whatever the model family: no hand list of families to keep up to date.

    [head | system head]  Q1  reply_open  A1  turn_end  Q2  generation
     ^ before the first     ^ user → past      ^ answer → next   ^ after the last user turn:
       user content           answer             user content       the generation prompt

* the system prompt goes at the start (`system_head`, wrapping it: ChatML, Llama 3, Gemma 3's first
  user turn, R1's bare prefix), or into the last user turn (`system_last_user`: Mistral), or nowhere
  because the template refuses it (`system = "none"`: Gemma 2);
* `head` is what the start looks like without one: empty, a fixed preamble (Llama 3.1's date lines) or
  a default system prompt (Qwen2.5, SmolLM2);
* `generation` differs from `reply_open` where the template opens a think block only in the
  generation prompt (R1's `<think>\n`) and drops reasoning from history.

`check` renders the probes both ways, so a template the wrappers cannot describe is refused in one line
rather than described wrongly. The Ollama TEMPLATE (export/ollama.py) is generated from `Wrappers`.
data/template.py infers the rest of the template model the same way (think block, answer head, turn end)
for training and the reasoning split.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from liandan.errors import LiandanError

# Markers: plain letters and digits, so no template trims, escapes or splits them.
Q1, A1, Q2, S1 = "LDQONE", "LDAONE", "LDQTWO", "LDSYSTEM"


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

Jinja = Callable[[list], str]  # conversation -> rendering with the generation prompt


@dataclass(frozen=True)
class Wrappers:
    head: str  # before the first user content when there is no system prompt
    reply_open: str  # after a user content, before a past answer
    turn_end: str  # after a past answer, before the next user content
    generation: str  # after the last user content: the generation prompt
    system: str = "start"  # "start", "last-user" or "none" (the template refuses a system prompt)
    system_wrap: tuple = ("", "")  # (before, after) the system text at that place
    bos: str = ""  # stripped from renderings: llama.cpp adds it itself


def render(wrappers: Wrappers, system: str | None, messages: list[dict]) -> str:
    """What the wrappers give for a conversation (system turns are taken from `system`, as Ollama does)."""
    turns = [m for m in messages if m["role"] in ("user", "assistant")]
    last_user = max((i for i, m in enumerate(turns) if m["role"] == "user"), default=-1)
    system = system if wrappers.system != "none" else None
    before, after = wrappers.system_wrap
    out = before + system + after if system and wrappers.system == "start" else wrappers.head
    for i, m in enumerate(turns):
        if m["role"] == "assistant":
            out += wrappers.reply_open + m["content"]
            continue
        if i > 0:
            out += wrappers.turn_end
        if system and wrappers.system == "last-user" and i == last_user:
            out += before + system + after
        out += m["content"] + (wrappers.generation if i == len(turns) - 1 else "")
    return out


def _strip(text: str, bos: str) -> str:
    return text[len(bos):] if bos and text.startswith(bos) else text


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


def _system_place(jinja: Jinja, bos: str, wrappers: Wrappers) -> Wrappers:
    """Where a system prompt goes: found by rendering a two-turn chat with one."""
    try:
        text = _strip(jinja(_chat(S1, Q1, A1, Q2)), bos)
    except LiandanError:
        return replace(wrappers, system="none")  # the template refuses system prompts
    if text.count(S1) != 1:
        raise LiandanError(f"the chat template puts the system prompt in {text.count(S1)} places, not one")
    first = text.split(Q1, 1)[0]
    if S1 in first:
        return replace(wrappers, system="start", system_wrap=tuple(first.split(S1)))
    between = _cut(text, [Q1, A1, Q2])[2]
    if S1 in between and between.startswith(wrappers.turn_end):
        wrap = tuple(between[len(wrappers.turn_end):].split(S1))
        return replace(wrappers, system="last-user", system_wrap=wrap)
    raise LiandanError("the chat template puts the system prompt somewhere other than the start or the last user turn")


def infer(jinja: Jinja, bos: str = "") -> Wrappers:
    """The wrappers of a template, from renderings of marker conversations; LiandanError if it has none."""
    head, q_end = _cut(_strip(jinja(_chat(None, Q1)), bos), [Q1])
    head2, reply_open, turn_end, generation = _cut(_strip(jinja(_chat(None, Q1, A1, Q2)), bos), [Q1, A1, Q2])
    if head2 != head or generation != q_end:
        raise LiandanError("the chat template renders the first user turn differently once a conversation goes on")
    wrappers = _system_place(jinja, bos, Wrappers(head, reply_open, turn_end, generation, bos=bos))
    check(wrappers, jinja)
    return wrappers


def check(wrappers: Wrappers, jinja: Jinja) -> None:
    """Stop unless the wrappers reproduce the Jinja template on every probe conversation."""
    for conversation in PROBES:
        system = next((m["content"] for m in conversation if m["role"] == "system"), None)
        if system is not None and wrappers.system == "none":
            continue
        expected = _strip(jinja(conversation), wrappers.bos)
        got = render(wrappers, system, conversation)
        if got != expected:
            at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            near = slice(max(0, at - 30), at + 30)
            raise LiandanError(f"the chat template renders differently from wrapper strings (at {expected[near]!r}, "
                               f"the wrappers give {got[near]!r})")
