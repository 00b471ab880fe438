"""Ollama Modelfile: the GGUF, a TEMPLATE that renders prompts exactly as in training, and its stop tokens.

Chat templates are Jinja; Ollama's are Go text/template. Rather than translating Jinja (a
programming language) we describe each family as a table of wrapper strings (the ChatML, Llama 3,
Gemma, Phi-3, Mistral and liandan-plain layouts), pick the family by its markers, and then *check*
it: the table must reproduce the Jinja template's rendering of several probe conversations, else
the export stops with a clear message instead of writing a wrong template. The same table
generates the Go template, and the test suite runs that through Go's own text/template.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from liandan.errors import LiandanError


@dataclass(frozen=True)
class Family:
    name: str
    markers: tuple  # all must occur in the Jinja template
    user: tuple  # (prefix, suffix)
    assistant: tuple  # (prefix, suffix); the suffix ends a finished assistant turn
    system: tuple | None = None  # (prefix, suffix) for a separate system block
    system_in_user: str | None = None  # "first" or "last": the system text goes into that user turn
    system_sep: str = "\n\n"
    bos: str = ""  # written by the template itself; llama.cpp adds it, so the Go template leaves it out


FAMILIES = (
    Family("chatml", ("<|im_start|>",), ("<|im_start|>user\n", "<|im_end|>\n"),
           ("<|im_start|>assistant\n", "<|im_end|>\n"), system=("<|im_start|>system\n", "<|im_end|>\n")),
    Family("llama3", ("<|start_header_id|>",), ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
           ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
           system=("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"), bos="<|begin_of_text|>"),
    Family("gemma", ("<start_of_turn>",), ("<start_of_turn>user\n", "<end_of_turn>\n"),
           ("<start_of_turn>model\n", "<end_of_turn>\n"), system_in_user="first", bos="<bos>"),
    Family("phi3", ("<|user|>", "<|end|>"), ("<|user|>\n", "<|end|>\n"), ("<|assistant|>\n", "<|end|>\n"),
           system=("<|system|>\n", "<|end|>\n")),
    Family("mistral", ("[INST]",), ("[INST] ", " [/INST]"), ("", "</s>"), system_in_user="last", bos="<s>"),
)


def plain_family(eos: str) -> Family:
    """liandan's own layout for models without a chat template (data/render.PLAIN_CHAT_TEMPLATE)."""
    return Family("liandan-plain", (), ("### User:\n", "\n\n"), ("### Assistant:\n", eos + "\n\n"), system=("", "\n\n"))


# ---------------------------------------------------------------- rendering with a family table
def render(family: Family, system: str | None, messages: list[dict], with_bos: bool = False) -> str:
    """What the Go template produces: Ollama passes .System and .Messages (system turns excluded here)."""
    turns = [m for m in messages if m["role"] != "system"]
    users = [i for i, m in enumerate(turns) if m["role"] == "user"]
    out = family.bos if with_bos else ""
    if system and family.system:
        out += family.system[0] + system + family.system[1]
    for i, m in enumerate(turns):
        last = i == len(turns) - 1
        if m["role"] == "user":
            content = m["content"]
            target = users[0] if family.system_in_user == "first" else users[-1] if users else None
            if system and family.system_in_user and i == target:
                content = system + family.system_sep + content
            out += family.user[0] + content + family.user[1]
        elif m["role"] == "assistant":
            out += family.assistant[0] + m["content"] + ("" if last else family.assistant[1])
        if last and m["role"] != "assistant":
            out += family.assistant[0]
    return out


def go_template(family: Family) -> str:
    """The same layout as a Go text/template for Ollama (no trim markers: literal text stays exact)."""
    sys_block = f"{{{{ if .System }}}}{family.system[0]}{{{{ .System }}}}{family.system[1]}{{{{ end }}}}" if family.system else ""
    inject = ""
    if family.system_in_user == "first":
        inject = f"{{{{ if and $.System (eq $i $first) }}}}{{{{ $.System }}}}{family.system_sep}{{{{ end }}}}"
    elif family.system_in_user == "last":
        inject = f"{{{{ if and $.System (eq $i $lastuser) }}}}{{{{ $.System }}}}{family.system_sep}{{{{ end }}}}"
    # $first / $lastuser: indexes of the first and last user turns, found before the main loop.
    find = ""
    if family.system_in_user:
        find = ('{{ $first := -1 }}{{ $lastuser := -1 }}{{ range $j, $m := .Messages }}{{ if eq $m.Role "user" }}'
                '{{ if lt $first 0 }}{{ $first = $j }}{{ end }}{{ $lastuser = $j }}{{ end }}{{ end }}')
    return (
        sys_block + find
        + "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        + f'{{{{ if eq .Role "user" }}}}{family.user[0]}{inject}{{{{ .Content }}}}{family.user[1]}'
        + f'{{{{ else if eq .Role "assistant" }}}}{family.assistant[0]}{{{{ .Content }}}}'
        + f"{{{{ if not $last }}}}{family.assistant[1]}{{{{ end }}}}{{{{ end }}}}"
        + f'{{{{ if and $last (ne .Role "assistant") }}}}{family.assistant[0]}{{{{ end }}}}{{{{ end }}}}'
    )


# ---------------------------------------------------------------- choosing and checking a family
PROBES = (
    [{"role": "user", "content": "Q1"}],
    [{"role": "system", "content": "S1"}, {"role": "user", "content": "Q1"}],
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
    [{"role": "system", "content": "S1"}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
     {"role": "user", "content": "Q2"}],
)


def pick_family(rendering, tokenizer) -> Family:
    template = rendering.chat_template
    if rendering.template_source == "plain":
        return plain_family(rendering.eos_token or tokenizer.eos_token)
    for family in FAMILIES:
        if all(m in template for m in family.markers):
            return family
    raise LiandanError(
        "this chat template is not one liandan can translate for Ollama (known: "
        + ", ".join(f.name for f in FAMILIES) + "); write the Modelfile TEMPLATE by hand"
    )


def default_system(family: Family, jinja) -> str | None:
    """The system prompt a template inserts when the conversation has none (SmolLM2, Qwen2.5 do)."""
    text = _strip_bos(jinja([{"role": "user", "content": "Q1"}]), family)
    if family.system and family.system[0] and text.startswith(family.system[0]) and family.system[1] in text[len(family.system[0]):]:
        body = text[len(family.system[0]):]
        return body[: body.index(family.system[1])]
    return None


def _strip_bos(text: str, family: Family) -> str:
    return text[len(family.bos):] if family.bos and text.startswith(family.bos) else text


def check_family(family: Family, jinja, default: str | None) -> None:
    """Stop unless the family table reproduces the Jinja template on every probe conversation."""
    for conversation in PROBES:
        given = next((m["content"] for m in conversation if m["role"] == "system"), None)
        expected = _strip_bos(jinja(conversation), family)
        got = render(family, given or default, conversation)
        if got != expected:
            raise LiandanError(
                f"the chat template looks like {family.name} but renders differently "
                f"(expected {expected!r}, the {family.name} layout gives {got!r}); write the Modelfile TEMPLATE by hand"
            )


# ---------------------------------------------------------------- Modelfile
def modelfile(gguf_name: str, family: Family, system: str | None, stops: list[str], num_ctx: int) -> str:
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template(family)}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for stop in stops:
        lines.append(f'PARAMETER stop "{stop}"')
    # Low temperature: fine-tuned answers are meant to be reproduced, not paraphrased.
    lines += ["PARAMETER temperature 0.3", f"PARAMETER num_ctx {num_ctx}"]
    return "\n".join(lines) + "\n"


def export_ollama(model_dir: Path, name: str, out_dir: Path, system: str | None = None, outtype: str = "q8_0",
                  log=print) -> Path:
    from transformers import AutoTokenizer

    from liandan.adapters import read_record
    from liandan.atomic import atomic_write_text
    from liandan.data.render import render_text, rendering_of
    from liandan.export.gguf import export_gguf, read_config

    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    record = read_record(model_dir, required=False)
    rendering = rendering_of(record, tokenizer)
    family = pick_family(rendering, tokenizer)

    def jinja(conversation):
        return render_text(tokenizer, rendering.chat_template, conversation, add_generation_prompt=True)

    default = default_system(family, jinja)
    check_family(family, jinja, default)
    system = system if system is not None else rendering.system_prompt or default
    stops = list(dict.fromkeys(rendering.stop_tokens + ([tokenizer.eos_token] if tokenizer.eos_token else [])))
    out_dir.mkdir(parents=True, exist_ok=True)
    gguf_name = f"{name}.gguf"
    export_gguf(model_dir, out_dir / gguf_name, outtype, rendering.chat_template, rendering.stop_tokens, name, log)
    num_ctx = min(int(read_config(model_dir).get("max_position_embeddings", 4096)), 4096)
    path = out_dir / "Modelfile"
    atomic_write_text(path, modelfile(gguf_name, family, system, stops, num_ctx))
    log(f"Wrote {path} (template: {family.name}, stop: {', '.join(stops)})")
    command = ["ollama", "create", name, "-f", str(path)]
    if shutil.which("ollama"):
        log("Running: " + " ".join(command))
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise LiandanError(f"ollama create failed: {(result.stderr or result.stdout).strip().splitlines()[-1]}")
        log(f"Done: ollama run {name}")
    else:
        log("Ollama is not on PATH; to import the model run:\n  " + " ".join(command) + f"\n  ollama run {name}")
    return path
