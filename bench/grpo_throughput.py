"""GRPO throughput on the GPU: ipylora's engine (`Session.train --method grpo` at its defaults) vs plain TRL.

    python bench/grpo_throughput.py --out bench-out        # the H200 run (bench/RESULTS.md)
    python bench/grpo_throughput.py --smoke                # CPU, tiny shape, a few prompts: the plumbing

A random-init Qwen2 of the real 1.5B shape with the embedded tokenizer (bench/common.py), the same
prompts for both (text of ~100 tokens, log-normal), the same LoRA shape (r16, alpha 32, dropout
0.05, all linear layers), 8 completions per prompt of at most 128 tokens at temperature 1, one
epoch, and the same reward (a function of the completion's length: random weights rarely stop, so
nearly every completion runs to the cap in both). Each recipe in its own process.

- `trl`: `GRPOTrainer(model, reward_funcs=[reward], args=GRPOConfig(output_dir, num_train_epochs=1,
  num_generations=8, max_completion_length=128, report_to="none"), train_dataset=prompt rows,
  peft_config=LoraConfig(...))`: TRL's defaults for everything else (8 completions per step).
- `engine`: `Session.train(dataset, TrainArgs(method="grpo", rewards=(reward,), epochs=1,
  num_generations=8, max_completion_length=128))` on the resident model, batches from its plan.
- `--trl-steps N` / `--engine-steps N` stop a recipe after N steps (a 256-prompt epoch of TRL at 8
  completions per step takes ~20 min): the rates compare, the totals do not.

Rollout time is the time inside GRPOTrainer._generate_single_turn (CUDA-synchronised), which both
use; rollout tokens/s = completion tokens generated / that time; training tokens/s = prompt +
completion tokens of every completion / (the whole train() call minus rollout time).
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
GENERATIONS, MAX_COMPLETION = 8, 128


def length_reward(prompts, completions, **columns):
    """Prefers completions of about 40 words (any reward does: its cost is negligible here)."""
    return [-abs(len(c.split()) - 40) / 40 for c in completions]


def make_prompts(tokenizer, rows: int, seed: int = 0):
    import numpy as np
    import pandas as pd

    words = sorted(t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 3)
    rng = np.random.default_rng(seed)
    lengths = lognormal_lengths(rng, rows, median=100, sigma=0.5, low=8, high=400)
    return pd.DataFrame({"prompt": [" ".join(rng.choice(words, size=int(n))) for n in lengths]})


class RolloutClock:
    """Times GRPOTrainer._generate_single_turn (engine and TRL both go through it) and counts its tokens."""

    def __init__(self):
        import torch
        from trl import GRPOTrainer

        self.seconds, self.completion_tokens, self.calls = 0.0, 0, 0
        inner = GRPOTrainer._generate_single_turn
        clock = self

        def timed(trainer, prompt_ids, *args, **kwargs):
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            started = time.perf_counter()
            completion_ids, logprobs = inner(trainer, prompt_ids, *args, **kwargs)
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            clock.seconds += time.perf_counter() - started
            clock.completion_tokens += sum(len(c) for c in completion_ids)
            clock.calls += 1
            clock.prompt_tokens = getattr(clock, "prompt_tokens", 0) + sum(len(p) for p in prompt_ids) * (
                len(completion_ids) // max(1, len(prompt_ids)))
            return completion_ids, logprobs

        GRPOTrainer._generate_single_turn = timed


def run_one(spec: dict) -> dict:
    import torch
    from transformers import AutoTokenizer

    model_dir, kind = spec["model_dir"], spec["kind"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    frame = make_prompts(tokenizer, spec["rows"])
    cuda = torch.cuda.is_available()
    clock = RolloutClock()
    max_completion = spec.get("max_completion", MAX_COMPLETION)
    if kind.startswith("engine"):
        from ipylora.engine import DataArgs, LoraArgs, TrainArgs
        from ipylora.engine.session import Session

        session = Session()
        session.ensure_model(model_dir)
        session.add_dataset("prompts", frame, DataArgs(format="prompts", template="plain"))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        end = session.train("prompts", TrainArgs(
            method="grpo", rewards=(length_reward,), epochs=None if spec.get("steps") else 1, num_generations=GENERATIONS,
            max_completion_length=max_completion, output=spec["out"], name="bench-grpo", steps=spec.get("steps"),
            lora=LoraArgs(r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"], target_modules="all-linear")))
        seconds = time.perf_counter() - started
        steps = end.step
        plan = json.loads((Path(spec["out"]) / "bench-grpo" / "run.json").read_text())
        batch = plan["train"]["batch_size"]
    else:
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM
        from trl import GRPOConfig, GRPOTrainer

        dtype = torch.bfloat16 if cuda else torch.float32
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to("cuda" if cuda else "cpu")
        config = GRPOConfig(output_dir=str(Path(spec["out"]) / "trl"), num_train_epochs=1, report_to="none",
                            num_generations=GENERATIONS, max_completion_length=max_completion, use_cpu=not cuda,
                            bf16=cuda, max_steps=spec.get("steps") or -1)
        trainer = GRPOTrainer(model, reward_funcs=[length_reward], args=config, train_dataset=Dataset.from_pandas(frame),
                              processing_class=tokenizer,
                              peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                     target_modules="all-linear", task_type="CAUSAL_LM"))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        steps, batch = trainer.state.global_step, config.per_device_train_batch_size
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    train_seconds = max(1e-9, seconds - clock.seconds)
    tokens = clock.completion_tokens + getattr(clock, "prompt_tokens", 0)
    return {"kind": kind, "prompts": len(frame), "steps": steps, "batch": batch, "seconds": seconds,
            "rollout_seconds": clock.seconds, "rollout_calls": clock.calls,
            "completion_tokens": clock.completion_tokens,
            "rollout_tokens_per_s": clock.completion_tokens / max(1e-9, clock.seconds),
            "train_tokens_per_s": tokens / train_seconds, "peak_gib": peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape on CPU, a few prompts")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--kinds", default="trl,engine")
    parser.add_argument("--trl-steps", type=int, default=None, help="stop TRL after this many steps (rates compare)")
    parser.add_argument("--engine-steps", type=int, default=None)
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
    rows = 4 if cli.smoke else cli.rows
    results = []
    for kind in cli.kinds.split(","):
        spec = {"kind": kind, "model_dir": str(model_dir), "rows": rows, "out": str(out / kind),
                "max_completion": 16 if cli.smoke else MAX_COMPLETION,
                "steps": cli.trl_steps if kind == "trl" else cli.engine_steps}
        results.append(run_child(__file__, spec))
    print(f"\nGRPO, Qwen2-{'tiny' if cli.smoke else '1.5B'} shape, random weights, {rows} prompts x {GENERATIONS} "
          f"completions, LoRA r{LORA['r']} all-linear, {'GPU: ' + torch.cuda.get_device_name() if cuda else 'CPU'}")
    print("| recipe | batch | steps | seconds | rollout s | rollout tok/s | train tok/s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['kind']} | failed: {r['error'][:120]}")
            continue
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        print(f"| {r['kind']} | {r['batch']} | {r['steps']} | {r['seconds']:.1f} | {r['rollout_seconds']:.1f} | "
              f"{r['rollout_tokens_per_s']:,.0f} | {r['train_tokens_per_s']:,.0f} | {peak} |")
    by = {r["kind"]: r for r in results if "error" not in r}
    if "trl" in by and "engine" in by:
        for key in ("rollout_tokens_per_s", "train_tokens_per_s"):
            print(f"engine / trl {key}: {by['engine'][key] / by['trl'][key]:.2f}x")
    print("RESULTS " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
