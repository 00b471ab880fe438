"""The prompt step of --docs: a question + its top-k chunks → the prompt (user or system turn), in a recorded layout.

The same function fills the layout for retrieval-aware training data (`data from-docs --questions`)
and at inference (`generate`/`chat`/`serve`/`lora --test`/`eval` with --docs), and the layout an
adapter was trained with is saved in its record (`docs_layout` in liandan.json, beside the chat
template), so the model sees at inference exactly the prompt shape it learned.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

from liandan.errors import LiandanError

DEFAULT_TOP_K = 3
# --top-k of every command that reads a trained adapter's record (generate, chat, serve, eval, lora --test)
TOP_K_HELP = f"Chunks per question with --docs (default: the trained layout's, else {DEFAULT_TOP_K})"
# serve and chat run for hours while the documents are edited: --docs looks at the folder's files again at most
# this often (a stat of each file, ~1 ms for 1,000 files) and rebuilds the index when one changed.
RECHECK_SECONDS = 2.0
LAYOUT_VERSION = 2  # bump when the default layout changes; records keep the one their adapter learned
# Version 1, frozen here as recorded (the defaults below may change): records without "version" are version 1.
_V1 = {"template": "Answer the question from these sources.\n\n{sources}\n\nQuestion: {question}",
       "source": "[{n}] {source}\n{text}", "separator": "\n\n", "top_k": 3, "placement": "user", "version": 1}


@dataclass
class DocsLayout:
    """How retrieved chunks and the question are laid out in the prompt."""

    # Sources first, then the instruction and the question last: a small model answers the text nearest to its
    # answer. Version 2's "a few words from the text above" lifted the embedded model's reading of the right
    # section from 6/15 to 9/15 with plain sources, and from 3/15 to 4/15 in this numbered layout with the top 3
    # chunks (benchmarks/docs_layouts.py, English handbook).
    template: str = "{sources}\n\nAnswer in a few words from the text above.\nQuestion: {question}"
    source: str = "[{n}] {source}\n{text}"
    separator: str = "\n\n"
    top_k: int = DEFAULT_TOP_K
    # Where the filled sources go: "user" (the template, question included, replaces the user turn) or
    # "system" (the template, without {question}, becomes the system message; the question stays as asked).
    placement: str = "user"
    version: int = LAYOUT_VERSION

    def __post_init__(self):
        if self.placement not in ("user", "system"):
            raise LiandanError(f"docs layout: placement must be 'user' or 'system', got {self.placement!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "DocsLayout":
        """The layout of a record; none recorded → today's default. A record of an older version keeps
        that version's values for the fields it did not have yet (it was trained without them)."""
        if not d:
            return cls()
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**{**(_V1 if d.get("version", 1) == 1 else {}), **known})

    def fill(self, question: str, chunks: list) -> str:
        """The layout filled for `question` with these chunks (objects with text, source, section): the new user
        message, or with placement "system" the system message's text."""
        parts = [self.source.format(n=i + 1, source=c.source, section=c.section, text=c.text.strip(),
                                    body=body_of(c)) for i, c in enumerate(chunks)]
        return self.template.format(sources=self.separator.join(parts) if parts else "(no sources found)",
                                    question=question.strip())

    def place(self, messages: list[dict], chunks: list) -> list[dict]:
        """`messages` with these chunks laid in for their last user turn (the question)."""
        last = last_turn(messages, "user")
        if last is None:
            return list(messages)
        filled = self.fill(messages[last].get("content") or "", chunks)
        out = list(messages)
        if self.placement != "system":
            out[last] = dict(messages[last], content=filled)
        elif out[0]["role"] == "system":  # a system prompt of the user's is kept, the sources follow it
            out[0] = dict(out[0], content=f"{out[0]['content']}\n\n{filled}")
        else:
            out.insert(0, {"role": "system", "content": filled})
        return out


def last_turn(messages: list[dict], role: str) -> int | None:
    """Index of the last message with this role (None if there is none)."""
    return max((i for i, m in enumerate(messages) if m["role"] == role), default=None)


def body_of(chunk) -> str:
    """The chunk's text without the heading line the chunker puts first ("# Title > Section")."""
    text = chunk.text.strip()
    for title in (chunk.section, chunk.section.split(" > ")[-1]):  # the chunker shortens a very long path
        if title and text.startswith(f"# {title}\n\n"):
            return text[len(f"# {title}\n\n"):].strip()
    return text


def sources_of(hits) -> list[dict]:
    """What `serve` returns and `generate` prints: where each chunk in the prompt came from."""
    return [{"rank": h.rank, "source": h.chunk.source, "section": h.chunk.section, "score": round(h.score, 4)}
            for h in hits]


def describe_sources(sources: list[dict]) -> str:
    if not sources:
        return "Sources: none (no chunk shares a word with the question)"
    return "Sources: " + "; ".join(f"[{s['rank']}] {s['source']} — {s['section']}" for s in sources)


class DocsContext:
    """An open index with the layout and k to use: the one object the commands call for --docs.
    Opened from a path (`open`), it follows the files: see `current_index`."""

    def __init__(self, index, layout: DocsLayout, top_k: int | None = None, path=None, log=None):
        self.index = index
        self.layout = layout
        self.top_k = top_k if top_k is not None else layout.top_k
        if self.top_k < 1:
            raise LiandanError(f"--top-k must be at least 1, got {self.top_k}")
        self.path, self.log = path, log
        self.checked = time.monotonic()
        self.lock = threading.Lock()  # serve asks from several threads: one recheck (and rebuild) at a time

    @classmethod
    def open(cls, path, record: dict | None = None, top_k: int | None = None, log=None) -> "DocsContext":
        """--docs PATH with an adapter's record: its trained layout, else the default one."""
        from liandan.docs.index import note, open_docs

        log = log or note
        return cls(open_docs(path, log), DocsLayout.from_dict((record or {}).get("docs_layout")), top_k, path, log)

    def current_index(self):
        """The index, rebuilt (as --docs PATH would be at start) once a file of its folder changed, looked at
        every RECHECK_SECONDS at most. A rebuild that fails (the folder emptied mid-edit) keeps the last index."""
        from liandan.docs.index import open_docs

        if self.path is None or time.monotonic() - self.checked < RECHECK_SECONDS:
            return self.index
        with self.lock:
            if time.monotonic() - self.checked >= RECHECK_SECONDS:
                try:
                    if not self.index.is_current():
                        self.index = open_docs(self.path, self.log)
                except (LiandanError, OSError) as exc:  # OSError: a file removed while it was being read
                    self.log(f"Note: --docs {self.path} changed but cannot be indexed ({exc}); "
                             "answering from the index as it was.")
                finally:
                    self.checked = time.monotonic()
        return self.index

    def apply(self, messages: list[dict]) -> tuple[list[dict], list[dict]]:
        """Messages with the last user turn's retrieved chunks laid in (see DocsLayout.place), and the sources used."""
        last = last_turn(messages, "user")
        if last is None:
            return list(messages), []
        hits = self.current_index().search(messages[last].get("content") or "", self.top_k)
        return self.layout.place(messages, [h.chunk for h in hits]), sources_of(hits)

    def apply_to_file(self, data) -> None:
        """Ask every question of a DataFile (chat-style formats) with its retrieved chunks, in place."""
        for example in data.examples:
            if example.messages is not None:
                last = last_turn(example.messages, "assistant")
                asked, _ = self.apply(example.messages[:last] if last is not None else example.messages)
                example.messages = asked + (example.messages[last:] if last is not None else [])
