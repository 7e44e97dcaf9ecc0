"""Taking a run out of the notebook: the adapter, a merged model, or a script that retrains it.

Everything works from the run folder (`run.json` + `adapter/`), so it also works after a kernel
restart. The merged model is built on a fresh copy of the base on the CPU, never on the resident
one (merging would destroy it): a run trained on a 4-bit base is loaded 4-bit, dequantized to
the target dtype, and only then merged, so the merged weights are the ones the adapter was trained
against plus its update, never re-quantized. The exported script repeats the run's exact
recipe with transformers + peft + trl alone: same tokenization and loss mask, same SFTConfig,
same seed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ipylora.engine.errors import ConfigError, UnknownNameError
from ipylora.engine.runs import adapter_dir, read_json, replace_dir

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


def save_merged(run_dir: Path, path: Path, source: str, dtype: str | None = None, tokenizer=None,
                trust_remote_code: bool = False) -> Path:
    """Write base + adapter merged into plain weights at `path` (loadable without peft)."""
    import torch
    from peft import PeftModel

    from ipylora.engine.models import Precision, load_model, load_tokenizer

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
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged = merged.to(torch_dtype)
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(merged.config, attribute):
            delattr(merged.config, attribute)
    merged.config.dtype = dtype_name
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


# -- the standalone script --------------------------------------------------------------------
def script_settings(record: dict, model_source: str) -> dict:
    """The constants the script needs, from run.json."""
    data = record["dataset"]
    if data.get("template_name") in ("model", "chat") or "{response}" not in data.get("template", ""):
        raise ConfigError(f"Run {record['name']!r} used the template {data.get('template_name')!r}; the exported "
                          "script reproduces string templates ({prompt} ... {response}) only.")
    prefix, suffix = data["template"].split("{response}")
    train = record["train"]
    return {
        "name": record["name"],
        "model": model_source,
        "model_id": record["model"],
        "quantization": record.get("quantization"),
        "prompt": data["prompt"],
        "response": data["response"],
        "prefix": prefix,
        "suffix": suffix,
        "train_on_prompt": bool(data.get("train_on_prompt")),
        "trust_remote_code": bool(train.get("trust_remote_code")),
        "lora": record["lora"],
        "train": {k: train.get(k) for k in ("lr", "scheduler", "warmup_ratio", "epochs", "steps", "batch_size",
                                             "max_grad_norm", "max_length", "seed")},
        "final_loss": record.get("final_loss"),
    }


def write_data(frame, path: Path) -> Path:
    """The dataset's table as JSON lines of strings (exactly the cells training formatted)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        for record in frame.astype(str).to_dict("records"):
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def write_script(settings: dict, data_path: str, path: Path, version: str) -> Path:
    """Write the standalone training script to `path` (atomically) and make it executable."""
    text = SCRIPT.format(
        name=settings["name"], version=version, model_id=settings["model_id"], script=Path(path).name,
        settings=_pretty({**settings, "data": data_path}),
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


def _pretty(settings: dict) -> str:
    # Python literals (True/None), not JSON (true/null).
    import pprint

    return pprint.pformat(settings, sort_dicts=False, width=100)


SCRIPT = '''#!/usr/bin/env python
"""Retrain the LoRA adapter {name!r} outside the notebook: transformers + peft + trl only.

Written by ipylora {version} from runs/{name}/run.json. It repeats that run's recipe exactly:
each row's prompt and response are formatted from the data file's columns, wrapped in the
template, tokenized separately (prompt with BOS, response without), EOS appended; loss is on
the response and EOS only. Same LoRA shape, same SFTConfig, same seed.

    python {script} [--data FILE] [--model PATH_OR_ID] [--output DIR]

The data file is JSON lines, CSV or TSV with the columns the formats below name. The base model
was {model_id!r}; MODEL is where it was loaded from.
"""

import argparse
import csv
import json
import math
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, set_seed
from trl import SFTConfig, SFTTrainer

SETTINGS = {settings}


def read_rows(path):
    """The data file as a list of {{column: string}} dicts."""
    path = Path(path)
    if path.suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle, delimiter="\\t" if path.suffix == ".tsv" else ","))
    if path.suffix == ".json":
        return [{{k: str(v) for k, v in row.items()}} for row in json.loads(path.read_text("utf-8"))]
    with open(path, encoding="utf-8") as handle:
        return [{{k: str(v) for k, v in json.loads(line).items()}} for line in handle if line.strip()]


def tokenize(rows, tokenizer):
    """input_ids and labels: prompt tokens masked (-100), response + EOS trained."""
    input_ids, labels = [], []
    max_length, eos = SETTINGS["train"]["max_length"], tokenizer.eos_token_id
    for row in rows:
        prompt = SETTINGS["prefix"].replace("{{prompt}}", SETTINGS["prompt"].format_map(row))
        response = SETTINGS["response"].format_map(row) + SETTINGS["suffix"]
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        mask = prompt_ids if SETTINGS["train_on_prompt"] else [-100] * len(prompt_ids)
        input_ids.append((prompt_ids + response_ids + [eos])[:max_length])
        labels.append((mask + response_ids + [eos])[:max_length])
    return Dataset.from_dict({{"input_ids": input_ids, "labels": labels}})


def load(model_path):
    """Tokenizer and base model; precision from the hardware (bf16 GPU, fp16 older GPU, fp32 CPU)."""
    trust = SETTINGS["trust_remote_code"]
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # safe: labels come from the mask above
    cuda = torch.cuda.is_available()
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    kwargs = dict(dtype=dtype, trust_remote_code=trust)
    if SETTINGS["quantization"] == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    elif SETTINGS["quantization"] == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if SETTINGS["quantization"]:
        kwargs["device_map"] = {{"": 0}} if cuda else {{"": "cpu"}}
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if not SETTINGS["quantization"]:
        model.to("cuda" if cuda else "cpu")
    return tokenizer, model, dtype


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=SETTINGS["data"], help="Data file (jsonl, json, csv, tsv).")
    parser.add_argument("--model", default=SETTINGS["model"], help="Base model folder or hub id.")
    parser.add_argument("--output", default="runs-script/" + SETTINGS["name"], help="Where the adapter goes.")
    cli = parser.parse_args()
    train = SETTINGS["train"]

    data_path = Path(cli.data)
    if not data_path.is_absolute() and not data_path.exists():  # the default sits beside this script
        data_path = Path(__file__).resolve().parent / data_path
    tokenizer, model, dtype = load(cli.model)
    data = tokenize(read_rows(data_path), tokenizer)
    steps = train["steps"] or max(1, math.ceil(train["epochs"] * math.ceil(len(data) / train["batch_size"])))

    set_seed(train["seed"])
    if SETTINGS["quantization"]:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = SETTINGS["lora"]
    targets = lora["target_modules"]
    model = get_peft_model(model, LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], bias="none", task_type="CAUSAL_LM",
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()],
    ))

    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as scratch:
        config = SFTConfig(
            output_dir=scratch, max_steps=steps, per_device_train_batch_size=train["batch_size"],
            gradient_accumulation_steps=1, learning_rate=train["lr"], lr_scheduler_type=train["scheduler"],
            warmup_steps=int(round(train["warmup_ratio"] * steps)), weight_decay=0.0,
            max_grad_norm=train["max_grad_norm"], bf16=cuda and dtype == torch.bfloat16,
            fp16=cuda and dtype == torch.float16, use_cpu=not cuda, gradient_checkpointing=False,
            logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", seed=train["seed"],
            data_seed=train["seed"], dataloader_num_workers=0, dataset_kwargs={{"skip_prepare_dataset": True}},
            max_length=None, remove_unused_columns=False,
        )
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    model.save_pretrained(cli.output)
    print(f"steps={{steps}} final_loss={{losses[-1]:.6f}} notebook_final_loss={{SETTINGS['final_loss']}}")
    print(f"adapter saved to {{cli.output}}")


if __name__ == "__main__":
    main()
'''
