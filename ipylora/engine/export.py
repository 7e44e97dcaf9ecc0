"""Taking a run out of the notebook: the adapter, a merged model, a GGUF file, or a script that retrains it.

Everything works from the run folder (`run.json` + `adapter/`), so it also works after a kernel
restart. The merged model is built on a fresh copy of the base on the CPU, never on the resident
one (merging would destroy it): a run trained on a 4-bit base is loaded 4-bit, dequantized to
the target dtype, and only then merged, so the merged weights are the ones the adapter was trained
against plus its update, never re-quantized. A GGUF file is that merged model written by gguf.py
(for llama.cpp, Ollama, LM Studio) with the training template inside and an Ollama Modelfile
beside it. The exported script repeats the run's exact recipe with transformers + peft + trl
alone: same tokenization and loss mask, same SFTConfig, same seed; a preference run (DPO, SimPO,
ORPO, KTO) the same prompt/answer tokens, TRL trainer, beta / loss_type / gamma and reference
(the base, or the --from-adapter folder it started from).
"""

from __future__ import annotations

import json
import math
import os
import pprint
import shutil
import tempfile
from pathlib import Path

from ipylora.engine.errors import ConfigError, UnknownNameError
from ipylora.engine.models import saved_tokenizer
from ipylora.engine.runs import adapter_dir, check_name, read_json, replace_dir
from ipylora.engine.tiny import TINY_MODEL_ID

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def run_record(run_dir: Path) -> dict:
    path = Path(run_dir) / "run.json"
    if not path.exists():
        raise UnknownNameError(f"No run in {run_dir} (run.json is missing): train it with %lora_train DATASET "
                               f"--name {Path(run_dir).name}, or pass --output with the folder that holds it.")
    return read_json(path)


def saved_adapter(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if (run_dir / "adapter_config.json").exists():  # an adapter loaded from a bare PEFT folder
        return run_dir
    if not run_dir.exists():
        run_record(run_dir)  # raises: no such run
    found = adapter_dir(run_dir)
    if found is None:
        raise UnknownNameError(f"Run {Path(run_dir).name!r} has no saved adapter in {run_dir}/adapter "
                               "(it stopped before its first step?): train it again.")
    return found


def _fresh_dir(path: Path) -> Path:
    """A temp folder beside `path`, for a write-then-rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))


def save_adapter(run_dir: Path, path: Path) -> Path:
    """Copy the run's adapter (standard PEFT files) to `path`, atomically."""
    source = saved_adapter(run_dir)
    path = Path(path)
    tmp = _fresh_dir(path)
    try:
        target = tmp / "adapter"
        shutil.copytree(source, target)
        replace_dir(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def merged_dtype(record: dict, dtype: str | None) -> str:
    """The torch dtype name for --dtype (bf16, fp16, fp32); by default the precision the run trained in
    (bf16 or fp16 on a GPU; float32 on a CPU, where the adapter + base ran in float32)."""
    if dtype is None:
        trained = record.get("precision")
        return trained if trained in ("bfloat16", "float16", "float32") else "bfloat16"
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def merged_model(run_dir: Path, source: str, dtype: str | None = None, trust_remote_code: bool = False):
    """Base + adapter of the run merged into plain weights, in memory on the CPU (a 4-bit or 8-bit
    base loaded as trained, then dequantized, before the merge)."""
    import torch
    from peft import PeftModel

    from ipylora.engine.models import Precision, load_model

    record = run_record(run_dir)
    adapter = saved_adapter(run_dir)
    dtype_name = merged_dtype(record, dtype)
    torch_dtype = getattr(torch, dtype_name)
    quantization = record.get("quantization")
    if quantization == "4bit":
        # Load exactly as trained (nf4, compute dtype float32 on the CPU), then dequantize.
        model = load_model(source, "4bit", Precision("float32", False, False), "cpu", trust_remote_code)
        model = model.dequantize()
    elif quantization == "8bit":
        model = load_model(source, "8bit", Precision("float32", False, False), "cpu", trust_remote_code)
        model = model.dequantize()
    else:
        model = load_model(source, None, Precision(dtype_name, False, False), "cpu", trust_remote_code)
    model = model.to(torch_dtype)
    tokens = saved_tokenizer(adapter)  # --add-tokens: the vocabulary the adapter's embeddings have
    if tokens is not None and len(tokens) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokens), mean_resizing=False)  # the adapter's copies replace them
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged = merged.to(torch_dtype)
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(merged.config, attribute):
            delattr(merged.config, attribute)
    merged.config.dtype = dtype_name
    return merged


def save_merged(run_dir: Path, path: Path, source: str, dtype: str | None = None, tokenizer=None,
                trust_remote_code: bool = False) -> Path:
    """Write base + adapter merged into plain weights at `path` (loadable without peft)."""
    from ipylora.engine.models import load_tokenizer

    merged = merged_model(run_dir, source, dtype, trust_remote_code)
    tokenizer = saved_tokenizer(saved_adapter(run_dir)) or tokenizer
    path = Path(path)
    tmp = _fresh_dir(path)
    try:
        target = tmp / "model"
        merged.save_pretrained(target, safe_serialization=True)
        (tokenizer or load_tokenizer(source, trust_remote_code)).save_pretrained(target)
        replace_dir(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def gguf_path(path: Path, name: str, quant: str) -> Path:
    """PATH itself when it names a .gguf file, else PATH/NAME-QUANT.gguf (the Modelfile goes beside it)."""
    path = Path(path)
    return path if path.suffix == ".gguf" else path / f"{name}-{quant}.gguf"


def save_gguf(run_dir: Path, path: Path, source: str, quant: str = "f16", tokenizer=None,
              trust_remote_code: bool = False):
    """Write base + adapter merged as one GGUF file (weights, tokenizer, the training template as its
    chat template, the trained EOS) and an Ollama Modelfile beside it; returns gguf.GGUFFiles.

    The quant and the architecture are checked before anything is loaded, so a refusal is instant.
    """
    from transformers import AutoConfig

    from ipylora.engine import gguf
    from ipylora.engine.chat import trained_system
    from ipylora.engine.models import load_tokenizer
    from ipylora.engine.templates import get_template

    record = run_record(run_dir)
    saved_adapter(run_dir)
    quant = gguf.check_quant(quant)
    gguf.check_architecture(AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code))
    data = record["dataset"]
    template = get_template(data["template"])
    system = trained_system(data).text
    tokenizer = saved_tokenizer(saved_adapter(run_dir)) or tokenizer or load_tokenizer(source, trust_remote_code)
    merged = merged_model(run_dir, source, None, trust_remote_code)  # the trained precision; gguf converts
    return gguf.write_gguf(merged, tokenizer, gguf_path(path, record["name"], quant), quant, template, system,
                           record["name"])


# -- the standalone script --------------------------------------------------------------------
# The script is export_script.py beside this module, with SETTINGS filled in from run.json. It
# re-implements the built-in formats, the two template kinds (format strings, Jinja chat
# templates; `model` is recorded as Jinja) and the tokenizer step; tests/test_export_formats.py
# checks its tokens against the engine's for every format.
SCRIPT = Path(__file__).with_name("export_script.py")
SCRIPT_FORMATS = ("messages", "sharegpt", "alpaca", "prompt-completion", "text", "preference", "unpaired-preference")
SCRIPT_METHODS = ("sft", "dpo", "simpo", "orpo", "kto")
TRAIN_KEYS = ("lr", "scheduler", "warmup_ratio", "epochs", "steps", "batch_size", "micro_batch_size",
              "max_grad_norm", "max_length", "seed", "method", "beta", "loss_type", "gamma", "loraplus_ratio", "neftune")


def data_path(script: Path) -> Path:
    """Where the run's rows go beside `script` (train.py -> train.data.jsonl)."""
    return Path(script).with_name(Path(script).stem + ".data.jsonl")


def script_settings(record: dict, model_source: str, from_adapter: Path | None = None) -> dict:
    """The constants the script needs, from run.json; `from_adapter`: the folder of the adapter the run
    started from (--from-adapter), which the script loads as its start and reference."""
    from ipylora.engine.templates import ChatTemplate, FormatTemplate, get_template

    data, train = record["dataset"], record["train"]
    method = train.get("method") or "sft"
    if method not in SCRIPT_METHODS:
        raise ConfigError(f"Run {record['name']!r} trained with the plugin method {method!r}; the exported script "
                          f"knows the built-in methods ({', '.join(SCRIPT_METHODS)}): train with one of them to "
                          "export it.")
    fmt = data.get("format", "prompt-completion")
    fields = data.get("fields") or {"prompt": data["prompt"], "completion": data["response"]}  # older run.json
    if fmt not in SCRIPT_FORMATS:
        raise ConfigError(f"Run {record['name']!r} read its data with the plugin format {fmt!r}; the exported "
                          f"script knows the built-in formats ({', '.join(SCRIPT_FORMATS)}): convert the data to "
                          "one of them (e.g. a messages column) and train again.")
    template = get_template(data["template"])
    if isinstance(template, FormatTemplate):
        shape = {"kind": "format", "name": data.get("template_name"), "prefix": template.prefix,
                 "suffix": template.suffix}
    elif isinstance(template, ChatTemplate):
        shape = {"kind": "jinja", "name": data.get("template_name"), "source": template.source,
                 "bos_token": template.bos_token, "eos_token": template.eos_token, "strip_bos": template.strip_bos}
    else:
        raise ConfigError(f"Run {record['name']!r} used the template {data.get('template_name')!r}, a "
                          f"{type(template).__name__} plugin the script cannot rebuild: train with a format-string "
                          "or Jinja template (e.g. --template chatml) to export it.")
    return {
        "name": record["name"],
        "model": model_source,
        "model_id": record["model"],
        "quantization": record.get("quantization"),
        "trust_remote_code": bool(train.get("trust_remote_code")),
        "format": fmt,
        "fields": dict(fields),
        "response_after": data.get("response_after"),
        "template": shape,
        "train_on_prompt": bool(data.get("train_on_prompt")),
        "split": {k: data.get(k) for k in ("shuffle", "limit", "eval", "eval_from")} | {"seed": data.get("seed", 42)},
        "lora": record["lora"],
        "train": {k: train.get(k) for k in TRAIN_KEYS} | {"method": method},
        "method": method,
        "from_adapter": str(Path(from_adapter).resolve()) if from_adapter else None,
        "final_loss": record.get("final_loss"),
        "versions": record.get("versions", {}),
    }


def write_data(frame, path: Path) -> Path:
    """The rows as JSON lines, structured as they were: lists and dicts stay JSON, a missing cell is null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = [str(c) for c in frame.columns]
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        for values in frame.itertuples(index=False, name=None):
            row = {c: _jsonable(v) for c, v in zip(columns, values)}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def _jsonable(value):
    """A cell as JSON: numpy arrays (parquet lists) -> lists, numpy scalars -> numbers, NaN -> None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, str):  # numpy arrays and scalars
        return _jsonable(value.tolist())
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    import pandas as pd

    return None if pd.isna(value) else str(value)  # pd.NA, NaT, timestamps: as the engine formats them


def write_script(settings: dict, data_ref: str, path: Path, version: str, rows_file: bool) -> Path:
    """Write the standalone training script to `path` (atomically) and make it executable.

    `data_ref` is the data file the script reads by default: the run's rows beside the script
    (`rows_file`: already shuffled and split) or the user's own table (the script splits it).
    """
    pretty = pprint.pformat({**settings, "data": data_ref, "data_is_split": rows_file}, sort_dicts=False, width=100)  # True/None, not JSON
    text = (SCRIPT.read_text("utf-8").replace("__RUN_NAME__", repr(settings["name"]))
            .replace("__IPYLORA_VERSION__", version)
            .replace("SETTINGS = {}  # filled in by %lora_export", "SETTINGS = " + pretty))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


# -- from the session ----------------------------------------------------------------------
def save_run(session, name: str, path: str, merge: bool = False, dtype: str | None = None, output: str = "runs",
             gguf: bool = False, quant: str | None = None):
    """Write adapter `name` to `path` (PEFT format), with `merge` the base + adapter as one plain model,
    with `gguf` as one GGUF file + Ollama Modelfile (`quant`: f16, bf16, q8_0, q4_0; returns
    gguf.GGUFFiles)."""
    if quant is not None and not gguf:
        raise ConfigError(f"--quant {quant} is for --gguf files: add --gguf, or drop --quant.")
    if gguf and (merge or dtype):
        raise ConfigError("--gguf writes merged weights in its own --quant type: drop --merge/--dtype, or drop --gguf.")
    run_dir = run_dir_of(session, name, output)
    if not merge and not gguf:
        return save_adapter(run_dir, Path(path))
    record = run_record(run_dir)
    tokenizer = session.tokenizer if session.model_id == record.get("model") else None
    trust = bool(record.get("train", {}).get("trust_remote_code"))
    if gguf:
        return save_gguf(run_dir, Path(path), model_source(record), quant or "f16", tokenizer, trust)
    return save_merged(run_dir, Path(path), model_source(record), dtype, tokenizer, trust)


def export_script(session, name: str, path: str, data: str | None = None, output: str = "runs") -> Path:
    """Write a standalone transformers + peft + trl script that retrains run `name` from a data file.

    Without `data`, the rows the run trained on are written beside the script (NAME.data.jsonl,
    structured as in the table); with it, the script reads that file and splits it as the run did.
    """
    from ipylora import __version__
    run_dir = run_dir_of(session, name, output)
    record = run_record(run_dir)
    start = record["train"].get("from_adapter")
    start_dir = saved_adapter(run_dir_of(session, start, output)) if start else None
    settings = script_settings(record, model_source(record), start_dir)
    settings["peft"] = adapter_targets(run_dir)
    path = Path(path)
    if data is not None:
        if not Path(data).exists():
            raise UnknownNameError(f"--data {data!r} does not exist: give the file the dataset was made from.")
        return write_script(settings, str(Path(data).resolve()), path, __version__, rows_file=False)
    rows = write_data(trained_frame(session, record), data_path(path))
    return write_script(settings, rows.name, path, __version__, rows_file=True)


# What the engine resolved for the model beyond --target-modules and --dropout (adapters.py): fused
# MoE expert parameters (target_parameters, with their rank/alpha patterns), no dropout on them
# (PEFT refuses any), another adapter's saved modules left out. The script takes them from the
# adapter the run saved, so that it trains what the notebook trained.
ADAPTER_TARGET_KEYS = ("target_modules", "target_parameters", "lora_dropout", "rank_pattern", "alpha_pattern",
                       "exclude_modules")


def adapter_targets(run_dir: Path) -> dict | None:
    """The saved adapter's resolved targets (ADAPTER_TARGET_KEYS), or None without a saved adapter."""
    from ipylora.engine.runs import adapter_dir, read_json

    folder = adapter_dir(Path(run_dir))
    if folder is None:
        return None
    config = read_json(folder / "adapter_config.json")
    targets = {k: config.get(k) for k in ADAPTER_TARGET_KEYS if config.get(k) not in (None, {}, [])}
    for key in ("target_modules", "target_parameters"):  # PEFT writes sets as lists in no fixed order
        if isinstance(targets.get(key), list):
            targets[key] = sorted(targets[key])
    return targets


def run_dir_of(session, name: str, output: str) -> Path:
    if name in session.adapters:
        return Path(session.adapters[name].run_dir)
    return Path(output) / check_name(name, "run")


def trained_frame(session, record: dict):
    """The rows run `record` trained on (its train split), from the dataset still in this session."""
    described = record["dataset"]
    dataset = session.datasets.get(described["name"])
    keys = ("rows", "format", "fields", "template", "train_on_prompt", "response_after", "shuffle", "seed",
            "limit", "eval", "eval_from")
    if dataset is None or any(dataset.describe().get(k) != described.get(k) for k in keys if k in described):
        raise UnknownNameError(f"Dataset {described['name']!r} of run {record['name']!r} is not in this session "
                               "as it was trained: pass --data FILE (the table it was made from).")
    part = dataset.splits()["train"] if hasattr(dataset, "splits") else dataset
    return part.frame


def model_source(record: dict) -> str:
    """Where run.json's base model loads from (the embedded model is rebuilt if its cache is gone)."""
    from ipylora.engine.models import resolve_model_id

    if record.get("model") == TINY_MODEL_ID:
        return resolve_model_id(None)[1]
    return record.get("model_source") or resolve_model_id(record["model"])[1]
