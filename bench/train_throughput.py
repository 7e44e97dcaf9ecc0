"""Training throughput on the GPU: the seed recipe vs the best off-the-shelf TRL flags vs ipylora.

    python bench/train_throughput.py --out bench-out          # the H200 run (bench/RESULTS.md)
    python bench/train_throughput.py --smoke                  # CPU, tiny shapes, seconds: checks the plumbing

Models are random-init Qwen2 of real shapes (7B, 1.5B; no download): random weights cost the
same FLOPs. Data: alpaca-like lengths (log-normal, median ~220 tokens, clipped to 16..1024), a
prompt/response split with loss on the response. Each configuration runs in its own process
(Liger patches module globals; memory peaks stay clean) through the real TRL SFTTrainer.

tokens/s counts real tokens (no padding) over the timed steps, after warm-up steps.
MFU = tokens/s x 4 FLOP x linear parameters / 790 TFLOP/s (forward 2 + input-gradient 2 per
weight; frozen weights get no weight gradient). Attention score FLOPs are not counted (< 1% at
these lengths); recomputation under checkpointing is not counted (it is overhead, not model work).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import SHAPES, lognormal_lengths, print_result, quantize_4bit, read_result  # noqa: E402

PEAK_FLOPS = 790e12
SEED_LORA = dict(r=64, alpha=16, dropout=0.1, targets=["q_proj", "v_proj"])
MODEL_LORA = dict(r=16, alpha=32, dropout=0.05, targets="all-linear")  # ipylora's MODEL_LORA


# -- data ----------------------------------------------------------------------------------------
def make_dataset(rows: int, vocab: int, seed: int = 0, median: float = 220, sigma: float = 0.6):
    """Alpaca-like rows: prompt then response then EOS; loss on response + EOS.

    Response tokens come from a small Zipf-weighted set, so the loss can fall: the loss trajectory
    comparison needs something to learn, and a random-init model can learn unigram statistics.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = lognormal_lengths(rng, rows, median, sigma)
    answer_vocab = rng.choice(np.arange(100, vocab - 1), size=min(512, vocab // 4), replace=False)
    zipf = 1.0 / np.arange(1, len(answer_vocab) + 1)
    zipf /= zipf.sum()
    eos = vocab - 1
    input_ids, labels = [], []
    for n in lengths:
        p = int(n * rng.uniform(0.2, 0.6))
        prompt = rng.integers(100, vocab - 1, size=p)
        response = rng.choice(answer_vocab, size=n - p - 1, p=zipf)
        ids = [*prompt.tolist(), *response.tolist(), eos]
        input_ids.append(ids)
        labels.append([-100] * p + ids[p:])
    return {"input_ids": input_ids, "labels": labels}


class Tokenizer:
    """Just what SFTTrainer reads from a tokenizer when the data is already tokenized."""

    def __init__(self, vocab):
        from transformers import PreTrainedTokenizerFast
        from tokenizers import Tokenizer as RawTokenizer
        from tokenizers.models import WordLevel

        vocab_map = {f"t{i}": i for i in range(vocab)}
        raw = RawTokenizer(WordLevel(vocab_map, unk_token="t0"))
        self.tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=f"t{vocab - 1}", pad_token=f"t{vocab - 1}")


# -- models --------------------------------------------------------------------------------------
def build_model(shape: str, quantization: str | None, device: str):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = Qwen2Config(**SHAPES[shape], initializer_range=0.02)
    config.use_cache = False
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    if quantization == "4bit":
        quantize_4bit(model, dtype)
        model.is_loaded_in_4bit = True
    return model


def linear_params(shape: str) -> int:
    s = SHAPES[shape]
    h, i, heads, kv = s["hidden_size"], s["intermediate_size"], s["num_attention_heads"], s["num_key_value_heads"]
    d = h // heads
    per_layer = h * (heads * d) * 2 + h * kv * d * 2 + 3 * h * i
    return per_layer * s["num_hidden_layers"] + h * s["vocab_size"]


# -- one configuration ---------------------------------------------------------------------------
def run_one(spec: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer
    import datasets as hf_datasets

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape, quant, recipe = spec["model"], spec.get("quant"), spec["recipe"]
    vocab = SHAPES[shape]["vocab_size"]
    data = make_dataset(spec.get("rows", 6000), vocab, seed=spec.get("data_seed", 0))
    tokenizer = Tokenizer(vocab).tok
    model = build_model(shape, quant, device)
    lora = SEED_LORA if recipe == "seed" else {**MODEL_LORA, **spec.get("lora", {})}
    if quant:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe == "seed")
    model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                             target_modules=lora["targets"], bias="none", task_type="CAUSAL_LM"))
    bf16 = device == "cuda"
    common = dict(output_dir=spec.get("tmp", "/tmp/bench-trainer"), learning_rate=spec.get("lr", 2e-4),
                  lr_scheduler_type="cosine", warmup_steps=int(0.03 * spec["steps"]), weight_decay=0.0,
                  max_grad_norm=1.0, bf16=bf16, use_cpu=device == "cpu", save_strategy="no", eval_strategy="no",
                  report_to="none", disable_tqdm=True, seed=42, data_seed=42, dataloader_num_workers=0,
                  remove_unused_columns=False, max_steps=spec["steps"], logging_steps=1)
    plan = None
    if recipe == "seed":  # QLoRA notebook: padded batches, SFTConfig defaults (checkpointing on)
        args = SFTConfig(**common, per_device_train_batch_size=spec["batch"], gradient_checkpointing=True,
                         dataset_kwargs={"skip_prepare_dataset": True}, max_length=None)
    elif recipe == "reference":  # plain padded LoRA, no tricks: the loss-trajectory reference
        # (checkpointing recomputes the same values: the 4-bit reference needs it to fit 80 GB at 16 padded rows)
        args = SFTConfig(**common, per_device_train_batch_size=spec["batch"],
                         gradient_checkpointing=spec.get("checkpointing", False),
                         dataset_kwargs={"skip_prepare_dataset": True}, max_length=None)
    elif recipe == "trl":  # the best off-the-shelf flags: BFD packing (padding-free) + Liger
        args = SFTConfig(**common, per_device_train_batch_size=spec["batch"], packing=True, max_length=1024,
                         use_liger_kernel=device == "cuda", gradient_checkpointing=True)
    else:  # ipylora's engine: train.training_settings' choices + speed.fast_settings
        from ipylora.engine import speed
        from ipylora.engine.models import choose_precision

        precision = choose_precision(device, None)
        if spec.get("lean_forward") is False:  # PEFT's LoRA forward, not lora_forward.py's (the before)
            from ipylora.engine import lora_forward

            lora_forward.ENABLED = False
        if spec.get("stack") is False:  # each LoRA layer its own A product and mask (lora_forward.STACK)
            from ipylora.engine import lora_forward

            lora_forward.STACK = False
        if spec.get("fused") is not None:  # each group of LoRA layers one autograd node (lora_fused.py) or not
            from ipylora.engine import lora_fused

            lora_fused.ENABLED = spec["fused"]
        if spec.get("dropout_kernel"):  # how a deferred dropout draws its mask (dropout.KERNEL)
            from ipylora.engine import dropout as lora_dropout

            lora_dropout.KERNEL = spec["dropout_kernel"]
        lengths = [len(x) for x in data["input_ids"]]
        overrides = speed.fast_settings(model, tokenizer, lengths, precision, device, quantization=quant,
                                        batch_size=spec.get("batch"), dropout=lora["dropout"],
                                        attention=spec.get("attention"), liger=spec.get("liger"),
                                        force=True, defer_dropout=spec.get("defer_dropout"),
                                        compile_layers=spec.get("compile_layers"),
                                        layer_graphs=spec.get("layer_graphs"),
                                        memory_budget=int(spec["budget_gib"] * 2**30) if spec.get("budget_gib") else None)
        plan = overrides.pop("_plan", None)
        from ipylora.engine.train import NO_WAIT_SETTINGS

        kwargs = {**common, "per_device_train_batch_size": spec.get("batch") or 8, "gradient_checkpointing": False,
                  "dataset_kwargs": {"skip_prepare_dataset": True}, "max_length": None,
                  "include_num_input_tokens_seen": "non_padding"}
        if spec.get("lag") is not False:  # `lag=False`: the Trainer's and TRL's reads each step (the before)
            kwargs.update(NO_WAIT_SETTINGS)
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        kwargs["logging_steps"] = 1
        args = SFTConfig(**kwargs)

    counts: list[int] = []
    timing: dict = {}
    losses: list[float] = []
    warmup = spec.get("warmup", 3)
    measured = spec["steps"] - warmup

    profiler = None
    if spec.get("profile"):  # where a step's time goes: every kernel over the timed steps (slows them)
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            timing["train_begin"] = time.perf_counter()

        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == warmup:
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                if profiler is not None:
                    profiler.__enter__()
                timing["start"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if state.global_step == spec["steps"]:
                if device == "cuda":
                    torch.cuda.synchronize()
                timing["end"] = time.perf_counter()
                if profiler is not None:
                    profiler.__exit__(None, None, None)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    train = hf_datasets.Dataset.from_dict(data)
    unchecked = contextlib.nullcontext()
    if recipe == "engine":  # the engine's SFTTrainer (methods/sft.py): each step's logs read one step later
        from ipylora.engine import lagged, speed
        from ipylora.engine.methods.sft import _trainer

        lagged.LaggedLogs.lag = spec.get("lag", True)
        trainer = _trainer(None, model=model, args=args, train_dataset=train, processing_class=tokenizer,
                           callbacks=[Clock()])
        if spec.get("lag", True):  # as train.run_training does
            unchecked = speed.packed_rows_unchecked(plan.__dict__ if plan is not None else None, overrides)
    else:
        trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                             callbacks=[Clock()])
    if recipe == "engine" and spec.get("trainer_patches", True):
        # What train.run_training does to every trainer: the FLOP count and the weight-decay split
        # without walking every parameter (`trainer_patches=False`: the Trainer's own, for before/after).
        from ipylora.engine.train import decay_parameter_names, step_flops

        trainer.floating_point_ops = step_flops(model)
        trainer.get_decay_parameter_names = decay_parameter_names
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        mask = batch.get("attention_mask")
        counts.append(int(mask.sum()) if mask is not None else int((batch["labels"] != -999).sum()))
        return batch

    trainer.data_collator = counting
    check = packed_check(model, tokenizer, data) if spec.get("check") else None
    with unchecked:
        trainer.train()
    ga = args.gradient_accumulation_steps
    tokens = sum(counts[warmup * ga: spec["steps"] * ga])
    seconds = timing["end"] - timing["start"]
    tps = tokens / seconds
    result = {
        **{k: v for k, v in spec.items() if k not in ("tmp",)},
        "tokens_per_s": tps,
        "mfu": tps * 4 * linear_params(shape) / PEAK_FLOPS,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if device == "cuda" else None,
        "tokens_per_step": tokens / measured,
        "micro_batch": args.per_device_train_batch_size,
        "accumulation": ga,
        "checkpointing": args.gradient_checkpointing,
        "step_s": seconds / measured,
        # the warmup steps' wall time beyond as many timed steps: what compiling (or any first-step setup) costs
        "first_steps_extra_s": timing["start"] - timing["train_begin"] - warmup * seconds / measured,
        "losses": losses,
        "plan": plan.__dict__ if plan is not None else None,
        "packed_check": check,
        "profile": profile_summary(profiler, seconds, measured) if profiler is not None else None,
    }
    return result


# Kernel names -> what they do, first match wins (cuBLAS/CUTLASS GEMMs, FlashAttention, Liger's and
# our Triton kernels, PyTorch's elementwise and reduction kernels, the optimizer's fused steps).
KERNEL_KINDS = [
    ("attention", ("flash", "fmha", "attention")),
    ("optimizer", ("multi_tensor", "adam", "foreach")),
    ("matmul", ("gemm", "cutlass", "sm90_", "nvjet", "cublas", "splitk", "gemv")),
    ("4-bit dequantize", ("dequantize",)),
    ("cross-entropy / LM head", ("cross_entropy", "liger_cross", "_ce_", "logsumexp", "softmax")),
    ("dropout", ("dropout", "masked_scale")),
    ("elementwise (add, scale, cast)", ("elementwise", "vectorized", "unrolled")),
    ("copy / fill", ("memcpy", "memset", "copy", "fill", "cat", "index")),
    ("reduction", ("reduce", "sum")),
    ("triton (norms, rope, swiglu)", ("triton", "_kernel", "rms", "rope", "swiglu")),
]


def profile_summary(profiler, seconds: float, steps: int) -> dict:
    """The profiled steps' kernels: GPU-busy share of the wall time, launches a step, time by kind, the
    15 longest. Busy well under 100% means the GPU waits on the host (launches, Python, syncs)."""
    from torch.autograd import DeviceType

    kernels = [e for e in profiler.key_averages() if e.device_type == DeviceType.CUDA]
    own = lambda e: getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)  # noqa: E731
    busy = sum(own(e) for e in kernels) / 1e6
    kinds: dict[str, float] = {}
    for e in kernels:
        name = e.key.lower()
        kind = next((k for k, marks in KERNEL_KINDS if any(m in name for m in marks)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + own(e) / 1e3 / steps
    top = sorted(kernels, key=lambda e: -own(e))[:15]
    # The host's side: operators and CUDA runtime calls by their own CPU time (what is left of the step
    # is Python outside operators), and the calls that wait for the GPU.
    host = [e for e in profiler.key_averages() if e.device_type == DeviceType.CPU]
    host_top = sorted(host, key=lambda e: -e.self_cpu_time_total)[:15]
    waits = {e.key: e.count / steps for e in host
             if e.key in ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize",
                          "cudaEventSynchronize", "aten::nonzero", "aten::item")}
    return {"step_ms": 1e3 * seconds / steps, "gpu_busy": busy / seconds, "kernel_ms": 1e3 * busy / steps,
            "launches_per_step": sum(e.count for e in kernels) / steps,
            "kinds_ms": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top": [[e.key[:100], e.count / steps, own(e) / 1e3 / steps] for e in top],
            "host_ops_ms": sum(e.self_cpu_time_total for e in host) / 1e3 / steps,
            "host_top": [[e.key[:100], e.count / steps, e.self_cpu_time_total / 1e3 / steps] for e in host_top],
            "waits_per_step": waits}


def profile_table(r: dict) -> str:
    p = r["profile"]
    lines = [f"profile {r['model']} {r['name']}: step {p['step_ms']:.0f} ms (profiled), kernels {p['kernel_ms']:.0f} ms, "
             f"GPU busy {100 * p['gpu_busy']:.0f}%, {p['launches_per_step']:,.0f} launches a step",
             "  by kind (ms a step): " + ", ".join(f"{k} {v:.1f}" for k, v in p["kinds_ms"].items())]
    lines += [f"  {ms:8.2f} ms  x{count:6.0f}  {name}" for name, count, ms in p["top"]]
    if "host_top" in p:
        lines.append(f"  host: operators' own CPU time {p['host_ops_ms']:.0f} ms a step; waits for the GPU a step: "
                     + ", ".join(f"{k} {v:.0f}" for k, v in p["waits_per_step"].items()))
        lines += [f"  {ms:8.2f} ms  x{count:6.0f}  {name} (host)" for name, count, ms in p["host_top"]]
    return "\n".join(lines)


def packed_check(model, tokenizer, data) -> dict:
    """Packed (padding-free, engine attention) vs padded logits on 8 real rows, in the run's dtype."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from ipylora.engine import speed

    base = model.get_base_model()
    examples = [{"input_ids": data["input_ids"][i], "labels": data["labels"][i]} for i in range(8)]
    lengths = [len(e["input_ids"]) for e in examples]
    dev = next(model.parameters()).device
    padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(examples)
    packed = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(examples)
    move = lambda b: {k: (v.to(dev) if hasattr(v, "to") else v) for k, v in b.items()}  # noqa: E731
    current = base.config._attn_implementation
    model.eval()
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        speed.set_attention(base, "sdpa")
        ref = model(**move(padded))
        base.config._attn_implementation = current
        out = model(**move(packed))
    model.train()
    pieces = torch.split(out.logits[0].float(), lengths)
    diff = max((p - ref.logits[i, :n].float()).abs().max().item() for i, (p, n) in enumerate(zip(pieces, lengths)))
    scale = ref.logits.float().abs().max().item()
    flat_ref = torch.cat([ref.logits[i, :n].float() for i, n in enumerate(lengths)])
    rel = ((out.logits[0].float() - flat_ref).norm() / flat_ref.norm()).item()
    return {"attention": current, "max_abs_logit_diff": diff, "max_abs_logit": scale, "rel_l2": rel,
            "loss_padded": ref.loss.item(), "loss_packed": out.loss.item()}


# -- the plan ------------------------------------------------------------------------------------
def plan(smoke: bool, which: str) -> list[dict]:
    if smoke:
        m = "tiny"
        return [
            dict(name="seed-4bit-b4", model=m, recipe="seed", quant="4bit", batch=4, steps=4, warmup=1, rows=200),
            dict(name="trl-bf16-b4", model=m, recipe="trl", batch=4, steps=4, warmup=1, rows=200),
            dict(name="engine-bf16", model=m, recipe="engine", steps=4, warmup=1, rows=600, check=True),
            dict(name="engine-bf16-waiting", model=m, recipe="engine", lag=False, steps=4, warmup=1, rows=600),
            dict(name="engine-4bit", model=m, recipe="engine", quant="4bit", steps=4, warmup=1, rows=600),
            dict(name="loss-reference", model=m, recipe="reference", batch=8, steps=6, warmup=1, rows=200),
            dict(name="loss-engine", model=m, recipe="engine", batch=8, steps=6, warmup=1, rows=200),
            dict(name="engine-graphed", model=m, recipe="engine", compile_layers=True, layer_graphs=True, steps=4,
                 warmup=1, rows=600),
        ]
    runs = {
        "main": [
            dict(name="seed-4bit-b4", model="7b", recipe="seed", quant="4bit", batch=4, steps=10, warmup=3),
            dict(name="seed-4bit-b16", model="7b", recipe="seed", quant="4bit", batch=16, steps=8, warmup=2),
            dict(name="trl-bf16-b4", model="7b", recipe="trl", batch=4, steps=10, warmup=3),
            dict(name="trl-4bit-b16", model="7b", recipe="trl", quant="4bit", batch=16, steps=6, warmup=2),
            dict(name="engine-bf16", model="7b", recipe="engine", steps=10, warmup=3, check=True),
            dict(name="engine-4bit", model="7b", recipe="engine", quant="4bit", steps=10, warmup=3),
        ],
        "loss": [
            dict(name="loss-reference", model="1.5b", recipe="reference", batch=16, steps=100, warmup=5),
            dict(name="loss-engine", model="1.5b", recipe="engine", batch=16, steps=100, warmup=5, check=True),
            dict(name="loss-engine-fused-dropout", model="1.5b", recipe="engine", batch=16, steps=100, warmup=5,
                 defer_dropout=True, dropout_kernel="fused"),
        ],
        "retune": [
            dict(name="engine-bf16", model="7b", recipe="engine", steps=10, warmup=3, check=True),
            dict(name="engine-4bit", model="7b", recipe="engine", quant="4bit", steps=10, warmup=3),
            dict(name="engine-4bit-budget11g", model="7b", recipe="engine", quant="4bit", budget_gib=11, steps=8,
                 warmup=3),
        ],
        "variants": [
            dict(name="engine-bf16-flex", model="7b", recipe="engine", attention="flex", steps=8, warmup=3),
            dict(name="engine-bf16-sdpa", model="7b", recipe="engine", attention="sdpa", steps=6, warmup=2),
            dict(name="engine-bf16-nodrop", model="7b", recipe="engine", lora={"dropout": 0.0}, steps=10, warmup=3),
            dict(name="engine-bf16-noliger", model="7b", recipe="engine", liger=False, steps=10, warmup=3),
        ],
        "dropout": [  # LoRA dropout: the engine's choice, drawn again in backward, PEFT's kept copies, none
            dict(name="engine-bf16", model="7b", recipe="engine", steps=10, warmup=3),
            dict(name="engine-bf16-redrawn", model="7b", recipe="engine", defer_dropout=True, steps=10, warmup=3),
            dict(name="engine-bf16-fused-dropout", model="7b", recipe="engine", defer_dropout=True,
                 dropout_kernel="fused", steps=10, warmup=3),
            dict(name="engine-bf16-peft-dropout", model="7b", recipe="engine", defer_dropout=False, steps=10, warmup=3),
            dict(name="engine-bf16-nodrop", model="7b", recipe="engine", lora={"dropout": 0.0}, steps=10, warmup=3),
            dict(name="engine-4bit-budget11g", model="7b", recipe="engine", quant="4bit", budget_gib=11, steps=8,
                 warmup=3),
            dict(name="engine-4bit-budget11g-peft-dropout", model="7b", recipe="engine", quant="4bit", budget_gib=11,
                 defer_dropout=False, steps=8, warmup=3),
        ],
        "kernels": [  # how a deferred dropout draws its mask (dropout.KERNEL: auto is the default), 7B and 1.5B
            dict(name="engine-bf16", model="7b", recipe="engine", steps=10, warmup=3),
            dict(name="engine-bf16-auto-dropout", model="7b", recipe="engine", defer_dropout=True,
                 dropout_kernel="auto", steps=10, warmup=3),
            dict(name="engine-bf16-torch-dropout", model="7b", recipe="engine", defer_dropout=True,
                 dropout_kernel="torch", steps=10, warmup=3),
            dict(name="engine-bf16-fused-dropout", model="7b", recipe="engine", defer_dropout=True,
                 dropout_kernel="fused", steps=10, warmup=3),
            dict(name="engine-bf16-peft-dropout", model="7b", recipe="engine", defer_dropout=False, steps=10, warmup=3),
            dict(name="engine-bf16-nodrop", model="7b", recipe="engine", lora={"dropout": 0.0}, steps=10, warmup=3),
            dict(name="engine-bf16", model="1.5b", recipe="engine", steps=10, warmup=3),
            dict(name="engine-bf16-auto-dropout", model="1.5b", recipe="engine", defer_dropout=True,
                 dropout_kernel="auto", steps=10, warmup=3),
            dict(name="engine-bf16-torch-dropout", model="1.5b", recipe="engine", defer_dropout=True,
                 dropout_kernel="torch", steps=10, warmup=3),
            dict(name="engine-bf16-fused-dropout", model="1.5b", recipe="engine", defer_dropout=True,
                 dropout_kernel="fused", steps=10, warmup=3),
            dict(name="engine-bf16-nodrop", model="1.5b", recipe="engine", lora={"dropout": 0.0}, steps=10, warmup=3),
            dict(name="engine-bf16-peft-dropout", model="1.5b", recipe="engine", defer_dropout=False, steps=10,
                 warmup=3),
            # 16 rows a step, as the learning guard trains (--groups loss)
            dict(name="b16-peft-dropout", model="1.5b", recipe="engine", batch=16, defer_dropout=False, steps=10,
                 warmup=3),
            dict(name="b16-auto-dropout", model="1.5b", recipe="engine", batch=16, defer_dropout=True,
                 dropout_kernel="auto", steps=10, warmup=3),
            dict(name="b16-nodrop", model="1.5b", recipe="engine", batch=16, lora={"dropout": 0.0}, steps=10,
                 warmup=3),
        ],
        "losscompiled": [  # the learning guard with compiled decoder layers (compiled_layers.py)
            dict(name="loss-engine-compiled", model="1.5b", recipe="engine", batch=16, steps=100, warmup=5,
                 compile_layers=True),
            dict(name="loss-engine-graphed", model="1.5b", recipe="engine", batch=16, steps=100, warmup=5,
                 compile_layers=True, layer_graphs=True),
        ],
        "loss4bit": [  # the learning guard for QLoRA: the same 100 steps over a 4-bit base
            dict(name="loss-reference-4bit", model="1.5b", recipe="reference", quant="4bit", batch=16, steps=100,
                 warmup=5, checkpointing=True),
            dict(name="loss-engine-4bit", model="1.5b", recipe="engine", quant="4bit", batch=16, steps=100, warmup=5),
        ],
        "lean": [  # lora_forward.py's LoRA forward (B's product added by its GEMM) against PEFT's, alternating
            dict(name="engine-bf16-peft-forward", model="1.5b", recipe="engine", lean_forward=False, steps=10, warmup=3),
            dict(name="engine-bf16", model="1.5b", recipe="engine", steps=10, warmup=3),
            dict(name="engine-bf16-peft-forward", model="7b", recipe="engine", lean_forward=False, steps=10, warmup=3),
            dict(name="engine-bf16", model="7b", recipe="engine", steps=10, warmup=3),
            dict(name="engine-4bit-peft-forward", model="7b", recipe="engine", quant="4bit", lean_forward=False,
                 steps=8, warmup=3),
            dict(name="engine-4bit", model="7b", recipe="engine", quant="4bit", steps=8, warmup=3),
            dict(name="engine-bf16-profiled", model="1.5b", recipe="engine", steps=7, warmup=4, profile=True),
        ],
        "compile": [  # compiled_layers.py's compiled decoder layers against the eager ones, alternating
            dict(name="engine-bf16-eager", model="1.5b", recipe="engine", compile_layers=False, steps=12, warmup=4),
            dict(name="engine-bf16-compiled", model="1.5b", recipe="engine", compile_layers=True, steps=12, warmup=4),
            dict(name="engine-bf16-eager", model="7b", recipe="engine", compile_layers=False, steps=10, warmup=3),
            dict(name="engine-bf16-compiled", model="7b", recipe="engine", compile_layers=True, steps=10, warmup=4),
            dict(name="engine-bf16-compiled-nodrop", model="1.5b", recipe="engine", compile_layers=True,
                 lora={"dropout": 0.0}, steps=12, warmup=4),
            dict(name="engine-bf16-compiled-profiled", model="1.5b", recipe="engine", compile_layers=True, steps=9,
                 warmup=5, profile=True),
        ],
        "graphs": [  # compiled layers replayed as CUDA graphs (the rows padded to buckets) against eager and
            # plain compiled layers; more steps than other groups, since each new bucket records a graph
            dict(name="engine-bf16-eager", model="1.5b", recipe="engine", compile_layers=False, steps=30, warmup=10),
            dict(name="engine-bf16-graphed", model="1.5b", recipe="engine", compile_layers=True, layer_graphs=True,
                 steps=30, warmup=10),
            dict(name="engine-bf16-compiled", model="1.5b", recipe="engine", compile_layers=True, layer_graphs=False,
                 steps=30, warmup=10),
            dict(name="engine-bf16-graphed-profiled", model="1.5b", recipe="engine", compile_layers=True,
                 layer_graphs=True, steps=16,
                 warmup=12, profile=True),
            dict(name="engine-bf16-eager-nodrop", model="7b", recipe="engine", compile_layers=False,
                 lora={"dropout": 0.0}, steps=14, warmup=5),
            dict(name="engine-bf16-graphed-nodrop", model="7b", recipe="engine", compile_layers=True,
                 layer_graphs=True, lora={"dropout": 0.0}, steps=14, warmup=5),
        ],
        "stack": [  # session 22's LoRA layers (before), q/k/v's and gate/up's A products stacked
            # (lora_forward.STACK: the default), and each group one autograd node (lora_fused.py, off by default)
            dict(name="engine-bf16-before", model="1.5b", recipe="engine", stack=False, fused=False, steps=10, warmup=3),
            dict(name="engine-bf16", model="1.5b", recipe="engine", steps=10, warmup=3),
            dict(name="engine-bf16-fused", model="1.5b", recipe="engine", fused=True, steps=10, warmup=3),
            dict(name="engine-bf16-before", model="7b", recipe="engine", stack=False, fused=False, steps=10, warmup=3),
            dict(name="engine-bf16", model="7b", recipe="engine", steps=10, warmup=3),
            dict(name="engine-bf16-fused", model="7b", recipe="engine", fused=True, steps=10, warmup=3),
            dict(name="engine-bf16-nodrop", model="7b", recipe="engine", lora={"dropout": 0.0}, steps=10, warmup=3),
            dict(name="engine-4bit-before", model="7b", recipe="engine", quant="4bit", stack=False, fused=False, steps=8,
                 warmup=3),
            dict(name="engine-4bit", model="7b", recipe="engine", quant="4bit", steps=8, warmup=3),
            dict(name="engine-4bit-fused", model="7b", recipe="engine", quant="4bit", fused=True, steps=8, warmup=3),
        ],
        "nowait": [  # per shape: session 22's step (each LoRA layer alone, the Trainer's and TRL's reads of
            # each step), session 23's (siblings stacked), and a step that waits for nothing (lagged.py, the
            # default); then one profiled run to count the waits
            dict(name="engine-bf16-s22", model="1.5b", recipe="engine", stack=False, fused=False, lag=False, steps=12,
                 warmup=4),
            dict(name="engine-bf16-waiting", model="1.5b", recipe="engine", lag=False, steps=12, warmup=4),
            dict(name="engine-bf16", model="1.5b", recipe="engine", steps=12, warmup=4),
            dict(name="engine-bf16-s22", model="7b", recipe="engine", stack=False, fused=False, lag=False, steps=10,
                 warmup=3),
            dict(name="engine-bf16-waiting", model="7b", recipe="engine", lag=False, steps=10, warmup=3),
            dict(name="engine-bf16", model="7b", recipe="engine", steps=10, warmup=3),
            dict(name="engine-bf16-profiled", model="1.5b", recipe="engine", steps=7, warmup=4, profile=True),
            dict(name="engine-4bit-s22", model="7b", recipe="engine", quant="4bit", stack=False, fused=False, lag=False,
                 steps=8, warmup=3),
            dict(name="engine-4bit-waiting", model="7b", recipe="engine", quant="4bit", lag=False, steps=8, warmup=3),
            dict(name="engine-4bit", model="7b", recipe="engine", quant="4bit", steps=8, warmup=3),
        ],
        "profile": [  # one profiled run each (slower than unprofiled: read the shares, not the tokens/s)
            dict(name="engine-bf16-profiled", model="1.5b", recipe="engine", steps=7, warmup=4, profile=True),
            dict(name="engine-bf16-profiled", model="7b", recipe="engine", steps=6, warmup=3, profile=True),
            dict(name="engine-4bit-profiled", model="7b", recipe="engine", quant="4bit", steps=6, warmup=3,
                 profile=True),
        ],
        "small": [
            dict(name="seed-4bit-b16", model="1.5b", recipe="seed", quant="4bit", batch=16, steps=10, warmup=3),
            dict(name="trl-bf16-b4", model="1.5b", recipe="trl", batch=4, steps=10, warmup=3),
            dict(name="engine-bf16", model="1.5b", recipe="engine", steps=10, warmup=3),
            dict(name="engine-bf16-trainer-flops", model="1.5b", recipe="engine", trainer_patches=False, steps=10,
                 warmup=3),
            dict(name="engine-4bit", model="1.5b", recipe="engine", quant="4bit", steps=10, warmup=3),
        ],
    }
    out = []
    for group in which.split(","):
        out += [dict(spec, group=group) for spec in runs[group]]
    return out


def table(results: list[dict]) -> str:
    lines = ["| model | config | batch (rows x accum) | tok/step | tokens/s | MFU | peak GiB | x seed best |",
             "|---|---|---|---|---|---|---|---|"]
    for model in sorted({r["model"] for r in results}):
        rows = [r for r in results if r["model"] == model]
        seeds = [r["tokens_per_s"] for r in rows if r.get("recipe") == "seed" and "tokens_per_s" in r]
        best = max(seeds) if seeds else None
        for r in rows:
            if "tokens_per_s" not in r:
                lines.append(f"| {model} | {r['name']} | failed: {r.get('error', '?')[:80]} |||||| ")
                continue
            ratio = f"{r['tokens_per_s'] / best:.2f}" if best else "-"
            peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
            lines.append(f"| {model} | {r['name']} | {r['micro_batch']} x {r['accumulation']} | "
                         f"{r['tokens_per_step']:,.0f} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | {peak} | {ratio} |")
    return "\n".join(lines)


def loss_comparisons(results: list[dict]) -> list[str]:
    """One line per loss-engine* run against the loss-reference run of its precision (bf16, 4-bit)."""
    lines = []
    for eng in results:
        if eng["name"].startswith("loss-engine") and eng.get("losses"):
            want = "loss-reference" + ("-4bit" if eng.get("quant") else "")
            ref = next((r for r in results if r["name"] == want and r.get("losses")), None)
            if ref:
                lines.append(f"{eng['name']} against {want}: " + loss_comparison(ref, eng))
    return lines


def loss_comparison(ref: dict, eng: dict) -> str:
    n = min(len(ref["losses"]), len(eng["losses"]))
    rel = [abs(a - b) / abs(a) for a, b in zip(ref["losses"][:n], eng["losses"][:n])]
    drop = ref["losses"][0] - min(ref["losses"][:n])
    return (f"loss trajectory over {n} steps: max relative diff {100 * max(rel):.3f}%, mean {100 * sum(rel) / n:.3f}%; "
            f"reference {ref['losses'][0]:.3f} -> {ref['losses'][n - 1]:.3f} (drop {drop:.3f}), "
            f"engine {eng['losses'][0]:.3f} -> {eng['losses'][n - 1]:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (or GPU), a few steps")
    parser.add_argument("--groups", default="main,loss,variants,small", help="main, loss, loss4bit, retune, variants, dropout, kernels, lean, compile, graphs, stack, nowait, profile, small")
    parser.add_argument("--only", default="", help="comma-separated config names to keep")
    parser.add_argument("--out", default="bench-out", help="folder for results.json and logs")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per configuration")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        spec = json.loads(args.one)
        try:
            result = run_one(spec)
        except Exception as exc:
            traceback.print_exc()
            result = {**spec, "error": f"{type(exc).__name__}: {exc}"}
        print_result(result)
        return 0
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("skipped: no CUDA")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = plan(args.smoke, args.groups)
    if args.only:
        keep = set(args.only.split(","))
        specs = [s for s in specs if s["name"] in keep or f"{s['model']}:{s['name']}" in keep]
    results = []
    for spec in specs:
        started = time.time()
        log = out / "log.txt"
        try:
            proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True,
                                  text=True, timeout=args.timeout, env={**os.environ, "PYTHONUNBUFFERED": "1",
                                                                 "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
            text = proc.stdout + proc.stderr
            result = read_result(proc.stdout)
            if result is None:
                result = {**spec, "error": f"no result (rc {proc.returncode})"}
        except subprocess.TimeoutExpired as exc:
            text = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            result = {**spec, "error": f"timeout after {args.timeout}s"}
        with log.open("a") as f:
            f.write(f"\n===== {spec['model']} {spec['name']} ({time.time() - started:.0f}s)\n{text[-6000:]}\n")
        result["wall_s"] = time.time() - started
        results.append(result)
        brief = {k: result.get(k) for k in ("tokens_per_s", "mfu", "peak_gib", "tokens_per_step", "first_steps_extra_s",
                                            "error")}
        print(f"{spec['model']:>5} {spec['name']:<22} {json.dumps(brief)} ({result['wall_s']:.0f}s)", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    print()
    print(table(results))
    for line in loss_comparisons(results):
        print(line)
    for r in results:
        if r.get("profile"):
            print(profile_table(r))
    for r in results:
        if r.get("packed_check"):
            print(f"packed check {r['model']} {r['name']}: {r['packed_check']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
