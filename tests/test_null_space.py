"""--protect-directions: LoRA inputs kept off the directions the base model uses on the replay examples."""

import torch

from liandan.data.render import IGNORE, Encoded


def _lora_model(tiny_llama):
    from transformers import AutoModelForCausalLM

    from liandan.adapters import setup_finetuning
    from liandan.config import TrainConfig

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model, _ = setup_finetuning(base, TrainConfig(num_layers=-1))
    return model


def _examples(n: int, length: int, seed: int = 0) -> list[Encoded]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(10, 2000, (length,), generator=g).tolist()
        out.append(Encoded(ids, [IGNORE] * (length // 2) + ids[length // 2:]))
    return out


def _randomize_adapter(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_the_adapter_changes_nothing_on_text_it_is_kept_off(tiny_llama):
    """With the replay examples' inputs fully inside the protected directions (12 tokens, 16 directions), the adapted
    model must give the base model's logits on them whatever the LoRA weights are, after every projection; on
    other text the adapter still acts."""
    from liandan.null_space import build, lora_inputs

    model = _lora_model(tiny_llama)
    replay, other = _examples(2, 6), _examples(1, 6, seed=1)
    space = build(model, replay, 16, torch.device("cpu"), log=lambda *_: None)
    assert len(space.pairs) == len(lora_inputs(model))
    for weight, basis in space.pairs:  # orthonormal columns, min(16, half the input width)
        assert basis.shape == (weight.shape[1], 16)
        assert torch.allclose(basis.T @ basis, torch.eye(16), atol=1e-4)

    def logits(example, adapter: bool):
        ids = torch.tensor([example.input_ids])
        with torch.no_grad():
            if adapter:
                return model(input_ids=ids).logits
            with model.disable_adapter():
                return model(input_ids=ids).logits

    for seed in (1, 2):  # as if after optimizer steps: new weights, projected again
        _randomize_adapter(model, seed)
        assert not torch.allclose(logits(replay[0], True), logits(replay[0], False), atol=1e-3)  # unprotected: it acts
        space.apply()
        for example in replay:
            assert torch.allclose(logits(example, True), logits(example, False), atol=1e-4)
        assert not torch.allclose(logits(other[0], True), logits(other[0], False), atol=1e-3)


def test_layers_fed_the_same_input_share_directions_computed_from_the_base_model(tiny_llama):
    """q/k/v read one tensor, as do gate/up: one sum and one basis each. A resumed run has trained LoRA weights when
    the directions are computed: they must be the base model's all the same."""
    from liandan.null_space import build, lora_inputs

    model = _lora_model(tiny_llama)
    replay = _examples(8, 40)
    fresh = build(model, replay, 8, torch.device("cpu"), log=lambda *_: None)
    _randomize_adapter(model, 3)
    resumed = build(model, replay, 8, torch.device("cpu"), log=lambda *_: None)
    projector = lambda basis: basis @ basis.T  # noqa: E731 (eigenvectors' signs are arbitrary; the span is not)
    for (_, a), (_, b) in zip(fresh.pairs, resumed.pairs):
        assert torch.allclose(projector(a), projector(b), atol=1e-4)
    name_of = {id(m): n for n, m in model.named_modules()}
    names = [name_of[id(m)] for m in lora_inputs(model)]  # the order of fresh.pairs
    by_name = dict(zip(names, (b for _, b in fresh.pairs)))
    first = names[0].rsplit(".", 2)[0]  # model...layers.N
    assert by_name[f"{first}.self_attn.q_proj"] is by_name[f"{first}.self_attn.v_proj"]
    assert by_name[f"{first}.mlp.gate_proj"] is by_name[f"{first}.mlp.up_proj"]
    assert by_name[f"{first}.self_attn.q_proj"] is not by_name[f"{first}.mlp.gate_proj"]


def test_nothing_to_protect_without_replay_or_with_zero(tiny_llama):
    from liandan.null_space import build

    model = _lora_model(tiny_llama)
    assert build(model, [], 16, torch.device("cpu")) is None
    assert build(model, _examples(2, 6), 0, torch.device("cpu")) is None
