"""The Data tab's steps: uploads, the `liandan data check` report, rendered examples, prepare, from-docs.

Uploads are checked where they were staged (a temporary directory); only data without errors is copied
into the studio's workspace, so a bad file leaves nothing behind.
"""

from __future__ import annotations

import functools
import html
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from liandan.data.formats import SPLITS, TABLE_KINDS, TABLE_SUFFIXES
from liandan.errors import LiandanError



@functools.lru_cache(maxsize=4)
def tokenizer_for(model: str | None):
    from transformers import AutoTokenizer

    from liandan.models import resolve_model

    return AutoTokenizer.from_pretrained(str(resolve_model(model)))


def encoder_for(model: str | None, data: Path | None = None):
    """The training renderer (chat template + stop token + prompt mask) of a model's tokenizer, for `data` (a
    folder or train file) as `lora` would pick it: tools data takes a tokenizer's `tool_use` template."""
    from liandan.data.render import Encoder, make_rendering, trains_tools

    tokenizer = tokenizer_for(model)
    return Encoder(tokenizer, make_rendering(tokenizer, tools=data is not None and trains_tools(tokenizer, Path(data))))


@dataclass
class CheckView:
    lines: list[str]
    errors: int
    warnings: int
    formats: dict[str, str | None] = field(default_factory=dict)  # file name -> format

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def check_data(target: Path, model: str | None = None, max_seq_length: int = 2048, hide: str | None = None) -> CheckView:
    """`liandan data check` on a directory or file; `hide` (a staging directory) is cut from the paths shown."""
    from liandan.data.check import check, render_report
    from liandan.data.formats import FieldNames

    encoder = encoder_for(model, target)
    result = check(Path(target), encoder, max_seq_length, FieldNames())
    lines, errors, warnings = render_report(result, encoder)
    if hide:
        lines = [line.replace(f"{hide}/", "") for line in lines]
    return CheckView(lines, errors, warnings, {r.path.name: r.format for r in result["files"]})


def stage(uploaded: list[str]) -> Path:
    """Copy uploaded files, under their own names, into a fresh temporary directory."""
    staging = Path(tempfile.mkdtemp(prefix="liandan-upload-"))
    for path in uploaded:
        path = Path(path)
        if path.suffix.lower() not in TABLE_SUFFIXES:
            shutil.rmtree(staging)
            raise LiandanError(f"{path.name}: unknown file type; upload {TABLE_KINDS}")
        shutil.copyfile(path, staging / path.name)
    return staging


def is_split_dir(directory: Path) -> bool:
    """Files named train/valid/test.jsonl are training data as they are; anything else needs `prepare`."""
    names = {p.name for p in Path(directory).iterdir()}
    return "train.jsonl" in names and names <= {f"{s}.jsonl" for s in SPLITS}


def validate_tables(directory: Path) -> list[str]:
    """Read every row of each table the way `prepare` will; the first error of each file, as file:line."""
    from liandan.data.prepare import read_rows

    errors = []
    for path in sorted(Path(directory).iterdir()):
        try:
            for _ in read_rows(path):
                pass
        except LiandanError as exc:
            errors.append(str(exc).replace(f"{directory}/", ""))
    return errors


def require_new_data_dir(out: Path) -> None:
    """The page never replaces a data folder: runs trained on it would then be tested on other data."""
    if Path(out).exists() and any(Path(out).iterdir()):
        raise LiandanError(f"{out} already holds data; choose another data name")


def save_split_dir(staging: Path, out: Path) -> Path:
    """Copy checked train/valid/test.jsonl into the workspace (the whole directory appears at once)."""
    from liandan.atomic import atomic_dir

    require_new_data_dir(out)
    with atomic_dir(out) as tmp:
        for path in staging.iterdir():
            shutil.copyfile(path, tmp / path.name)
    return out


def prepare_tables(inputs: list[Path], out: Path, fmt: str, valid_ratio: float, test_ratio: float, seed: int,
                   **fields) -> str:
    """`liandan data prepare`; returns what it printed."""
    from liandan.data.prepare import FIELDS_OF, prepare

    said = []
    # The page shows every field box whatever the format: the ones this format does not use are not the user's
    # mistake, as a flag given to the CLI would be.
    fields = {k: (v.strip() if v else None) or None for k, v in fields.items() if k in FIELDS_OF[fmt]}
    prepare([Path(p) for p in inputs], Path(out), fmt, valid_ratio, test_ratio, seed, log=said.append, **fields)
    return "\n".join(said)


def docs_to_data(source: Path, out: Path, model: str | None, chunk_tokens: int, overlap: int) -> str:
    """`liandan data from-docs`; returns what it printed."""
    from liandan.data.docs import check_chunking, from_docs

    if not Path(source).exists():
        raise LiandanError(f"{source}: no such file or directory")
    check_chunking(chunk_tokens, overlap)
    said = []
    from_docs(Path(source), Path(out), tokenizer_for(model), chunk_tokens, overlap, log=said.append)
    return "\n".join(said)


def rendered_examples(path: Path, model: str | None = None, count: int = 3) -> str:
    """HTML of the first examples as the model is trained on them: the trained tokens highlighted."""
    from liandan.data.formats import scan_jsonl
    from liandan.data.render import IGNORE

    encoder = encoder_for(model, path)
    blocks = []
    for fmt, example in scan_jsonl(path):
        if fmt is None:
            continue  # the check report lists the bad lines
        where = f'<div class="where">{html.escape(path.name)}:{example.line}</div>'
        try:
            encoded = encoder.encode(example)
        except LiandanError as exc:  # this example cannot be rendered: say so in its place, show the others
            blocks.append(f'<div class="example">{where}<pre>✗ {html.escape(str(exc))}</pre></div>')
            continue
        pieces, start = [], 0
        for i in range(1, len(encoded.input_ids) + 1):
            if i == len(encoded.input_ids) or (encoded.labels[i] == IGNORE) != (encoded.labels[start] == IGNORE):
                text = html.escape(encoder.tokenizer.decode(encoded.input_ids[start:i], skip_special_tokens=False))
                pieces.append(text if encoded.labels[start] == IGNORE else f'<mark class="trained">{text}</mark>')
                start = i
        blocks.append(f'<div class="example">{where}<pre>{"".join(pieces)}</pre></div>')
        if len(blocks) == count:
            break
    return "\n".join(blocks)
