"""The embedded default model: deterministic, cached, rebuilt when corrupt, loaded via from_pretrained."""

import json

from ipylora.engine import tiny


def _manifest(path):
    return json.loads((path / tiny.MANIFEST).read_text())["files"]


def test_build_is_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("IPYLORA_CACHE", str(tmp_path / "a"))
    first = tiny.tiny_model_path()
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert tiny.tiny_model_path() == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime, "a valid cache must not be rebuilt"
    monkeypatch.setenv("IPYLORA_CACHE", str(tmp_path / "b"))
    second = tiny.tiny_model_path()
    assert first != second
    assert _manifest(first) == _manifest(second), "two builds must be byte-identical"


def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("IPYLORA_CACHE", str(tmp_path))
    path = tiny.tiny_model_path()
    good = _manifest(path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert tiny.tiny_model_path() == path
    assert _manifest(path) == good
    assert len(weights.read_bytes()) > 100
    (path / "tokenizer.json").unlink()
    tiny.tiny_model_path()
    assert (path / "tokenizer.json").exists()


def test_loads_through_from_pretrained():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny.tiny_model_path()
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.hidden_size == 128 and model.config.num_hidden_layers == 2
    text = "###Human:\ngenerate a prompt, 8k!\n"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
