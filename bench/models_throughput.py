"""Every family of the model matrix at ~0.5B parameters on a GPU: the engine vs plain TRL, training and chat.

    python bench/models_throughput.py                               # all 16 families (H200: ~9-10 min)
    python bench/models_throughput.py --families gemma2,falcon --steps 30
    python bench/models_throughput.py --families opt,falcon --decode-only   # chat vs generate() only
    python bench/models_throughput.py --smoke                       # CPU, the matrix's tiny shapes, seconds

Each family of tests/model_matrix.py gets a random-init checkpoint of its real architecture with
its features (sliding window, soft-capping, q/k norm, MoE experts, attention sinks, tied embeddings), at the shape
of the family's small real models (hidden ~1024, 16-32 layers) and its real vocabulary size,
drawn in bf16 on the GPU in seconds. The tokenizer and chat template are the tiny checkpoint's
(`model_matrix.build`): the model's vocabulary is larger than the tokenizer's, and only the
tokenizer's ids occur. Each family runs in two child processes, each under a time limit: the
engine's (Liger patches module globals, memory peaks stay clean) and plain TRL's, which imports
nothing of ipylora, so that its generate() is transformers' own. A family that fails is a row with
its error. Rows are merged by family into the --json file (other families' rows stay).

Per family:

- engine training: `Session.train` at the engine's defaults (`--template model`), tokens/s from
  metrics.jsonl's StepEnd events (cumulative non-padding tokens and seconds): the tokens of the
  steps after the warm-up over the time they took. Peak memory, and run.json's speed plan.
- plain TRL: `SFTTrainer` at its defaults (batch 8, padded, gradient checkpointing) with
  LoRA r 16 on all linear layers, on the same rows rendered by `apply_chat_template`; tokens/s
  counts attention-mask tokens of the same steps (bench/train_throughput.py's way).
- decode: `Session.chat` with the adapter (the second answer: the first captures the decode
  step), and, in the plain process, transformers generate() with the same adapter through PEFT
  (greedy, 128 new tokens forced by min_new_tokens). Both are answer tokens over the whole call,
  prefill included. A random model's answer may end early at EOS; chat cannot be told to go on, so
  its own count is reported and, when short, one more answer with the stop tokens switched off
  gives the like-for-like figure. With --decode-only no training runs: the adapter is a fresh
  (untrained) PEFT one, r 16 on all linear layers, the same compute as a trained one.
- packed vs padded: two rows packed into one (position ids restarting at 0) under the engine's
  attention vs each row alone under eager attention, as bf16 logits.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import child_main, lognormal_lengths, run_child  # noqa: E402

GIB = 2**30
MAX_NEW = 128
ROWS = 2400  # the engine keeps >= 32 steps per epoch: fewer rows would shrink its ~60-row batches
SMOKE_ROWS = 48
TRL_BATCH = 8  # SFTConfig's default per_device_train_batch_size
# Packed logits agree with each row alone when the largest difference is within 5% of the largest
# logit. bf16 keeps 8 bits of mantissa (0.4% per rounding) and the kernels sum in different
# orders through 16-28 layers, which moves logits by 1-2% of their scale; a row that sees its
# neighbour's tokens is off by a sizeable fraction of that scale, mostly at its first positions.
PACKED_TOLERANCE = 0.05


def _sliding(pattern: int, layers: int) -> list[str]:
    """Gemma 3's layer types: `pattern - 1` sliding-window layers, then one full-attention layer."""
    return [("full_attention" if (i + 1) % pattern == 0 else "sliding_attention") for i in range(layers)]


# The family's small real models, scaled to ~0.5B where the real one is larger: hidden size,
# heads / kv heads, MLP ratio, vocabulary, windows and features as published (Llama 3.2, Qwen2.5-
# 0.5B, Qwen3-0.6B, Mistral 7B, Mixtral 8x7B, Gemma 2 2B, Gemma 3 1B, Phi-3-mini, SmolLM3-3B,
# OLMo-2-1B, gpt-oss-20b, GPT-2 medium, Pythia-410m, OPT-350m, Falcon-7B). GPT-2 and OPT keep their real
# dropout (the tiny matrix turns it off only so that 2-layer models memorise).
SHAPES = {
    "llama3": dict(vocab_size=128256, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                   num_attention_heads=16, num_key_value_heads=4, rope_theta=500000.0, max_position_embeddings=8192,
                   tie_word_embeddings=True),
    "qwen2-5": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                    num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, max_position_embeddings=32768,
                    tie_word_embeddings=True),
    "qwen3": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1e6,
                  max_position_embeddings=32768, tie_word_embeddings=True),
    "qwen3-moe": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, moe_intermediate_size=1024,
                      num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=True,
                      num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                      rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=False),
    "mistral": dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, num_key_value_heads=4, sliding_window=4096,
                    max_position_embeddings=32768, tie_word_embeddings=False),
    "mixtral": dict(vocab_size=32000, hidden_size=1024, intermediate_size=1536, num_hidden_layers=16,
                    num_attention_heads=16, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                    sliding_window=4096, rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=False),
    "gemma2": dict(vocab_size=256000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=18,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=128, query_pre_attn_scalar=128,
                   sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                   max_position_embeddings=8192, tie_word_embeddings=True),
    "gemma3": dict(vocab_size=262144, hidden_size=1024, intermediate_size=4096, num_hidden_layers=18,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                   sliding_window=512, layer_types=_sliding(6, 18), max_position_embeddings=32768,
                   tie_word_embeddings=True),
    "phi3": dict(vocab_size=32064, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=16, sliding_window=None, max_position_embeddings=4096,
                 tie_word_embeddings=False),
    "smollm3": dict(vocab_size=128256, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, num_key_value_heads=4, rope_theta=5e6, max_position_embeddings=65536,
                    no_rope_layers=[int((i + 1) % 4 != 0) for i in range(24)],  # every 4th layer without RoPE
                    tie_word_embeddings=True),
    "olmo2": dict(vocab_size=100352, hidden_size=1024, intermediate_size=4096, num_hidden_layers=20,
                  num_attention_heads=16, num_key_value_heads=16, rope_theta=500000.0, max_position_embeddings=4096,
                  tie_word_embeddings=False),
    # gpt-oss-20b (hidden 2880, 24 layers, 64 / 8 heads of 64, 32 experts top-4, window 128, YaRN):
    # its vocabulary, heads of 64 at the same 8:1 grouping, alternating layers; 8 experts top-2.
    "gpt-oss": dict(vocab_size=201088, hidden_size=1024, intermediate_size=512, num_hidden_layers=12,
                    num_attention_heads=16, num_key_value_heads=2, head_dim=64, num_local_experts=8,
                    num_experts_per_tok=2, sliding_window=128, layer_types=_sliding(2, 12),
                    max_position_embeddings=131072, tie_word_embeddings=False),
    "gpt2": dict(vocab_size=50257, n_embd=1024, n_layer=24, n_head=16, n_positions=1024),
    "gpt-neox": dict(vocab_size=50304, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, max_position_embeddings=2048, rotary_pct=0.25, tie_word_embeddings=False),
    "opt": dict(vocab_size=50272, hidden_size=1024, ffn_dim=4096, num_hidden_layers=24, num_attention_heads=16,
                word_embed_proj_dim=1024, max_position_embeddings=2048),
    "falcon": dict(vocab_size=65024, hidden_size=1024, num_hidden_layers=32, num_attention_heads=16, multi_query=True,
                   parallel_attn=True, bias=False),
}


def model_matrix():
    """tests/model_matrix.py (FAMILIES, build): tests/ is not a package."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    import model_matrix as matrix

    return matrix


# -- checkpoint and data -------------------------------------------------------------------------
def build_checkpoint(family, root: Path, smoke: bool) -> Path:
    """The family's checkpoint: the matrix's tiny one with `smoke`, else SHAPES' shape in bf16 on the GPU
    with the tiny one's tokenizer, chat template and generation config (eos = [EOS, end of turn])."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tiny = model_matrix().build(family, root / "tiny")
    if smoke:
        return tiny
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    shape = dict(SHAPES[family.name], initializer_range=0.02)
    shape["vocab_size"] = max(shape["vocab_size"], len(tokenizer))
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = getattr(transformers, family.config)(**ids, **shape)
    torch.manual_seed(0)
    with torch.device("cuda"):  # drawn in bf16 where it lives (bench.common.save_random_qwen2, cast=False)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig.from_pretrained(tiny)
    path = root / family.name
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


def make_frame(tokenizer, rows: int, smoke: bool, seed: int = 0):
    """Alpaca-like rows of random words: prompt p, response r, `lognormal_lengths` words in all.

    The words are vocabulary entries that are one token after a space, so a row has about as many
    tokens as words (plus the chat template's markers).
    """
    import numpy as np
    import pandas as pd

    vocab = sorted(t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 3)
    words = np.array([w for w in vocab if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1])
    rng = np.random.default_rng(seed)
    lengths = lognormal_lengths(rng, rows, median=48, high=128) if smoke else lognormal_lengths(rng, rows)
    prompts, responses = [], []
    for n in lengths:
        p = max(1, int(n * rng.uniform(0.2, 0.6)))
        prompts.append(" ".join(rng.choice(words, p)))
        responses.append(" ".join(rng.choice(words, max(1, n - p))))
    return pd.DataFrame({"p": prompts, "r": responses})


def chat_rows(tokenizer, frame) -> list[dict]:
    """Prompt/completion rows through the tokenizer's chat template (tests/test_model_matrix.py's reference)."""
    rows = []
    for prompt, answer in zip(frame.p, frame.r):
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        whole = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": answer}], tokenize=False)
        # The tokenizer adds BOS itself; TRL appends EOS to a completion that lacks it.
        head_text = head[len(tokenizer.bos_token):] if head.startswith(tokenizer.bos_token or "\0") else head
        rows.append({"prompt": head_text, "completion": whole[len(head):].rstrip()})
    return rows


# -- the engine ------------------------------------------------------------------------------------
def engine_train(session, path: Path, frame, spec: dict, out: Path) -> dict:
    """Train with the engine's defaults; tokens/s over the steps after the warm-up, peak memory, speed plan."""
    import torch

    from ipylora.engine import DataArgs, TrainArgs
    from ipylora.engine.runs import read_json, read_metrics

    session.ensure_model(str(path))
    params = sum(p.numel() for p in session.model.parameters())  # before the adapter; tied weights once
    session.add_dataset("d", frame, DataArgs(prompt="{p}", response="{r}", template="model"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    end = session.train("d", TrainArgs(name="bench", steps=spec["steps"], output=str(out / "runs")))
    if end.status != "finished" or not end.adapter_dir:
        raise RuntimeError(f"engine run {end.status}: {end.message}")
    run_dir = Path(end.adapter_dir).parent
    steps = {e["step"]: e for e in read_metrics(run_dir) if e.get("event") == "StepEnd"}
    # StepEnd's tokens (the Trainer's non-padding count) and elapsed are cumulative since the start.
    first, last = steps[spec["warmup"]], steps[spec["steps"]]
    tokens = last["tokens"] - first["tokens"]
    plan = read_json(run_dir / "run.json").get("speed_plan") or {}
    return {
        "params": params,
        "engine_tok_s": tokens / (last["elapsed"] - first["elapsed"]),
        "engine_tokens_per_step": tokens / (spec["steps"] - spec["warmup"]),
        "engine_peak_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        "engine_batch": f"{plan['batch_size']} x {plan['accumulation']}" if plan else None,
        "attention": plan.get("attention"), "liger": plan.get("liger"), "checkpointing": plan.get("checkpointing"),
        "notes": list(plan.get("notes") or []),
        "adapter_dir": end.adapter_dir,
    }


def _captured(model) -> bool:
    """Whether chat's last answer replayed a captured step: `graphdecode.usable` only says it was
    tried (sliding-window caches turn capture off; a failed capture falls back uncaptured)."""
    from ipylora.engine import graphdecode

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    graph = base.__dict__.get(graphdecode._SLOT)
    return bool(graphdecode.usable(model) and graph is not None and graph._graph is not None)


def engine_decode(session, prompt: str) -> dict:
    """The second chat answer's tokens/s (the first captures the decode step), and a full-length one if it was short."""
    from unittest import mock

    from ipylora.engine import GenerateArgs
    from ipylora.engine import chat as chat_module

    args = GenerateArgs(adapter="bench", max_new_tokens=MAX_NEW)
    session.chat(prompt, args)
    answer = session.chat(prompt, args)
    result = {"decode_engine_tok_s": answer["tokens"] / answer["seconds"], "decode_engine_tokens": answer["tokens"],
              "captured_decode": _captured(session.model)}
    full = answer
    if answer["tokens"] < MAX_NEW and hasattr(chat_module, "stop_ids"):
        # Chat has no "ignore EOS": with no stop tokens the same loop runs its MAX_NEW tokens.
        with mock.patch.object(chat_module, "stop_ids", lambda model, tokenizer: []):
            full = session.chat(prompt, args)
    result["decode_engine_full_tok_s"] = full["tokens"] / full["seconds"] if full["tokens"] == MAX_NEW else None
    return result


# -- plain TRL and transformers --------------------------------------------------------------------
def trl_train(path: Path, rows: list[dict], spec: dict, out: Path, dropout: float) -> dict:
    """SFTTrainer at its defaults with LoRA r 16 on all linear layers; tokens/s over the steps after the warm-up."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    config = SFTConfig(output_dir=str(out / "trl"), max_steps=spec["steps"], bf16=cuda, use_cpu=not cuda,
                       report_to="none", save_strategy="no", disable_tqdm=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    timing: dict = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == spec["warmup"]:
                if cuda:
                    torch.cuda.synchronize()
                timing["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == spec["steps"]:
                if cuda:
                    torch.cuda.synchronize()
                timing["end"] = time.perf_counter()

    # The rows one run reads (8 a step), from the start of the same frame the engine trained on.
    data = Dataset.from_list(rows[:TRL_BATCH * spec["steps"] + TRL_BATCH])
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=lora,
                         callbacks=[Clock()])
    collate, counts = trainer.data_collator, []

    def counting(examples):
        batch = collate(examples)
        counts.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting
    trainer.train()
    tokens = sum(counts[spec["warmup"] * config.gradient_accumulation_steps:
                        spec["steps"] * config.gradient_accumulation_steps])
    result = {"trl_tok_s": tokens / (timing["end"] - timing["start"]),
              "trl_tokens_per_step": tokens / (spec["steps"] - spec["warmup"]),
              "trl_peak_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
              "trl_checkpointing": config.gradient_checkpointing, "trl_lora_dropout": dropout}
    del trainer, model
    return result


def plain_decode(path: Path, adapter_dir: str, tokenizer, prompt: str) -> dict:
    """generate() tokens/s with the PEFT adapter active: greedy, MAX_NEW tokens (EOS held off), transformers' own loop
    (dynamic cache, nothing compiled or captured), on a fresh base model with the adapter loaded."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32)
    model = PeftModel.from_pretrained(base.to("cuda" if cuda else "cpu"), adapter_dir).eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not text.startswith(tokenizer.bos_token or "\0"))
    ids = ids.to(next(model.parameters()).device)
    seconds = 0.0
    with torch.inference_mode():
        for new in (8, MAX_NEW):  # the first call warms up
            _sync()
            started = time.perf_counter()
            out = model.generate(**ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            _sync()
            seconds = time.perf_counter() - started
    del model, base
    return {"decode_plain_tok_s": (out.shape[1] - ids["input_ids"].shape[1]) / seconds,
            "decode_plain_tokens": out.shape[1] - ids["input_ids"].shape[1],
            # The point of the plain process: generate() on transformers + peft as they come.
            "decode_plain_clean": not any(m == "ipylora" or m.startswith("ipylora.") for m in sys.modules)}


def packed_check(model, rows: list[list[int]], attention: str | None) -> dict:
    """Logits of `rows` packed in one row (position ids restarting at 0) under the engine's `attention`
    vs each row alone under eager attention; in the model's dtype (bf16 on the GPU)."""
    import torch

    from ipylora.engine import speed

    base = model.get_base_model()
    loaded = base.config._attn_implementation
    device = next(model.parameters()).device
    with torch.inference_mode():
        _attend(base, "eager")
        alone = [model(input_ids=torch.tensor([r], device=device)).logits[0].float() for r in rows]
        if attention in ("varlen", "sdpa", "flex"):
            speed.set_attention(base, attention)
        else:  # "eager" stays; "native" (the model's own attention code) is the one it loaded with
            _attend(base, "eager" if attention == "eager" else loaded)
        ids = torch.tensor([sum(rows, [])], device=device)
        positions = torch.tensor([[i for r in rows for i in range(len(r))]], device=device)
        packed = model(input_ids=ids, position_ids=positions).logits[0].float()
    reference = torch.cat(alone)
    diff = (packed - reference).abs().max().item()
    scale = reference.abs().max().item()
    return {"packed_attention": attention, "packed_max_abs_diff": diff, "packed_max_abs_logit": scale,
            "packed_rel_l2": ((packed - reference).norm() / reference.norm()).item(),
            "packed_ok": diff <= PACKED_TOLERANCE * scale}


def _attend(model, name: str) -> None:
    try:
        model.set_attn_implementation(name)
    except Exception:  # a model (or transformers version) without the setter takes the config value
        model.config._attn_implementation = name


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- one family ------------------------------------------------------------------------------------
def run_one(spec: dict) -> dict:
    """The child process's part, by `spec["kind"]`."""
    import torch

    if spec["smoke"]:
        torch.set_num_threads(1)  # tiny matmuls: more threads made a step 20x slower on a 2-core box
    parts = {"family": run_engine, "plain": run_plain, "decode": run_decode_engine, "decode_plain": run_decode_plain}
    return parts[spec["kind"]](spec)


def run_engine(spec: dict) -> dict:
    """The engine's part of one family: checkpoint, training, chat, packed check. Training comes
    first (the rest needs its adapter); a later part that fails sets the row's error and the next
    part still runs. The checkpoint and the adapter stay in spec["root"] for the plain process."""
    from transformers import AutoTokenizer

    from ipylora.engine.session import Session

    family = model_matrix().BY_NAME[spec["family"]]
    result = {"family": family.name}
    out = Path(spec["root"])
    path = build_checkpoint(family, out / "checkpoints", spec["smoke"])
    result["checkpoint"] = str(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    frame = make_frame(tokenizer, spec["rows"], spec["smoke"])
    rows = chat_rows(tokenizer, frame)
    session = Session()
    try:
        result.update(engine_train(session, path, frame, spec, out))
        _part(result, "engine chat", lambda: engine_decode(session, _prompt(frame)))
    finally:
        session.unload()
        _free()
    _part(result, "packed check", lambda: packed_checks(path, tokenizer, result, rows))
    return result


def run_plain(spec: dict) -> dict:
    """Plain TRL's part of one family, in a process that imports nothing of ipylora: SFTTrainer at
    its defaults, then generate() with the engine's adapter."""
    from transformers import AutoTokenizer

    family = model_matrix().BY_NAME[spec["family"]]
    path = Path(spec["checkpoint"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    frame = make_frame(tokenizer, spec["rows"], spec["smoke"])
    result = {"family": family.name}
    # PEFT refuses dropout on fused MoE experts (lora.ParamWrapper), which all-linear targets; the
    # engine trains those without, as tests/test_model_matrix.py's reference does.
    dropout = 0.0 if "MoE experts" in family.features else 0.05
    _part(result, "trl", lambda: trl_train(path, chat_rows(tokenizer, frame), spec, Path(spec["root"]), dropout))
    _free()
    _part(result, "plain decode", lambda: plain_decode(path, spec["adapter_dir"], tokenizer, _prompt(frame)))
    return result


def run_decode_engine(spec: dict) -> dict:
    """--decode-only, the engine's part for each family: checkpoint, a fresh PEFT adapter (saved for
    the plain process), chat's decode with it. A family that fails gets its error; the next one runs."""
    from transformers import AutoTokenizer

    from ipylora.engine.session import Session

    rows = {}
    for name in spec["families"]:
        family = model_matrix().BY_NAME[name]
        row = rows[name] = {"family": name, "decode_adapter": "fresh PEFT r16 all-linear (--decode-only)"}

        def measure():
            path = build_checkpoint(family, Path(spec["root"]) / "checkpoints", spec["smoke"])
            adapter = fresh_adapter(path, Path(spec["root"]) / f"{name}-adapter")
            frame = make_frame(AutoTokenizer.from_pretrained(path), spec["rows"], spec["smoke"])
            session = Session()
            try:
                session.ensure_model(str(path))
                session.load_adapter(str(adapter), name="bench")
                return {"checkpoint": str(path), "adapter_dir": str(adapter),
                        **engine_decode(session, _prompt(frame))}
            finally:
                session.unload()
                _free()

        _part(row, "engine chat", measure)
    return {"kind": "decode", "rows": rows}


def run_decode_plain(spec: dict) -> dict:
    """--decode-only, the plain part: generate() with each family's adapter, nothing of ipylora imported."""
    from transformers import AutoTokenizer

    rows = {}
    for name, paths in spec["paths"].items():
        row = rows[name] = {"family": name}

        def measure():
            tokenizer = AutoTokenizer.from_pretrained(paths["checkpoint"])
            frame = make_frame(tokenizer, spec["rows"], spec["smoke"])
            return plain_decode(Path(paths["checkpoint"]), paths["adapter_dir"], tokenizer, _prompt(frame))

        _part(row, "plain decode", measure)
        _free()
    return {"kind": "decode_plain", "rows": rows}


def _prompt(frame) -> str:
    return " ".join(frame.p[0].split()[:32])


def fresh_adapter(path: Path, out: Path) -> Path:
    """An untrained LoRA adapter as the TRL runs attach it (r 16, alpha 32, all linear layers), saved by PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.save_pretrained(out)
    del model, base
    _free()
    return out


def packed_checks(path: Path, tokenizer, result: dict, rows: list[dict]) -> dict:
    """The packed-logits check on the base model with the engine's adapter through PEFT."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ipylora.engine import speed

    cuda = torch.cuda.is_available()
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32)
    model = PeftModel.from_pretrained(base.to("cuda" if cuda else "cpu"), result["adapter_dir"]).eval()
    # The longest row (past Gemma 3's 512-token window) and the first one, as training tokenized them.
    texts = [r["prompt"] + r["completion"] for r in rows]
    longest = max(range(len(texts)), key=lambda i: len(texts[i]))
    ids = [tokenizer(texts[i])["input_ids"][:1024] for i in (longest, 0 if longest else 1)]
    attention = result.get("attention")
    if attention is None:  # CPU: no speed plan, so the attention the engine would choose there
        attention = speed.attention_path(type(base), base.config, "cpu").kind \
            if hasattr(speed, "attention_path") else "varlen"
    checks = packed_check(model, ids, attention)
    checks["engine_packs"] = attention in ("varlen", "sdpa", "flex")
    del model, base
    return checks


def _part(result: dict, label: str, work) -> None:
    """Add what `work()` measured to `result`; if it fails, the row's error (the first one) says where."""
    import traceback

    try:
        result.update(work())
    except Exception as exc:
        traceback.print_exc()
        result.setdefault("error", f"{label}: {type(exc).__name__}: {exc}")


# -- the report ------------------------------------------------------------------------------------
def _num(value, fmt: str = ",.0f") -> str:
    return "-" if value is None else format(value, fmt)


def _packed(r: dict) -> str:
    if r.get("packed_max_abs_diff") is None:
        return "-"
    figures = f"{r['packed_max_abs_diff']:.3g} / {r['packed_max_abs_logit']:.3g} {'ok' if r['packed_ok'] else 'NOT ok'}"
    return figures if r["engine_packs"] else f"trains padded (packed: {figures})"


def table(results: list[dict]) -> str:
    lines = ["| family | params | engine tok/s | TRL tok/s | x TRL | peak GiB eng / TRL | decode tok/s eng / plain "
             "(eng tokens) | attention | liger | captured | packed diff / max logit |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        params = r.get("params")
        size = "-" if params is None else f"{params / 1e6:{'.2f' if params < 1e7 else ',.0f'}}M"
        decode = r.get("decode_engine_full_tok_s") or r.get("decode_engine_tok_s")
        lines.append(
            f"| {r['family']} | {size} | "
            f"{_num(r.get('engine_tok_s'))} | {_num(r.get('trl_tok_s'))} | {_num(r.get('ratio'), '.2f')} | "
            f"{_num(r.get('engine_peak_gib'), '.1f')} / {_num(r.get('trl_peak_gib'), '.1f')} | "
            f"{_num(decode)} / {_num(r.get('decode_plain_tok_s'))} ({r.get('decode_engine_tokens', '-')}) | "
            f"{r.get('attention', '-')} | {r.get('liger', '-')} | {r.get('captured_decode', '-')} | {_packed(r)} |")
    failed = [f"{r['family']}: {r['error']}" for r in results if r.get("error")]
    return "\n".join(lines + (["", "errors:", *failed] if failed else []))


def family_row(name: str, spec: dict, timeout: float) -> dict:
    """One family's row: the engine's child, then plain TRL's child on its checkpoint and adapter."""
    started = time.time()
    with tempfile.TemporaryDirectory(prefix=f"models-{name}-") as root:
        common = {**spec, "family": name, "root": root}
        engine = _row(run_child(__file__, {**common, "kind": "family"}, timeout=timeout))
        plain = {}
        if engine.get("adapter_dir"):
            plain = _row(run_child(__file__, {**common, "kind": "plain", "checkpoint": engine["checkpoint"],
                                              "adapter_dir": engine["adapter_dir"]}, timeout=timeout))
    result = {"family": name, **engine, **{k: v for k, v in plain.items() if k != "error"}}
    if plain.get("error"):
        result.setdefault("error", plain["error"])
    for key in ("checkpoint", "adapter_dir"):  # in the folder just deleted
        result.pop(key, None)
    result["decode_adapter"] = "the engine run's"
    if result.get("engine_tok_s") and result.get("trl_tok_s"):
        result["ratio"] = result["engine_tok_s"] / result["trl_tok_s"]
    result["wall_s"] = round(time.time() - started, 1)
    return result


def decode_rows(names: list[str], spec: dict, timeout: float) -> list[dict]:
    """--decode-only: one engine child decodes every family, then one plain child generates for each."""
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="models-decode-") as root:
        common = {**spec, "families": names, "root": root}
        engine = run_child(__file__, {**common, "kind": "decode"}, timeout=timeout * len(names))
        rows = engine.get("rows") or {n: {"family": n, "error": engine.get("error", "?")} for n in names}
        paths = {n: {k: r[k] for k in ("checkpoint", "adapter_dir")} for n, r in rows.items() if r.get("adapter_dir")}
        plain = run_child(__file__, {**common, "kind": "decode_plain", "paths": paths},
                          timeout=timeout * max(1, len(paths))) if paths else {}
    results = []
    for name in names:
        row, other = _row(rows.get(name, {})), _row((plain.get("rows") or {}).get(name, {}))
        if plain.get("error") and name in paths:
            other.setdefault("error", plain["error"])
        result = {**row, **{k: v for k, v in other.items() if k != "error"}, "family": name}
        if other.get("error"):
            result.setdefault("error", other["error"])
        for key in ("checkpoint", "adapter_dir"):
            result.pop(key, None)
        results.append(result)
    print(f"decode rows: {time.time() - started:.0f} s")
    return results


def _row(result: dict) -> dict:
    result = dict(result)
    result.pop("kind", None)
    if "error" in result:  # one line: the child's traceback went to stderr
        result["error"] = (str(result["error"]).strip().splitlines() or ["?"])[0][:300]
    return result


# Decode figures a --decode-only row replaces (and notes about the older in-process baseline it drops).
DECODE_KEYS = ("decode_engine_tok_s", "decode_engine_tokens", "decode_engine_full_tok_s", "captured_decode",
               "captured_decode_why", "decode_capture_tried", "decode_plain_tok_s", "decode_plain_tokens",
               "decode_plain_clean", "decode_adapter")


def merge_rows(out: Path, results: list[dict], update: bool) -> None:
    """Write `results` into the list in `out` by family: a full row replaces the family's row; with
    `update` (--decode-only) only the decode figures change, and its error (if any) is added."""
    rows = {r["family"]: r for r in (json.loads(out.read_text()) if out.exists() else [])}
    for result in results:
        if update and result["family"] in rows:
            row = {k: v for k, v in rows[result["family"]].items() if k not in DECODE_KEYS}
            if result.get("error"):
                row["decode_error"] = result.pop("error")
            else:
                row.pop("decode_error", None)
            rows[result["family"]] = {**row, **result}
        else:
            rows[result["family"]] = result
    order = [f.name for f in model_matrix().FAMILIES]
    merged = sorted(rows.values(), key=lambda r: order.index(r["family"]) if r["family"] in order else len(order))
    out.write_text(json.dumps(merged, indent=1) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU plumbing check: the matrix's tiny shapes, 4 steps")
    parser.add_argument("--families", default="", help="comma-separated family names (default: all)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 30, smoke 4)")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of tokens/s (default 10, smoke 1)")
    parser.add_argument("--timeout", type=float, default=150, help="seconds per family before its child is killed")
    parser.add_argument("--json", default=None, help="the list of per-family results, merged by family (default "
                        "bench/results/models_gpu.json, with --smoke bench/results/models_smoke.json)")
    parser.add_argument("--decode-only", action="store_true", help="chat decode and plain generate() only, with a "
                        "fresh adapter (no training); updates the decode figures of the families' rows")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return child_main(run_one, args.one)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("skipped: needs CUDA (run with --smoke for the CPU plumbing check)")
        return 0
    matrix = model_matrix()
    names = [f.name for f in matrix.FAMILIES if matrix.available(f)]
    if args.families:
        unknown = sorted(set(args.families.split(",")) - set(matrix.BY_NAME))
        if unknown:
            parser.error(f"unknown families {', '.join(unknown)} (known: {', '.join(matrix.BY_NAME)})")
        names = [n for n in names if n in args.families.split(",")]
    steps = args.steps or (4 if args.smoke else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 10)
    if not 0 < warmup < steps:
        parser.error(f"--warmup {warmup} must be at least 1 and below --steps {steps}")
    out = Path(args.json or ROOT / "bench" / "results" / f"models_{'smoke' if args.smoke else 'gpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = {"smoke": args.smoke, "steps": steps, "warmup": warmup, "rows": SMOKE_ROWS if args.smoke else ROWS}
    begun = time.time()
    if args.decode_only:
        results = decode_rows(names, spec, args.timeout)
        merge_rows(out, results, update=True)
    else:
        results = []
        for name in names:
            results.append(family_row(name, spec, args.timeout))
            merge_rows(out, results[-1:], update=False)  # as it goes: a cut run keeps what it measured
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "CPU smoke"
    print(f"\n{device} · {steps} steps, tokens/s over the last {steps - warmup} · decode {MAX_NEW} new tokens\n")
    print(table(results))
    print(f"\nwrote {out} ({time.time() - begun:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
