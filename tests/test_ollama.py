"""Ollama TEMPLATEs: inferred from the chat template's wrapper strings, checked against Jinja with Go's text/template."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import fixtures
from fixtures import real_templates
from transformers import AutoTokenizer

from liandan.data.render import make_rendering, render_text, template_model
from liandan.data.template import PROBES
from liandan.errors import LiandanError
from liandan.export.ollama import go_template, template_wrappers

# The templates issue 14 names: each must get a TEMPLATE that Go renders exactly as Jinja does.
REQUIRED = (
    "meta-llama-Llama-3.1-8B-Instruct", "meta-llama-Llama-3.2-3B-Instruct", "meta-llama-Llama-3.3-70B-Instruct",
    "google-gemma-2-2b-it", "mistralai-Mistral-Nemo-Instruct-2407", "Mistral-Small-3.2-24B-Instruct-2506",
    "Qwen-Qwen2.5-7B-Instruct", "Qwen-Qwen3-0.6B", "Qwen-QwQ-32B", "deepseek-ai-DeepSeek-R1-Distill-Llama-8B",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", "HuggingFaceTB-SmolLM3-3B", "microsoft-Phi-3.5-mini-instruct",
    "ibm-granite-granite-3.3-2B-Instruct", "ibm-granite-granite-4.0", "ibm-granite-granite-4.1",
)


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    """Renders [(template, system, messages), ...] with Go's text/template in one process."""
    if shutil.which("go") is None:
        pytest.skip("Go is not installed (Debian: apt-get install golang-go)")
    binary = tmp_path_factory.mktemp("go") / "render"
    subprocess.run(["go", "build", "-o", str(binary), "main.go"], cwd=Path(__file__).parent / "gotemplate", check=True,
                   env={**os.environ, "GOFLAGS": "-mod=mod", "GO111MODULE": "off"})

    def run(cases):
        data = json.dumps([{"template": t, "system": s or "", "messages": m} for t, s, m in cases])
        out = json.loads(subprocess.run([str(binary)], input=data, capture_output=True, text=True, check=True).stdout)
        return [o.get("error") and "GO ERROR: " + o["error"] or o["text"] for o in out]

    return run


def modelfile_template(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    return text.split('TEMPLATE """', 1)[1].split('"""\n', 1)[0]


def system_of(conversation):
    return next((m["content"] for m in conversation if m["role"] == "system"), None)


def probe_cases(wrappers, jinja):
    """(Go case, expected Jinja rendering) for every probe the system placement allows."""
    out = []
    for conv in PROBES:
        if wrappers.system == "none" and system_of(conv) is not None:
            continue
        expected = jinja(conv)
        expected = expected[len(wrappers.bos):] if wrappers.bos and expected.startswith(wrappers.bos) else expected
        assert wrappers.render(system_of(conv), conv) == expected
        out.append(((go_template(wrappers), system_of(conv), conv), expected))
    return out


@pytest.fixture(scope="session")
def plain_tokenizer(llama_tokenizer):
    """A tokenizer only for apply_chat_template: bos_token "<s>", eos_token "</s>" as the sweep renders them."""
    tok = AutoTokenizer.from_pretrained(llama_tokenizer.name_or_path)
    tok.bos_token, tok.eos_token = "<s>", "</s>"
    return tok


def jinja_of(tokenizer, template):
    """The export path's rendering (data/render.render_text) of a template, with the generation prompt."""
    return lambda conversation: render_text(tokenizer, template, conversation, add_generation_prompt=True)


def test_every_real_template_gets_a_go_template_equal_to_jinja(go_render, plain_tokenizer):
    """The sweep over llama.cpp's real templates (from the llama-cpp-python sdist): wrapper strings, then Go == Jinja."""
    templates = real_templates()
    cases, owners, refused = [], [], {}
    for name, template in templates.items():
        jinja = jinja_of(plain_tokenizer, template)
        try:
            wrappers = template_model(plain_tokenizer, template, "<s>").wrappers
        except LiandanError as exc:
            refused[name] = str(exc)
            continue
        for case in probe_cases(wrappers, jinja):
            cases.append(case)
            owners.append(name)
    outputs = go_render([case for case, _ in cases])
    for name, (_, expected), got in zip(owners, cases, outputs):
        if got != expected and name not in refused:
            refused[name] = f"Go renders {got[:200]!r}, Jinja {expected[:200]!r}"
    ok = [name for name in templates if name not in refused]
    print(f"\nOllama TEMPLATE equals Jinja under Go: {len(ok)}/{len(templates)}; refused {len(refused)}:")
    for name, reason in refused.items():
        print(f"  {name}: {reason[:300]}")
    assert not [name for name in REQUIRED if name not in ok], refused
    assert len(ok) >= 60 and all("\n" not in reason for reason in refused.values())


@pytest.mark.parametrize("which", ["smollm2", "qwen2.5", "plain"])
def test_model_templates_through_the_export_path(which, llama_tokenizer, qwen_tokenizer, go_render):
    """template_wrappers (what `export ollama` uses) on real tokenizers, liandan's plain template included."""
    tok = {"smollm2": llama_tokenizer, "qwen2.5": qwen_tokenizer, "plain": llama_tokenizer}[which]
    if which == "plain":
        tok = AutoTokenizer.from_pretrained(llama_tokenizer.name_or_path)
        tok.bos_token, tok.eos_token, tok.chat_template = "<|im_start|>", "<|im_end|>", None
    rendering = make_rendering(tok)
    wrappers = template_wrappers(rendering, tok)
    cases = probe_cases(wrappers, lambda conv: render_text(tok, rendering.chat_template, conv, True))
    assert go_render([case for case, _ in cases]) == [expected for _, expected in cases]
    if which == "smollm2":  # the default system prompt lives in the TEMPLATE, used when no SYSTEM is given
        assert "You are a helpful AI assistant named SmolLM, trained by Hugging Face" in wrappers.head


def test_wrapper_strings_that_look_like_go_syntax_stay_literal(go_render, plain_tokenizer):
    template = ("{% for m in messages %}{{ '{{' + m.role + '}} \"\"\"' + m.content + '{{ end }}\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '{{assistant}} \"\"\"' }}{% endif %}")
    jinja = jinja_of(plain_tokenizer, template)
    cases = probe_cases(template_model(plain_tokenizer, template).wrappers, jinja)
    assert '"""' not in cases[0][0][0]
    assert go_render([case for case, _ in cases]) == [expected for _, expected in cases]


@pytest.mark.parametrize("template, reason", [
    ("{% for m in messages %}{{ m.role }}: {{ m.content | lower }}\n{% endfor %}", "LDQONE"),
    ("{% for m in messages %}Turn {{ loop.index }} {{ m.role }}: {{ m.content }}\n{% endfor %}"
     "{% if add_generation_prompt %}assistant:{% endif %}", "differently"),
    ("{% for m in messages %}{{ m.content }}{% endfor %}{{ messages[0].content }}", "2 times"),
])
def test_templates_wrappers_cannot_describe_are_refused_in_one_line(template, reason, plain_tokenizer):
    with pytest.raises(LiandanError, match=reason) as info:
        template_model(plain_tokenizer, template).wrappers
    assert "\n" not in str(info.value).replace("\\n", "")



def tiny_model_with(tiny_llama, tmp_path, name, bos, eos):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    fixtures.template_tokenizer(real_templates()[name], bos, eos).save_pretrained(model)
    return model


def test_export_ollama_writes_a_checked_modelfile_for_llama_3_1(tiny_llama, tmp_path, go_render):
    from liandan.export.ollama import adds_bos, export_ollama

    model = tiny_model_with(tiny_llama, tmp_path, "meta-llama-Llama-3.1-8B-Instruct", "<|begin_of_text|>", "<|eot_id|>")
    path = export_ollama(model, "tiny", tmp_path / "out", outtype="f32", log=lambda *_: None)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("FROM ./tiny.gguf\n") and 'PARAMETER stop "<|eot_id|>"' in text and "SYSTEM" not in text
    assert "Today Date: 26 Jul 2024" in text  # the fixed preamble, with and without a system prompt
    tok = AutoTokenizer.from_pretrained(str(model))
    bos = tok.bos_token if adds_bos(model) else ""
    outputs = go_render([(modelfile_template(path), system_of(c), c) for c in PROBES])
    assert [bos + out for out in outputs] == [jinja_of(tok, tok.chat_template)(c) for c in PROBES]


def test_export_ollama_refuses_before_writing(tiny_llama, tmp_path):
    from liandan.export.ollama import export_ollama

    model = tiny_model_with(tiny_llama, tmp_path, "google-gemma-2-2b-it", "<bos>", "<eos>")
    with pytest.raises(LiandanError, match="no system role"):
        export_ollama(model, "tiny", tmp_path / "out", system="Be brief.", log=lambda *_: None)
    tok = AutoTokenizer.from_pretrained(str(model))
    tok.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content | lower }}\n{% endfor %}"
    tok.save_pretrained(model)
    with pytest.raises(LiandanError, match="cannot write an Ollama TEMPLATE: the chat template renders the probe"):
        export_ollama(model, "tiny", tmp_path / "out", log=lambda *_: None)
    assert not (tmp_path / "out").exists()


def test_ollama_names_take_a_tag_and_files_never_a_colon():
    from liandan.export.ollama import check_ollama_name, file_stem

    for good in ("jokes", "jokes:v1", "my-model_2.5:latest"):
        check_ollama_name(good)
    for bad in (".hidden", "-x", "a:b:c", "a/b", "名字", ""):
        with pytest.raises(LiandanError, match="use name or name:tag"):
            check_ollama_name(bad)
    assert file_stem("jokes:v1") == "jokes-v1"



# (template, BOS, EOS as the model's tokenizer has them)
GGUF_FAMILIES = [
    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    ("meta-llama-Llama-3.1-8B-Instruct", "<|begin_of_text|>", "<|eot_id|>"),
    ("google-gemma-2-2b-it", "<bos>", "<eos>"),
    ("mistralai-Mistral-Nemo-Instruct-2407", "<s>", "</s>"),
]


@pytest.mark.parametrize("name, bos, eos", GGUF_FAMILIES)
def test_gguf_chat_template_gives_llama_cpp_the_training_prompt(name, bos, eos, tiny_llama, tmp_path):
    """llama.cpp's chat-completion path renders the template inside the GGUF with the GGUF's BOS/EOS: its
    prompt tokens must be liandan's training prompt, and its EOS the trained stop token."""
    lc = pytest.importorskip("llama_cpp")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from liandan.data.render import Encoder
    from liandan.export.gguf import export_gguf

    model = tiny_model_with(tiny_llama, tmp_path, name, bos, eos)
    tok = AutoTokenizer.from_pretrained(str(model))
    rendering = make_rendering(tok)
    export_gguf(model, tmp_path / "m.gguf", "f32", rendering.chat_template, rendering.stop_tokens, log=lambda *_: None)
    llm = lc.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    assert llm.token_eos() == tok.convert_tokens_to_ids(rendering.stop_tokens[0])
    # What Llama.__init__ builds from the GGUF's metadata for create_chat_completion.
    text = llm._model.token_get_text
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], text(llm.token_eos()), text(llm.token_bos()))
    encoder = Encoder(tok, rendering)
    for conv in PROBES:
        if name == "google-gemma-2-2b-it" and system_of(conv) is not None:
            continue
        prompt = formatter(messages=conv).prompt
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == encoder.prompt_ids(conv)


# ---------------------------------------------------------------- end to end on the embedded model
from conftest import E2E_TEMPLATES  # noqa: E402


@pytest.mark.slow  # about 30 s each after template_adapter's training (shared with test_templates_e2e.py)
@pytest.mark.parametrize("name", list(E2E_TEMPLATES))
def test_trained_model_ships_under_a_real_template(name, template_adapter, go_render, tmp_path):
    """Trained on the seed's jokes under a real template: the fused GGUF answers through llama.cpp's own
    chat-completion path (the template inside the GGUF) and stops; the Ollama TEMPLATE equals Jinja under Go."""
    lc = pytest.importorskip("llama_cpp")
    from conftest import JOKES, liandan

    from liandan.data.formats import read_jsonl
    from liandan.export.ollama import adds_bos

    _, adapters = template_adapter(name)
    fused = tmp_path / "fused"
    result = liandan("fuse", "--adapter-path", adapters, "--save-path", fused, "--export-gguf")
    assert result.returncode == 0, result.stderr[-2000:]
    llm = lc.Llama(model_path=str(fused / "ggml-model-f16.gguf"), n_ctx=256, verbose=False)
    assert llm.metadata["tokenizer.chat_template"] == real_templates()[E2E_TEMPLATES[name][0]]
    questions = []
    for example in read_jsonl(JOKES / "train.jsonl").examples:
        question, answer = example.messages[0]["content"], example.messages[1]["content"]
        questions.append(question)
        reply = llm.create_chat_completion([{"role": "user", "content": question}], max_tokens=30, temperature=0.0,
                                           top_k=1)["choices"][0]
        assert (reply["message"]["content"], reply["finish_reason"]) == (answer, "stop"), question

    export = liandan("export", "ollama", "--model", fused, "--name", "jokes", "--out", tmp_path / "ollama",
                     "--outtype", "f16")
    assert export.returncode == 0, export.stderr[-2000:]
    template = modelfile_template(tmp_path / "ollama" / "Modelfile")
    tok = AutoTokenizer.from_pretrained(str(fused))
    bos = tok.bos_token if adds_bos(fused) else ""
    conversations = [c for c in PROBES if name != "gemma-2" or system_of(c) is None]
    conversations += [[{"role": "user", "content": q}] for q in questions]
    outputs = go_render([(template, system_of(c), c) for c in conversations])
    assert [bos + out for out in outputs] == [jinja_of(tok, tok.chat_template)(c) for c in conversations]
