"""Ollama Modelfile: the GGUF, a TEMPLATE that renders prompts exactly as in training, and its stop tokens.

Chat templates are Jinja; Ollama's are Go text/template. Rather than translating Jinja (a programming
language) we infer the template's wrapper strings from probe renderings (data/template.py),
check that the layout reproduces the Jinja rendering of every probe conversation, and generate the Go
template from it; a template the layout cannot describe is refused in one line instead of written
wrong. The test suite runs the generated templates through Go's own text/template.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from liandan.data.template import Wrappers
from liandan.errors import LiandanError


def go_literal(text: str) -> str:
    """Literal text for a Go template: as is, or as a quoted action when it holds braces or quotes
    (template syntax, or a triple quote that would end the Modelfile's TEMPLATE \"\"\" block)."""
    if not any(c in text for c in '{}"'):
        return text
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"  # JSON string escapes are valid Go string escapes


def go_template(wrappers: Wrappers) -> str:
    """The wrappers as a Go text/template over Ollama's .System and .Messages (system turns in .Messages are
    skipped: Ollama gathers them into .System). Mirrors Wrappers.render, which the probes check."""
    lit = go_literal
    before, after = (lit(x) for x in wrappers.system_wrap)
    if wrappers.system == "start":
        out = f"{{{{ if .System }}}}{before}{{{{ .System }}}}{after}{{{{ else }}}}{lit(wrappers.head)}{{{{ end }}}}"
    else:
        out = lit(wrappers.head)
    inject = ""
    if wrappers.system == "last-user":
        out += ('{{ $lastuser := -1 }}{{ range $j, $m := .Messages }}{{ if eq $m.Role "user" }}'
                "{{ $lastuser = $j }}{{ end }}{{ end }}")
        inject = f"{{{{ if and $.System (eq $i $lastuser) }}}}{before}{{{{ $.System }}}}{after}{{{{ end }}}}"
    return out + (
        "{{ $started := false }}{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        f'{{{{ if eq $m.Role "user" }}}}{{{{ if $started }}}}{lit(wrappers.reply_close)}{{{{ end }}}}{inject}'
        f"{{{{ $m.Content }}}}{{{{ if $last }}}}{lit(wrappers.generation)}{{{{ end }}}}{{{{ $started = true }}}}"
        f'{{{{ else if eq $m.Role "assistant" }}}}{lit(wrappers.reply_open)}{{{{ $m.Content }}}}'
        "{{ $started = true }}"
        "{{ end }}{{ end }}"
    )


def template_wrappers(rendering, tokenizer, bos: str = "") -> Wrappers:
    """The training template's wrappers, checked against Jinja on the probes; one-line refusal otherwise."""
    from liandan.data.render import template_model

    try:
        return template_model(tokenizer, rendering.chat_template, bos).wrappers
    except LiandanError as exc:
        raise LiandanError(f"cannot write an Ollama TEMPLATE: {exc}; "
                           "write the Modelfile TEMPLATE by hand") from None


def adds_bos(model_dir: Path) -> bool:
    """Whether llama.cpp adds BOS itself for this model (as the GGUF will say): then the TEMPLATE must not."""
    import gguf

    return bool(gguf.SpecialVocab(model_dir, load_merges=False).add_special_token.get("bos"))


# ---------------------------------------------------------------- Modelfile
def modelfile(gguf_name: str, wrappers: Wrappers, system: str | None, stops: list[str], num_ctx: int) -> str:
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template(wrappers)}"""']
    if system:
        if '"""' in system:
            raise LiandanError('the system prompt contains """, which a Modelfile SYSTEM block cannot hold')
        lines.append(f'SYSTEM """{system}"""')
    for stop in stops:
        lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    # Low temperature: fine-tuned answers are meant to be reproduced, not paraphrased.
    lines += ["PARAMETER temperature 0.3", f"PARAMETER num_ctx {num_ctx}"]
    return "\n".join(lines) + "\n"


def describe(wrappers: Wrappers) -> str:
    system = {"start": "system prompt at the start", "last-user": "system prompt in the last user turn",
              "none": "no system prompt"}[wrappers.system]
    if wrappers.generation == wrappers.reply_open:
        return system
    return f"{system}; generation prompt {wrappers.generation!r}, history answers after {wrappers.reply_open!r}"


def check_ollama_name(name: str) -> None:
    """Ollama's model names: name[:tag], of ASCII letters, digits, '-', '_' and '.', starting with a letter or digit."""
    if not (name.isascii() and name[:1].isalnum() and name.replace("-", "").replace("_", "").replace(".", "").replace(":", "", 1).isalnum()):
        raise LiandanError(f"--name {name!r}: use name or name:tag, of ASCII letters, digits, '-', '_' and '.', starting "
                           "with a letter or digit")


def file_stem(name: str) -> str:
    """The model's files are named after it, but ':' (before a tag) is not allowed in Windows file names."""
    return name.replace(":", "-")


def gguf_file_name(name: str) -> str:
    return f"{file_stem(name)}.gguf"


def default_folder(name: str) -> str:
    """Where `export ollama` writes without --out (the studio too)."""
    return f"{file_stem(name)}-ollama"


def export_ollama(model_dir: Path, name: str, out_dir: Path, system: str | None = None, outtype: str = "q8_0",
                  log=print, chat_template: str | None = None) -> Path:
    from transformers import AutoTokenizer

    from liandan.adapters import read_record
    from liandan.atomic import atomic_write_text
    from liandan.data.render import rendering_of
    from liandan.engines import LLAMA_DEFAULT_CTX
    from liandan.export.gguf import export_gguf, read_config

    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    record = read_record(model_dir, required=False)
    rendering = rendering_of(record, tokenizer, chat_template=chat_template)
    wrappers = template_wrappers(rendering, tokenizer, tokenizer.bos_token if adds_bos(model_dir) else "")
    system = system if system is not None else rendering.system_prompt
    if system and wrappers.system == "none":
        raise LiandanError("--system: this chat template has no system role (it refuses system messages)")
    stops = list(dict.fromkeys(rendering.stop_tokens + ([tokenizer.eos_token] if tokenizer.eos_token else [])))
    gguf_name = gguf_file_name(name)
    num_ctx = min(int(read_config(model_dir).get("max_position_embeddings", LLAMA_DEFAULT_CTX)), LLAMA_DEFAULT_CTX)
    text = modelfile(gguf_name, wrappers, system, stops, num_ctx)  # first: its errors must not cost an export
    out_dir.mkdir(parents=True, exist_ok=True)
    export_gguf(model_dir, out_dir / gguf_name, outtype, rendering.chat_template, rendering.stop_tokens, name, log)
    path = out_dir / "Modelfile"
    atomic_write_text(path, text)
    log(f"Wrote {path} (TEMPLATE checked against the chat template: {describe(wrappers)}; stop: {', '.join(stops)})")
    command = ["ollama", "create", name, "-f", str(path)]
    if shutil.which("ollama"):
        log("Running: " + " ".join(command))
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            said = (result.stderr or result.stdout).strip().splitlines()
            raise LiandanError(f"ollama create failed: {said[-1] if said else f'exit status {result.returncode}'}")
        log(f"Done: ollama run {name}")
    else:
        log("Ollama is not on PATH; to import the model run:\n  " + " ".join(command) + f"\n  ollama run {name}")
    return path
