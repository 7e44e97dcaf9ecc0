"""DPO throughput on the GPU: ipylora's engine (`Session.train --method dpo` at its defaults) vs plain TRL.

    python bench/dpo_throughput.py --out bench-out        # the H200 run (bench/RESULTS.md)
    python bench/dpo_throughput.py --smoke                # CPU, tiny shape, a few rows: checks the plumbing

The model is a random-init Qwen2 of the real 1.5B shape (no download; random weights cost the
same FLOPs) with the embedded tokenizer. The data are the same preference rows for both: text
prompt, chosen, rejected of log-normal word counts (prompt median ~100 tokens, answers ~120),
drawn from the tokenizer's own words. Both train one epoch over every row with the same LoRA
shape (ipylora's MODEL_LORA: r16, alpha 32, dropout 0.05, all linear layers); each in its own
process, so patches and memory peaks stay apart.

- `trl`: `DPOTrainer(model, args=DPOConfig(output_dir, num_train_epochs=1, report_to="none"),
  train_dataset=text rows, peft_config=LoraConfig(...))`: TRL's defaults for everything else.
- `engine`: `Session.train(dataset, TrainArgs(method="dpo", epochs=1))` on the resident model
  (batches sized by its token budget from free memory); `engine-b8`: the same with `--batch-size 8`,
  TRL's default batch; `engine-mtrl`: the defaults under `--memory` = the peak the `trl` row measured
  (run it after `trl`), so the planner stays within TRL's memory; `engine-mGIB` gives --memory GIB.
- `--check-packing`: on the GPU, one padded DPO batch of the 1.5B shape through the fused LM head,
  padded vs padding-free (`engine/packed.py`, flash varlen), bf16: the largest log-prob difference.

tokens/s counts real tokens (no padding): each row costs prompt + chosen + prompt + rejected tokens
(the policy sees both sequences); the time is the whole train() call, reference log-probs included.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import child_main, lognormal_lengths, qwen2_for_bench, run_child  # noqa: E402

LORA = dict(r=16, alpha=32, dropout=0.05)


def make_rows(tokenizer, rows: int, seed: int = 0):
    """Preference rows as text: words of the tokenizer's own vocabulary, log-normal lengths."""
    import numpy as np
    import pandas as pd

    words = sorted(t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 3)
    rng = np.random.default_rng(seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(words, size=int(n)))

    prompts = lognormal_lengths(rng, rows, median=100, sigma=0.5, low=8, high=512)
    chosen = lognormal_lengths(rng, rows, median=120, sigma=0.5, low=4, high=400)
    rejected = lognormal_lengths(rng, rows, median=120, sigma=0.5, low=4, high=400)
    return pd.DataFrame({"prompt": [text(n) for n in prompts], "chosen": [text(n) for n in chosen],
                         "rejected": [text(n) for n in rejected]})


def real_tokens(tokenizer, frame) -> int:
    """Tokens the policy processes over one epoch: (prompt + chosen) + (prompt + rejected) per row."""
    count = lambda texts: sum(len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"])  # noqa: E731
    return 2 * count(frame.prompt) + count(frame.chosen) + count(frame.rejected) + 2 * len(frame)  # + EOS each


def run_one(spec: dict) -> dict:
    import torch
    from transformers import AutoTokenizer

    model_dir, kind = spec["model_dir"], spec["kind"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    frame = make_rows(tokenizer, spec["rows"])
    tokens = real_tokens(tokenizer, frame)
    cuda = torch.cuda.is_available()
    if kind.startswith("engine"):
        from ipylora.engine import DataArgs, LoraArgs, TrainArgs
        from ipylora.engine.session import Session

        session = Session()
        session.ensure_model(model_dir)
        session.add_dataset("prefs", frame, DataArgs(format="preference", template="plain"))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        batch = int(kind.split("-b")[1]) if "-b" in kind else None  # engine-b8: TRL's default batch of 8
        end = session.train("prefs", TrainArgs(method="dpo", epochs=1, output=spec["out"], name="bench-dpo",
                                               batch_size=batch, memory=spec.get("memory"),
                                               lora=LoraArgs(r=LORA["r"], alpha=LORA["alpha"],
                                                             dropout=LORA["dropout"], target_modules="all-linear")))
        seconds = time.perf_counter() - started
        final_loss, steps = end.final_loss, end.step
        plan = json.loads((Path(spec["out"]) / "bench-dpo" / "run.json").read_text()).get("speed_plan") or {}
        extra = {"batch": plan.get("batch_size"), "checkpointing": plan.get("checkpointing"), "liger": plan.get("liger"),
                 "attention": plan.get("attention"), "memory": spec.get("memory")}
    else:
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM
        from trl import DPOConfig, DPOTrainer

        dtype = torch.bfloat16 if cuda else torch.float32
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to("cuda" if cuda else "cpu")
        config = DPOConfig(output_dir=str(Path(spec["out"]) / "trl"), num_train_epochs=1, report_to="none",
                           use_cpu=not cuda, bf16=cuda, max_steps=spec.get("max_steps", -1))
        trainer = DPOTrainer(model, args=config, train_dataset=Dataset.from_pandas(frame), processing_class=tokenizer,
                             peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                    target_modules="all-linear", task_type="CAUSAL_LM"))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        final_loss, steps = (losses[-1] if losses else None), trainer.state.global_step
        extra = {"batch": config.per_device_train_batch_size, "checkpointing": config.gradient_checkpointing}
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {"kind": kind, "rows": len(frame), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "peak_gib": peak, "steps": steps, "final_loss": final_loss, **extra}


def check_packing(model_dir: str) -> dict:
    """Padded vs padding-free log-probs of one DPO-shaped batch on the GPU (bf16, flash varlen)."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from ipylora.engine import speed
    from ipylora.engine.packed import pack_padded_forward

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    speed.set_attention(model, "varlen")
    add_fused_lm_head(model)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(100, 500, (16,), generator=g)
    width = int(lengths.max())
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    ids = torch.randint(10, model.config.vocab_size, (16, width), generator=g) * mask
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :80] = -100
    ids, mask, labels = ids.cuda(), mask.cuda(), labels.cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        padded = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs.float()
        pack_padded_forward(model)
        packed = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs.float()
    valid = labels[:, 1:] != -100
    seq_padded, seq_packed = (padded * valid).sum(1), (packed * valid).sum(1)
    return {"max_token_diff": float((padded - packed)[valid].abs().max()),
            "max_seq_logp_rel_diff": float(((seq_padded - seq_packed).abs() / seq_padded.abs()).max()),
            "mean_token_logp": float(padded[valid].mean())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape on CPU, a few rows")
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--kinds", default="trl,engine-mtrl,engine,engine-b8")
    parser.add_argument("--check-packing", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.one:
        return child_main(run_one, cli.one)
    import torch

    cuda = torch.cuda.is_available()
    out = Path(cli.out)
    model_dir = qwen2_for_bench(out, cli.smoke)
    if model_dir is None:
        return 0
    if cli.check_packing:
        print("packing check " + json.dumps(check_packing(str(model_dir))), flush=True)
    rows = 16 if cli.smoke else cli.rows
    results = []
    for kind in cli.kinds.split(","):
        spec = {"kind": kind, "model_dir": str(model_dir), "rows": rows, "out": str(out / kind)}
        if kind.startswith("engine-m") and kind != "engine-mtrl":  # engine-m6.34: --memory 6.34
            spec["memory"] = float(kind[len("engine-m"):])
        if kind == "engine-mtrl":
            trl_row = next((r for r in results if r["kind"] == "trl" and r.get("peak_gib")), None)
            spec["memory"] = round(trl_row["peak_gib"], 2) if trl_row else None
        results.append(run_child(__file__, spec))
    print(f"\nDPO, Qwen2-{'tiny' if cli.smoke else '1.5B'} shape, random weights, {rows} preference rows, 1 epoch, "
          f"LoRA r{LORA['r']} all-linear, {'GPU: ' + torch.cuda.get_device_name() if cuda else 'CPU'}")
    print(f"| {'recipe':<11} | batch | ckpt | {'steps':>5} | {'seconds':>8} | {'tokens/s':>9} | {'peak GiB':>8} | "
          f"{'final loss':>10} |")
    print(f"|{'-' * 13}|-------|------|{'-' * 7}|{'-' * 10}|{'-' * 11}|{'-' * 10}|{'-' * 12}|")
    for r in results:
        if "error" in r:
            print(f"| {r['kind']:<11} | failed: {r['error'][:120]}")
            continue
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        loss = f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "-"
        ckpt = {True: "on", False: "off"}.get(r.get("checkpointing"), "-")
        print(f"| {r['kind']:<11} | {r.get('batch') or '-':>5} | {ckpt:>4} | {r['steps']:>5} | {r['seconds']:>8.1f} | "
              f"{r['tokens_per_s']:>9,.0f} | {peak:>8} | {loss:>10} |")
    by = {r["kind"]: r for r in results if "error" not in r}
    for kind in by:
        if kind.startswith("engine") and "trl" in by:
            print(f"{kind} / trl: {by[kind]['tokens_per_s'] / by['trl']['tokens_per_s']:.2f}x tokens/s")
    print("RESULTS " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
