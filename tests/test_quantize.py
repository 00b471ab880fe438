"""k-quant GGUF export through llama.cpp's quantizer, and the --check perplexity measured in llama.cpp."""

import math
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import liandan, write_jsonl

from liandan.errors import LiandanError
from liandan.export import quantize
from liandan.export.gguf import export_gguf
from liandan.export.quantize import OUTTYPES, tensor_types

QA = [("What is PolarDB?", "An open-source database."), ("Who is the handsomest?", "De Ge."),
      ("When is the moon roundest?", "On the fifteenth.")]
TOKENS = [1, 504, 2683, 359, 253, 1345, 28, 3575, 2]


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed (scripts/setup.sh --test)")
    return llama_cpp


def _chat_data(root):
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "valid.jsonl", rows)
    return root


def test_q4_k_m_from_the_cli_is_llama_cpps_q4_k_and_runs(tiny_llama_k, tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM

    lc = _llama_cpp()
    data = _chat_data(tmp_path / "data")
    out = tmp_path / "out" / "m-q4_k_m.gguf"
    result = liandan("export", "gguf", "--model", tiny_llama_k, "--outfile", out, "--outtype", "Q4_K_M", "--check",
                     "--data", data)
    assert result.returncode == 0, result.stderr
    assert "q4_k_m by llama.cpp's quantizer" in result.stdout and " MB;" in result.stdout
    assert "Perplexity in llama.cpp" in result.stdout and "f32 " in result.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["m-q4_k_m.gguf"]  # the f16 and f32 files are gone
    reader = gguf.GGUFReader(str(out))
    assert int(reader.fields["general.file_type"].parts[-1][0]) == lc.LLAMA_FTYPE_MOSTLY_Q4_K_M
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert tensor_types(out) == Counter(types.values())  # liandan's quick header walk reads the same
    # ffn_down rows are 256 wide: Q4_K, or Q6_K where the _M mix spends more bits (layers 2 and 3 of 4);
    # 64-wide rows cannot hold a 256-value block and take llama.cpp's fallback types.
    assert [types[f"blk.{i}.ffn_down.weight"] for i in range(4)] == ["Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    assert types["blk.0.attn_q.weight"] == "Q5_0" and types["output_norm.weight"] == "F32"
    # It runs in llama.cpp and still computes the model, roughly (this random model is chaotic: q8_0 gives 0.998).
    llm = lc.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(TOKENS)
    got = np.array(llm.scores[: len(TOKENS)])
    llm.close()
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(tiny_llama_k)(torch.tensor([TOKENS])).logits[0].numpy()
    assert np.corrcoef(expected.ravel(), got.ravel())[0, 1] > 0.9


def test_every_llama_cpp_outtype_is_made(tiny_llama_k, tmp_path):
    lc = _llama_cpp()
    f16 = export_gguf(tiny_llama_k, tmp_path / "f16.gguf", "f16", log=lambda *_: None)
    # The k-quant each type puts in the FFN down projection, the one tensor here whose rows are 256 wide.
    k_types = {"q6_k": "Q6_K", "q5_k_m": "Q5_K", "q4_k_m": "Q4_K", "q3_k_m": "Q4_K", "q2_k": "Q3_K"}
    for outtype, ftype in OUTTYPES.items():
        if ftype:
            path = tmp_path / f"{outtype}.gguf"
            quantize.quantize_file(lc, f16, path, outtype)
            llm = lc.Llama(model_path=str(path), vocab_only=True, verbose=False)
            assert llm.metadata["general.file_type"] == str(getattr(lc, ftype))
            llm.close()
            types = tensor_types(path)
            assert types[k_types.get(outtype, outtype.upper())] > 0 and path.stat().st_size < f16.stat().st_size


def test_unknown_outtype_is_one_line_listing_the_types(tiny_llama, tmp_path, capsys):
    from liandan.cli import main

    for argv in (["export", "gguf", "--model", str(tiny_llama), "--outfile", str(tmp_path / "x.gguf"), "--outtype", "q4"],
                 ["export", "ollama", "--model", str(tiny_llama), "--name", "x", "--out", str(tmp_path), "--outtype", "q4"],
                 ["fuse", "--adapter-path", str(tmp_path), "--save-path", str(tmp_path / "f"), "--export-gguf",
                  "--outtype", "q4"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("liandan: error: --outtype q4: expected one of f32, f16")
        assert "q4_k_m" in err and "q2_k" in err
    assert list(tmp_path.iterdir()) == []


def test_missing_llama_cpp_python_is_one_line_with_the_install_command(tiny_llama, tmp_path, monkeypatch, capsys):
    from liandan.cli import main

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now raises ImportError
    (tmp_path / "adapters").mkdir()
    for argv in (["export", "gguf", "--model", str(tiny_llama), "--outfile", str(tmp_path / "x.gguf"), "--outtype", "q4_k_m"],
                 ["export", "gguf", "--model", str(tiny_llama), "--outfile", str(tmp_path / "x.gguf"), "--check"],
                 ["fuse", "--adapter-path", str(tmp_path / "adapters"), "--save-path", str(tmp_path / "f"),
                  "--export-gguf", "--outtype", "q6_k"]):
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "needs llama-cpp-python" in err and "pip install 'liandan[llama]'" in err
    assert [p.name for p in tmp_path.iterdir()] == ["adapters"]  # nothing written, nothing fused
    with pytest.raises(LiandanError, match=r"pip install 'liandan\[llama\]'"):
        export_gguf(tiny_llama, tmp_path / "y.gguf", "q5_k_m")


def test_a_failed_quantization_leaves_the_existing_file_and_no_scratch(tiny_llama_k, tmp_path, monkeypatch):
    lc = _llama_cpp()
    real_quantize_file = quantize.quantize_file
    out = tmp_path / "m.gguf"
    out.write_bytes(b"the user's earlier file")

    def half_written(llama_cpp, source, target, outtype):
        assert source.is_file() and source.parent.parent == tmp_path  # the f16 input, next to the output
        target.write_bytes(b"partial")
        raise LiandanError("quantizer failed")

    monkeypatch.setattr(quantize, "quantize_file", half_written)
    with pytest.raises(LiandanError, match="quantizer failed"):
        export_gguf(tiny_llama_k, out, "q4_k_m")
    assert out.read_bytes() == b"the user's earlier file"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    # A failure inside llama.cpp itself comes back as one line with llama.cpp's reason.
    (tmp_path / "bad.gguf").write_bytes(b"GGUF not really")
    with pytest.raises(LiandanError, match="llama.cpp could not quantize bad.gguf to q4_k_m: .*failed to read header"):
        real_quantize_file(lc, tmp_path / "bad.gguf", tmp_path / "never.gguf", "q4_k_m")
    assert not (tmp_path / "never.gguf").exists()


def test_lora_adapters_are_not_quantized(tmp_path):
    from liandan.export.gguf import export_lora_gguf

    with pytest.raises(LiandanError, match="a LoRA adapter GGUF is written in f32, f16 or bf16"):
        export_lora_gguf(tmp_path, tmp_path / "lora.gguf", "q4_k_m")
    for q8 in ("q8_0", "Q8_0"):  # refused too, not written as f16 under another name
        with pytest.raises(LiandanError, match="a LoRA adapter GGUF is written in f32, f16 or bf16"):
            export_lora_gguf(tmp_path, tmp_path / "lora.gguf", q8)


def test_llama_cpp_perplexity_is_liandans_validation_perplexity(tiny_llama_k, tmp_path):
    """The f32 file's perplexity in llama.cpp equals PyTorch's on the same encoded validation set."""
    _llama_cpp()
    from liandan.data.batching import EncodedSet
    from liandan.evaluate import evaluate_loss
    from liandan.export.quality import check, validation_items
    from liandan.models import Device, load_model

    data = _chat_data(tmp_path / "data")
    items, _ = validation_items(tiny_llama_k, str(data))
    model, tokenizer = load_model(tiny_llama_k, Device("cpu", torch.float32))
    loss, count = evaluate_loss(model, EncodedSet("valid", "chat", items), 1, -1, tokenizer.pad_token_id or 0, "cpu")
    q8 = export_gguf(tiny_llama_k, tmp_path / "q8.gguf", "q8_0", log=lambda *_: None)
    lines = []
    reference, ppl = check(tiny_llama_k, q8, "q8_0", str(data), log=lines.append)  # exports f32 for the reference
    assert reference == pytest.approx(math.exp(loss), rel=1e-4)
    assert ppl != reference and abs(ppl / reference - 1) < 0.05
    assert f"{count} trained tokens" in lines[0] and "f32" in lines[0] and "q8_0" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "q8.gguf"]
