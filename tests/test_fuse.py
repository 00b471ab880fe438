"""`liandan fuse` and adapter-only GGUF: the shipped model computes what base + adapter computed."""

import json

import numpy as np
import pytest
import torch
from conftest import liandan, write_jsonl

from liandan.config import load_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama):
    """A LoRA adapter with non-trivial weights (a few steps at a high learning rate)."""
    from liandan.lora import run

    root = tmp_path_factory.mktemp("fuse")
    write_jsonl(root / "data" / "train.jsonl", [{"prompt": "Capital of France?", "completion": "Paris"}] * 2)
    run(load_config(None, dict(model=str(tiny_llama), train=True, data=str(root / "data"), iters=5, batch_size=2,
                               learning_rate=1e-2, num_layers=-1, adapter_path=str(root / "adapters"),
                               system_prompt="Answer briefly.")), log=lambda *_: None)
    return root


def test_fused_model_equals_base_plus_adapter(trained, tiny_llama):
    from transformers import AutoModelForCausalLM

    from liandan.generate import load_pipeline

    result = liandan("fuse", "--adapter-path", trained / "adapters", "--save-path", trained / "fused")
    assert result.returncode == 0, result.stderr
    fused_dir = trained / "fused"
    fused = AutoModelForCausalLM.from_pretrained(fused_dir, dtype=torch.float32).eval()  # plain transformers
    pipe = load_pipeline(None, str(trained / "adapters"))
    ids = torch.tensor([pipe.encoder.prompt_ids([{"role": "user", "content": "Capital of France?"}])])
    with torch.no_grad():
        diff = (fused(ids).logits - pipe.model(ids).logits).abs().max().item()
    assert diff < 1e-4
    assert not any(fused_dir.glob("adapter_*"))  # merged, not stacked
    generation = json.loads((fused_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] in (2, [2])  # <|im_end|>, the trained stop token
    assert (fused_dir / "chat_template.jinja").is_file()
    record = json.loads((fused_dir / "liandan.json").read_text())
    assert record["rendering"]["system_prompt"] == "Answer briefly."
    # A fused model renders prompts as in training without its adapter (system prompt included).
    fused_pipe = load_pipeline(str(fused_dir), None)
    assert fused_pipe.encoder.prompt_ids([{"role": "user", "content": "x"}]) == pipe.encoder.prompt_ids([{"role": "user", "content": "x"}])


def test_fuse_refuses_to_replace_a_foreign_directory(trained, tmp_path):
    (tmp_path / "mine.txt").write_text("important")
    result = liandan("fuse", "--adapter-path", trained / "adapters", "--save-path", tmp_path)
    assert result.returncode == 2 and "already exists and holds mine.txt; pass --overwrite" in result.stderr
    assert (tmp_path / "mine.txt").read_text() == "important"


def test_lora_gguf_in_llama_cpp_matches_peft(trained, tiny_llama, tmp_path):
    lc = pytest.importorskip("llama_cpp")
    from liandan.export.gguf import export_gguf, export_lora_gguf
    from liandan.generate import load_pipeline

    base = export_gguf(tiny_llama, tmp_path / "base.gguf", "f32", name="tiny", log=lambda *_: None)
    adapter = export_lora_gguf(trained / "adapters", tmp_path / "lora.gguf", log=lambda *_: None)
    pipe = load_pipeline(None, str(trained / "adapters"))
    tokens = pipe.encoder.prompt_ids([{"role": "user", "content": "Capital of France?"}])
    with torch.no_grad():
        expected = pipe.model(torch.tensor([tokens])).logits[0].numpy()
    llm = lc.Llama(model_path=str(base), lora_path=str(adapter), n_ctx=64, logits_all=True, verbose=False,
                   type_k=0, type_v=0)
    llm.eval(tokens)
    got = np.array(llm.scores[: len(tokens)])
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-3


def test_studio_ship_tab_fuses_and_exports_twice(trained, tmp_path):
    """The Ship tab's functions (the page calls exactly these): fuse, GGUF, Ollama; a second export replaces the first."""
    import shutil

    from safetensors.torch import load_file, save_file

    from liandan.studio import ship

    adapter, out = tmp_path / "run", tmp_path / "ship"
    shutil.copytree(trained / "adapters", adapter)
    for _ in range(2):  # Fuse twice: the second replaces the first (the ship folder is the studio's)
        ship.fuse_run(adapter, out)
    for _ in range(2):
        gguf = ship.export_gguf(ship.fused_for(adapter, out), "f16")
        modelfile, model_gguf, command = ship.export_ollama(ship.fused_for(adapter, out), "tiny", "q8_0")
    assert gguf.read_bytes()[:4] == b"GGUF" == model_gguf.read_bytes()[:4]
    assert "FROM ./tiny.gguf" in modelfile.read_text(encoding="utf-8") and command.startswith("ollama create tiny -f ")
    fused_weights = ship.fused_dir(out) / "model.safetensors"
    before = fused_weights.read_bytes()
    ship.fused_for(adapter, out)
    assert fused_weights.read_bytes() == before  # unchanged adapter: not fused again
    weights = load_file(str(adapter / "adapter_model.safetensors"))  # the run trained on: new weights
    save_file({k: v * 2 for k, v in weights.items()}, str(adapter / "adapter_model.safetensors"))
    ship.fused_for(adapter, out)
    assert fused_weights.read_bytes() != before  # exports now come from the new weights, not the stale fuse


def test_fuse_overwrite_drops_the_old_models_weights_and_never_replaces_the_base(trained, tiny_llama, tmp_path):
    out = tmp_path / "fused"
    assert liandan("fuse", "--adapter-path", trained / "adapters", "--save-path", out).returncode == 0
    (out / "model-00001-of-00002.safetensors").write_bytes((out / "model.safetensors").read_bytes())  # an older,
    (out / "model.safetensors.index.json").write_text("{}")  # sharded model's files
    (out / "old.gguf").write_bytes(b"GGUF")
    (out / "notes.txt").write_text("mine")
    result = liandan("fuse", "--adapter-path", trained / "adapters", "--save-path", out, "--overwrite", "--export-gguf")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.glob("*.safetensors*")) == ["model.safetensors"] and not (out / "old.gguf").exists()
    assert (out / "notes.txt").read_text() == "mine" and (out / "ggml-model-f16.gguf").is_file()
    base = tmp_path / "base.gguf"
    assert liandan("export", "gguf", "--model", tiny_llama, "--outfile", base, "--outtype", "f32").returncode == 0
    before = base.read_bytes()
    result = liandan("fuse", "--adapter-path", trained / "adapters", "--model", base, "--save-path", tmp_path / "f2",
                     "--export-gguf", "--gguf-path", base, "--overwrite")
    assert result.returncode == 2 and "--gguf-path" in result.stderr and "--model" in result.stderr
    assert base.read_bytes() == before
