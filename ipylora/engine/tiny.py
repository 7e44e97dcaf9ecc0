"""The embedded default model: a tiny Llama built offline, deterministically, in seconds.

There is no model hub on many machines (CI, air-gapped servers), yet the whole workflow should
run anywhere in a minute. So ipylora builds its own default: a byte-level BPE tokenizer trained
on a bundled corpus and a 2-layer Llama with random weights. It is written to the user's cache
dir with a manifest of file hashes; a missing or corrupt cache is rebuilt. It then loads through
the same `from_pretrained` path as any other model.

The settings are measured, not guessed: hidden 128, 2 layers and `initializer_range=0.1` let
LoRA (r=32, lr 1e-2) memorise ~55 short prompt/response pairs in a few hundred steps on 2 CPU
cores; with the usual init of 0.02 LoRA barely moves the output and learns nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

TINY_MODEL_ID = "ipylora/tiny-llama"
BUILD_VERSION = 1
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>"]
MODEL_SETTINGS = dict(
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    initializer_range=0.1,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
MANIFEST = "ipylora-manifest.json"


def cache_root() -> Path:
    """Where ipylora caches what it builds: $IPYLORA_CACHE, else the XDG cache dir."""
    if os.environ.get("IPYLORA_CACHE"):
        return Path(os.environ["IPYLORA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ipylora"


def _corpus() -> str:
    return resources.files("ipylora.engine").joinpath("assets/corpus.txt").read_text("utf-8")


def _build_key() -> str:
    recipe = json.dumps([BUILD_VERSION, VOCAB_SIZE, SPECIAL_TOKENS, MODEL_SETTINGS], sort_keys=True)
    return hashlib.sha256((recipe + _corpus()).encode()).hexdigest()[:12]


def tiny_model_path() -> Path:
    """The embedded model's folder, built first if it is missing or does not match its manifest."""
    path = cache_root() / "models" / f"tiny-llama-{_build_key()}"
    if not _verify(path):
        _build(path)
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verify(path: Path) -> bool:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return all(_sha256(path / name) == digest for name, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _build(path: Path) -> None:
    """Build tokenizer + model into a temp dir next to `path`, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=path.parent))
    try:
        tokenizer = _build_tokenizer()
        tokenizer.save_pretrained(tmp)
        model = _build_model(tokenizer)
        model.save_pretrained(tmp)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        manifest = {"id": TINY_MODEL_ID, "files": {name: _sha256(tmp / name) for name in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus().split("\n\n"), trainer=trainer)
    pad, bos, eos = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        add_bos_token=True,
        model_max_length=MODEL_SETTINGS["max_position_embeddings"],
    )


def _build_model(tokenizer):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_SETTINGS,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model
