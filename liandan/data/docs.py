"""`liandan data from-docs`: Markdown, plain-text and HTML files → `text` JSONL chunks that fit the context.

Documents are cut at headings first, then at paragraphs, and paragraphs are packed into chunks of
at most --chunk-tokens tokens (counted with the model's tokenizer). Each chunk starts with its
heading path, so a chunk read alone still says what it is about, and keeps its source file and
section as metadata. A paragraph longer than a chunk is cut at sentence ends, with --overlap
tokens repeated between pieces.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

from liandan.errors import LiandanError

SUFFIXES = {".md": "markdown", ".markdown": "markdown", ".txt": "text", ".html": "html", ".htm": "html"}
_HEADING = re.compile(r"^(#{1,6})\s+(.*\S)\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?。！？；;])\s*")


class _HtmlToMarkdown(HTMLParser):
    """Just enough HTML → Markdown: headings, paragraphs and list items; scripts and styles dropped."""

    BLOCKS = {"p", "div", "li", "br", "tr", "section", "article", "pre", "blockquote", "table"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "nav", "footer"):
            self.skip += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self.parts.append("\n\n" + "#" * int(tag[1]) + " ")
        elif tag in self.BLOCKS:
            self.parts.append("\n\n" if tag != "li" else "\n- ")

    def handle_endtag(self, tag):
        if tag in ("script", "style", "nav", "footer"):
            self.skip = max(0, self.skip - 1)
        elif re.fullmatch(r"h[1-6]", tag) or tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(re.sub(r"[ \t\r\n]+", " ", data))


def read_document(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LiandanError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    if "\x00" in text:
        raise LiandanError(f"{path}: a binary file (it contains NUL bytes), not text")
    if SUFFIXES.get(path.suffix.lower()) == "html":
        parser = _HtmlToMarkdown()
        parser.feed(text)
        text = "".join(parser.parts)
    return text.replace("\r\n", "\n")


def sections(text: str):
    """Yield (heading path, [paragraphs]) for a Markdown-ish text."""
    path: list[tuple[int, str]] = []
    paragraphs: list[str] = []
    current: list[str] = []

    def flush_paragraph():
        if current:
            paragraph = "\n".join(current).strip()
            if paragraph:
                paragraphs.append(paragraph)
            current.clear()

    for line in text.split("\n"):
        match = _HEADING.match(line)
        if match:
            flush_paragraph()
            if paragraphs:
                yield [h for _, h in path], list(paragraphs)
                paragraphs.clear()
            level = len(match.group(1))
            path = [(lv, h) for lv, h in path if lv < level] + [(level, match.group(2))]
        elif not line.strip():
            flush_paragraph()
        else:
            current.append(line)
    flush_paragraph()
    if paragraphs:
        yield [h for _, h in path], paragraphs


def _pieces(paragraph: str, limit: int, overlap: int, count) -> list[str]:
    """Cut an over-long paragraph at sentence ends (then words), repeating ~overlap tokens."""
    units = [u for u in _SENTENCE_END.split(paragraph) if u.strip()]
    if len(units) == 1:
        units = paragraph.split(" ")
    out, current = [], []
    for unit in units:
        if current and count(" ".join(current + [unit])) > limit:
            out.append(" ".join(current))
            kept = []
            while current and count(" ".join(kept + current[-1:])) <= overlap:
                kept = current[-1:] + kept
                current = current[:-1]
            current = kept
        current.append(unit)
    if current:
        out.append(" ".join(current))
    return out


def chunk_document(text: str, count, chunk_tokens: int, overlap: int) -> list[tuple[str, str]]:
    """(section title, chunk text) pairs; each chunk ≤ chunk_tokens tokens including its heading line."""
    chunks = []
    for heads, paragraphs in sections(text):
        title = " > ".join(heads)
        header = f"# {title}\n\n" if title else ""
        budget = max(chunk_tokens - count(header), 16)
        current: list[str] = []
        for paragraph in paragraphs:
            parts = [paragraph] if count(paragraph) <= budget else _pieces(paragraph, budget, overlap, count)
            for part in parts:
                if current and count("\n\n".join(current + [part])) > budget:
                    chunks.append((title, header + "\n\n".join(current)))
                    current = []
                current.append(part)
        if current:
            chunks.append((title, header + "\n\n".join(current)))
    return chunks


def document_files(source: Path) -> list[Path]:
    """The documents under a directory (recursively, sorted), or the one file given."""
    source = Path(source)
    if not source.exists():
        raise LiandanError(f"{source}: no such file or directory")
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
    if not files:
        raise LiandanError(f"{source}: no .md, .markdown, .txt, .html or .htm files")
    return files


def from_docs(source: Path, out: Path, tokenizer, chunk_tokens: int, overlap: int, log=print) -> int:
    from liandan.data.prepare import write_jsonl

    source = Path(source)
    files = document_files(source)
    if overlap >= chunk_tokens:
        raise LiandanError(f"--overlap {overlap} must be smaller than --chunk-tokens {chunk_tokens}")

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    records = []
    for path in files:
        relative = str(path.relative_to(source)) if source.is_dir() else path.name
        for title, text in chunk_document(read_document(path), count, chunk_tokens, overlap):
            records.append({"text": text, "source": relative, "section": title})
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", records)
    log(f"Wrote {out / 'train.jsonl'}: {len(records)} chunk(s) of at most {chunk_tokens} tokens from {len(files)} file(s)")
    return len(records)
