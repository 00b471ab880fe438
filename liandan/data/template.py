"""The layout of a chat template, inferred once from probe renderings: one template model, many uses.

Any Jinja chat template is treated as a black box that renders conversations. Rendering a few probe
conversations tells us what liandan needs to know about it, without a list of model families:

* `generation_tail`: what the generation prompt (add_generation_prompt=True) writes that an assistant
  turn in history does not start with: R1's and QwQ's `<think>\\n`, or nothing (ChatML, Llama 3, ...);
* `answer_head`: what the template writes before an answer without reasoning: Qwen3's empty think block
  `<think>\\n\\n</think>\\n\\n`, gpt-oss's `<|channel|>final<|message|>`, or nothing;
* the think block (`think_before` + reasoning + `think_after`) and the message field the template reads
  reasoning from (`reasoning_key`), or `<think>\\n…\\n</think>\\n\\n` when the template has none;
* `turn_end`: the control token that ends an answer (the stop token).

Training rendering (data/render.py), the reasoning split at inference (liandan/reasoning.py) and the
Ollama TEMPLATE all read this one layout, so they cannot disagree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from liandan.errors import LiandanError

PROBE_QUESTION = "LIANDAN_PROBE_QUESTION"
PROBE_ANSWER = "LIANDAN_PROBE_ANSWER"
PROBE_REASONING = "LIANDAN_PROBE_REASONING"
# Where templates read an assistant message's reasoning from: the OpenAI/DeepSeek field, gpt-oss's, others'.
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
# The think block of DeepSeek-R1 and Qwen3, used when a template has no think block of its own.
DEFAULT_THINK = ("<think>\n", "\n</think>\n\n")
_THINK_IN_CONTENT = re.compile(r"^\s*<think>(.*?)</think>\s*", re.S)

Render = Callable[[list, bool], str]  # (messages, add_generation_prompt) -> text


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


def turn_end_of(render: Render, specials: list[str], eos: str | None) -> str:
    """The first special token the template writes after an assistant answer, else EOS."""
    text = render([{"role": "user", "content": PROBE_QUESTION}, {"role": "assistant", "content": PROBE_ANSWER}], False)
    found = first_control_token(text[text.rfind(PROBE_ANSWER) + len(PROBE_ANSWER):], specials)
    if found is not None:
        return found[1]
    if eos is None:
        raise LiandanError("cannot tell which token ends an answer: the chat template writes none and there is no EOS token")
    return eos


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


def infer_layout(render: Render, specials: list[str], eos: str | None) -> Layout:
    """Probe the template (see the module docstring); LiandanError in one line when it cannot be trained."""
    question = [{"role": "user", "content": PROBE_QUESTION}]
    prompt = render(question, True)
    plain = render(question + [{"role": "assistant", "content": PROBE_ANSWER}], False)
    if PROBE_ANSWER not in plain or PROBE_QUESTION not in prompt:
        raise LiandanError("the chat template does not write the messages it is given; cannot train with it")
    answer_at = plain.index(PROBE_ANSWER)
    start = _token_boundary(min(_common_prefix(prompt, plain), answer_at), (prompt, plain), specials)
    if start <= prompt.index(PROBE_QUESTION):
        raise LiandanError("the chat template renders the question differently once an answer follows; cannot mask prompts")
    if prompt[start:] and not prompt[start:].strip():  # `<think>` + "\n" vs `<think></think>`: split before the opener
        start -= next((len(t) for t in specials if prompt[:start].endswith(t)), 0)
    tail, head = prompt[start:], plain[start:answer_at]
    turn_end = turn_end_of(render, specials, eos)
    key, before, after = None, None, None
    for candidate in REASONING_KEYS:
        message = {"role": "assistant", "content": PROBE_ANSWER, candidate: PROBE_REASONING}
        text = render(question + [message], False)
        if PROBE_REASONING in text and text.startswith(plain[:start]) and text.index(PROBE_REASONING) < text.index(PROBE_ANSWER):
            key = candidate
            before = text[start:text.index(PROBE_REASONING)]
            after = text[text.index(PROBE_REASONING) + len(PROBE_REASONING):text.index(PROBE_ANSWER)]
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
