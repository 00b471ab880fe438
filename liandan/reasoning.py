"""Split a thinking model's output into reasoning and answer, as it streams.

The markers come from the chat template's layout (data/template.py), not from a list of families:
the think block opens with `think_before` (R1/Qwen3 `<think>`, gpt-oss `<|channel|>analysis<|message|>`)
and closes with `think_after` (`</think>`, gpt-oss `<|end|><|start|>assistant<|channel|>final<|message|>`);
a template whose generation prompt already opens the block (R1, QwQ) starts inside it. Text is fed in
chunks (token by token in generate/chat/serve); text that could still be the start of a marker is held
back until the next chunk decides it, so a marker split across tokens is never shown.
"""

from __future__ import annotations


class ReasoningSplitter:
    """feed(text) -> (reasoning delta, content delta); finish() flushes what was held back."""

    def __init__(self, opener: str, closer: str, starts_inside: bool = False, answer_head: str = ""):
        self.opener, self.closer = opener, closer
        self.answer_head = answer_head.strip()  # written before an answer without reasoning (gpt-oss's final channel)
        self.state = "reasoning" if starts_inside else "start"
        self.buffer = ""
        self.pending_space = ""  # whitespace at the end of the reasoning, shown only if more reasoning follows
        self.reasoning_started = False  # leading whitespace of the reasoning is layout, not shown

    @classmethod
    def for_layout(cls, layout) -> "ReasoningSplitter | None":
        """A splitter for this template, or None when the template has no think block (plain answers)."""
        if not layout.thinks:
            return None
        return cls(layout.think_before.strip(), layout.think_after.strip(), layout.opens_thinking, layout.answer_head)

    def feed(self, text: str) -> tuple[str, str]:
        self.buffer += text
        reasoning, content = "", ""
        while True:
            if self.state == "start":
                head = self.buffer.lstrip()
                for marker, state in ((self.opener, "reasoning"), (self.answer_head, "content")):
                    if marker and head.startswith(marker):
                        self.buffer, self.state = head[len(marker):], state
                        break
                else:
                    if any(m and m.startswith(head) for m in (self.opener, self.answer_head)) and head != "":
                        return reasoning, content  # could still become a marker: wait
                    if not head:
                        return reasoning, content
                    self.state = "content"
                    continue
                continue
            if self.state == "reasoning":
                at = self.buffer.find(self.closer)
                if at >= 0:
                    reasoning += self._reasoning_text(self.buffer[:at], final=True)
                    self.buffer, self.state = self.buffer[at + len(self.closer):], "content_start"
                    continue
                keep = _partial_suffix(self.buffer, self.closer)
                reasoning += self._reasoning_text(self.buffer[: len(self.buffer) - keep], final=False)
                self.buffer = self.buffer[len(self.buffer) - keep:]
                return reasoning, content
            if self.state == "content_start":  # whitespace between the think block and the answer is layout
                self.buffer = self.buffer.lstrip()
                if not self.buffer:
                    return reasoning, content
                self.state = "content"
            content += self.buffer
            self.buffer = ""
            return reasoning, content

    def _reasoning_text(self, text: str, final: bool) -> str:
        if not self.reasoning_started:
            text = text.lstrip()
        if not text:
            return ""
        self.reasoning_started = True
        text = self.pending_space + text
        body = text.rstrip()
        self.pending_space = "" if final else text[len(body):]
        return body

    def finish(self) -> tuple[str, str]:
        """What is left at the end of the generation (a marker that never completed is text)."""
        if self.state == "reasoning":
            out = self._reasoning_text(self.buffer, final=True), ""
        elif self.state == "start":
            out = "", self.buffer.lstrip()
        else:
            out = "", self.buffer
        self.buffer = ""
        return out


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a beginning of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def split_text(splitter: ReasoningSplitter | None, text: str) -> tuple[str, str]:
    """(reasoning, content) of a whole generated text."""
    if splitter is None:
        return "", text
    r1, c1 = splitter.feed(text)
    r2, c2 = splitter.finish()
    return r1 + r2, c1 + c2


def splitter_for(encoder) -> ReasoningSplitter | None:
    """A fresh splitter for one generation under this encoder's rendering; None for raw prompts and for
    templates without a think block (their output is all answer)."""
    from liandan.errors import LiandanError

    if encoder.rendering.prompt_style == "raw":
        return None
    try:
        return ReasoningSplitter.for_layout(encoder.layout)
    except LiandanError:  # a template liandan cannot lay out still generates; its output is shown whole
        return None


class ShownAnswer:
    """Prints a generation as it streams: the answer, and the reasoning of a thinking model only when asked."""

    def __init__(self, splitter, show_thinking: bool, dim: bool = False):
        self.splitter, self.show_thinking, self.dim = splitter, show_thinking, dim
        self.in_reasoning = False

    def feed(self, piece: str) -> None:
        if self.splitter is None:
            print(piece, end="", flush=True)
            return
        self._show(*self.splitter.feed(piece))

    def finish(self) -> None:
        if self.splitter is not None:
            self._show(*self.splitter.finish())

    def _show(self, reasoning: str, content: str) -> None:
        if reasoning and self.show_thinking:
            if not self.in_reasoning:
                print("\033[2m" if self.dim else "Thinking: ", end="")
            self.in_reasoning = True
            print(reasoning, end="", flush=True)
        if content:
            if self.in_reasoning:
                print("\033[0m\n" if self.dim else "\n----------\n", end="")
                self.in_reasoning = False
            print(content, end="", flush=True)
