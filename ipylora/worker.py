"""One rank of a `--gpus N` run: `torchrun --nproc_per_node N -m ipylora.worker RUN_DIR [--resume]`.

Plain Python, no IPython: it reads the config from RUN_DIR/launch.json and the rows from
RUN_DIR/data.parquet (both written by the kernel, or by hand for a multi-node run), loads the
base model, and trains through the same `run_training` as the kernel, in the folder the kernel
claimed; `--resume` continues from the folder's last checkpoint. The HF Trainer sees torchrun's
environment and sets up DDP itself.

What differs from one process, and why:
- The global batch is split over the ranks (`per_rank`); the Trainer's sampler gives each rank
  its share of the same rows a single process would take at that step.
- Every rank must plan the same micro-batch and accumulation, or their samplers disagree on the
  rows and their collectives on the steps; the GPU plan depends on free memory, and rank 0 shares
  its GPU with the kernel, so all ranks plan with the least free memory of any rank.
- Rank 0 records the run as the user launched it (global batch, epochs) and, if the kernel died,
  says so; launch.json gets the batch and steps the engine chose, so a resume repeats them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
from dataclasses import replace
from pathlib import Path


def load_inputs(run_dir: Path):
    """(TrainArgs, LoraDataset, the launch record) from a run folder written by the kernel."""
    import pandas as pd

    from ipylora.engine.config import DataArgs, args_from_record
    from ipylora.engine.data import LoraDataset
    from ipylora.engine.distributed import LAUNCH
    from ipylora.engine.runs import read_json

    record = read_json(run_dir / LAUNCH if (run_dir / LAUNCH).exists() else run_dir / "run.json")
    args = args_from_record(record["train"], record["lora"])
    frame = pd.read_parquet(run_dir / "data.parquet")
    if (run_dir / "eval.parquet").exists():
        frame = {"train": frame, "eval": pd.read_parquet(run_dir / "eval.parquet")}
    dataset = LoraDataset(record["dataset"]["name"], frame, DataArgs(**record["data_args"]))
    # run.json should say how the user's rows were shuffled, limited and split, not how these were.
    recorded, describe = record["dataset"], dataset.describe
    dataset.describe = lambda: {**describe(), **{k: recorded.get(k) for k in ("shuffle", "limit", "eval", "seed")}}
    return args, dataset, record


def per_rank(args, rows: int, world: int):
    """The same global batch and step count, split over `world` ranks.

    Without a batch size each rank gets the batch the engine plans for one GPU, so one step takes
    `world` times the rows: the epochs are divided by `world` to keep the number of passes.
    """
    from ipylora.engine.train import total_steps

    if world <= 1:
        return args
    if not args.batch_size:
        return args if args.steps else replace(args, epochs=args.epochs / world)
    if args.batch_size % world:
        return args
    steps = args.steps or total_steps(rows, args)
    batch = args.batch_size // world
    return replace(args, steps=steps, batch_size=batch,
                   micro_batch_size=min(args.micro_batch_size, batch) if args.micro_batch_size else None)


@contextlib.contextmanager
def same_plan_on_every_rank(world: int):
    """While training starts: the GPU batch plan sees the least free memory of all ranks."""
    import torch

    from ipylora.engine import distributed, speed

    if world <= 1 or not torch.cuda.is_available():
        yield
        return
    own, calls = speed._free_bytes, itertools.count()
    speed._free_bytes = lambda: distributed.agree_min(f"free-bytes-{next(calls)}", own())
    try:
        yield
    finally:
        speed._free_bytes = own


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


def _record_launch_plan(run_dir: Path, world: int) -> None:
    """Rank 0, once the engine planned the batch: launch.json keeps it, so a resume repeats it."""
    from ipylora.engine.distributed import LAUNCH
    from ipylora.engine.runs import read_json, write_json

    launched, planned = read_json(run_dir / LAUNCH), read_json(run_dir / "run.json")
    train = launched["train"]
    if train.get("batch_size") and train.get("steps"):
        return
    per_gpu = planned["train"]["batch_size"]
    train = {**train, "batch_size": train.get("batch_size") or per_gpu * world,
             "steps": train.get("steps") or planned["total_steps"]}
    write_json(run_dir / LAUNCH, {**launched, "train": train})


def _record_as_launched(run_dir: Path, world: int) -> None:
    """Rank 0, after the run: run.json's config is the global one, and says if the kernel died."""
    from ipylora.engine import distributed
    from ipylora.engine.runs import read_json, write_json

    path = run_dir / "run.json"
    record = read_json(path)
    if "total_steps" not in record:  # run_training never started: nothing to correct
        return
    launched = read_json(run_dir / distributed.LAUNCH)["train"]
    record["train"] = {**record["train"], "epochs": launched["epochs"], "gpus": world,
                       "batch_size": launched.get("batch_size") or record["train"]["batch_size"] * world}
    if distributed.kernel_gone() and record.get("status") == "interrupted":
        record["stop_reason"] = (f"the kernel (pid {os.environ[distributed.KERNEL_PID]}) exited: the workers "
                                 f"stopped after step {record.get('step')} and saved it; "
                                 f"%lora_train --resume {record['name']} continues the run")
    write_json(path, record)


def main(argv: list[str]) -> int:
    resume = "--resume" in argv
    paths = [a for a in argv if a != "--resume"]
    if len(paths) != 1:
        print("usage: python -m ipylora.worker RUN_DIR [--resume]", file=sys.stderr)
        return 2
    from ipylora.engine import adapters, distributed
    from ipylora.engine.errors import OutOfMemoryError
    from ipylora.engine.events import RunStart, StepEnd
    from ipylora.engine.session import Session
    from ipylora.engine.train import StopFlag, micro_batch, run_training

    run_dir = Path(paths[0]).resolve()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    main_rank = distributed.is_main()
    last = {"step": 0}
    crash = _crash_for_tests(distributed.rank())
    flag = StopFlag()
    distributed.watch_kernel(flag)  # the kernel gone: stop after this step, save it, exit

    def reporter(event):
        if isinstance(event, StepEnd):
            last["step"] = event.step
        if isinstance(event, RunStart) and main_rank:
            _record_launch_plan(run_dir, world)
        if crash is not None:
            crash(event)

    try:
        args, dataset, record = load_inputs(run_dir)
        args = per_rank(args, len(dataset), world)
        # The folder given is the run's, whatever this machine's working directory is.
        args = replace(args, output=str(run_dir.parent), name=run_dir.name)
        _use_local_gpu()
        session = Session()
        session.ensure_model(args.model, args.quantization, args.trust_remote_code)
        adapters.add_tokens(session.tokenizer, args.lora.add_tokens)  # as the kernel's did before tokenizing
        if args.from_adapter:  # the start (and reference) adapter, from its run folder beside this one
            session.load_adapter(args.from_adapter, output=str(run_dir.parent))
        with same_plan_on_every_rank(world):
            end = run_training(session, dataset, args, reporter, flag, resume=resume, reuse_dir=True)
        if end.status == "oom":  # the other ranks wait in a collective: this run cannot go on
            raise OutOfMemoryError(f"out of GPU memory at micro-batch {micro_batch(args)} per GPU: "
                                   "lower --micro-batch-size or --max-length, or use --strategy fsdp")
    except BaseException as exc:
        distributed.write_failure(run_dir, last["step"], exc)
        raise
    finally:
        if main_rank and (run_dir / "run.json").exists():
            _record_as_launched(run_dir, world)
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Tear the process group down before the interpreter does: left to exit, a gloo rank now and then
    aborted there ("terminate called without an active exception", SIGABRT) after its run had
    finished and saved, and the kernel reported the run as failed (CI, session 13). Only after a run
    ends well: after a failure the other ranks may still wait in a collective."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
