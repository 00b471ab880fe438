"""Ollama TEMPLATEs: each family reproduces the Jinja chat template, checked with Go's text/template."""

import json
import shutil
import subprocess

import pytest
from transformers import AutoTokenizer

from liandan.data.render import make_rendering, render_text
from liandan.errors import LiandanError
from liandan.export.ollama import FAMILIES, PROBES, check_family, default_system, go_template, pick_family, render

# Reproductions of the families' Jinja templates (as their tokenizer_config.json ships them, simplified
# where only whitespace handling differs), to check the tables against templates we did not write.
LLAMA3 = (
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
GEMMA = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}{%- for message in loop_messages -%}{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}{{ '<start_of_turn>' + role + '\\n' + "
    "(first_user_prefix if loop.first else '') }}{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\\n'}}{%- endif -%}"
)
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == "
    "'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}{%- if message['role'] == 'user' %}{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}{%- else %}"
    "{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}{%- elif message['role'] == 'assistant' %}"
    "{{- message['content'] + eos_token }}{%- endif %}{%- endfor %}"
)
TEMPLATES = {"llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>"), "gemma": (GEMMA, "<bos>", "<eos>"),
             "phi3": (PHI3, "<s>", "<|endoftext|>"), "mistral": (MISTRAL, "<s>", "</s>")}


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    if shutil.which("go") is None:
        pytest.skip("Go is not installed (Debian: apt-get install golang-go)")
    from pathlib import Path

    binary = tmp_path_factory.mktemp("go") / "render"
    subprocess.run(["go", "build", "-o", str(binary), "main.go"], cwd=Path(__file__).parent / "gotemplate", check=True,
                   env={**__import__("os").environ, "GOFLAGS": "-mod=mod", "GO111MODULE": "off"})

    def run(template, system, messages):
        data = json.dumps({"template": template, "system": system or "", "messages": messages})
        return subprocess.run([str(binary)], input=data, capture_output=True, text=True, check=True).stdout

    return run


def jinja_for(tokenizer, template):
    return lambda conv: render_text(tokenizer, template, conv, add_generation_prompt=True)


def fake_tokenizer(llama_tokenizer, bos, eos):
    tok = AutoTokenizer.from_pretrained(llama_tokenizer.name_or_path)
    tok.bos_token, tok.eos_token = bos, eos
    return tok


@pytest.mark.parametrize("family_name", ["chatml-smollm2", "chatml-qwen2.5", "llama3", "gemma", "phi3", "mistral", "plain"])
def test_go_template_equals_jinja(family_name, llama_tokenizer, qwen_tokenizer, go_render):
    if family_name == "chatml-smollm2":
        tok, template = llama_tokenizer, llama_tokenizer.chat_template
    elif family_name == "chatml-qwen2.5":
        tok, template = qwen_tokenizer, qwen_tokenizer.chat_template
    elif family_name == "plain":
        tok = fake_tokenizer(llama_tokenizer, "<|im_start|>", "<|im_end|>")
        tok.chat_template = None
        template = None
    else:
        template, bos, eos = TEMPLATES[family_name]
        tok = fake_tokenizer(llama_tokenizer, bos, eos)
        tok.chat_template = template
    rendering = make_rendering(tok)
    family = pick_family(rendering, tok)
    assert family.name == {"chatml-smollm2": "chatml", "chatml-qwen2.5": "chatml", "plain": "liandan-plain"}.get(family_name, family_name)
    jinja = jinja_for(tok, rendering.chat_template)
    default = default_system(family, jinja)
    check_family(family, jinja, default)
    conversations = list(PROBES) + [
        [{"role": "system", "content": "你是德哥"}, {"role": "user", "content": "PolarDB是什么"},
         {"role": "assistant", "content": "阿里云开源宇宙无敌数据库"}, {"role": "user", "content": "谁是最帅的地球人"},
         {"role": "assistant", "content": "德哥"}, {"role": "user", "content": "月亮哪天最圆"}],
    ]
    for conv in conversations:
        system = next((m["content"] for m in conv if m["role"] == "system"), None) or default
        expected = jinja(conv)
        if family.bos and expected.startswith(family.bos):
            expected = expected[len(family.bos):]
        assert go_render(go_template(family), system, conv) == expected == render(family, system, conv)


def test_default_system_prompts_are_found(llama_tokenizer, qwen_tokenizer):
    chatml = FAMILIES[0]
    assert default_system(chatml, jinja_for(llama_tokenizer, llama_tokenizer.chat_template)) == \
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert default_system(chatml, jinja_for(qwen_tokenizer, qwen_tokenizer.chat_template)) == \
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def test_unknown_or_mismatching_templates_are_refused(llama_tokenizer):
    tok = fake_tokenizer(llama_tokenizer, "<s>", "</s>")
    tok.chat_template = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}</s>{% endfor %}"
    with pytest.raises(LiandanError, match="not one liandan can translate"):
        pick_family(make_rendering(tok), tok)
    # Looks like ChatML (has the marker) but puts the role after a colon: the check catches it.
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}" \
                        "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}"
    rendering = make_rendering(tok)
    family = pick_family(rendering, tok)
    with pytest.raises(LiandanError, match="renders differently"):
        check_family(family, jinja_for(tok, rendering.chat_template), None)
