"""GGUF export: tiny random models of every supported architecture round-trip, and run in llama.cpp."""

import json

import numpy as np
import pytest
import torch

from liandan.errors import LiandanError
from liandan.export.gguf import ARCHITECTURES, CHECK_TEXT, PRE_TOKENIZERS, export_gguf, permute_qk, rope_settings

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, initializer_range=0.2)


def tiny_configs(vocab_size):
    from transformers import (Gemma2Config, Gemma3TextConfig, GemmaConfig, LlamaConfig, MistralConfig, Phi3Config,
                              Qwen2Config, Qwen3Config)

    return {
        "LlamaForCausalLM": LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=True, **SMALL),
        "MistralForCausalLM": MistralConfig(vocab_size=vocab_size, sliding_window=None, **SMALL),
        "Qwen2ForCausalLM": Qwen2Config(vocab_size=vocab_size, tie_word_embeddings=True, **SMALL),
        "Qwen3ForCausalLM": Qwen3Config(vocab_size=vocab_size, head_dim=16, tie_word_embeddings=True, **SMALL),
        "GemmaForCausalLM": GemmaConfig(vocab_size=vocab_size, head_dim=16, hidden_activation="gelu_pytorch_tanh", **SMALL),
        "Gemma2ForCausalLM": Gemma2Config(vocab_size=vocab_size, head_dim=16, query_pre_attn_scalar=16,
                                          sliding_window=128, **SMALL),
        # Per-layer-type rope, neither llama.cpp's defaults (sliding base 10000, 5 sliding layers of 6): the
        # logits match only if the GGUF says which layer slides and the sliding layers' rope base.
        "Gemma3ForCausalLM": Gemma3TextConfig(vocab_size=vocab_size, head_dim=16, query_pre_attn_scalar=16,
                                              sliding_window=128, layer_types=["full_attention", "sliding_attention"],
                                              rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                               "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
                                              **SMALL),
        "Phi3ForCausalLM": Phi3Config(vocab_size=vocab_size, pad_token_id=None, tie_word_embeddings=False, **SMALL),
    }


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, llama_tokenizer):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("archs")
    out = {}
    for arch, config in tiny_configs(len(llama_tokenizer)).items():
        config.architectures = [arch]
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        path = root / arch
        model.save_pretrained(path)
        llama_tokenizer.save_pretrained(path)
        out[arch] = (path, model)
    return out


def test_every_table_architecture_has_a_fixture(llama_tokenizer):
    assert set(tiny_configs(10)) == set(ARCHITECTURES)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_round_trip_names_shapes_values(arch, tiny_models, tmp_path):
    import gguf

    path, model = tiny_models[arch]
    out = export_gguf(path, tmp_path / "m.gguf", "f32", log=lambda *_: None)
    reader = gguf.GGUFReader(str(out))
    fields = reader.fields
    arch_name = bytes(fields["general.architecture"].parts[-1]).decode()
    assert arch_name == gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, ARCHITECTURES[arch].gguf_arch)]
    assert int(fields[f"{arch_name}.block_count"].parts[-1][0]) == 2
    assert bytes(fields["tokenizer.ggml.pre"].parts[-1]).decode() == "smollm"
    tensors = {t.name: t for t in reader.tensors}
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    embed = tensors["token_embd.weight"]
    assert list(reversed(embed.shape.tolist())) == list(state["model.embed_tokens.weight"].shape)
    np.testing.assert_array_equal(embed.data.reshape(state["model.embed_tokens.weight"].shape), state["model.embed_tokens.weight"])
    offset = 1.0 if ARCHITECTURES[arch].norm_offset else 0.0
    np.testing.assert_allclose(tensors["output_norm.weight"].data, state["model.norm.weight"] + offset)
    assert ("output.weight" in tensors) == (not model.config.tie_word_embeddings)
    # Every weight is written once (tied heads and rotary buffers excepted).
    expected = {k for k in state if not k.endswith("inv_freq") and not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    assert len(reader.tensors) == len(expected)


def test_qk_permutation_matches_interleaved_rope():
    w = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)  # 2 heads of 8 rows
    p = permute_qk(w, 2)
    # Within a head, rows [0..3] and [4..7] (HF's halves) become interleaved pairs (0,4), (1,5), ...
    assert p[:8, 0].tolist() == [0, 12, 3, 15, 6, 18, 9, 21]


def test_gemma3_rope_settings_read_alike_from_old_and_new_configs():
    new = {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    old = {"rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    (new_global, new_sliding), (old_global, old_sliding) = rope_settings(new), rope_settings(old)
    assert new_global == old_global == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    assert new_sliding["rope_theta"] == old_sliding["rope_theta"] == 1e4
    assert rope_settings({"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}) == \
        ({"rope_theta": 5e5, "rope_type": "default"}, {})


def test_pre_tokenizer_hashes(llama_tokenizer, qwen_tokenizer):
    from hashlib import sha256

    def name(tok):
        return PRE_TOKENIZERS.get(sha256(str(tok.encode(CHECK_TEXT)).encode()).hexdigest())

    assert name(llama_tokenizer) == "smollm" and name(qwen_tokenizer) == "qwen2"


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(LiandanError, match="does not support GPTNeoXForCausalLM; supported: Gemma2ForCausalLM"):
        export_gguf(tmp_path, tmp_path / "x.gguf")


def test_outtypes_write_smaller_files(tiny_models, tmp_path):
    path, _ = tiny_models["LlamaForCausalLM"]
    sizes = {t: export_gguf(path, tmp_path / f"{t}.gguf", t, log=lambda *_: None).stat().st_size for t in ("f32", "f16", "q8_0")}
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"]


# ---------------------------------------------------------------- llama.cpp


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed (scripts/setup.sh --test)")
    return llama_cpp


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_llama_cpp_logits_match_pytorch(arch, tiny_models, tmp_path):
    lc = _llama_cpp()
    path, model = tiny_models[arch]
    # A neutral name: llama.cpp looks for Phi-3's own special tokens when general.name says "Phi3".
    out = export_gguf(path, tmp_path / "m.gguf", "f32", name="tiny", log=lambda *_: None)
    tokens = [1, 504, 2683, 359, 253, 1345, 28, 3575, 2]
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0].numpy()
    # f32 KV cache: the default f16 cache alone costs ~1e-3 of relative error
    llm = lc.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0)
    llm.eval(tokens)
    got = np.array(llm.scores[: len(tokens)])
    rel = np.abs(got - expected).max() / np.abs(expected).max()
    assert rel < 1e-3, f"{arch}: relative error {rel:.2e}"
