"""What the GPU benchmarks share: real Qwen2 shapes, random-init models, alpaca-like lengths, 4-bit swap.

The scripts run as `python bench/X.py`; each puts the repo root on sys.path first, then imports
`from bench.common import ...` (bench/ is a package so that no other `bench` on the path wins).
Heavy imports (torch, transformers, bitsandbytes, numpy) stay inside the functions: a script that
prints "skipped" without CUDA must not pay for them.

Each helper reproduces, argument for argument, what the scripts did before it existed, so their
numbers (random weights, dataset lengths) are unchanged; where the scripts differed, the
difference is a parameter (`cast`, `whole`) rather than a new behaviour.
"""

from __future__ import annotations

import math
from pathlib import Path

# The real Qwen2-7B and Qwen2-1.5B configs (vocab included), and a tiny one for CPU smoke runs.
SHAPES = {
    "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
               rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                 rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "tiny": dict(vocab_size=2048, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                 tie_word_embeddings=False),
}
def cuda_or_skip(without: str) -> bool:
    """Whether torch and a CUDA GPU are both there; if not, prints the bench's one "skipped" line
    (`without`: what it says when there is no GPU), and the caller exits 0."""
    try:
        import torch
    except ImportError:
        print("skipped: torch is not installed")
        return False
    if not torch.cuda.is_available():
        print(f"skipped: {without}")
        return False
    return True


RESULT_PREFIX = "RESULT "  # a child process's last word: this prefix, then its result as JSON


def save_random_qwen2(path: Path, shape: dict, *, device: str, dtype, cast: bool):
    """Save a random-init Qwen2 of `shape` with the embedded tiny tokenizer to `path`.

    The vocabulary is at least the tokenizer's (a shape without `vocab_size` gets exactly the
    tokenizer's). Weights are drawn after `torch.manual_seed(0)` on `device`: `cast=True` draws
    them in fp32 and casts to `dtype`; `cast=False` draws them in `dtype` directly (how a 7B model
    is initialised on the GPU in seconds rather than minutes). The two give different weights,
    which is why the choice is the caller's. Returns (tokenizer, parameter count).
    """
    import gc

    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from ipylora.engine.tiny import tiny_model_path

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path())
    config = Qwen2Config(**{**shape, "vocab_size": max(shape.get("vocab_size", 0), len(tokenizer))},
                         initializer_range=0.02, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    if cast:
        with torch.device(device):
            model = Qwen2ForCausalLM(config).to(dtype)
    else:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = Qwen2ForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return tokenizer, params


def lognormal_lengths(rng, rows: int, median: float = 220, sigma: float = 0.6, low: int = 16, high: int = 1024,
                      whole: bool = True):
    """Alpaca-like token counts: log-normal around `median`, clipped to low..high.

    `whole` truncates to integers before clipping (an int array); without it the floats are clipped
    as drawn. Same draws from `rng` either way.
    """
    import numpy as np

    lengths = rng.lognormal(math.log(median), sigma, rows)
    if whole:
        lengths = lengths.astype(int)
    return np.clip(lengths, low, high)


def quantize_4bit(model, compute_dtype) -> None:
    """Swap every decoder linear layer for a bitsandbytes Linear4bit holding the same weights.

    nf4 + double quantization (as BitsAndBytesConfig would; the LM head stays), quantized on the
    device the weights are on. Biases (Qwen2's q/k/v) are kept, frozen.
    """
    import bitsandbytes as bnb
    import torch

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True,
                                      device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                q.weight = q.weight.to(child.weight.device) if child.weight.device.type != "cpu" else q.weight._quantize("cpu")
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, q)
                del child
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def print_result(result: dict) -> None:
    """A child process's answer to its parent (see `read_result`)."""
    import json

    print(RESULT_PREFIX + json.dumps(result), flush=True)


def read_result(stdout: str) -> dict | None:
    """The result a child printed with `print_result`, or None if it printed none."""
    import json

    line = next((x for x in stdout.splitlines() if x.startswith(RESULT_PREFIX)), None)
    return json.loads(line[len(RESULT_PREFIX):]) if line else None


def child_main(run_one, spec_json: str) -> int:
    """A benchmark's `--one SPEC` child: run one recipe, print its result (or its error) for the parent."""
    import json
    import traceback

    try:
        print_result(run_one(json.loads(spec_json)))
    except Exception as exc:  # the parent prints the row as failed, with the first line of why
        traceback.print_exc()
        print_result({"kind": json.loads(spec_json)["kind"], "error": f"{type(exc).__name__}: {exc}"})
    return 0


def qwen2_for_bench(out: Path, smoke: bool) -> Path | None:
    """The random Qwen2 (1.5B shape on a GPU, tiny on CPU with `smoke`) in `out`, made once; None
    (after saying why) without a GPU and without `smoke`."""
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not smoke:
        print("skipped: no CUDA GPU (run with --smoke for the CPU plumbing check)")
        return None
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / ("qwen2-tiny" if smoke else "qwen2-1.5b")
    if not (model_dir / "config.json").exists():
        save_random_qwen2(model_dir, SHAPES["tiny" if smoke else "1.5b"], device="cuda" if cuda else "cpu",
                          dtype=torch.bfloat16 if cuda else torch.float32, cast=False)
    return model_dir


def run_child(script: str, spec: dict, timeout: float | None = None) -> dict:
    """One recipe in its own process (`script --one SPEC`): its result, printed as a `row` line as it lands.

    `timeout` (seconds): a child still running then is killed and its row says so, so that one hang
    does not eat the whole run (None: wait for it however long it takes).
    """
    import json
    import subprocess
    import sys

    try:
        proc = subprocess.run([sys.executable, script, "--one", json.dumps(spec)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        result = {"kind": spec["kind"], "error": f"timeout after {timeout:g}s"}
        sys.stderr.write(_text(exc.stdout)[-3000:] + _text(exc.stderr)[-3000:])
        print("row " + json.dumps(result), flush=True)
        return result
    result = read_result(proc.stdout) or {"kind": spec["kind"], "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    if "error" in result:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
    print("row " + json.dumps(result), flush=True)  # each row as it lands: a cut call keeps the ones before
    return result


def _text(output) -> str:
    """What a timed-out child had printed (bytes, str or None, depending on how far it got)."""
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""
