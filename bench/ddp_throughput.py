"""Two GPUs against one, through the real engine path: `Session.train(TrainArgs(gpus=N))`.

    python bench/ddp_throughput.py --out DIR            # 2 GPUs: 1gpu, ddp2, fsdp2 (one 600 s call)
    python bench/ddp_throughput.py --smoke --out DIR    # CPU, gloo, tiny shapes: checks the plumbing

A random-init model of the real Qwen2-1.5B shape is saved (bf16, `save_pretrained`, with the
embedded tiny tokenizer) to a temp folder, as `bench/gpu_session_checks.py` does. Data: alpaca-like
text rows, log-normal token lengths (median ~220, clipped 16..1024), responses drawn from a small
Zipf-weighted word set so the loss has something to fall to.

Each configuration runs in its own process, standing in for a kernel: `1gpu` trains in that
process (`gpus=1`), `ddp2`/`fsdp2` launch torchrun workers (`gpus=2`). All use one global batch
(`--batch`, else the batch the engine plans for one GPU on this data, made even) and the same
steps; everything else is the engine's defaults (bf16 LoRA, padding-free, token budget).

tokens/s: real tokens (the Trainer's non-padding count, summed over ranks) between the StepEnd of
step `--warmup` and the last one, over the time between them, from runs/NAME/metrics.jsonl.
Loss: max relative difference to the 1gpu trajectory, step by step.
Rows are printed as each configuration finishes; results.json and table.md go to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import SHAPES as QWEN2_SHAPES  # noqa: E402
from bench.common import lognormal_lengths, print_result, read_result, save_random_qwen2  # noqa: E402

# As the other benchmarks, except the tiny vocab: 4096, not 2048.
SHAPES = {"1.5b": QWEN2_SHAPES["1.5b"], "tiny": {**QWEN2_SHAPES["tiny"], "vocab_size": 4096}}
CONFIGS = {"1gpu": dict(gpus=1, strategy="ddp"), "ddp2": dict(gpus=2, strategy="ddp"),
           "fsdp2": dict(gpus=2, strategy="fsdp")}
# NVLink multicast stays off on shared hosts (the device notes); kept for every process we start.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


# -- model and data (one process, before any run) --------------------------------------------------
def build(folder: Path, shape: str, rows: int, median: float, low: int, high: int) -> dict:
    """Save the random-init model + tokenizer to folder/model and the rows to folder/data.parquet."""
    import numpy as np
    import pandas as pd
    import torch

    started = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer, params = save_random_qwen2(folder / "model", SHAPES[shape], device=device, dtype=torch.bfloat16, cast=True)
    text = " ".join(pd.read_csv(ROOT / "examples" / "data" / "concepts.csv")["description"])
    words = sorted(set(text.replace(",", " ").replace(".", " ").split()))
    rng = np.random.default_rng(0)
    sample = " ".join(rng.choice(words, 4000))
    per_word = len(tokenizer(sample)["input_ids"]) / 4000
    answer_words = rng.choice(words, size=min(300, len(words)), replace=False)
    zipf = 1.0 / np.arange(1, len(answer_words) + 1)
    zipf /= zipf.sum()
    lengths = lognormal_lengths(rng, rows, median, 0.6, low, high, whole=False)
    table = []
    for n in lengths:
        prompt_words = max(1, int(n * rng.uniform(0.2, 0.6) / per_word))
        answer = max(1, int(n / per_word) - prompt_words)
        table.append({"instruction": " ".join(rng.choice(words, prompt_words)),
                      "output": " ".join(rng.choice(answer_words, answer, p=zipf))})
    frame = pd.DataFrame(table)
    frame.to_parquet(folder / "data.parquet")
    # The rows as the engine tokenizes them (template, EOS), and the batch it would plan for one
    # GPU with memory to spare (the 16k-token step budget), made even so 2 GPUs split it exactly.
    from ipylora.engine import DataArgs
    from ipylora.engine.data import LoraDataset
    from ipylora.engine.speed import MAX_STEP_TOKENS, MIN_STEPS_PER_EPOCH, rows_for_tokens

    tokens = [len(ids) for ids in LoraDataset("alpaca", frame, DataArgs(prompt="{instruction}", response="{output}"))
              .tokenize(tokenizer, high)["input_ids"]]
    batch = min(rows_for_tokens(tokens, MAX_STEP_TOKENS), max(8, rows // MIN_STEPS_PER_EPOCH))
    return {"params": params, "rows": rows, "median_tokens": float(np.median(tokens)),
            "mean_tokens": float(np.mean(tokens)), "plan_batch": batch - batch % 2,
            "build_s": round(time.time() - started, 1)}


# -- one configuration (its own process: the "kernel") ---------------------------------------------
def run_one(spec: dict) -> dict:
    import pandas as pd
    import torch

    from ipylora.engine import DataArgs, TrainArgs, get_session

    session = get_session()
    session.add_dataset("alpaca", pd.read_parquet(spec["data"]), DataArgs(prompt="{instruction}", response="{output}"))
    args = TrainArgs(model=spec["model"], name=spec["name"], output=spec["runs"], steps=spec["steps"],
                     batch_size=spec.get("batch"), gpus=spec["gpus"], strategy=spec["strategy"])
    started = time.time()
    end = session.train("alpaca", args)
    wall = time.time() - started
    run_dir = Path(spec["runs"]) / end.name
    record = json.loads((run_dir / "run.json").read_text())
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [e for e in steps if e["event"] == "StepEnd"]
    warm = next(e for e in steps if e["step"] == spec["warmup"])
    last = steps[-1]
    result = {
        "status": end.status, "steps": last["step"], "wall_s": round(wall, 1),
        "tokens_per_s": (last["tokens"] - warm["tokens"]) / (last["elapsed"] - warm["elapsed"]),
        "tokens_per_step": (last["tokens"] - warm["tokens"]) / (last["step"] - warm["step"]),
        "step_s": (last["elapsed"] - warm["elapsed"]) / (last["step"] - warm["step"]),
        "losses": [e["loss"] for e in steps],
        "memory_gib_rank0": max(e["memory_mb"] for e in steps) / 1024,
        "batch_size": record["train"]["batch_size"], "micro_batch_size": record["train"].get("micro_batch_size"),
        "speed_plan": record.get("speed_plan"),
    }
    if torch.cuda.is_available() and spec["gpus"] == 1:
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


# -- the driver --------------------------------------------------------------------------------------
def _run_child(spec: dict, timeout: float) -> tuple[dict, str]:
    """Run one configuration in a fresh process; on timeout end it and every worker it started."""
    import psutil

    from ipylora.engine.distributed import end_processes

    env = {**os.environ, **SAFE_ENV, "PYTHONUNBUFFERED": "1"}
    if spec["smoke"]:  # torchrun gives each CPU worker 1 thread; the in-process run gets the same
        env["OMP_NUM_THREADS"] = "1"
    child = subprocess.Popen([sys.executable, __file__, "--one", json.dumps(spec)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        text, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        family = psutil.Process(child.pid).children(recursive=True)
        os.killpg(child.pid, signal.SIGKILL)  # the workers see their kernel gone and stop; then make sure
        end_processes(family, timeout=15)
        text, _ = child.communicate()
        return {"error": f"timeout after {timeout:.0f}s"}, text or ""
    result = read_result(text)
    return (result if result is not None else {"error": f"no result (rc {child.returncode})"}), text


def _max_rel_diff(a: list[float], b: list[float]) -> float | None:
    n = min(len(a), len(b))
    return max(abs(x - y) / abs(x) for x, y in zip(a[:n], b[:n])) if n else None


def _row(r: dict, base: dict | None) -> str:
    if "tokens_per_s" not in r:
        return f"| {r['name']} | {r.get('gpus', '?')} | failed: {r.get('error', '?')[:160]} | | | | | |"
    speedup = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base and "tokens_per_s" in base and r is not base else "-"
    diff = _max_rel_diff(base["losses"], r["losses"]) if base and base.get("losses") and r is not base else None
    return (f"| {r['name']} | {r['gpus']} | {r['batch_size']} (micro {r['micro_batch_size']}) | "
            f"{r['tokens_per_step']:,.0f} | {r['tokens_per_s']:,.0f} | {speedup} | "
            f"{'-' if diff is None else f'{100 * diff:.3f}%'} | {r['memory_gib_rank0']:.1f} |")


HEADER = ("| config | GPUs | global batch | tokens/step | tokens/s | vs 1gpu | loss max rel diff vs 1gpu | GiB rank 0 |\n"
          "|---|---|---|---|---|---|---|---|")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU (gloo), tiny model and data, a few steps")
    parser.add_argument("--configs", default="1gpu,ddp2,fsdp2", help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 40; smoke 8)")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of tokens/s (default 5; smoke 2)")
    parser.add_argument("--batch", type=int, default=None,
                        help="global batch for every config (default: the engine's 1-GPU plan for this data, made even; smoke 8)")
    parser.add_argument("--rows", type=int, default=None, help="dataset rows (default 3000; smoke 200)")
    parser.add_argument("--budget", type=float, default=570, help="seconds for everything (model save included)")
    parser.add_argument("--out", default="bench-out/ddp", help="folder for results.json, table.md, log.txt")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--build", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        spec = json.loads(args.one)
        try:
            result = run_one(spec)
        except Exception as exc:
            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:400]}
        print_result(result)
        return 0
    if args.build:
        spec = json.loads(args.build)
        print_result(build(Path(spec["folder"]), spec["shape"], spec["rows"], spec["median"], spec["low"], spec["high"]))
        return 0

    started = time.time()
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            print("skipped: no CUDA (use --smoke to check the launcher path on CPU)")
            return 0
        if torch.cuda.device_count() < 2:
            print(f"skipped: {torch.cuda.device_count()} GPU visible, 2 needed")
            return 0
    steps = args.steps or (8 if args.smoke else 40)
    warmup = args.warmup or (2 if args.smoke else 5)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.txt", "w")
    work = Path(tempfile.mkdtemp(prefix="ipylora-ddp-bench-"))  # the model stays out of --out
    shape = "tiny" if args.smoke else "1.5b"
    data_spec = dict(folder=str(work), shape=shape, rows=args.rows or (200 if args.smoke else 3000),
                     median=40 if args.smoke else 220, low=16, high=128 if args.smoke else 1024)
    built = subprocess.run([sys.executable, __file__, "--build", json.dumps(data_spec)], capture_output=True,
                           text=True, env={**os.environ, **SAFE_ENV})
    log.write(built.stdout + built.stderr)
    info = read_result(built.stdout)
    if info is None:
        print(f"model/data build failed:\n{built.stderr[-3000:]}")
        return 1
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (gloo)"
    batch = args.batch or (8 if args.smoke else info["plan_batch"])
    print(f"{shape} model ({info['params'] / 1e9:.2f}B params), {info['rows']} rows, median {info['median_tokens']:.0f} "
          f"tokens, built in {info['build_s']} s; global batch {batch}, {steps} steps, tokens/s after step {warmup}; {device}", flush=True)
    print(HEADER, flush=True)
    results, base = [], None
    for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
        if name not in CONFIGS:
            print(f"unknown config {name!r} (known: {', '.join(CONFIGS)})")
            return 2
        left = args.budget - (time.time() - started)
        if left < 30:
            results.append({"name": name, **CONFIGS[name], "error": "not run: out of time budget"})
            print(_row(results[-1], base), flush=True)
            continue
        spec = dict(name=name, **CONFIGS[name], model=str(work / "model"), data=str(work / "data.parquet"),
                    runs=str(work / "runs"), steps=steps, warmup=warmup, batch=batch, smoke=args.smoke)
        t0 = time.time()
        result, text = _run_child(spec, timeout=left - 10)
        result = {"name": name, **CONFIGS[name], **result, "run_s": round(time.time() - t0, 1)}
        log.write(f"\n===== {name} ({result['run_s']} s)\n{text[-8000:]}\n")
        worker_log = work / "runs" / name / "worker.log"
        if worker_log.exists():
            log.write(f"----- {worker_log}\n{worker_log.read_text(errors='replace')[-8000:]}\n")
        log.flush()
        if name == "1gpu" and "tokens_per_s" in result:
            base = result
        results.append(result)
        print(_row(result, base), flush=True)
        (out / "results.json").write_text(json.dumps({"device": device, "data": info, "steps": steps,
                                                      "warmup": warmup, "results": results}, indent=1))
    lines = [HEADER] + [_row(r, base) for r in results]
    summary = {}
    for r in results:
        if base and r is not base and "tokens_per_s" in r:
            summary[r["name"]] = {"speedup": r["tokens_per_s"] / base["tokens_per_s"],
                                  "loss_max_rel_diff": _max_rel_diff(base["losses"], r["losses"])}
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"device": device, "data": info, "steps": steps, "warmup": warmup,
                                                  "summary": summary, "results": results}, indent=1))
    print()
    print(json.dumps(summary, indent=1))
    print(f"total {time.time() - started:.0f} s; results in {out}/results.json, logs in {out}/log.txt")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
