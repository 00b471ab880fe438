"""Self-replay against forgetting, the KL term's soft targets, and the retention score."""

import json
import random
from pathlib import Path

import pytest
import torch

from conftest import liandan, write_jsonl
from liandan.data.batching import EncodedSet, collate, iterate_batches
from liandan.data.render import IGNORE, Encoded
from liandan.errors import LiandanError
from liandan.replay import (builtin, is_correct, nearest_replay, read_prompts, read_questions, replay_indices, REPLAY_PROMPTS,
                            RETENTION_QUESTIONS)

ROWS = [{"prompt": f"What is code {i}?", "completion": f"Code {i} is {'ab' * (i % 3 + 1)}."} for i in range(8)]


def test_answer_matching():
    assert is_correct("The capital of France is Paris.", ["Paris"])
    assert is_correct("There are 24 hours in a day.", ["24"])
    assert not is_correct("There are 124 hours.", ["24"])  # numbers and words match whole
    assert not is_correct("Parisian food", ["Paris"])
    assert is_correct("法国的首都是巴黎。", ["巴黎"])
    assert not is_correct("I do not know.", ["Jupiter"])


def test_builtin_sets_are_bilingual_and_disjoint():
    prompts = read_prompts(builtin(REPLAY_PROMPTS))
    questions = read_questions(builtin(RETENTION_QUESTIONS))
    broad = read_prompts(Path(__file__).parents[1] / "benchmarks" / "replay_broad.jsonl")  # a benchmarked candidate
    assert len(prompts) >= 100 and len(questions) >= 300
    chinese = lambda s: any("\u4e00" <= c <= "\u9fff" for c in s)  # noqa: E731
    assert sum(map(chinese, prompts)) >= 16 and sum(chinese(q.question) for q in questions) >= 30
    # Held out by wording and by topic: no retention answer is named in any replay prompt.
    for q in questions:
        named = [p for p in prompts + broad if is_correct(p, q.answers) or p == q.question]
        assert not named, (q.question, named[:3])


def test_replay_prompt_file_errors_name_the_line(tmp_path):
    bad = write_jsonl(tmp_path / "mine.jsonl", [{"prompt": "Hi"}, '{"prompt": oops}'])
    with pytest.raises(LiandanError, match=r"mine.jsonl:2: invalid JSON"):
        read_prompts(bad)
    (tmp_path / "plain.txt").write_text("First question?\n\nSecond one\n", encoding="utf-8")
    assert read_prompts(tmp_path / "plain.txt") == ["First question?", "Second one"]
    with pytest.raises(LiandanError, match="not found"):
        read_prompts(tmp_path / "missing.txt")


def test_replay_is_mixed_in_at_the_ratio_deterministically():
    data = EncodedSet("train.jsonl", "completions", [Encoded([1] * (5 + i), [IGNORE] + [1] * (4 + i)) for i in range(8)])
    replay = [Encoded([2] * 30, [IGNORE] * 10 + [2] * 20) for _ in range(3)]
    pick = lambda rng: replay_indices(len(data), len(replay), 0.5, rng)  # noqa: E731 (what train.py passes in)
    first = iterate_batches(data, 2, seed=0, replay=replay, pick_replay=pick)
    again = iterate_batches(data, 2, seed=0, replay=replay, pick_replay=pick)
    epoch0 = [b for e, b in (next(first) for _ in range(6))]
    assert epoch0 == [b for e, b in (next(again) for _ in range(6))]
    seen = sorted(i for b in epoch0 for i in b)
    assert seen[:8] == list(range(8)) and len([i for i in seen if i >= 8]) == 4  # 0.5 × 8, cycling a pool of 3
    assert set(i for i in seen if i >= 8) == {8, 9, 10}
    assert replay_indices(8, 3, 0.0, random.Random(0)) == []
    # Without replay the order is what it always was (resuming older runs replays the same batches).
    plain = iterate_batches(data, 2, seed=0)
    assert all(max(b) < 8 for b in (next(plain)[1] for _ in range(8)))


def test_focus_replays_the_prompts_nearest_the_training_ones():
    prompt = lambda *ids: Encoded([1, 2, *ids, 3], [IGNORE] * (len(ids) + 3) + [9])  # noqa: E731 (1 2 … 3: the template)
    pool = [prompt(10, 11), prompt(20, 21), prompt(30, 31), prompt(30, 40), prompt(50, 51)]
    train = [prompt(30, 7), prompt(50, 8, 8)]
    # Nearest by the tokens they share (template tokens are in every prompt: no weight); none shared → not picked.
    assert sorted(nearest_replay(train, pool, per_example=2)) == [2, 3, 4]
    assert nearest_replay([prompt(99)], pool) == []
    rng = random.Random(0)
    picks = replay_indices(10, 5, 1.0, rng, focus=[2, 3, 4], focus_share=0.6)
    assert len(picks) == 10 and sorted(picks[:6]) == [2, 2, 3, 3, 4, 4] and len(set(picks[6:])) == 4  # 4 uniform draws, no repeat
    # No focus: the draws are what they were before focus existed (resuming older runs replays the same batches).
    assert replay_indices(10, 5, 1.0, random.Random(1), focus=[2], focus_share=0.0) == replay_indices(10, 5, 1.0, random.Random(1))


def test_soft_targets_line_up_with_trained_positions(tmp_path, tiny_llama):
    """The cached top-k log-probs of each replay answer token equal a fresh forward pass at that position."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from liandan.data.render import Encoder, make_rendering, stop_token_ids
    from liandan.evaluate import loss_terms
    from liandan.replay import replay_pool

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    encoder = Encoder(tokenizer, make_rendering(tokenizer))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Tell me a story"}, {"prompt": "Hi"}, {"prompt": "Why?"}])
    stops = stop_token_ids(tokenizer, model, encoder.rendering)
    pool = replay_pool(model, tokenizer, encoder, tiny_llama, str(prompts), stops, tokenizer.pad_token_id, "cpu", 2048,
                       soft_targets=True)
    assert pool.items and all(item.soft is not None for item in pool.items)
    batch = collate(pool.items, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        logp = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].log_softmax(-1)
    selected = batch["labels"][:, 1:] != IGNORE
    at_trained = logp[selected]
    assert int(batch["soft_mask"].sum()) == at_trained.shape[0]
    assert torch.allclose(at_trained.gather(-1, batch["soft_ids"]), batch["soft_logp"], atol=2e-3)
    # The trained token is the base model's greedy choice: the top of its own distribution.
    assert torch.equal(batch["soft_ids"][:, 0], batch["labels"][:, 1:][selected])
    with torch.no_grad():
        _, _, no_kl = loss_terms(model, batch)
        _, _, kl = loss_terms(model, batch, with_kl=True)
    assert no_kl is None and float(kl) > 0  # KL to a top-16 truncation of itself is positive for a flat tiny model
    # A second pool comes from the cache, identical.
    again = replay_pool(model, tokenizer, encoder, tiny_llama, str(prompts), stops, tokenizer.pad_token_id, "cpu", 2048,
                        soft_targets=True)
    assert again.seconds is None and [i.input_ids for i in again.items] == [i.input_ids for i in pool.items]


def test_lora_reports_replay_and_retention(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("LIANDAN_CACHE", str(tmp_path / "cache"))  # an empty replay cache: the first run generates
    data = tmp_path / "data"
    for split in ("train", "valid", "test"):
        write_jsonl(data / f"{split}.jsonl", ROWS)
    common = ["lora", "--model", tiny_llama, "--train", "--test", "--data", data, "--iters", "8", "--batch-size", "2",
              "--steps-per-report", "2", "--val-batches", "1"]
    first = liandan(*common, "--adapter-path", tmp_path / "a")
    assert first.returncode == 0, first.stderr
    assert "base-model answers to 104 general prompts (generated in" in first.stdout
    assert "Replay: 8 of the 16 examples trained on were base-model answers" in first.stdout  # one epoch, ratio 1
    assert "General knowledge kept:" in first.stdout and "held-out general questions" in first.stdout
    record = json.loads((tmp_path / "a" / "liandan.json").read_text())
    assert record["training"]["replay_ratio"] == 1.0 and record["training"]["kl_weight"] == 3.0
    again = liandan(*common, "--adapter-path", tmp_path / "b", "--kl-weight", "0.5")
    assert again.returncode == 0, again.stderr
    assert "general prompts (read from the cache" in again.stdout
    off = liandan(*common, "--adapter-path", tmp_path / "d", "--replay-ratio", "0")
    assert off.returncode == 0 and "Replay:" not in off.stdout
    bad = liandan(*common, "--adapter-path", tmp_path / "e", "--replay-ratio", "-1")
    assert bad.returncode == 2 and "--replay-ratio must be between 0 and 10" in bad.stderr


@pytest.mark.slow
def test_embedded_model_knows_150_held_out_answers_none_of_them_replayed():
    """The retention score's premise on the embedded model: at least 150 held-out questions it answers right, and
    none of their answers in the base model's own replay answers (what training sees). Both are cached, so after the
    demo (tests/test_e2e.py) this only reads the cache."""
    from liandan.config import TrainConfig
    from liandan.data.render import Encoder, make_rendering, stop_token_ids
    from liandan.lora import load_base
    from liandan.replay import base_retention, replay_pool

    base = load_base(TrainConfig())
    tokenizer, device = base.tokenizer, base.device.torch_device
    encoder = Encoder(tokenizer, make_rendering(tokenizer))
    stops = stop_token_ids(tokenizer, base.model, encoder.rendering)
    known = base_retention(base.model, tokenizer, encoder, base.model_dir, stops, tokenizer.pad_token_id, device)
    assert sum(known.correct) >= 150
    pool = replay_pool(base.model, tokenizer, encoder, base.model_dir, None, stops, tokenizer.pad_token_id, device, 2048,
                       soft_targets=True)
    replies = [tokenizer.decode([t for t in item.labels if t != IGNORE], skip_special_tokens=True)
               for item in pool.items]
    for q in known.questions:
        leaked = [r for r in replies if is_correct(r, q.answers)]
        assert not leaked, (q.question, leaked[:2])


def test_teacher_forced_check_agrees_with_greedy_generation(tiny_llama):
    """retention() skips generating where the model still produces the base answer's decisive prefix: that shortcut
    must say yes exactly for what greedy decoding produces."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from liandan.data.render import Encoder, make_rendering
    from liandan.replay import (BaseKnowledge, Question, decisive_margins, decisive_prefix, greedy_answers,
                                user_prompt_ids)

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    encoder = Encoder(tokenizer, make_rendering(tokenizer))
    texts = ("Hi", "Tell me a story about a dog", "Why?")
    prompts = [user_prompt_ids(encoder, q) for q in texts]
    answers = greedy_answers(model, prompts, 12, [], tokenizer.pad_token_id, "cpu")
    # Greedy decoding produced these answers, so their margin is above 0; one token changed, below 0.
    full = decisive_margins(model, prompts, [a.tokens for a in answers], tokenizer.pad_token_id, "cpu")
    wrong = [a.tokens[:-1] + [(a.tokens[-1] + 1) % len(tokenizer)] for a in answers]
    # The margin is the smallest over the continuation: a prefix of the greedy answer is at least as sure.
    first = decisive_margins(model, prompts, [a.tokens[:1] for a in answers], tokenizer.pad_token_id, "cpu")
    assert all(0 < f <= p for f, p in zip(full, first)), (full, first)
    assert all(m < 0 for m in decisive_margins(model, prompts, wrong, tokenizer.pad_token_id, "cpu"))
    # BaseKnowledge.margins, what retention() and the benchmark use: the right answers only, by question index.
    base = BaseKnowledge([Question(q, ["?"]) for q in texts], [True, False, True], [answers[0].tokens, [], wrong[2]])
    by_index = base.margins(model, encoder, tokenizer.pad_token_id, "cpu")
    # A padded batch and a lone sequence round differently in float32 (5e-6 apart on some CPUs, measured).
    assert sorted(by_index) == [0, 2] and by_index[0] == pytest.approx(full[0], abs=1e-4) and by_index[2] < 0
    ids = tokenizer("There are 240 hours", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(decisive_prefix(tokenizer, ids, ["240"])) == "There are 240 hours"  # the word closed
    assert decisive_prefix(tokenizer, ids, ["24"]) == ids  # "24" is never a whole word here


def test_learned_tokens_add_loss_but_no_gradient():
    """--learned-prob: a token already predicted with at least that probability keeps its loss value (the report
    is the true loss) but stops pushing; the others train as before."""
    from liandan.evaluate import learned_tokens_stop

    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.2, 0.0]], requires_grad=True)  # p(target) ≈ 0.96 and ≈ 0.33
    per_token = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]), reduction="none")
    stopped = learned_tokens_stop(per_token, 0.8)
    assert torch.equal(stopped, per_token)
    stopped.sum().backward()
    assert torch.count_nonzero(logits.grad[0]) == 0 and torch.count_nonzero(logits.grad[1]) == 3
    assert learned_tokens_stop(per_token, 0.0) is per_token  # off
    with torch.no_grad():  # evaluation: nothing to stop
        assert torch.equal(learned_tokens_stop(per_token.detach(), 0.8), per_token)
