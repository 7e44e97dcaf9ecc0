"""Loading the base model and tokenizer through `from_pretrained`, for any model.

The embedded tiny model is just a local folder (built on first use), so it takes the same path
as a hub id or a user's checkpoint. Precision is chosen from the hardware and the checkpoint,
never hard-coded: the seed recipe's fp16 on a bf16 checkpoint crashes the AMP grad scaler.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path

from ipylora.engine.errors import ModelLoadError
from ipylora.engine.tiny import TINY_MODEL_ID, tiny_model_path


@dataclass(frozen=True)
class Precision:
    """The dtype weights are loaded in and the Trainer's mixed-precision flags."""

    dtype: str  # "float32" | "bfloat16" | "float16"
    bf16: bool
    fp16: bool


def device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def choose_precision(device: str, checkpoint_dtype: str | None) -> Precision:
    """bf16 where the GPU has it; fp16 autocast on older GPUs; float32 on CPU (bf16 matmuls are slow there)."""
    import torch

    if device != "cuda":
        return Precision("float32", bf16=False, fp16=False)
    if torch.cuda.is_bf16_supported():
        return Precision("bfloat16", bf16=True, fp16=False)
    # Older GPUs: load the weights in fp16 whatever the checkpoint says, so the AMP scaler sees fp16.
    return Precision("float16", bf16=False, fp16=True)


def resolve_model_id(model: str | None) -> tuple[str, str]:
    """(display id, what from_pretrained gets) for a model argument; None means the embedded model."""
    if model in (None, "", "tiny", TINY_MODEL_ID):
        return TINY_MODEL_ID, str(tiny_model_path())
    return model, str(Path(model).expanduser()) if Path(model).expanduser().exists() else model


def load_tokenizer(source: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError, ValueError, HF hub errors...
        raise ModelLoadError(_load_message(source, exc, trust_remote_code)) from None
    if tokenizer.pad_token is None:
        # Safe here: labels come from our own mask, never from comparing ids to pad.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(source: str, quantization: str | None, precision: Precision, device: str,
               trust_remote_code: bool = False):
    """The base model on `device`, quantized with bitsandbytes if asked."""
    import torch
    from transformers import AutoModelForCausalLM

    if device == "cuda":
        from ipylora.engine.speed import configure_allocator

        configure_allocator()  # before the first CUDA allocation
    dtype = getattr(torch, precision.dtype)
    # safetensors only: pickle weights can run arbitrary code when loaded.
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True)
    if quantization:
        kwargs["quantization_config"] = _bnb_config(quantization, dtype)
        kwargs["device_map"] = {"": torch.cuda.current_device()} if device == "cuda" else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except ImportError as exc:
        raise ModelLoadError(f"Loading {source!r} needs a package that is missing: {exc}. Install it and retry.") from None
    except Exception as exc:
        raise ModelLoadError(_load_message(source, exc, trust_remote_code)) from None
    if not quantization:
        model.to(device)
    else:
        problem = _unquantized(model, source, quantization)
        if problem:
            del model  # before the error: its traceback keeps this frame alive
            free_memory()
            raise ModelLoadError(problem)
        if device == "cpu":
            _keep_4bit_layout_trainable(model)
    model.config.use_cache = True
    return model


def quantized_layers(model) -> int:
    """How many of the model's layers bitsandbytes holds quantized."""
    import bitsandbytes as bnb

    return sum(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())


def _unquantized(model, source: str, quantization: str) -> str | None:
    """Why a --4bit/--8bit load must be refused: bitsandbytes replaced no layer (the full-size model would train).

    transformers swaps only plain nn.Linear (and GPT-2's Conv1D) for bitsandbytes layers: Falcon's
    FalconLinear subclass is left as it is, and the load would quietly give a 16-bit model.
    """
    if quantized_layers(model) == 0:
        head = model.get_output_embeddings()
        kinds = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__ and m is not head})
        return (f"--{quantization}: bitsandbytes quantized no layer of {source!r} (its layers are "
                f"{', '.join(kinds) or 'not nn.Linear'}): load it without --{quantization}.")
    return None


def _keep_4bit_layout_trainable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    Measured here: on CPUs with AVX512-BF16, the first eval-mode forward (a chat) repacks every
    Linear4bit weight into an inference-only layout. Training afterwards still runs but learns far
    worse, greedy answers of a trained adapter come out as garbage (0/8 memorised vs 8/8), and
    layers whose width is not a multiple of 32 crash. The unpacked path is correct everywhere.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def check_safetensors_adapter(folder: Path) -> None:
    """Refuse an adapter whose weights are pickles (adapter_model.bin): loading them can run code."""
    if not (folder / "adapter_model.safetensors").exists():
        found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise ModelLoadError(
            f"{str(folder)!r} has no adapter_model.safetensors (it has: {found}); ipylora does not load pickled "
            "adapters. Re-save it with PeftModel.save_pretrained (safetensors is the default)."
        )


def _bnb_config(quantization: str, compute_dtype):
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def _load_message(source: str, exc: Exception, trust_remote_code: bool) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "trust_remote_code" in str(exc) and not trust_remote_code:
        return (f"{source!r} ships its own model code, which would run as Python on this machine with your "
                "permissions: if you trust its authors, add --trust-remote-code.")
    if "safetensors" in str(exc).lower() or "use_safetensors" in str(exc):
        return (f"{source!r} has no .safetensors weights: ipylora loads no pickle (.bin/.pt) weights, since "
                "unpickling can run code. Convert the checkpoint to safetensors (save_pretrained does by default).")
    if not os.path.exists(source) and ("/" in source or not source.startswith(".")):
        return (
            f"Could not load {source!r}: it is not a local folder and the hub did not provide it "
            f"({text}). Pass a local folder saved with save_pretrained, or check the id and network."
        )
    return f"Could not load {source!r}: {text}"


def keep_resident() -> None:
    """Take what is alive now (the resident model, its adapters, the libraries imported) out of the
    cyclic collector's sight; called as each run starts.

    accelerate runs a full `gc.collect()` as every training starts; with a model resident it walks
    every object alive (~600k in the embedded model's session, more for deep models): 0.4 s of each
    sweep trial, measured. Frozen objects are still freed by reference counting (a dropped adapter,
    a finished run's data); `release_resident` hands them back to the collector when the model goes.
    What a run builds after this (its trainer, whose cycles hold the optimizer) stays collectable.
    """
    gc.collect()
    gc.freeze()


def release_resident() -> None:
    """Undo `keep_resident` and free the dropped model's memory (its cycles included)."""
    gc.unfreeze()
    free_memory()


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def base_of(model):
    """The transformers model under `model` (a PeftModel), or `model` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def base_memo(model, key: str, compute=None):
    """What `compute()` says about the base model under `model` (a PeftModel or the base itself), worked
    out once per base model: the walks over every module that do not change while it is resident.
    Without `compute`: what was kept under `key`, or None."""
    memo = base_of(model).__dict__.setdefault("_ipylora_memo", {})
    if key not in memo and compute is not None:
        memo[key] = compute()
    return memo.get(key)


def saved_tokenizer(folder: Path):
    """The tokenizer an --add-tokens adapter was saved with (None for an adapter saved without one)."""
    return load_tokenizer(str(folder)) if (Path(folder) / "tokenizer_config.json").exists() else None
