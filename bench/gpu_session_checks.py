"""GPU checks of the resident session, printed as tables (not a timed test; skips without CUDA).

1. Memory (issue 4): ten consecutive trainings in one session on a Qwen2-0.5B-shaped model;
   `torch.cuda.memory_allocated` after each, with the run's adapter deleted from the session (a
   kept adapter is memory the user asked for, not a leak).
2. Out of memory (issue 9): the process is capped to a few GiB with
   `torch.cuda.set_per_process_memory_fraction`; a run with long rows and a large batch must
   retry with half the micro-batch (same effective batch) until it fits, say so, and leave the
   session usable.

    python bench/gpu_session_checks.py [--cap-gib 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import save_random_qwen2  # noqa: E402

PROMPT = "generate a stable diffusion prompt for {concept}"


def build_model(path: Path) -> None:
    """A random-init Qwen2-0.5B-shaped model (the tiny tokenizer's vocab), drawn on the CPU, saved in bf16."""
    import torch

    shape = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, max_position_embeddings=4096)
    save_random_qwen2(path, shape, device="cpu", dtype=torch.bfloat16, cast=True)


def memory_check(session, model: str, out: Path) -> dict:
    import torch

    from ipylora.engine import TrainArgs

    rows = []
    for index in range(10):
        started = time.time()
        end = session.train("concepts", TrainArgs(model=model, name="mem", steps=10, output=str(out)))
        session.delete_adapter(end.name)
        gc.collect()
        torch.cuda.empty_cache()
        rows.append({"run": index + 1, "status": end.status, "seconds": round(time.time() - started, 1),
                     "allocated_mib": round(torch.cuda.memory_allocated() / 2**20, 1),
                     "peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)})
        print(rows[-1], flush=True)
    first, last = rows[0]["allocated_mib"], rows[-1]["allocated_mib"]
    return {"rows": rows, "last_over_first": round(last / first, 4)}


def oom_check(session, model: str, out: Path, cap_gib: float) -> dict:
    import pandas as pd
    import torch

    from ipylora.engine import DataArgs, IpyloraError, TrainArgs
    from ipylora.engine.events import Notice

    words = " ".join(pd.read_csv(ROOT / "examples" / "data" / "concepts.csv")["description"]).split()
    long_rows = [{"prompt": f"story {i}", "response": " ".join(words[(i * 37) % 200:] * 3)[:4000]} for i in range(64)]
    session.add_dataset("long", pd.DataFrame(long_rows), DataArgs(prompt="{prompt}", response="{response}"))
    session.unload()
    gc.collect()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / total)
    events, result = [], {}
    try:
        end = session.train("long", TrainArgs(model=model, name="oom", steps=3, batch_size=64, max_length=1024,
                                              output=str(out)), reporter=events.append)
        record = json.loads((out / end.name / "run.json").read_text())
        result = {"status": end.status, "final_loss": end.final_loss, "batch_size": record["train"]["batch_size"],
                  "micro_batch_size": record["train"]["micro_batch_size"]}
    except IpyloraError as exc:
        result = {"status": "error", "message": str(exc)}
    result["notices"] = [e.message for e in events if isinstance(e, Notice)]
    result["cap_gib"] = cap_gib
    result["allocated_after_mib"] = round(torch.cuda.memory_allocated() / 2**20, 1)
    torch.cuda.set_per_process_memory_fraction(1.0)
    again = session.train("concepts", TrainArgs(model=model, name="after-oom", steps=5, output=str(out)))
    result["next_run"] = again.status
    print(result, flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap-gib", type=float, default=3.0)
    parser.add_argument("--out", default="/tmp/ipylora-gpu-checks")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("skipped: no CUDA")
        return 0
    import pandas as pd

    from ipylora.engine import DataArgs, get_session

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = out / "qwen2-0.5b-shape"
    build_model(model)
    session = get_session()
    session.add_dataset("concepts", pd.read_csv(ROOT / "examples" / "data" / "concepts.csv"),
                        DataArgs(prompt=PROMPT, response="{description}"))
    report = {"device": torch.cuda.get_device_name(0), "memory": memory_check(session, str(model), out / "runs")}
    report["oom"] = oom_check(session, str(model), out / "runs", args.cap_gib)
    (out / "gpu_session_checks.json").write_text(json.dumps(report, indent=1))
    print("\n| run | allocated MiB | peak MiB | s |\n|---|---|---|---|")
    for row in report["memory"]["rows"]:
        print(f"| {row['run']} | {row['allocated_mib']:,} | {row['peak_mib']:,} | {row['seconds']} |")
    print(f"last / first allocated: {report['memory']['last_over_first']}")
    print(json.dumps(report["oom"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
