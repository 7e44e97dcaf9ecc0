"""Sweep overhead: trials on the resident model (`Session.sweep`) vs `Trainer.hyperparameter_search`, and
pruned TPE vs the full grid.

    python bench/sweep_overhead.py --device cpu                          # embedded tiny model, CPU (minutes)
    python bench/sweep_overhead.py --model qwen2-1.5b --out bench-out    # GPU: random-init Qwen2-1.5B shape
    python bench/sweep_overhead.py --model PATH                          # any local checkpoint

(A) The same grid of trials (lr x r, a few steps each, one eval at the end) two ways:
- `engine`: `Session.sweep` on the one resident model; each trial attaches a fresh adapter of its
  rank, trains, saves it, and the next trial starts on the same weights.
- `hf`: `transformers.Trainer.hyperparameter_search(backend="optuna", n_trials=N, model_init=...)`
  with Optuna's GridSampler over the same grid and no pruner; `model_init(trial)` loads the base
  model from disk (`from_pretrained`) and wraps it with PEFT LoRA of the trial's rank, as the
  transformers docs show. Plain `Trainer`, the engine's own tokens (same rows, template, mask),
  `DataCollatorForSeq2Seq`, the same steps, batch, schedule, LoRA alpha/dropout/targets.
The gap of a trial is the time from the end of the trial before (its RunEnd; HF: `on_train_end`)
to the end of its own first optimizer step (first StepEnd; HF: `on_step_end`, after a CUDA sync).
It holds one step of training, so "overhead" is the gap minus the median step time.

(B) A 12-point space (4 lr x 3 r, eval loss every tenth of the steps): the full grid against
`search="tpe", trials=12, prune="median"` over the same lists (categorical choices), both at the
engine's defaults otherwise. Wall time of each, their ratio, the best eval loss of each, trials pruned.

The HF half runs first, so that the engine's Liger patches (module globals) cannot speed it up;
CUDA is initialised before anything is timed. `--device cpu` hides the GPU (CUDA_VISIBLE_DEVICES="").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import qwen2_for_bench  # noqa: E402

DATA = ROOT / "examples" / "data" / "concepts.csv"
PROMPT, RESPONSE = "generate a stable diffusion prompt for {concept}", "{description}"
SHAPE_NAMES = {"qwen2-1.5b": False, "qwen2-tiny": True}  # name -> qwen2_for_bench's `smoke`
# Spaces per model kind: the embedded tiny model trains at lr ~1e-2 (config.TINY_DEFAULTS), real shapes at ~2e-4.
SPACES = {
    "tiny": {"a": {"lr": "1e-3,3e-3,1e-2", "r": "8,16"}, "b": {"lr": "1e-3,3e-3,1e-2,3e-2", "r": "4,8,16"}},
    "model": {"a": {"lr": "1e-4,2e-4,5e-4", "r": "8,16"}, "b": {"lr": "5e-5,1e-4,2e-4,5e-4", "r": "8,16,32"}},
}


def log(text: str) -> None:
    print(text, flush=True)


def values(spec: str) -> list:
    return [int(v) if v.strip().isdigit() else float(v) for v in spec.split(",")]


def step_times(times: list[float]) -> list[float]:
    """Seconds between consecutive step ends of one trial (its first step is left out: it holds the gap)."""
    return [b - a for a, b in zip(times, times[1:])]


def summarize(kind: str, trials: list[dict], wall: float) -> dict:
    """Gaps and step times from per-trial records of `end` (trial end time) and `steps` (step end times)."""
    steps = [dt for t in trials for dt in step_times(t["steps"])]
    median_step = statistics.median(steps) if steps else 0.0
    gaps = [b["steps"][0] - a["end"] for a, b in zip(trials, trials[1:]) if b["steps"]]
    return {"kind": kind, "trials": len(trials), "median_step_s": median_step, "gaps_s": gaps,
            "mean_gap_s": statistics.mean(gaps) if gaps else None, "max_gap_s": max(gaps) if gaps else None,
            "mean_overhead_s": statistics.mean(gaps) - median_step if gaps else None,
            "max_overhead_s": max(gaps) - median_step if gaps else None, "wall_s": wall,
            "parts": _mean_parts(trials[1:])}


def _mean_parts(trials: list[dict]) -> dict:
    names = dict.fromkeys(name for t in trials for name in t.get("parts", {}))  # in the order they happen
    return {name: statistics.mean(t["parts"][name] for t in trials if name in t.get("parts", {})) for name in names}


# -- (A) the engine ----------------------------------------------------------------------------------
def engine_sweep(session, name: str, space: dict, base, search: str = "grid", trials: int | None = None,
                 prune: str = "none", profiler=None) -> tuple[list[dict], dict, float]:
    """One `Session.sweep`; per-trial timings from its events, the SweepEnd record, wall seconds.
    `profiler` (a cProfile.Profile): on over each gap, from a trial's RunEnd to the next one's first StepEnd."""
    from ipylora.engine.events import EvalEnd, RunEnd, RunStart, StepEnd, TrialEnd, TrialStart
    from ipylora.engine.sweep import SweepArgs

    records: list[dict] = []
    last_end: dict = {}

    def reporter(event) -> None:
        if isinstance(event, TrialStart):
            records.append({"trial": event.trial, "params": event.params, "steps": [], "evals": 0,
                            "trial_start": event.time})
        elif isinstance(event, RunStart):
            records[-1]["run_start"] = event.time
        elif isinstance(event, StepEnd):
            if profiler is not None and not records[-1]["steps"] and len(records) > 1:
                profiler.disable()
            records[-1]["steps"].append(event.time)
        elif isinstance(event, EvalEnd):
            records[-1]["evals"] += 1
        elif isinstance(event, RunEnd):
            records[-1]["end"] = event.time
            if profiler is not None:
                profiler.enable()
        elif isinstance(event, TrialEnd):
            record = records[-1]
            record.update(trial_end=event.time, status=event.status, score=event.score, pruned_at=event.pruned_at)
            if last_end:  # where the gap before this trial went
                record["parts"] = {"RunEnd->TrialEnd (before)": last_end["trial_end"] - last_end["end"],
                                   "->TrialStart": record["trial_start"] - last_end["trial_end"],
                                   "->RunStart": record.get("run_start", record["trial_start"]) - record["trial_start"],
                                   "->first StepEnd": record["steps"][0] - record.get("run_start", record["trial_start"])
                                   if record["steps"] else 0.0}
            last_end.update(record)
            score = "-" if event.score is None else f"{event.score:.4f}"
            where = f" at step {event.pruned_at}" if event.pruned_at is not None else ""
            why = f" ({event.message})" if event.status == "failed" else ""
            log(f"  {name} trial {event.trial + 1}: {event.params} {event.status}{where}{why}, eval_loss {score}, "
                f"{event.steps} steps, {event.elapsed:.2f} s")

    started = time.time()
    end = session.sweep("c", SweepArgs(name, space=space, trials=trials, search=search, metric="eval_loss",
                                       prune=prune), base=base, reporter=reporter)
    wall = time.time() - started
    for entry in list(session.adapters):  # the next sweep starts with no adapter of this one loaded
        session.delete_adapter(entry)
    return records, {"message": end.message, "best_score": end.best_score, "trials": list(end.trials)}, wall


# -- (A) transformers' hyperparameter_search ---------------------------------------------------------
def hf_search(model_source: str, tokenizer, tokens: dict, space: dict, base, tiny: bool, out: Path, device: str):
    """The same grid through Trainer.hyperparameter_search with model_init reloading the model per trial."""
    import datasets as hf_datasets
    import optuna
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                              TrainingArguments)
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging

    from ipylora.engine.config import resolve
    from ipylora.engine.sweep import apply

    hf_logging.set_verbosity_error()  # the "no field lora_r in TrainingArguments" warning, once per trial
    hf_logging.disable_progress_bar()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    lrs, ranks = values(space["lr"]), values(space["r"])
    args = resolve(apply(base, {"lr": lrs[0], "r": ranks[0]}), tiny=tiny, tokens=1)
    lora = args.lora
    targets = lora.target_modules if lora.target_modules == "all-linear" else lora.target_modules.split(",")
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32

    def model_init(trial):
        # Optuna caches a trial's suggestions, so hp_space's later suggest of lora_r returns this value.
        r = trial.suggest_categorical("lora_r", ranks) if trial is not None else ranks[0]
        model = AutoModelForCausalLM.from_pretrained(model_source, dtype=dtype)
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                target_modules=targets, task_type="CAUSAL_LM"))

    def hp_space(trial):
        return {"learning_rate": trial.suggest_categorical("learning_rate", lrs),
                "lora_r": trial.suggest_categorical("lora_r", ranks)}

    records: list[dict] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            records.append({"steps": [], "begin": time.time()})

        def on_step_end(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            records[-1]["steps"].append(time.time())

        def on_train_end(self, a, state, control, model=None, **kw):
            records[-1]["end"] = time.time()
            loss = next((e["eval_loss"] for e in reversed(state.log_history) if "eval_loss" in e), None)
            r = model.peft_config["default"].r if model is not None and hasattr(model, "peft_config") else "?"
            log(f"  hf trial {len(records)}: lr {a.learning_rate:g} r {r}, eval_loss {loss and round(loss, 4)}, "
                f"{state.global_step} steps, {records[-1]['end'] - records[-1]['begin']:.2f} s after on_train_begin")

    steps = args.steps
    settings = TrainingArguments(
        output_dir=str(out / "hf"), max_steps=steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.lr, lr_scheduler_type=args.scheduler,
        warmup_steps=int(round(args.warmup_ratio * steps)), weight_decay=0.0, max_grad_norm=args.max_grad_norm,
        bf16=cuda, use_cpu=not cuda, logging_steps=1, eval_strategy="steps", eval_steps=steps, save_strategy="no",
        report_to="none", disable_tqdm=True, seed=args.seed, data_seed=args.seed, dataloader_num_workers=0,
        remove_unused_columns=False)
    train = hf_datasets.Dataset.from_dict({k: tokens["train"][k] for k in ("input_ids", "labels")})
    evals = hf_datasets.Dataset.from_dict({k: tokens["eval"][k] for k in ("input_ids", "labels")})
    started = time.time()
    trainer = Trainer(model_init=model_init, args=settings, train_dataset=train, eval_dataset=evals,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
                      callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)  # it prints every log dict, progress bars off or not
    best = trainer.hyperparameter_search(
        direction="minimize", backend="optuna", hp_space=hp_space, n_trials=len(lrs) * len(ranks),
        sampler=optuna.samplers.GridSampler({"learning_rate": lrs, "lora_r": ranks}, seed=42),
        pruner=optuna.pruners.NopPruner())
    wall = time.time() - started
    for before, record in zip(records, records[1:]):
        record["parts"] = {"on_train_end->on_train_begin (reload, PEFT, optimizer)": record["begin"] - before["end"],
                           "->first on_step_end": record["steps"][0] - record["begin"] if record["steps"] else 0.0}
    del trainer
    if cuda:
        torch.cuda.empty_cache()
    return records, {"best_score": best.objective, "best_params": best.hyperparameters}, wall


# -- tables ------------------------------------------------------------------------------------------
def table_a(rows: list[dict], trials: int, steps: int) -> list[str]:
    lines = [f"(A) per-trial overhead, {trials} trials x {steps} steps (gap: end of a trial -> end of the next one's "
             "first step; overhead: gap - median step)",
             "| recipe | trials | median step s | mean gap s | max gap s | mean overhead s | max overhead s | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['trials']} | {r['median_step_s']:.3f} | {r['mean_gap_s']:.2f} | "
                     f"{r['max_gap_s']:.2f} | {r['mean_overhead_s']:.2f} | {r['max_overhead_s']:.2f} | {r['wall_s']:.1f} |")
    by = {r["kind"]: r for r in rows}
    if "engine" in by and "hf" in by and by["engine"]["mean_overhead_s"] > 0:
        lines.append(f"hf / engine overhead per trial: {by['hf']['mean_overhead_s'] / by['engine']['mean_overhead_s']:.1f}x "
                     f"(mean), wall {by['hf']['wall_s'] / by['engine']['wall_s']:.2f}x")
    for r in rows:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r["parts"].items())
        lines.append(f"{r['kind']} gap, mean by part (s): {parts}")
    return lines


def table_b(rows: list[dict]) -> list[str]:
    lines = ["(B) pruned TPE vs the full grid, same 12-point space, eval_loss",
             "| search | trials | distinct points | finished | pruned | steps trained | wall s | best eval_loss | best params |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['trials']} | {r['distinct']} | {r['finished']} | {r['pruned']} | {r['steps']} | "
                     f"{r['wall_s']:.1f} | {r['best_score']:.4f} | {r['best_params']} |")
    by = {r["kind"]: r for r in rows}
    if "grid" in by and "tpe" in by:
        ratio = by["tpe"]["wall_s"] / by["grid"]["wall_s"]
        gap = (by["tpe"]["best_score"] - by["grid"]["best_score"]) / abs(by["grid"]["best_score"])
        lines.append(f"tpe / grid wall time: {ratio:.0%} (target <= 60%); steps trained "
                     f"{by['tpe']['steps'] / by['grid']['steps']:.0%}; best eval_loss gap {gap:+.2%} (target within 5%)")
    if "grid" in by and "grid-median" in by:
        gap = (by["grid-median"]["best_score"] - by["grid"]["best_score"]) / abs(by["grid"]["best_score"])
        lines.append(f"grid-median / grid wall time: {by['grid-median']['wall_s'] / by['grid']['wall_s']:.0%}; steps "
                     f"trained {by['grid-median']['steps'] / by['grid']['steps']:.0%}; best eval_loss gap {gap:+.2%}")
    return lines


def part_b(kind: str, records: list[dict], end: dict, wall: float) -> dict:
    trials = end["trials"]
    best = min((t for t in trials if t["status"] == "finished"), key=lambda t: t["score"], default=None)
    pruned = [t for t in trials if t["status"] == "pruned"]
    return {"kind": kind, "trials": len(trials), "finished": sum(t["status"] == "finished" for t in trials),
            "pruned": len(pruned), "pruned_at": [t["pruned_at"] for t in pruned],
            "distinct": len({json.dumps(t["params"], sort_keys=True) for t in trials}),
            "steps": sum(t["steps"] for t in trials), "wall_s": wall,
            "best_score": best["score"] if best else float("nan"), "best_params": best and best["params"],
            "trial_records": [{k: t.get(k) for k in ("trial", "params", "status", "score", "steps", "pruned_at",
                                                     "elapsed")} for t in trials]}


# -- main --------------------------------------------------------------------------------------------
def print_profile(profiler, path: str, trials: int, top: int = 45) -> None:
    """Save the profile to `path` and print the functions with the most cumulative time per trial
    (the engine's, PEFT's, transformers', TRL's and accelerate's, not the model's forward/backward)."""
    import io
    import pstats

    profiler.dump_stats(path)
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (file, line, func), (_, calls, _, cumulative, _) in stats.stats.items():
        if any(part in file for part in ("ipylora", "peft", "transformers", "trl", "accelerate", "datasets")) \
                and not any(skip in func for skip in ("forward", "backward", "training_step", "compute_loss")):
            rows.append((cumulative / trials, calls / trials, f"{file.rsplit('site-packages/', 1)[-1]}:{line}({func})"))
    log(f"profile ({path}): cumulative s per gap, calls per gap")
    for cumulative, calls, where in sorted(rows, reverse=True)[:top]:
        log(f"  {cumulative:7.3f} {calls:8.1f}  {where}")
    own = sorted(((own / trials, calls / trials, f"{file.rsplit('site-packages/', 1)[-1]}:{line}({func})")
                  for (file, line, func), (_, calls, own, _, _) in stats.stats.items()), reverse=True)
    log("most time in the function itself (the device's waits and allocations show here): s per gap, calls per gap")
    for spent, calls, where in own[:15]:
        log(f"  {spent:7.3f} {calls:8.1f}  {where}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto",
                        help="cpu: hide any GPU (the CPU run); auto: the GPU if there is one")
    parser.add_argument("--model", default=None,
                        help="a local checkpoint, or a shape to build in --out: " + ", ".join(SHAPE_NAMES)
                             + " (random init); default: the embedded tiny model")
    parser.add_argument("--out", default="bench-out/sweep", help="folder for the checkpoint, runs and HF output")
    parser.add_argument("--parts", default="hf,engine,grid,tpe,grid-median",
                        help="comma-separated: hf, engine (A); grid, tpe, grid-median (B; the last: the grid "
                             "with the median pruner, to show what pruning alone saves)")
    parser.add_argument("--steps-a", type=int, default=10, help="steps per trial in (A)")
    parser.add_argument("--steps-b", type=int, default=None, help="steps per trial in (B) (default: 30 tiny, 20 else)")
    parser.add_argument("--batch", type=int, default=8, help="rows per step, every trial")
    parser.add_argument("--space-a", default=None, help='(A) space as JSON, e.g. {"lr": "1e-4,2e-4", "r": "8,16"}')
    parser.add_argument("--space-b", default=None, help="(B) space as JSON (12 points for the comparison)")
    parser.add_argument("--json", default=None, help="write every figure (per-trial gaps included) to this file")
    parser.add_argument("--profile", default=None,
                        help="cProfile the engine half of (A) over the gaps between trials (a trial's end to the "
                             "next one's first step) into this .prof file, and print where they go")
    cli = parser.parse_args()
    if cli.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import pandas as pd
    import torch

    from ipylora.engine import DataArgs, TrainArgs
    from ipylora.engine.models import load_tokenizer, resolve_model_id
    from ipylora.engine.session import Session

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(cli.out)
    shutil.rmtree(out / "runs", ignore_errors=True)  # sweep and run names are claimed once per folder
    shutil.rmtree(out / "hf", ignore_errors=True)
    model = cli.model
    if model in SHAPE_NAMES:
        made = qwen2_for_bench(out, smoke=SHAPE_NAMES[model])
        if made is None:
            return 0
        model = str(made)
    tiny = model is None
    _, source = resolve_model_id(model)
    spaces = SPACES["tiny" if tiny else "model"]
    space_a = json.loads(cli.space_a) if cli.space_a else spaces["a"]
    space_b = json.loads(cli.space_b) if cli.space_b else spaces["b"]
    steps_b = cli.steps_b or (30 if tiny else 20)
    parts = cli.parts.split(",")
    if device == "cuda":  # CUDA context and cuBLAS up before anything is timed
        torch.ones(64, 64, device="cuda", dtype=torch.bfloat16).matmul(torch.ones(64, 64, device="cuda",
                                                                                  dtype=torch.bfloat16))
        torch.cuda.synchronize()
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {os.cpu_count()} cores"
    log(f"{where} · torch {torch.__version__} · model {model or 'embedded tiny'} · batch {cli.batch} · "
        f"load average {os.getloadavg()[0]:.1f}")

    session = Session()
    session.add_dataset("c", pd.read_csv(DATA), DataArgs(prompt=PROMPT, response=RESPONSE, eval=8))
    tokenizer = load_tokenizer(source)
    splits = session.dataset("c").splits()
    tokens = {name: splits[name].tokenize(tokenizer, 1024) for name in ("train", "eval")}
    base_a = TrainArgs(model=model, steps=cli.steps_a, batch_size=cli.batch, eval_every=cli.steps_a,
                       output=str(out / "runs"))
    result: dict = {"device": where, "model": model or "embedded tiny", "batch": cli.batch, "space_a": space_a,
                    "space_b": space_b, "steps_a": cli.steps_a, "steps_b": steps_b, "a": [], "b": []}
    trials_a = len(values(space_a["lr"])) * len(values(space_a["r"]))

    def save() -> None:  # after every part, so that a run cut short keeps what it measured
        if cli.json:
            Path(cli.json).parent.mkdir(parents=True, exist_ok=True)
            Path(cli.json).write_text(json.dumps(result, indent=1, default=str))

    if "hf" in parts:
        log(f"(A) hf: Trainer.hyperparameter_search, {trials_a} trials")
        records, best, wall = hf_search(source, tokenizer, tokens, space_a, base_a, tiny, out, device)
        result["a"].append({**summarize("hf", records, wall), **best})
        save()
    if "engine" in parts:
        log(f"(A) engine: Session.sweep, {trials_a} trials")
        profiler = None
        if cli.profile:
            import cProfile

            profiler = cProfile.Profile()
        records, end, wall = engine_sweep(session, "bench-a", space_a, base_a, profiler=profiler)
        if profiler is not None:
            profiler.disable()
            print_profile(profiler, cli.profile, trials_a - 1)  # the gaps between trials
        result["a"].append({**summarize("engine", records, wall), "best_score": end["best_score"]})
        save()
    if result["a"]:
        log("\n".join(["", *table_a(result["a"], trials_a, cli.steps_a), ""]))

    base_b = TrainArgs(model=model, steps=steps_b, batch_size=cli.batch, output=str(out / "runs"))
    for kind, search in (("grid", dict()), ("tpe", dict(search="tpe", trials=12, prune="median")),
                         ("grid-median", dict(prune="median"))):
        if kind in parts:
            log(f"(B) {kind}: Session.sweep {search or 'grid'}, {steps_b} steps per trial")
            records, end, wall = engine_sweep(session, f"bench-{kind}", space_b, base_b, **search)
            result["b"].append(part_b(kind, records, end, wall))
            save()
    if result["b"]:
        log("\n".join(["", *table_b(result["b"]), ""]))
    log(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
