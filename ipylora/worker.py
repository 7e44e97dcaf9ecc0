"""One rank of a `--gpus N` run: `torchrun --nproc_per_node N -m ipylora.worker RUN_DIR`.

Plain Python, no IPython: it reads the config from RUN_DIR/run.json and the rows from
RUN_DIR/data.parquet (both written by the kernel, or by hand for a multi-node run), loads the
base model, and trains through the same `run_training` as the kernel, in the folder the kernel
claimed. The HF Trainer sees torchrun's environment and sets up DDP itself.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path


def load_inputs(run_dir: Path):
    """(TrainArgs, LoraDataset, the run.json record) from a run folder written by the kernel."""
    import pandas as pd

    from ipylora.engine.config import DataArgs, LoraArgs, TrainArgs
    from ipylora.engine.data import LoraDataset
    from ipylora.engine.runs import read_json

    record = read_json(run_dir / "run.json")
    train = {**record["train"], "samples": tuple(record["train"].get("samples") or ())}
    args = TrainArgs(**{**train, "lora": LoraArgs(**record["lora"])})
    frame = pd.read_parquet(run_dir / "data.parquet")
    if (run_dir / "eval.parquet").exists():
        frame = {"train": frame, "eval": pd.read_parquet(run_dir / "eval.parquet")}
    dataset = LoraDataset(record["dataset"]["name"], frame, DataArgs(**record["data_args"]))
    # run.json should say how the user's rows were shuffled, limited and split, not how these were.
    recorded, describe = record["dataset"], dataset.describe
    dataset.describe = lambda: {**describe(), **{k: recorded.get(k) for k in ("shuffle", "limit", "eval", "seed")}}
    return args, dataset, record


def per_rank(args, rows: int, world: int):
    """The same global batch and step count, split over `world` ranks."""
    from ipylora.engine.train import total_steps

    if world <= 1 or not args.batch_size or args.batch_size % world:
        return args
    steps = args.steps or total_steps(rows, args)
    batch = args.batch_size // world
    return replace(args, steps=steps, batch_size=batch,
                   micro_batch_size=min(args.micro_batch_size, batch) if args.micro_batch_size else None)


def _crash_for_tests(rank: int):
    """IPYLORA_TEST_CRASH_AT_STEP=k (tests only): rank IPYLORA_TEST_CRASH_RANK (default 1) raises at step k."""
    at = os.environ.get("IPYLORA_TEST_CRASH_AT_STEP")
    if not at or rank != int(os.environ.get("IPYLORA_TEST_CRASH_RANK", "1")):
        return None

    def reporter(event):
        from ipylora.engine.events import StepEnd

        if isinstance(event, StepEnd) and event.step == int(at):
            raise RuntimeError(f"injected crash at step {at} (IPYLORA_TEST_CRASH_AT_STEP)")

    return reporter


def _use_local_gpu() -> None:
    """Make "cuda" mean this rank's GPU, so the model loads there and not all on GPU 0."""
    import torch

    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m ipylora.worker RUN_DIR", file=sys.stderr)
        return 2
    from ipylora.engine import distributed
    from ipylora.engine.errors import OutOfMemoryError
    from ipylora.engine.events import StepEnd
    from ipylora.engine.session import Session
    from ipylora.engine.train import StopFlag, micro_batch, run_training

    run_dir = Path(argv[0])
    last = {"step": 0}
    crash = _crash_for_tests(distributed.rank())

    def reporter(event):
        if isinstance(event, StepEnd):
            last["step"] = event.step
        if crash is not None:
            crash(event)

    try:
        args, dataset, record = load_inputs(run_dir)
        args = per_rank(args, len(dataset), int(os.environ.get("WORLD_SIZE", "1")))
        # The folder given is the run's, whatever this machine's working directory is.
        args = replace(args, output=str(run_dir.resolve().parent), name=run_dir.resolve().name)
        _use_local_gpu()
        session = Session()
        session.ensure_model(args.model, args.quantization, args.trust_remote_code)
        end = run_training(session, dataset, args, reporter, StopFlag(), reuse_dir=True)
        if end.status == "oom":  # the other ranks wait in a collective: this run cannot go on
            raise OutOfMemoryError(f"out of GPU memory at micro-batch {micro_batch(args)} per GPU: "
                                   "lower --micro-batch-size or --max-length, or use --strategy fsdp")
    except BaseException as exc:
        distributed.write_failure(run_dir, last["step"], exc)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
