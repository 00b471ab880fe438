"""The prompt step of --docs: a question + its top-k chunks → one user message, in a recorded layout.

The same function fills the layout for retrieval-aware training data (`data from-docs --questions`)
and at inference (`generate`/`chat`/`serve`/`lora --test`/`eval` with --docs), and the layout an
adapter was trained with is saved in its record (`docs_layout` in liandan.json, beside the chat
template), so the model sees at inference exactly the prompt shape it learned.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from liandan.errors import LiandanError

DEFAULT_TOP_K = 3


@dataclass
class DocsLayout:
    """How retrieved chunks and the question are laid out in the user message."""

    # The question comes last: a small model answers the text nearest to its answer.
    template: str = "Answer the question from these sources.\n\n{sources}\n\nQuestion: {question}"
    source: str = "[{n}] {source}\n{text}"
    separator: str = "\n\n"
    top_k: int = DEFAULT_TOP_K

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "DocsLayout":
        return cls(**{k: v for k, v in (d or {}).items() if k in cls.__dataclass_fields__})

    def fill(self, question: str, chunks: list) -> str:
        """The user message for `question` with these chunks (objects with text, source, section)."""
        parts = [self.source.format(n=i + 1, source=c.source, section=c.section, text=c.text.strip())
                 for i, c in enumerate(chunks)]
        return self.template.format(sources=self.separator.join(parts) if parts else "(no sources found)",
                                    question=question.strip())


def sources_of(hits) -> list[dict]:
    """What `serve` returns and `generate` prints: where each chunk in the prompt came from."""
    return [{"rank": h.rank, "source": h.chunk.source, "section": h.chunk.section, "score": round(h.score, 4)}
            for h in hits]


def describe_sources(sources: list[dict]) -> str:
    if not sources:
        return "Sources: none (no chunk shares a word with the question)"
    return "Sources: " + "; ".join(f"[{s['rank']}] {s['source']} — {s['section']}" for s in sources)


class DocsContext:
    """An open index with the layout and k to use: the one object the commands call for --docs."""

    def __init__(self, index, layout: DocsLayout, top_k: int | None = None):
        self.index = index
        self.layout = layout
        self.top_k = top_k if top_k is not None else layout.top_k
        if self.top_k < 1:
            raise LiandanError(f"--top-k must be at least 1, got {self.top_k}")

    @classmethod
    def open(cls, path, record: dict | None = None, top_k: int | None = None, log=None) -> "DocsContext":
        """--docs PATH with an adapter's record: its trained layout, else the default one."""
        from liandan.docs.index import note, open_docs

        return cls(open_docs(path, log or note), DocsLayout.from_dict((record or {}).get("docs_layout")), top_k)

    def apply(self, messages: list[dict]) -> tuple[list[dict], list[dict]]:
        """Messages with the last user turn replaced by the filled layout, and the sources used."""
        last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last is None:
            return list(messages), []
        question = messages[last].get("content") or ""
        hits = self.index.search(question, self.top_k)
        out = list(messages)
        out[last] = dict(messages[last], content=self.layout.fill(question, [h.chunk for h in hits]))
        return out, sources_of(hits)

    def apply_to_file(self, data) -> None:
        """Ask every question of a DataFile (chat-style formats) with its retrieved chunks, in place."""
        for example in data.examples:
            if example.messages is not None:
                last = max((i for i, m in enumerate(example.messages) if m["role"] == "assistant"), default=None)
                asked, _ = self.apply(example.messages[:last] if last is not None else example.messages)
                example.messages = asked + (example.messages[last:] if last is not None else [])

    def prompt(self, question: str) -> tuple[str, list[dict]]:
        messages, sources = self.apply([{"role": "user", "content": question}])
        return messages[0]["content"], sources
