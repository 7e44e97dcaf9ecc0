"""Operators a training step runs that make the host wait for the GPU, and where they come from.

    python bench/step_waits.py                      # this checkout
    python bench/step_waits.py --repo ../old-tree   # another checkout (e.g. `git worktree add ../old-tree REV`)

Trains the embedded tiny model through `Session.train` for 8 steps, with the GPU's plan forced on
this machine's CPU (speed.fast_settings(force=True): padding-free rows, the varlen attention,
lora_forward.py's layers), and counts, over steps 3-6, the operators whose result the host needs at
once (`.item()`, `bool(tensor)`, `nonzero`, ...): on a GPU each one waits until everything queued
has run. The collator's, which work on host tensors before the batch is copied, are left out.
GPU-only waits (a blocking copy of the batch, a CUDA kernel's own) do not show on a CPU:
tests/test_lagged.py counts those with CUDA's sync debug mode where there is a GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WAITS = ("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.equal", "aten.masked_select")
STEPS = (3, 6)  # the steps counted, first and last


def count(repo: Path) -> dict:
    """{"per_step": waits a step, "where": {file:line function: waits a step}} for the checkout `repo`."""
    sys.path[:0] = [str(repo), str(repo / "tests")]
    import collections
    import functools
    import os
    import tempfile
    import traceback

    import pandas as pd
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import Trainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from ipylora.engine import DataArgs, TrainArgs, speed
    from ipylora.engine.session import get_session
    from support import CONCEPTS, PROMPT

    where, state = collections.Counter(), {"on": False, "step": 0}
    skipped = ("_python_dispatch", "torch/_compile", "_dynamo/eval_frame")

    class Waits(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if state["on"] and str(func.overloadpacket) in WAITS:
                frame = next(f for f in reversed(traceback.extract_stack()[:-1])
                             if not any(s in f.filename for s in skipped))
                where[f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"] += 1
            return func(*args, **(kwargs or {}))

    step, collate = Trainer.training_step, DataCollatorForLanguageModeling.__call__

    def training_step(self, *args, **kwargs):
        state["step"] += 1
        state["on"] = STEPS[0] <= state["step"] <= STEPS[1]
        return step(self, *args, **kwargs)

    def collating(self, *args, **kwargs):
        on, state["on"] = state["on"], False
        try:
            return collate(self, *args, **kwargs)
        finally:
            state["on"] = on

    Trainer.training_step, DataCollatorForLanguageModeling.__call__ = training_step, collating
    speed.fast_settings = functools.partial(speed.fast_settings, force=True, liger=False)
    os.chdir(tempfile.mkdtemp())
    session = get_session()
    session.add_dataset("c", pd.read_csv(CONCEPTS).head(24), DataArgs(prompt=PROMPT, response="{description}"))
    with Waits():
        session.train("c", TrainArgs(name="waits", steps=8, batch_size=4, seed=3))
    steps = STEPS[1] - STEPS[0] + 1
    return {"per_step": sum(where.values()) / steps, "where": {k: n / steps for k, n in where.most_common()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=str(ROOT), help="the checkout to measure (default: this one)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    repo = Path(args.repo).resolve()
    if args.one:
        print("RESULT " + json.dumps(count(repo)))
        return 0
    # A process of its own: the checkout's modules, not this one's, and a fresh kernel-wide Session.
    out = subprocess.run([sys.executable, __file__, "--repo", str(repo), "--one"], capture_output=True, text=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        print(out.stdout[-3000:] + out.stderr[-3000:])
        return 1
    result = json.loads(line[len("RESULT "):])
    print(f"| checkout | waits a step (steps {STEPS[0]}-{STEPS[1]}) | where (a step) |")
    print("|---|---|---|")
    where = "; ".join(f"{k} {v:g}" for k, v in result["where"].items()) or "-"
    print(f"| {repo.name} | {result['per_step']:g} | {where} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
