"""`%lora_train --dry-run` against real runs on a GPU: estimated vs measured peak memory and tokens/s.

    python bench/dry_run_check.py --out DIR [--configs 7b-4bit,7b-bf16,1.5b-bf16] [--steps 30]
    python bench/dry_run_check.py --out DIR --configs 7b-4bit-16k,7b-4bit-32k,7b-4bit-32k-m16 --steps 6 --warmup 2
    python bench/dry_run_check.py --smoke        # CPU, tiny shapes: checks the plumbing in a minute

For each configuration: a random-init Qwen2 of the real shape (vocab included) is saved once in
bf16 with the embedded model's tokenizer (it only uses the first ids) to a temp folder, the
dry-run estimate is made with nothing loaded, then the same dataset trains through
`Session.train` with the engine's defaults (no batch or budget overrides) for --steps steps.
Measured: `torch.cuda.max_memory_allocated` over the run (reset after the model loads), tokens/s
from the run's StepEnd events after --warmup steps (real tokens, no padding), and the plan from
run.json. Data: alpaca-like text rows whose token counts are log-normal (median ~220, sigma 0.6,
clipped 16..1024) as in bench/train_throughput.py; the long-row configurations (`-16k`, `-32k`)
train 12 rows of exactly that many tokens (--max-length cuts their prompts), under --memory where
the name says (`-m16`).

Each row is printed (and DIR/dry_run_check.json rewritten) as soon as it is done, so a run cut
short keeps what it measured. Without CUDA (and without --smoke) it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import SHAPES, lognormal_lengths, save_random_qwen2  # noqa: E402

# name: (shape, quantization, tokens per row (None: alpaca-like lengths), --memory GiB)
CONFIGS = {"7b-4bit": ("7b", "4bit", None, None), "7b-bf16": ("7b", None, None, None),
           "1.5b-bf16": ("1.5b", None, None, None),
           # Issue #20 target 4: long rows (16k within 16 GiB, 32k within 24 GiB); under --memory 16 a
           # 32k row fits only with its checkpointed layer inputs offloaded to host memory.
           "7b-4bit-16k": ("7b", "4bit", 16384, None), "7b-4bit-32k": ("7b", "4bit", 32768, None),
           "7b-4bit-32k-m16": ("7b", "4bit", 32768, 16.0), "7b-bf16-32k": ("7b", None, 32768, None),
           "tiny-4bit": ("tiny", "4bit", None, None), "tiny-bf16": ("tiny", None, None, None),
           "tiny-long": ("tiny", None, 1800, None)}
LONG_ROWS = 12  # rows in a long-row dataset: one a step at these lengths


def build_model(shape: str, path: Path) -> float:
    """Save a random-init Qwen2 of `shape` in bf16 (fp32 on CPU) with the tiny tokenizer; seconds taken."""
    import torch

    started = time.time()
    cuda = torch.cuda.is_available()
    # Drawn in the final dtype on the device: initialising 7B weights on the CPU takes minutes.
    save_random_qwen2(path, SHAPES[shape], device="cuda" if cuda else "cpu",
                      dtype=torch.bfloat16 if cuda else torch.float32, cast=False)
    return time.time() - started


def alpaca_like(rows: int, seed: int = 0, median: float = 220, sigma: float = 0.6):
    """A DataFrame of prompt/response text whose rows tokenize to log-normal lengths (tiny tokenizer)."""
    import numpy as np
    import pandas as pd

    from ipylora.engine.models import load_tokenizer
    from ipylora.engine.tiny import tiny_model_path

    tokenizer = load_tokenizer(str(tiny_model_path()))
    rng = np.random.default_rng(seed)
    lengths = lognormal_lengths(rng, rows, median, sigma)
    # Whole words from the tokenizer's own vocabulary re-tokenize to about one token each.
    words = [w for w in (tokenizer.decode([i]).strip() for i in range(3, len(tokenizer))) if w.isalpha()]
    sample = " ".join(rng.choice(words, 1000))
    per_word = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / 1000
    template_tokens = 12  # "### Human:" / "### Assistant:" framing and EOS, roughly
    out = []
    for n in lengths:
        body = max(4, int((int(n) - template_tokens) / per_word))
        p = max(1, int(body * rng.uniform(0.2, 0.6)))
        out.append({"prompt": " ".join(rng.choice(words, p)), "response": " ".join(rng.choice(words, body - p))})
    return pd.DataFrame(out)


def long_like(rows: int, tokens: int, seed: int = 0):
    """A DataFrame of `rows` rows of about `tokens` tokens each (30% prompt), as `alpaca_like` words them."""
    import numpy as np
    import pandas as pd

    from ipylora.engine.models import load_tokenizer
    from ipylora.engine.tiny import tiny_model_path

    tokenizer = load_tokenizer(str(tiny_model_path()))
    rng = np.random.default_rng(seed)
    words = [w for w in (tokenizer.decode([i]).strip() for i in range(3, len(tokenizer))) if w.isalpha()]
    sample = " ".join(rng.choice(words, 1000))
    count = int((tokens - 12) / (len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / 1000))
    return pd.DataFrame([{"prompt": " ".join(rng.choice(words, count * 3 // 10)),
                          "response": " ".join(rng.choice(words, count - count * 3 // 10))} for _ in range(rows)])


def measure(session, config: str, model: Path, steps: int, warmup: int, runs: Path) -> dict:
    import torch

    from ipylora.engine import DataArgs, TrainArgs
    from ipylora.engine.estimate import estimate
    from ipylora.engine.events import StepEnd
    from ipylora.engine.models import free_memory

    shape, quantization, row_tokens, memory = CONFIGS[config]
    cuda = torch.cuda.is_available()
    session.unload()
    free_memory()
    data = "alpaca"
    if row_tokens:
        data = f"rows{row_tokens}"
        if data not in session.datasets:
            # A little longer than --max-length: each row's prompt is cut to exactly that many tokens.
            session.add_dataset(data, long_like(LONG_ROWS, row_tokens + 256),
                                DataArgs(prompt="{prompt}", response="{response}"))
    args = TrainArgs(model=str(model), quantization=quantization, steps=steps, name=config.replace(".", "_"),
                     output=str(runs), memory=memory, max_length=row_tokens or 1024)
    started = time.time()
    est = estimate(args, session.dataset(data), session=session)
    estimate_s = time.time() - started
    print("\n".join(f"    {label:20s} {value}" for label, value in est.table()), flush=True)
    started = time.time()
    session.ensure_model(str(model), quantization)
    load_s = time.time() - started
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    events: list = []
    end = session.train(data, args, reporter=events.append)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    record = json.loads((runs / end.name / "run.json").read_text())
    steps_seen = [e for e in events if isinstance(e, StepEnd)]
    w = min(warmup, len(steps_seen) - 2)
    first, last = steps_seen[w], steps_seen[-1]
    tokens_per_s = (last.tokens - first.tokens) / max(last.elapsed - first.elapsed, 1e-9)
    step_tokens = [b.tokens - a.tokens for a, b in zip(steps_seen, steps_seen[1:])]
    plan = record.get("speed_plan") or {}
    row = {
        "config": config, "status": end.status, "steps": end.step,
        "estimate": {**est.to_dict(), "seconds": round(estimate_s, 1)},
        "estimated_peak_gib": est.peak_bytes / 2**30,
        "measured_peak_gib": peak / 2**30 if peak is not None else None,
        "estimated_tokens_per_s": est.tokens_per_s, "measured_tokens_per_s": tokens_per_s,
        "plan": {"batch_size": record["train"]["batch_size"], "micro_batch_size": record["train"]["micro_batch_size"],
                 "step_tokens": plan.get("step_tokens"), "checkpointing": plan.get("checkpointing", False),
                 "offload": plan.get("offload", False), "attention": plan.get("attention"), "liger": plan.get("liger"),
                 "notes": plan.get("notes")},
        "estimated_plan": {"batch_size": est.batch_size, "micro_batch": est.micro_batch,
                           "step_tokens": est.step_tokens, "checkpointing": est.checkpointing, "offload": est.offload},
        "memory_cap_gib": memory, "row_tokens": row_tokens,
        "mean_tokens_per_step": (last.tokens - steps_seen[0].tokens) / max(1, len(steps_seen) - 1),
        "largest_step_tokens": max(step_tokens) if step_tokens else None,
        "estimated_largest_micro_tokens": est.largest_micro_tokens,
        "load_s": round(load_s, 1), "train_s": round(end.elapsed, 1),
    }
    if peak is not None:
        row["peak_ratio"] = est.peak_bytes / peak
    row["speed_ratio"] = est.tokens_per_s / tokens_per_s
    if end.name in session.adapters:
        session.delete_adapter(end.name)
    return row


def markdown_row(r: dict) -> str:
    peak = (f"{r['estimated_peak_gib']:.1f} / {r['measured_peak_gib']:.1f} ({r['peak_ratio']:.2f}, "
            f"{'ok' if abs(r['peak_ratio'] - 1) <= 0.2 else 'OFF'})" if r.get("measured_peak_gib") is not None
            else f"{r['estimated_peak_gib']:.2f} / - (CPU)")
    p, e = r["plan"], r["estimated_plan"]
    same = (p["batch_size"], p["checkpointing"], p["offload"]) == (e["batch_size"], e["checkpointing"], e["offload"])
    return (f"| {r['config']} | {peak} | {r['estimated_tokens_per_s']:,.0f} / {r['measured_tokens_per_s']:,.0f} "
            f"({r['speed_ratio']:.2f}) | {p['batch_size']} rows, micro {p['micro_batch_size']}, "
            f"{r['mean_tokens_per_step']:,.0f} tok/step (max {r['largest_step_tokens']:,} vs est "
            f"{r['estimated_largest_micro_tokens']:,}), budget {p['step_tokens']}, ckpt "
            f"{'yes' if p['checkpointing'] else 'no'}{', offloaded' if p['offload'] else ''} | "
            f"{'same' if same else 'DIFFERENT: ' + str(e)} |")


HEADER = ("| config | peak GiB est / measured (ratio) | tokens/s est / measured (ratio) | plan (real run) "
          "| dry-run plan |\n|---|---|---|---|---|")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/ipylora-dry-run-check", help="where the JSON goes")
    parser.add_argument("--configs", default=None, help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, a few steps")
    parser.add_argument("--keep", action="store_true", help="keep the saved models (temp folder)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("skipped: no CUDA (bench/dry_run_check.py --smoke runs the plumbing on CPU)")
        return 0
    configs = (args.configs or ("tiny-bf16,tiny-4bit,tiny-long" if args.smoke else "7b-4bit,7b-bf16,1.5b-bf16")).split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown --configs {unknown}: choose from {', '.join(CONFIGS)}")
    steps, rows = (6, 300) if args.smoke else (args.steps, args.rows)
    warmup = min(args.warmup, 2) if args.smoke else args.warmup

    from ipylora.engine import DataArgs, get_session

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Models and runs in a temp folder, never under --out: a 7B checkpoint would be copied back.
    work = Path(tempfile.mkdtemp(prefix="ipylora-dry-"))
    report = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "steps": steps, "warmup": warmup, "rows": rows, "results": [], "build_s": {}}
    session = get_session()
    session.add_dataset("alpaca", alpaca_like(rows), DataArgs(prompt="{prompt}", response="{response}"))
    lines = []
    try:
        for config in configs:
            shape = CONFIGS[config][0]
            model = work / shape
            if not model.exists():
                report["build_s"][shape] = round(build_model(shape, model), 1)
                print(f"<!-- built {shape} in {report['build_s'][shape]} s -->", flush=True)
            try:
                row = measure(session, config, model, steps, warmup, work / "runs")
            except Exception as exc:  # one failing config must not lose the others' rows
                row = {"config": config, "error": f"{type(exc).__name__}: {exc}"}
                lines.append(f"| {config} | error: {row['error']} | | | |")
            else:
                lines.append(markdown_row(row))
            print(f"{HEADER}\n{lines[-1]}\n", flush=True)
            report["results"].append(row)
            (out / "dry_run_check.json").write_text(json.dumps(report, indent=1, default=str))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join([HEADER, *lines]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
