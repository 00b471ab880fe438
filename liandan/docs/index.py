"""A BM25 index over a folder of documents: build, save, load, cache, search.

Documents are read and cut by `liandan.data.docs` (the `from-docs` readers and chunker), scored by
`bm25s` (sparse-matrix BM25), with `jieba` word segmentation for Chinese and Snowball stemming for
other scripts (so "charging" finds "charge"). The index is model-independent: chunk sizes are
counted in words, CJK characters and punctuation marks, not in one model's tokens, so one index serves every model.

On disk an index is a directory: `liandan-index.json` (what was indexed: the source folder, each
file's size and mtime, the chunking settings), `chunks.jsonl` (text, source, section) and `bm25/`
(bm25s's own arrays: .npy and JSON, no pickle).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from liandan.atomic import atomic_dir
from liandan.docs.prompt import DEFAULT_TOP_K
from liandan.errors import LiandanError

MANIFEST = "liandan-index.json"
FORMAT = 1
CHUNK_WORDS = 200  # small chunks: three of them fit a small model's attention, and each stays on one topic
OVERLAP_WORDS = 24
INSTALL = "pip install 'liandan[docs]'"

_CJK_RUN = re.compile(r"([\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+)")
_WORD = re.compile(r"[^\W_]+")
_COUNTED = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+|[^\w\s]")
# Question words carry no topic; BM25's IDF would weigh them down anyway, but in a small handbook
# "what" may be rare enough to outscore a real term.
_STOP_ZH = {"的", "了", "是", "吗", "呢", "什么", "多少", "怎么", "怎样", "如何", "哪个", "哪些", "哪", "几", "在", "和",
            "有", "要", "会", "可以", "我", "你", "我们", "请问", "？", "一个"}


def _require():
    try:
        import bm25s  # noqa: F401
        import jieba  # noqa: F401
        import Stemmer  # noqa: F401
    except ImportError as exc:
        raise LiandanError(f"--docs needs bm25s, jieba and PyStemmer ({exc.name} is missing): {INSTALL}") from None


def count_words(text: str) -> int:
    """Chunk size unit: words, CJK characters and punctuation marks (about one model token each)."""
    return len(_COUNTED.findall(text))


class Analyzer:
    """Text → index terms: NFKC, lower case, jieba for Chinese runs, stemmed words elsewhere, stop words out."""

    def __init__(self):
        _require()
        import jieba
        import Stemmer
        from bm25s.stopwords import STOPWORDS_EN

        jieba.setLogLevel(60)  # its "Building prefix dict" chatter goes to stderr otherwise
        self.jieba = jieba
        self.stemmer = Stemmer.Stemmer("english")
        self.stop = set(STOPWORDS_EN) | _STOP_ZH

    def terms(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFKC", text).lower()
        out: list[str] = []
        for i, piece in enumerate(_CJK_RUN.split(text)):
            if i % 2:  # a run of Chinese characters
                out += [w for w in self.jieba.cut_for_search(piece) if w.strip() and w not in self.stop]
            else:
                words = [w for w in _WORD.findall(piece) if w not in self.stop]
                out += self.stemmer.stemWords(words)
        return out


@dataclass
class Chunk:
    text: str
    source: str
    section: str

    def to_dict(self) -> dict:
        return {"text": self.text, "source": self.source, "section": self.section}


@dataclass
class Hit:
    chunk: Chunk
    score: float
    rank: int


def read_chunks(source: Path, log=print) -> tuple[list[Chunk], list[list], int]:
    """Chunks of every readable document under `source`, the files' fingerprints, and how many were skipped."""
    from liandan.data.docs import chunk_document, document_files, readable_documents

    source = Path(source)
    files = document_files(source)
    texts = readable_documents(source, files, log)
    chunks = [Chunk(body, name, title)
              for name, text in texts for title, body in chunk_document(text, count_words, CHUNK_WORDS, OVERLAP_WORDS)]
    skipped = len(files) - len(texts)
    if not chunks:
        raise LiandanError(f"{source}: no readable text in {len(files)} document file(s)"
                           + (f" ({skipped} not readable UTF-8 text)" if skipped else ""))
    return chunks, fingerprints_of(source, files), skipped


def fingerprints_of(source: Path, files: list[Path] | None = None) -> list[list]:
    """[name, size, mtime] of each document file (`files`, else those under `source`): what makes an index current."""
    from liandan.data.docs import document_files, document_name

    source = Path(source)
    out = []
    for path in files if files is not None else document_files(source):
        stat = path.stat()
        out.append([document_name(path, source), stat.st_size, stat.st_mtime_ns])
    return out


class DocsIndex:
    """Chunks + a bm25s retriever + the analyzer that made its terms."""

    def __init__(self, chunks: list[Chunk], retriever, manifest: dict):
        self.chunks = chunks
        self.retriever = retriever
        self.manifest = manifest
        self.analyzer = Analyzer()
        self.vocab = retriever.vocab_dict

    @classmethod
    def build(cls, source: Path, log=print) -> "DocsIndex":
        import bm25s

        source = Path(source).resolve()
        chunks, fingerprints, skipped = read_chunks(source, log)
        analyzer = Analyzer()
        corpus = [analyzer.terms(c.text) for c in chunks]
        retriever = bm25s.BM25()
        retriever.index(corpus, show_progress=False)
        manifest = {"format": FORMAT, "source": str(source), "files": fingerprints, "skipped": skipped,
                    "chunks": len(chunks), "chunk_words": CHUNK_WORDS, "overlap_words": OVERLAP_WORDS}
        return cls(chunks, retriever, manifest)

    def search(self, query: str, k: int = DEFAULT_TOP_K) -> list[Hit]:
        terms = [t for t in self.analyzer.terms(query) if t in self.vocab]
        if not terms or k <= 0:
            return []
        # A few more than k: a chunk whose text an earlier hit already shows (the same manual as .md and .html, a
        # copied file) is skipped, so that it does not take a place of the k.
        ids, scores = self.retriever.retrieve([terms], k=min(2 * k, len(self.chunks)), show_progress=False,
                                              n_threads=1)
        hits, shown = [], set()
        for i, score in zip(ids[0], scores[0]):
            text = " ".join(self.chunks[int(i)].text.split())
            if score > 0 and text not in shown and len(hits) < k:
                shown.add(text)
                hits.append(Hit(self.chunks[int(i)], float(score), len(hits) + 1))
        return hits

    def save(self, directory: Path) -> None:
        with atomic_dir(directory) as tmp:
            self.retriever.save(str(tmp / "bm25"))
            with open(tmp / "chunks.jsonl", "w", encoding="utf-8") as f:
                for chunk in self.chunks:
                    f.write(json.dumps(chunk.to_dict(), ensure_ascii=False) + "\n")
            (tmp / MANIFEST).write_text(json.dumps(self.manifest, indent=2, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> "DocsIndex":
        _require()
        import bm25s

        directory = Path(directory)
        manifest = read_manifest(directory)
        try:
            with open(directory / "chunks.jsonl", encoding="utf-8") as f:
                chunks = [Chunk(**json.loads(line)) for line in f if line.strip()]
            retriever = bm25s.BM25.load(str(directory / "bm25"), mmap=False, allow_pickle=False,
                                        show_progress=False)
        except (OSError, ValueError, TypeError) as exc:
            raise LiandanError(f"{directory}: a damaged index ({str(exc).splitlines()[0]}); rebuild it with "
                               f"`liandan docs index {manifest.get('source', 'DIR')} --out {directory}`") from None
        if len(chunks) != manifest.get("chunks"):
            raise LiandanError(f"{directory}: chunks.jsonl has {len(chunks)} chunks, the manifest {manifest.get('chunks')}")
        return cls(chunks, retriever, manifest)

    def is_current(self) -> bool:
        return manifest_is_current(self.manifest)


def manifest_is_current(manifest: dict) -> bool:
    """True when the indexed folder is gone (the index is all there is) or its files are unchanged. From the
    manifest alone: a stale index is rebuilt without loading it first."""
    source = Path(manifest["source"])
    if not source.exists():
        return True
    try:
        return fingerprints_of(source) == manifest["files"]
    except (LiandanError, OSError):  # OSError: a file removed between listing and stat
        return False


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LiandanError(f"{directory}: not a liandan docs index (no {MANIFEST})") from None
    except json.JSONDecodeError as exc:
        raise LiandanError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if manifest.get("format") != FORMAT or manifest.get("chunk_words") != CHUNK_WORDS:
        raise LiandanError(f"{directory}: an index from another liandan version; rebuild it with "
                           f"`liandan docs index {manifest.get('source', 'DIR')} --out {directory} --overwrite`")
    return manifest


def is_index(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def cache_dir_for(source: Path) -> Path:
    from liandan.models import cache_root

    key = hashlib.sha256(str(Path(source).resolve()).encode()).hexdigest()[:16]
    return cache_root() / "docs-index" / key


def build_index(source: Path, out: Path, overwrite: bool = False, log=print) -> DocsIndex:
    """`liandan docs index DIR --out INDEX`: (re)build, refusing to replace an index of other files."""
    from liandan.atomic import check_creatable

    source, out = Path(source), Path(out)
    if not source.exists():  # also a symlink loop, which resolve() would raise as a RuntimeError
        raise LiandanError(f"{source}: no such file or directory")
    check_creatable(out, "--out")
    if out.exists() and not out.is_dir():
        raise LiandanError(f"--out {out}: a file, not a folder; choose an empty or new folder")
    if out.exists() and any(out.iterdir()):
        if not is_index(out):
            raise LiandanError(f"--out {out}: the folder holds other files; choose an empty or new folder")
        try:
            previous = json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("source")
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous != str(source.resolve()) and not overwrite:
            raise LiandanError(f"--out {out} holds an index of {previous}, not {source}; pass --overwrite or another --out")
    index = DocsIndex.build(source, log)
    index.save(out)
    return index


def note(message: str) -> None:
    """Notes of --docs go to stderr: stdout carries the answer (or --json) of the command that asked."""
    print(message, file=sys.stderr, flush=True)


def open_docs(path: str | Path, log=note) -> DocsIndex:
    """--docs PATH: a saved index (rebuilt if its folder's files changed) or a folder, indexed via the cache."""
    path = Path(path)
    if not path.exists():
        raise LiandanError(f"--docs {path}: no such file or directory")
    if is_index(path):
        manifest = read_manifest(path)
        if manifest_is_current(manifest):
            return DocsIndex.load(path)
        log(f"Note: the files in {manifest['source']} changed since {path} was built; rebuilding it.")
        index = DocsIndex.build(Path(manifest["source"]), log)
        _save_if_possible(index, path, log)
        return index
    cached = cache_dir_for(path)
    if is_index(cached):
        try:
            manifest = read_manifest(cached)
            if manifest["source"] == str(path.resolve()) and manifest_is_current(manifest):
                return DocsIndex.load(cached)
        except LiandanError:
            pass  # an old or damaged cache entry: rebuild it
    index = DocsIndex.build(path, log)
    _save_if_possible(index, cached, log)
    return index


def _save_if_possible(index: DocsIndex, where: Path, log) -> None:
    """A rebuilt index that cannot be written (a read-only folder or cache) still answers; it is rebuilt next time."""
    try:
        index.save(where)
    except OSError as exc:
        log(f"Note: could not save the rebuilt index to {where} ({exc.strerror}); using it unsaved.")
