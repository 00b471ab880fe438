"""Training rendering under every real chat template llama.cpp keeps for its tests (tokenization only), and
the reasoning split: the layout inferred from probe renderings (liandan/data/template.py) drives both."""

import pytest

import fixtures
from liandan.data.render import IGNORE, Encoder, make_rendering
from liandan.data.template import Layout
from liandan.errors import LiandanError
from liandan.reasoning import ReasoningSplitter, split_text

QUESTION, ANSWER = "What is PolarDB?", "A database."


def encoder_for(tokenizer, name: str) -> Encoder:
    tokenizer.chat_template = fixtures.real_templates()[name]
    return Encoder(tokenizer, make_rendering(tokenizer))


def trained_text(tokenizer, enc) -> str:
    return tokenizer.decode([t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE])


def qa(answer=ANSWER, **reasoning):
    return [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": answer, **reasoning}]


def test_every_real_template_trains_after_its_generation_prompt(all_templates_tokenizer):
    tok = all_templates_tokenizer
    trained, refused = [], {}
    for name in fixtures.real_templates():
        try:
            encoder = encoder_for(tok, name)
            enc = encoder.encode_chat(qa())
        except LiandanError as exc:
            assert "\n" not in str(exc), name
            refused[name] = str(exc)
            continue
        prompt = encoder.prompt_ids(qa()[:1])
        assert enc.input_ids[: len(prompt)] == prompt, name  # the generation prompt, token for token
        assert all(label == IGNORE for label in enc.labels[: len(prompt)]), name
        text, stop, layout = trained_text(tok, enc), encoder.rendering.stop_tokens[0], encoder.layout
        assert enc.labels[len(prompt):] == enc.input_ids[len(prompt):], name  # everything after it is trained
        before, _, after = text.partition(ANSWER)
        # The answer as the model generates it: after the channel header or (empty) think block, then the turn end.
        assert before in ("", layout.answer_head, layout.think_after), (name, before)
        assert after.endswith(stop) and not after[: -len(stop)].strip(), (name, after)
        trained.append(name)
    print(f"\nreal chat templates: {len(trained)}/{len(trained) + len(refused)} trained, {len(refused)} refused")
    for name, reason in refused.items():
        print(f"  refused {name}: {reason}")
    assert len(trained) + len(refused) == 70 and len(trained) >= 68


def test_reasoning_in_data_trains_inside_the_think_block_r1(all_templates_tokenizer):
    tok = all_templates_tokenizer
    encoder = encoder_for(tok, "deepseek-ai-DeepSeek-R1-Distill-Llama-8B")  # prompt ends with <think>\n
    assert encoder.layout.opens_thinking
    eos = encoder.rendering.stop_tokens[0]
    field = encoder.encode_chat(qa(reasoning_content="Alibaba Cloud makes it."))
    inline = encoder.encode_chat(qa("<think>\nAlibaba Cloud makes it.\n</think>\n\n" + ANSWER))
    assert field.input_ids == inline.input_ids and field.labels == inline.labels
    assert tok.decode(field.input_ids).endswith(f"<｜Assistant｜><think>\nAlibaba Cloud makes it.\n</think>\n\n{ANSWER}{eos}")
    assert trained_text(tok, field) == f"Alibaba Cloud makes it.\n</think>\n\n{ANSWER}{eos}"
    # Without reasoning: an empty think block, so the model learns to answer directly.
    assert trained_text(tok, encoder.encode_chat(qa())) == f"\n</think>\n\n{ANSWER}{eos}"


def test_qwen3_renders_reasoning_itself_and_empty_think_blocks(all_templates_tokenizer):
    tok = all_templates_tokenizer
    encoder = encoder_for(tok, "Qwen-Qwen3-0.6B")
    assert encoder.layout.reasoning_key == "reasoning_content" and encoder.layout.generation_tail == ""
    assert trained_text(tok, encoder.encode_chat(qa(reasoning_content="Think."))) == f"<think>\nThink.\n</think>\n\n{ANSWER}<|im_end|>"
    assert trained_text(tok, encoder.encode_chat(qa())) == f"<think>\n\n</think>\n\n{ANSWER}<|im_end|>"


def test_template_that_drops_old_reasoning_trains_the_last_turn_after_its_real_prompt(all_templates_tokenizer):
    tok = all_templates_tokenizer
    encoder = encoder_for(tok, "Qwen-Qwen3-0.6B")
    messages = qa(reasoning_content="First thought.") + [{"role": "user", "content": "And?"},
                                                         {"role": "assistant", "content": "More.", "reasoning_content": "Second."}]
    enc = encoder.encode_chat(messages)
    prompt = encoder.prompt_ids(messages[:3])
    assert enc.input_ids[: len(prompt)] == prompt and "First thought." not in tok.decode(prompt)
    assert trained_text(tok, enc) == "<think>\nSecond.\n</think>\n\nMore.<|im_end|>"


def test_chatml_without_think_block_trains_reasoning_as_deepseek_think_text(all_templates_tokenizer):
    tok = all_templates_tokenizer
    encoder = encoder_for(tok, "Qwen-Qwen2.5-7B-Instruct")
    assert not encoder.layout.thinks
    assert trained_text(tok, encoder.encode_chat(qa(reasoning_content="Hmm."))) == f"<think>\nHmm.\n</think>\n\n{ANSWER}<|im_end|>"
    assert trained_text(tok, encoder.encode_chat(qa())) == f"{ANSWER}<|im_end|>"


def test_gpt_oss_channels(all_templates_tokenizer):
    tok = all_templates_tokenizer
    encoder = encoder_for(tok, "openai-gpt-oss-120b")
    assert trained_text(tok, encoder.encode_chat(qa())) == f"<|channel|>final<|message|>{ANSWER}<|return|>"
    assert trained_text(tok, encoder.encode_chat(qa(reasoning_content="Look it up."))) == (
        f"<|channel|>analysis<|message|>Look it up.<|end|><|start|>assistant<|channel|>final<|message|>{ANSWER}<|return|>")


def test_thinking_off_prompt_trains_direct_answers_and_refuses_reasoning(all_templates_tokenizer):
    tok = all_templates_tokenizer
    encoder = encoder_for(tok, "deepseek-ai-DeepSeek-V3.2")  # generation prompt ends with <think></think>
    assert encoder.layout.closes_thinking
    assert trained_text(tok, encoder.encode_chat(qa())) == f"{ANSWER}<｜end▁of▁sentence｜>"
    with pytest.raises(LiandanError, match="reasoning in the data cannot be trained"):
        encoder.encode_chat(qa(reasoning_content="x"))


def test_tool_use_templates_render_chats_without_tools(all_templates_tokenizer):
    tok = all_templates_tokenizer
    for name in ("NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use", "NousResearch-Hermes-3-Llama-3.1-8B-tool_use",
                 "CohereForAI-c4ai-command-r-plus-tool_use"):
        encoder = encoder_for(tok, name)
        assert trained_text(tok, encoder.encode_chat(qa())) == ANSWER + encoder.rendering.stop_tokens[0], name


def feed_in_pieces(splitter, text, size):
    reasoning = content = ""
    for i in range(0, len(text), size):
        r, c = splitter.feed(text[i : i + size])
        reasoning, content = reasoning + r, content + c
    r, c = splitter.finish()
    return reasoning + r, content + c


@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_reasoning_splitter_streams(size):
    r1 = Layout("<think>\n", "", "<think>\n", "\n</think>\n\n", None, "<eos>")
    assert feed_in_pieces(ReasoningSplitter.for_layout(r1), "Some thought.\n</think>\n\nThe answer.", size) == (
        "Some thought.", "The answer.")
    assert feed_in_pieces(ReasoningSplitter.for_layout(r1), "\n</think>\n\nDirect.", size) == ("", "Direct.")
    qwen3 = Layout("", "<think>\n\n</think>\n\n", "<think>\n", "\n</think>\n\n", "reasoning_content", "<|im_end|>")
    assert feed_in_pieces(ReasoningSplitter.for_layout(qwen3), "<think>\nA.\n\nB.\n</think>\n\nC <b>", size) == ("A.\n\nB.", "C <b>")
    assert feed_in_pieces(ReasoningSplitter.for_layout(qwen3), "<thin and more", size) == ("", "<thin and more")
    oss = Layout("", "<|channel|>final<|message|>", "<|channel|>analysis<|message|>",
                 "<|end|><|start|>assistant<|channel|>final<|message|>", "reasoning_content", "<|return|>")
    text = "<|channel|>analysis<|message|>Plan.<|end|><|start|>assistant<|channel|>final<|message|>Done."
    assert feed_in_pieces(ReasoningSplitter.for_layout(oss), text, size) == ("Plan.", "Done.")
    assert feed_in_pieces(ReasoningSplitter.for_layout(oss), "<|channel|>final<|message|>Done.", size) == ("", "Done.")


def test_no_splitter_for_templates_without_think_block():
    chatml = Layout("", "", "<think>\n", "\n</think>\n\n", None, "<|im_end|>")
    assert ReasoningSplitter.for_layout(chatml) is None
    assert split_text(None, "plain <think>") == ("", "plain <think>")


def test_data_check_show_marks_the_trained_part_under_a_chosen_template(tmp_path, tiny_llama):
    from conftest import liandan, write_jsonl

    write_jsonl(tmp_path / "data" / "train.jsonl", [{"prompt": QUESTION, "completion": ANSWER}] * 3)
    (tmp_path / "mine.jinja").write_text(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}", encoding="utf-8")
    out = liandan("data", "check", tmp_path / "data", "--model", tiny_llama, "--show", 2, "--chat-template",
                  tmp_path / "mine.jinja")
    assert out.stdout.count("--- train.jsonl:") == 2, out.stdout + out.stderr
    assert f"user: {QUESTION}\nassistant: ⟦{ANSWER}<|im_end|>⟧" in out.stdout  # no turn end in the template: EOS
    bad = liandan("data", "check", tmp_path / "data", "--model", tiny_llama, "--chat-template", tmp_path / "nope.jinja")
    assert bad.returncode == 2 and "--chat-template" in bad.stderr and "chatml" in bad.stderr


def test_chat_template_choice_is_recorded_and_overrides_the_record(llama_tokenizer, tmp_path):
    from liandan.data.render import CHATML_TEMPLATE, make_rendering, rendering_of

    rendering = make_rendering(llama_tokenizer, "Be brief.", "chatml")
    assert rendering.chat_template == CHATML_TEMPLATE and rendering.template_source == "chatml"
    (tmp_path / "t.jinja").write_text(CHATML_TEMPLATE, encoding="utf-8")
    chosen = rendering_of({"rendering": rendering.to_dict()}, llama_tokenizer, chat_template=str(tmp_path / "t.jinja"))
    assert chosen.template_source == "file:t.jinja" and chosen.system_prompt == "Be brief."
    assert rendering_of({"rendering": rendering.to_dict()}, llama_tokenizer).template_source == "chatml"


def test_generate_prints_the_answer_and_the_reasoning_only_when_asked(capsys):
    from liandan.reasoning import ShownAnswer

    r1 = Layout("<think>\n", "", "<think>\n", "\n</think>\n\n", None, "<eos>")
    for show_thinking, expected in ((False, "Answer."), (True, "Thinking: Plan.\n----------\nAnswer.")):
        shown = ShownAnswer(ReasoningSplitter.for_layout(r1), show_thinking)
        for piece in ("Pl", "an.\n</th", "ink>\n", "\nAnswer."):
            shown.feed(piece)
        shown.finish()
        assert capsys.readouterr().out == expected
