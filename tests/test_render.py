"""The prompt format: stop tokens appended once, hand-typed ones recognised, prompts masked."""

import pytest
from transformers import AutoTokenizer

from liandan.data.formats import Example
from liandan.data.render import IGNORE, PLAIN_CHAT_TEMPLATE, Encoder, make_rendering, stop_token_ids
from liandan.errors import LiandanError

# Llama 3's chat template (as in its tokenizer_config.json, without the date/tools preamble): a turn ends
# with <|eot_id|>, and <|end_of_text|> is the EOS token, so the two differ as they do in the real model.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def qa(prompt, completion):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def trained_text(tok, enc):
    return tok.decode([t for t, l in zip(enc.input_ids, enc.labels) if l != IGNORE])


def test_stop_token_is_the_turn_end_of_the_template(qwen_tokenizer, llama_tokenizer):
    assert make_rendering(qwen_tokenizer).stop_tokens == ["<|im_end|>"]
    assert make_rendering(llama_tokenizer).stop_tokens == ["<|im_end|>"]


def test_stop_token_of_a_llama3_template_is_eot_id(tiny_llama):
    """Not ChatML: SmolLM2's tokenizer given Llama 3's special tokens and template trains and stops on <|eot_id|>."""
    from types import SimpleNamespace

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = LLAMA3_TEMPLATE
    rendering = make_rendering(tok)
    assert rendering.stop_tokens == ["<|eot_id|>"]
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    enc = Encoder(tok, rendering).encode_chat(qa("Capital of France?", "Paris"))
    assert enc.input_ids[-1] == eot and trained_text(tok, enc) == "Paris<|eot_id|>"
    stops = stop_token_ids(tok, SimpleNamespace(generation_config=None), rendering)
    assert stops == sorted({eot, tok.convert_tokens_to_ids("<|end_of_text|>")})  # the turn end and the EOS


def test_seed_data_without_stop_token_trains_the_stop(qwen_tokenizer):
    enc = Encoder(qwen_tokenizer, make_rendering(qwen_tokenizer)).encode_chat(qa("PolarDB是什么", "阿里云开源宇宙无敌数据库"))
    im_end = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert enc.input_ids[-1] == im_end and enc.labels[-1] == im_end
    assert trained_text(qwen_tokenizer, enc) == "阿里云开源宇宙无敌数据库<|im_end|>"
    # The prompt, rendered exactly as generation will render it, is masked.
    encoder = Encoder(qwen_tokenizer, make_rendering(qwen_tokenizer))
    prompt = encoder.prompt_ids([{"role": "user", "content": "PolarDB是什么"}])
    assert enc.input_ids[: len(prompt)] == prompt
    assert all(l == IGNORE for l in enc.labels[: len(prompt)])
    assert all(l != IGNORE for l in enc.labels[len(prompt):])


def test_hand_typed_stop_token_is_recognised_not_doubled(qwen_tokenizer):
    encoder = Encoder(qwen_tokenizer, make_rendering(qwen_tokenizer))
    typed = encoder.encode_chat(qa("PolarDB是什么<|endoftext|>", "阿里云开源宇宙无敌数据库<|endoftext|>"))
    clean = encoder.encode_chat(qa("PolarDB是什么", "阿里云开源宇宙无敌数据库"))
    assert typed.input_ids == clean.input_ids and typed.labels == clean.labels
    assert encoder.hand_typed.counts["<|endoftext|>"] == 2
    eot = qwen_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert eot not in typed.input_ids
    spaced = encoder.encode_chat(qa("PolarDB是什么", "阿里云开源宇宙无敌数据库 <|endoftext|>"))  # no space trained before the stop
    assert spaced.input_ids == clean.input_ids


def test_no_mask_prompt_trains_everything(qwen_tokenizer):
    enc = Encoder(qwen_tokenizer, make_rendering(qwen_tokenizer), mask_prompt=False).encode_chat(qa("q", "a"))
    assert enc.labels == enc.input_ids


def test_multi_turn_trains_only_assistant_turns(llama_tokenizer):
    encoder = Encoder(llama_tokenizer, make_rendering(llama_tokenizer))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "One?"},
                {"role": "assistant", "content": "1"}, {"role": "user", "content": "Two?"},
                {"role": "assistant", "content": "2"}]
    enc = encoder.encode_chat(messages)
    assert trained_text(llama_tokenizer, enc) == "1<|im_end|>2<|im_end|>"
    # The whole sequence is exactly the template's rendering (minus the final newline).
    full = llama_tokenizer.apply_chat_template(messages, tokenize=False)
    assert llama_tokenizer.decode(enc.input_ids) == full.rstrip("\n")


def test_system_prompt_is_injected(qwen_tokenizer):
    rendering = make_rendering(qwen_tokenizer, system_prompt="你是德哥")
    enc = Encoder(qwen_tokenizer, rendering).encode_chat(qa("q", "a"))
    assert "<|im_start|>system\n你是德哥<|im_end|>" in qwen_tokenizer.decode(enc.input_ids)


def test_text_format_ends_with_eos_once(qwen_tokenizer):
    encoder = Encoder(qwen_tokenizer, make_rendering(qwen_tokenizer))
    eos = qwen_tokenizer.eos_token_id
    for text in ("一段文档", "一段文档<|endoftext|>", "一段文档<|endoftext|>\n"):
        enc = encoder.encode(Example(1, text=text))
        assert enc.input_ids[-1] == eos and enc.input_ids.count(eos) == 1 and enc.labels == enc.input_ids


def test_model_without_chat_template_gets_the_plain_layout(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = None
    rendering = make_rendering(tok)
    assert rendering.template_source == "plain" and rendering.chat_template == PLAIN_CHAT_TEMPLATE
    assert rendering.stop_tokens == [tok.eos_token]
    enc = Encoder(tok, rendering).encode_chat(qa("Capital of France?", "Paris"))
    assert tok.decode(enc.input_ids) == f"### User:\nCapital of France?\n\n### Assistant:\nParis{tok.eos_token}"
    assert trained_text(tok, enc) == f"Paris{tok.eos_token}"


def test_tools_format_renders_tool_calls(qwen_tokenizer):
    encoder = Encoder(qwen_tokenizer, make_rendering(qwen_tokenizer))
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "Weather in Hangzhou?"},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Hangzhou"}}}]},
                {"role": "tool", "content": "sunny"},
                {"role": "assistant", "content": "It is sunny."}]
    enc = encoder.encode_chat(messages, tools)
    text = trained_text(qwen_tokenizer, enc)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Hangzhou"}}\n</tool_call><|im_end|>' in text
    assert text.endswith("It is sunny.<|im_end|>")
    assert "# Tools" in qwen_tokenizer.decode(enc.input_ids) and "sunny" not in text.replace("It is sunny.", "")


def test_a_tokenizer_with_several_named_templates_trains_in_its_own(qwen_tokenizer):
    """Hermes 2 Pro and Command R+ ship "default" and "tool_use" templates (a dict in transformers): chats train in
    "default", tools data in "tool_use", as apply_chat_template picks; never the plain fallback."""
    own = qwen_tokenizer.chat_template
    tool_use = own + "{# tool_use #}"
    qwen_tokenizer.chat_template = {"default": own, "tool_use": tool_use}
    try:
        assert make_rendering(qwen_tokenizer).chat_template == own
        assert make_rendering(qwen_tokenizer, tools=True).chat_template == tool_use
        qwen_tokenizer.chat_template = {"tool_use": tool_use}  # one template, whatever its name
        assert make_rendering(qwen_tokenizer).chat_template == tool_use
        qwen_tokenizer.chat_template = {"rag": own, "tool_use": tool_use}  # no default: not guessed
        with pytest.raises(LiandanError, match="none is named 'default'; pass one with --chat-template"):
            make_rendering(qwen_tokenizer)
    finally:
        qwen_tokenizer.chat_template = own


def test_data_check_renders_tools_data_in_the_tool_use_template_as_training_does(qwen_tokenizer, tmp_path):
    import json

    from liandan.data.render import trains_tools

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    (tmp_path / "train.jsonl").write_text(json.dumps(chat) + "\n" + json.dumps({**chat, "tools": tools}) + "\n")
    own = qwen_tokenizer.chat_template
    assert not trains_tools(qwen_tokenizer, tmp_path)  # one template: nothing to choose
    qwen_tokenizer.chat_template = {"default": own, "tool_use": own + "{# tools #}"}
    try:
        assert trains_tools(qwen_tokenizer, tmp_path)
        (tmp_path / "train.jsonl").write_text(json.dumps(chat) + "\n")
        assert not trains_tools(qwen_tokenizer, tmp_path)
    finally:
        qwen_tokenizer.chat_template = own
