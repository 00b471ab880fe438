"""`liandan data from-docs`: Markdown, plain-text and HTML files → `text` JSONL chunks that fit the context.

Documents are cut at headings first, then at paragraphs, and paragraphs are packed into chunks of
at most --chunk-tokens tokens (counted with the model's tokenizer). Each chunk starts with its
heading path, so a chunk read alone still says what it is about, and keeps its source file and
section as metadata. A paragraph longer than a chunk is cut at line breaks, then sentence ends, then
spaces (a hard cut where there are none), with --overlap tokens repeated between pieces. Cuts keep
the text as it was: "2.5 bar" and "example.com" are not sentence ends, and no space is added.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

from liandan.errors import LiandanError

CHUNK_TOKENS, OVERLAP_TOKENS = 512, 64  # `data from-docs` defaults, on the command line and in the studio
MIN_CHUNK_TOKENS = 16  # the least text a chunk holds besides its heading line
SUFFIXES = {".md": "markdown", ".markdown": "markdown", ".txt": "text", ".html": "html", ".htm": "html"}
_KINDS = ", ".join(list(SUFFIXES)[:-1]) + f" or {list(SUFFIXES)[-1]}"  # for messages: ".md, …, .html or .htm"
_HEADING = re.compile(r"^(#{1,6})\s+(.*\S)\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
# Where an over-long paragraph may be cut, coarsest first; the capture group keeps each separator.
_CUTS = (re.compile(r"(\n)"),
         re.compile(r"((?<=[.!?;])\s+|(?<=[。！？；])\s*)"),  # "2.5" and "example.com" have no space after the dot
         re.compile(r"(\s+)"))
# Never descended into: package and cache folders, and (see document_files) every hidden folder: version
# control (.git), virtual environments named .venv, editor settings (.vscode, .idea).
_SKIPPED_DIRS = {"node_modules", "__pycache__", "site-packages"}


class _HtmlToMarkdown(HTMLParser):
    """Just enough HTML → Markdown: headings, paragraphs and list items; scripts, styles, menus and <head> dropped."""

    BLOCKS = {"p", "div", "li", "br", "tr", "section", "article", "pre", "blockquote", "table"}
    # Not the page's text: code, menus, and <head> (its <title> would be a tiny chunk of its own that BM25's
    # length normalisation ranks high for the product's name).
    SKIPPED = {"script", "style", "nav", "footer", "aside", "head"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag == "body":  # a <head> left open (HTML lets it be) must not swallow the page
            self.skip = 0
        elif tag in self.SKIPPED:
            self.skip += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self.parts.append("\n\n" + "#" * int(tag[1]) + " ")
        elif tag in self.BLOCKS:
            self.parts.append("\n\n" if tag != "li" else "\n- ")

    def handle_endtag(self, tag):
        if tag in self.SKIPPED:
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
    except OSError as exc:
        raise LiandanError(f"{path}: cannot be read ({exc.strerror})") from None
    if "\x00" in text:
        raise LiandanError(f"{path}: a binary file (it contains NUL bytes), not text")
    if SUFFIXES.get(path.suffix.lower()) == "html":
        parser = _HtmlToMarkdown()
        parser.feed(text)
        text = "".join(parser.parts)
    return text.replace("\r\n", "\n")


def sections(text: str):
    """Yield (heading path, [paragraphs]) for a Markdown-ish text. A fenced code block is one paragraph,
    and its `# comment` lines are not headings."""
    path: list[tuple[int, str]] = []
    paragraphs: list[str] = []
    current: list[str] = []
    fence = None  # the ``` or ~~~ that opened the code block we are in

    def flush_paragraph():
        if current:
            paragraph = "\n".join(current).strip()
            if paragraph:
                paragraphs.append(paragraph)
            current.clear()

    for line in text.split("\n"):
        opened = _FENCE.match(line)
        if fence or opened:
            current.append(line)
            if opened and fence is None:
                fence = opened.group(1)
            elif opened and opened.group(1) == fence:
                fence = None
            continue
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


def _units(text: str, limit: int, count, level: int = 0) -> list[str]:
    """`text` in consecutive pieces of at most `limit`, cut at the coarsest boundary that is enough
    (_CUTS), each piece keeping the separator after it, so that "".join(pieces) == text."""
    if count(text) <= limit:
        return [text]
    if level == len(_CUTS):
        return _hard_cut(text, limit, count)
    parts = _CUTS[level].split(text)
    units = [u for u in ("".join(parts[i:i + 2]) for i in range(0, len(parts), 2)) if u]
    return [piece for unit in units for piece in _units(unit, limit, count, level + 1)]


def _hard_cut(text: str, limit: int, count) -> list[str]:
    """Cut by characters: for a run with no space or sentence end (Chinese without 。, a long URL)."""
    pieces = []
    while text:
        n = len(text)
        while n > 1 and count(text[:n]) > limit:
            n = max(1, min(n - 1, n * limit // count(text[:n])))
        pieces.append(text[:n])
        text = text[n:]
    return pieces


def _pieces(paragraph: str, limit: int, overlap: int, count) -> list[str]:
    """Cut an over-long paragraph into pieces of at most `limit`, each starting with ~overlap of the last."""
    out, current = [], []
    for unit in _units(paragraph, limit, count):
        if current and count("".join(current + [unit])) > limit:
            out.append("".join(current).strip())
            kept = []
            while current and count("".join(current[-1:] + kept)) <= overlap:
                kept = current[-1:] + kept
                current = current[:-1]
            while kept and count("".join(kept + [unit])) > limit:  # the overlap must leave room for the new unit
                kept = kept[1:]
            current = kept
        current.append(unit)
    if "".join(current).strip():
        out.append("".join(current).strip())
    return out


def _header(heads: list[str], count, chunk_tokens: int) -> str:
    """The heading line each chunk starts with: the whole path, or only the last heading (or none) when a path
    that long would leave a chunk fewer than MIN_CHUNK_TOKENS of text (its section is still recorded in full)."""
    for title in (" > ".join(heads), heads[-1] if heads else ""):
        header = f"# {title}\n\n" if title else ""
        if chunk_tokens - count(header) >= MIN_CHUNK_TOKENS:
            return header
    return ""


def chunk_document(text: str, count, chunk_tokens: int, overlap: int) -> list[tuple[str, str]]:
    """(section title, chunk text) pairs; each chunk ≤ chunk_tokens tokens including its heading line."""
    chunks = []
    for heads, paragraphs in sections(text):
        title = " > ".join(heads)
        header = _header(heads, count, chunk_tokens)
        budget = max(chunk_tokens - count(header), MIN_CHUNK_TOKENS)
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
    """The documents under a directory (recursively, sorted; hidden and package folders skipped), or the one file given."""
    source = Path(source)
    if not source.exists():
        raise LiandanError(f"{source}: no such file or directory")
    if source.is_file():
        if source.suffix.lower() not in SUFFIXES:
            raise LiandanError(f"{source}: not a {_KINDS} file")
        return [source]
    files = sorted(p for p in source.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file()
                   and not any(d.startswith(".") or d in _SKIPPED_DIRS for d in p.relative_to(source).parts[:-1]))
    if not files:
        raise LiandanError(f"{source}: no {_KINDS} files")
    return files


def document_name(path: Path, source: Path) -> str:
    """How a document is named in chunks, indexes and fingerprints: its path under the folder, or its file name."""
    return str(path.relative_to(source)) if source.is_dir() else path.name


def readable_documents(source: Path, files: list[Path], log=print) -> list[tuple[str, str]]:
    """(name, text) of each file that reads as text; the others (not UTF-8, binary, unreadable) are skipped,
    counted in one note."""
    texts, skipped = [], []
    for path in files:
        try:
            texts.append((document_name(path, source), read_document(path)))
        except LiandanError as exc:
            skipped.append(str(exc))
    if skipped:
        log(f"Skipped {len(skipped)} file(s) that are not readable UTF-8 text (first: {skipped[0]})")
    return texts


def check_chunking(chunk_tokens: int, overlap: int) -> None:
    """--chunk-tokens and --overlap, checked before a tokenizer loads."""
    if chunk_tokens < MIN_CHUNK_TOKENS:
        raise LiandanError(f"--chunk-tokens must be at least {MIN_CHUNK_TOKENS}, got {chunk_tokens}")
    if not 0 <= overlap < chunk_tokens:
        raise LiandanError(f"--overlap {overlap} must be 0 or more and smaller than --chunk-tokens {chunk_tokens}")


def from_docs(source: Path, out: Path, tokenizer, chunk_tokens: int, overlap: int, log=print,
              overwrite: bool = False) -> int:
    from liandan.atomic import check_output
    from liandan.data.prepare import write_jsonl
    from liandan.docs.qa import LAYOUT_FILE

    source = Path(source)
    files = document_files(source)
    check_chunking(chunk_tokens, overlap)
    check_output(out / "train.jsonl", "--out", [("the documents", source)], overwrite)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    texts = readable_documents(source, files, log)
    records = [{"text": chunk, "source": name, "section": title}
               for name, text in texts for title, chunk in chunk_document(text, count, chunk_tokens, overlap)]
    if not records:
        raise LiandanError(f"{source}: no text in {len(files)} document file(s)")
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", records)
    if (out / LAYOUT_FILE).exists():  # left by an earlier --questions run: plain text has no docs layout
        (out / LAYOUT_FILE).unlink()
    log(f"Wrote {out / 'train.jsonl'}: {len(records)} chunk(s) of at most {chunk_tokens} tokens from "
        f"{len(texts)} file(s)")
    return len(records)
