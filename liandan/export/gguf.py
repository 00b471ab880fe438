"""GGUF export for llama.cpp and Ollama, written with the `gguf` package (no llama.cpp checkout needed).

Per-architecture facts live in the ARCHITECTURES table, as in gguf-py; tensor names come from gguf-py's
own HF→GGUF name map and metadata keys from its `gguf.Keys`, so this module only adds what differs
between families:

* llama-family q/k weights are permuted from HF's rotate-half layout to GGML's interleaved rope;
* Gemma's RMSNorm multiplies by (1 + w): GGUF stores w + 1;
* Gemma 3 says per layer whether it slides, with the sliding layers' own rope base: written as the
  sliding-window pattern and the `_swa` rope base (the rope keys hold the full-attention layers');
* tied embeddings: no `output.weight`, llama.cpp reuses `token_embd.weight`;
* hyperparameters (rope base, head dim, soft-capping, sliding window) are read from config.json.

The tokenizer goes in as byte-level BPE (with the pre-tokenizer name llama.cpp identifies by
hashing a reference encoding) or SentencePiece (tokens, scores, types), with special-token ids,
add_bos/add_eos and the chat template used in training.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

import numpy as np

from liandan.atomic import atomic_path
from liandan.errors import LiandanError
from liandan.export.quantize import OUTTYPES, check_outtype


# Suffix rules, by HF tensor name: q/k projections permuted for GGML's rope (with the config key of
# their head count), and the RMSNorm weights Gemma uses as x * (1 + w).
ROPE_PERMUTED = (("q_proj.weight", "num_attention_heads"), ("k_proj.weight", "num_key_value_heads"))
GEMMA_NORMS = ("norm.weight",)


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str  # gguf.MODEL_ARCH member name
    permuted: tuple = ()  # (name suffix, head-count key): rows from HF rotate-half to GGML interleaved rope
    norm_offset: tuple = ()  # name suffixes of RMSNorm weights computing x * (1 + w): GGUF stores w + 1
    hparams: tuple = ()  # extra (config key, writer method) pairs
    sliding_layers: bool = False  # which layers slide and their rope base are per model (`layer_types`, Gemma 3)

    def permute_heads(self, hf_name: str, config: dict) -> int | None:
        """The head count to permute this weight's rows by, or None when it is not permuted."""
        for suffix, key in self.permuted:
            if hf_name.endswith(suffix):
                return config.get(key) or config["num_attention_heads"]
        return None

    def offset(self, hf_name: str) -> float:
        return 1.0 if self.norm_offset and hf_name.endswith(self.norm_offset) else 0.0


ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec("LLAMA", permuted=ROPE_PERMUTED),
    "MistralForCausalLM": ArchSpec("LLAMA", permuted=ROPE_PERMUTED),
    "Qwen2ForCausalLM": ArchSpec("QWEN2"),
    "Qwen3ForCausalLM": ArchSpec("QWEN3"),
    "GemmaForCausalLM": ArchSpec("GEMMA", norm_offset=GEMMA_NORMS),
    "Gemma2ForCausalLM": ArchSpec("GEMMA2", norm_offset=GEMMA_NORMS, hparams=(
        ("attn_logit_softcapping", "add_attn_logit_softcapping"),
        ("final_logit_softcapping", "add_final_logit_softcapping"),
        ("sliding_window", "add_sliding_window"),
    )),
    "Gemma3ForCausalLM": ArchSpec("GEMMA3", norm_offset=GEMMA_NORMS, hparams=(("sliding_window", "add_sliding_window"),),
                                  sliding_layers=True),
    "Phi3ForCausalLM": ArchSpec("PHI3"),
}

# Byte-level BPE pre-tokenizers, identified as llama.cpp does: the sha256 of the token ids of CHECK_TEXT.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 "
    "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen 1.5 / 2 / 2.5 / 3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
}


@dataclass
class Vocab:
    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str | None
    tokens: list
    types: list[int]
    scores: list[float] | None = None
    extra: dict = field(default_factory=dict)


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise LiandanError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Target:
    """What a model is written as: its row of the table, gguf-py's architecture and tensor name map."""

    hf_arch: str
    spec: ArchSpec
    arch: object  # gguf.MODEL_ARCH
    names: object  # gguf.TensorNameMap

    def tensor_name(self, hf_name: str, try_suffixes=(".weight", ".bias")) -> str | None:
        return self.names.get_name(hf_name, try_suffixes=try_suffixes)


def target_of(config: dict) -> Target:
    import gguf

    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[name].gguf_arch)
            return Target(name, ARCHITECTURES[name], arch, gguf.get_tensor_name_map(arch, config["num_hidden_layers"]))
    raise LiandanError(
        f"GGUF export does not support {', '.join(names) or config.get('model_type', 'this model')}; "
        f"supported: {', '.join(sorted(ARCHITECTURES))}"
    )


@contextmanager
def gguf_writer(outfile: Path, target: Target):
    """A GGUFWriter for this target, shared by both exporters: when the block ends the header, metadata and
    tensors are written and the file moved into place atomically; after an error nothing is left."""
    import gguf

    with atomic_path(outfile) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[target.arch])
        try:
            yield writer
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()


ROPE_THETA = 10000.0  # transformers' default rope base, for configs that leave it out


def rope_settings(config: dict) -> tuple[dict, dict]:
    """(global, sliding-window layers') rope parameters — `rope_theta`, `rope_type`, `factor` — from
    transformers 5's `rope_parameters` (per layer type for Gemma 3: `full_attention`, `sliding_attention`) or
    the older top-level `rope_theta`, `rope_local_base_freq` and `rope_scaling`."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if "full_attention" in params:
        return dict(params["full_attention"]), dict(params.get("sliding_attention") or {})
    sliding = {"rope_theta": config["rope_local_base_freq"]} if "rope_local_base_freq" in config else {}
    return {"rope_theta": config.get("rope_theta", ROPE_THETA), **params}, sliding


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores q/k rows as [first halves | second halves] per head; GGML wants them interleaved."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


# ---------------------------------------------------------------- vocabulary
def read_vocab(model_dir: Path, vocab_size: int) -> Vocab:
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if (model_dir / "tokenizer.model").is_file() and not _is_byte_level(model_dir):
        return _sentencepiece_vocab(model_dir / "tokenizer.model", vocab_size, tokenizer)
    if not (model_dir / "tokenizer.json").is_file():
        raise LiandanError(f"{model_dir}: GGUF export needs tokenizer.json (byte-level BPE) or tokenizer.model (SentencePiece)")
    # Hash what tokenizer.json itself says (transformers may swap in a class of its own for some model types).
    from tokenizers import Tokenizer

    digest = sha256(str(Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(CHECK_TEXT).ids).encode()).hexdigest()
    pre = PRE_TOKENIZERS.get(digest)
    if pre is None:
        raise LiandanError(
            f"{model_dir}: this byte-level BPE pre-tokenizer is not one llama.cpp knows (hash {digest[:12]}…); "
            f"supported: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}"
        )
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(str(added[i]))
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return Vocab("gpt2", pre, tokens, types)


def _is_byte_level(model_dir: Path) -> bool:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return False
    model = json.loads(path.read_text(encoding="utf-8")).get("model", {})
    return model.get("type") == "BPE" and not model.get("byte_fallback", False)


def _sentencepiece_vocab(path: Path, vocab_size: int, tokenizer) -> Vocab:
    import gguf

    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise LiandanError(f"{path} is a SentencePiece vocabulary; exporting it needs: pip install sentencepiece") from None

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(path))
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        if sp.IsUnknown(i):
            types[i] = gguf.TokenType.UNKNOWN
        elif sp.IsControl(i):
            types[i] = gguf.TokenType.CONTROL
        elif sp.IsUnused(i):
            types[i] = gguf.TokenType.UNUSED
        elif sp.IsByte(i):
            types[i] = gguf.TokenType.BYTE
        else:
            types[i] = gguf.TokenType.NORMAL
    for i, token in tokenizer.added_tokens_decoder.items():
        if i < vocab_size and i >= sp.vocab_size():
            tokens[i] = str(token).encode("utf-8")
            scores[i] = -1000.0
            types[i] = gguf.TokenType.CONTROL if token.special else gguf.TokenType.USER_DEFINED
    return Vocab("llama", "default", tokens, types, scores)


# ---------------------------------------------------------------- tensors
def iter_tensors(model_dir: Path):
    from safetensors import safe_open

    from liandan.models import weight_files

    files = weight_files(model_dir)
    if not files:
        raise LiandanError(f"{model_dir}: no *.safetensors weights")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name).float().numpy()


def encode_tensor(data: np.ndarray, outtype: str, name: str):
    """Cast one tensor to the output type: norms and other 1-D tensors stay in f32; for q8_0, rows not a
    multiple of 32 values wide (Q8_0's block) are written as f16."""
    import gguf
    from gguf.quants import quantize

    if data.ndim <= 1 or outtype == "f32" or name.endswith("_norm.weight"):
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if outtype == "f16":
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    if outtype == "bf16":
        return quantize(data, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    if data.shape[-1] % 32 != 0:  # Q8_0 blocks are 32 values wide
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    return quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def export_gguf(model_dir: Path, outfile: Path, outtype: str = "f16", chat_template: str | None = None,
                stop_tokens: list[str] | None = None, name: str | None = None, log=print) -> Path:
    """Write a complete GGUF (weights + tokenizer + chat template) for a Hugging Face model directory."""
    import gguf

    model_dir, outfile = Path(model_dir), Path(outfile)
    outtype = check_outtype(outtype)
    if OUTTYPES[outtype]:  # a k-quant or legacy quant: llama.cpp's quantizer makes it from this writer's f16
        from liandan.export.quantize import export_quantized

        return export_quantized(model_dir, outfile, outtype, chat_template, stop_tokens, name, log)
    config = read_config(model_dir)
    target = target_of(config)
    vocab = read_vocab(model_dir, config["vocab_size"])
    with gguf_writer(outfile, target) as writer:
        writer.add_name(name or model_dir.name)
        writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[outtype]))
        _write_hparams(writer, config, target.spec)
        _write_vocab(writer, vocab, model_dir, chat_template, stop_tokens)
        count = _write_tensors(writer, model_dir, config, target, outtype)
    log(f"Wrote {outfile} ({gguf.MODEL_ARCH_NAMES[target.arch]}, {outtype}, {count} tensors, "
        f"{outfile.stat().st_size / 1e6:.1f} MB)")
    return outfile


def _write_hparams(writer, config: dict, spec: ArchSpec) -> None:
    """The model's shape and rope settings, in llama.cpp's keys."""
    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    rope, sliding_rope = rope_settings(config)
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads", n_head))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rotary = rope.get("partial_rotary_factor") or config.get("partial_rotary_factor", 1.0)
    writer.add_rope_dimension_count(int(head_dim * rotary))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_vocab_size(config["vocab_size"])
    for key, method in spec.hparams:
        if config.get(key) is not None:
            getattr(writer, method)(config[key])
    _write_rope(writer, rope)
    if spec.sliding_layers:  # rather than llama.cpp's defaults for the family (5 of 6 layers slide, base 10000)
        if config.get("layer_types"):
            writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config["layer_types"]])
        if sliding_rope.get("rope_theta") is not None:
            writer.add_rope_freq_base_swa(float(sliding_rope["rope_theta"]))


def _write_rope(writer, rope: dict) -> None:
    import gguf

    writer.add_rope_freq_base(float(rope.get("rope_theta", ROPE_THETA)))
    kind = rope.get("rope_type") or rope.get("type")
    if kind in (None, "default"):
        return
    if kind != "linear":
        raise LiandanError(f"GGUF export: rope scaling '{kind}' is not supported yet (only linear)")
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(float(rope["factor"]))


def _write_tensors(writer, model_dir: Path, config: dict, target: Target, outtype: str) -> int:
    """Every weight under its GGUF name, permuted and offset as the architecture needs; returns the count."""
    tied = config.get("tie_word_embeddings", False)
    count = 0
    for hf_name, data in iter_tensors(model_dir):
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd.weight
        new = target.tensor_name(hf_name)
        if new is None:
            raise LiandanError(f"GGUF export: no GGUF name for tensor {hf_name} of {target.hf_arch}")
        heads = target.spec.permute_heads(hf_name, config)
        if heads:
            data = permute_qk(data, heads)
        if target.spec.offset(hf_name):
            data = data + target.spec.offset(hf_name)
        encoded, qtype = encode_tensor(data, outtype, new)
        writer.add_tensor(new, encoded, raw_dtype=qtype)
        count += 1
    return count


def _write_vocab(writer, vocab: Vocab, model_dir: Path, chat_template: str | None, stop_tokens: list[str] | None) -> None:
    import gguf

    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    special = gguf.SpecialVocab(model_dir, load_merges=vocab.model == "gpt2", n_vocab=len(vocab.tokens))
    if chat_template:
        special.chat_template = chat_template
    if stop_tokens:
        # Generation must end where training ended: the trained stop token is the EOS/EOT llama.cpp watches.
        texts = [t.decode() if isinstance(t, bytes) else t for t in vocab.tokens]
        ids = [texts.index(t) for t in stop_tokens if t in texts]
        if ids:
            special.special_token_ids["eos"] = ids[0]
            writer.add_eot_token_id(ids[0])
    special.add_to_gguf(writer)


def export_lora_gguf(adapter_dir: Path, outfile: Path, outtype: str = "f32", log=print, base: str | None = None) -> Path:
    """The LoRA adapter alone, as a GGUF LoRA adapter for llama.cpp's --lora and Ollama's ADAPTER. `base`: the
    base model whose architecture it records (default: the one the adapter was trained on)."""
    import gguf
    from safetensors.torch import load_file

    from liandan.adapters import PEFT_CONFIG, PEFT_WEIGHTS, read_record
    from liandan.models import resolve_model

    adapter_dir, outfile = Path(adapter_dir), Path(outfile)
    outtype = check_outtype(outtype)
    if OUTTYPES[outtype] or outtype == "q8_0":
        raise LiandanError(f"--outtype {outtype}: a LoRA adapter GGUF is written in f32, f16 or bf16 (llama.cpp applies "
                           "adapters unquantized); quantize the base model's GGUF instead")
    record = read_record(adapter_dir)
    if record.get("fine_tune_type") in ("dora", "full"):
        raise LiandanError(f"{adapter_dir}: a {record['fine_tune_type']} adapter has no llama.cpp adapter format; "
                           "use `liandan fuse --export-gguf` instead")
    adapter_config = json.loads((adapter_dir / PEFT_CONFIG).read_text(encoding="utf-8"))
    if adapter_config.get("use_dora"):
        raise LiandanError(f"{adapter_dir}: llama.cpp cannot apply DoRA adapters; use `liandan fuse --export-gguf`")
    config = read_config(resolve_model(base or record.get("base_model") or adapter_config.get("base_model_name_or_path")))
    target = target_of(config)
    state = load_file(str(adapter_dir / PEFT_WEIGHTS))
    with gguf_writer(outfile, target) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter_config["lora_alpha"]))
        for key in sorted(state):
            module, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
            if kind not in ("A.weight", "B.weight"):
                raise LiandanError(f"{adapter_dir}: unexpected adapter tensor {key}")
            target_name = target.tensor_name(module + ".weight", try_suffixes=(".weight",))
            if target_name is None:
                raise LiandanError(f"{adapter_dir}: no GGUF name for {module}")
            data = state[key].float().numpy()
            heads = target.spec.permute_heads(module + ".weight", config)
            if kind == "B.weight" and heads:
                data = permute_qk(data, heads)  # B's rows are the weight's rows
            suffix = ".lora_a" if kind == "A.weight" else ".lora_b"
            encoded, qtype = encode_tensor(data, outtype, target_name + suffix)
            writer.add_tensor(target_name + suffix, encoded, raw_dtype=qtype)
    log(f"Wrote {outfile} (LoRA adapter, alpha {adapter_config['lora_alpha']}, rank {adapter_config['r']})")
    return outfile
