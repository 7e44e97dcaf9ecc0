"""More than one GPU: the same run, in torchrun workers outside the kernel.

The kernel cannot fork itself into ranks (its CUDA state and bitsandbytes forbid it), so a
`--gpus N` run is handed to `torchrun --nproc_per_node N -m ipylora.worker RUN_DIR`: the kernel
claims the run folder and writes what the workers need into it (run.json with the config,
data.parquet with the rows, launch.json with the global config that a resume starts again from),
and each worker trains through the same `run_training`, with the HF Trainer doing DDP itself.
Rank 0 alone writes metrics.jsonl, run.json and the adapter.

The folder is also the wire back: the kernel tails metrics.jsonl, turns each line back into its
event and feeds the same reporter, so the live panel cannot tell the difference. A stop is a
file, RUN_DIR/STOP; rank 0 reads it at each step and the ranks agree through one all_reduce, so
every rank stops after the same step. A worker that dies leaves RUN_DIR/error-rank<R>.json (or,
if it was killed, torchrun's summary in worker.log): the kernel reports the rank and the cause
in one line, and kills whatever is left of the process tree.

The workers outlive nothing: each watches the kernel's pid (IPYLORA_KERNEL_PID) and, once the
kernel is gone (killed, crashed, restarted), stops through the same agreement after the step it
is on, so the adapter and a resumable checkpoint of that step are saved and torchrun exits.
`%lora_train --resume NAME` starts the workers again from that checkpoint (`ipylora.worker
RUN_DIR --resume`) with the config in launch.json: the same global batch, rows and steps.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

from ipylora.engine.errors import IpyloraError
from ipylora.engine.events import EvalEnd, Event, Notice, RunEnd, RunStart, Sample, StepEnd
from ipylora.engine.runs import claim_run_dir, read_json, write_json

STOP = "STOP"
LOG = "worker.log"
LAUNCH = "launch.json"  # the config as the kernel launched it (run.json's "train" is rank 0's share)
KERNEL_PID = "IPYLORA_KERNEL_PID"
KERNEL_STARTED = "IPYLORA_KERNEL_STARTED"
EVENTS = {cls.__name__: cls for cls in (RunStart, StepEnd, EvalEnd, Sample, Notice, RunEnd)}


class WorkerError(IpyloraError):
    """A training worker process crashed, ran out of memory or was killed."""


# -- inside a worker -----------------------------------------------------------------------------
def world_size() -> int:
    """Ranks in this run: 1 in the kernel, N under torchrun once the Trainer set up the group."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 1
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True in the kernel and on rank 0: the one process that writes the run folder."""
    return rank() == 0


def ddp_backend(device: str) -> str | None:
    """gloo for CPU ranks under torchrun; None otherwise (the Trainer's choice, or no process group)."""
    return "gloo" if device == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None


# Why a run stops, in the order the ranks settle on when they disagree: a kernel that died
# (rank 1's watchdog may see it a moment before rank 0's) outranks a Stop request.
STOP_REASONS = ("stopped", "early-stopped", "interrupted")


def agree_to_stop(flag, run_dir: Path) -> bool:
    """Whether any rank wants to stop after this step; every rank gets the same answer and reason.

    Rank 0 reads RUN_DIR/STOP (on multi-node runs only its machine is sure to see the folder).
    """
    import torch
    import torch.distributed as dist

    reason = flag.reason if flag.is_set() else None
    if reason is None and is_main() and (Path(run_dir) / STOP).exists():
        reason = (Path(run_dir) / STOP).read_text().strip() or "stopped"
    vote = torch.tensor([0 if reason is None else 1 + _reason_rank(reason)])
    if dist.get_backend() == "nccl":
        vote = vote.cuda()
    dist.all_reduce(vote, op=dist.ReduceOp.MAX)
    agreed = int(vote.item())
    if agreed:
        flag.set(STOP_REASONS[agreed - 1])
        flag.reason = STOP_REASONS[agreed - 1]  # the same status in run.json whichever rank saw it first
    return bool(agreed)


def _reason_rank(reason: str) -> int:
    return STOP_REASONS.index(reason) if reason in STOP_REASONS else 0


def agree_min(key: str, value: int) -> int:
    """The smallest `value` any rank passes under `key`, through torchrun's own store.

    Needs no process group (the Trainer creates that later): every rank must call it with the
    same keys in the same order. Outside torchrun's agent (no store to reach) it returns `value`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return value
    from datetime import timedelta

    from torch.distributed import TCPStore

    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                     timeout=timedelta(minutes=10))
    prefix = f"ipylora/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{key}"
    store.set(f"{prefix}/{rank()}", str(int(value)))
    keys = [f"{prefix}/{r}" for r in range(world)]
    store.wait(keys)
    return min(int(store.get(k)) for k in keys)


def kernel_alive(pid: int, started: float | None) -> bool:
    """Whether the kernel that launched this run still runs (a reused pid is not the kernel)."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(process.create_time() - started) < 1.0
    except psutil.Error:
        return False


def kernel_gone() -> bool:
    """In a worker: whether the kernel named by IPYLORA_KERNEL_PID has exited (False if none is named)."""
    if not os.environ.get(KERNEL_PID):
        return False
    started = float(os.environ[KERNEL_STARTED]) if os.environ.get(KERNEL_STARTED) else None
    return not kernel_alive(int(os.environ[KERNEL_PID]), started)


def watch_kernel(flag, interval: float = 1.0) -> threading.Thread | None:
    """In a worker: set `flag` ("interrupted") once the kernel named by IPYLORA_KERNEL_PID is gone.

    The ranks then agree to stop after the current step and save it, as for the Stop button;
    nothing waits for a kernel that will never read the result. None when no kernel launched us
    (a launch by hand).
    """
    if not os.environ.get(KERNEL_PID):
        return None

    def watch():
        while not flag.is_set():
            if kernel_gone():
                flag.set("interrupted")
                return
            time.sleep(interval)

    thread = threading.Thread(target=watch, name="ipylora-kernel-watch", daemon=True)
    thread.start()
    return thread


def write_failure(run_dir: Path, step: int, exc: BaseException) -> None:
    """Leave the cause of this rank's crash for the kernel (one line)."""
    cause = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
    write_json(Path(run_dir) / f"error-rank{rank()}.json",
               {"rank": rank(), "step": step, "cause": cause, "time": time.time()})


# -- in the kernel -------------------------------------------------------------------------------
def launch_command(run_dir: Path, gpus: int, resume: bool = False) -> list[str]:
    """`torchrun --standalone --nproc_per_node N -m ipylora.worker RUN_DIR [--resume]`, with this Python."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
            "-m", "ipylora.worker", str(Path(run_dir).resolve()), *(["--resume"] if resume else [])]


def prepare_run(session, dataset: str, args) -> Path:
    """Claim runs/<name>/ and write what workers need, for a launch by hand (several machines).

    Start `torchrun ... -m ipylora.worker RUN_DIR` (or `accelerate launch`) on each machine; then
    `%lora_adapters --load NAME` brings the adapter into the kernel.
    """
    from ipylora.engine.config import resolve
    from ipylora.engine.tiny import TINY_MODEL_ID

    data = session.dataset(dataset)
    args = replace(args, name=args.name or dataset)
    model_id, _ = session._target_model(args.model)
    args = resolve(args, tiny=model_id == TINY_MODEL_ID)
    name, run_dir = claim_run_dir(Path(args.output), args.name)
    write_inputs(session, data, replace(args, name=name), run_dir)
    return run_dir


def write_inputs(session, dataset, args, run_dir: Path) -> None:
    """run.json (config, model, data mapping) and the rows, for the workers to read."""
    from ipylora.engine import train
    from ipylora.engine.models import resolve_model_id

    model_id, source = session._target_model(args.model)
    split = dataset.splits() if hasattr(dataset, "splits") else {"train": dataset}
    split["train"].frame.to_parquet(run_dir / "data.parquet")
    if split.get("eval") is not None:
        split["eval"].frame.to_parquet(run_dir / "eval.parquet")
    # The rows are written already shuffled, limited and split: the workers must not do it again.
    data_args = replace(dataset.args, eval=None, shuffle=False, limit=None)
    if model_id == resolve_model_id(None)[0]:
        model_id = None
    record = {
        "name": args.name, "status": "launching", "model": model_id, "model_source": source,
        "train": {**train.recorded_args(args), "model": model_id},
        "lora": asdict(args.lora), "data_args": asdict(data_args), "dataset": dataset.describe(),
        "started": time.time(),
    }
    # run.json is rewritten by rank 0 as the run goes; launch.json keeps what the workers start from.
    write_json(run_dir / LAUNCH, record)
    write_json(run_dir / "run.json", record)


def launch_record(run_dir: Path) -> dict | None:
    """What a --gpus run was launched with (None for a run trained in the kernel)."""
    path = Path(run_dir) / LAUNCH
    return read_json(path) if path.exists() else None


def _prepare_resume(run_dir: Path, name: str) -> None:
    """Check that run `name` can continue in its workers, and clear what its last attempt left."""
    from ipylora.engine.errors import ConfigError
    from ipylora.engine.train import CHECKPOINTS, last_checkpoint

    if not (run_dir / LAUNCH).exists() or not (run_dir / "data.parquet").exists():
        raise ConfigError(f"Run {name!r} has no launch.json/data.parquet in {run_dir}: it was not a --gpus run "
                          "(resume it without --gpus).")
    if last_checkpoint(run_dir) is None:
        raise ConfigError(f"Run {name!r} has no checkpoint to resume from in {run_dir / CHECKPOINTS}: "
                          "train it with --save-every N, or stop it (checkpoints are written on stop).")
    for path in [run_dir / STOP, *run_dir.glob("error-rank*.json")]:  # an old STOP would end it at once
        path.unlink(missing_ok=True)


def run_distributed(session, dataset, args, reporter=None, flag=None, resume: bool = False) -> RunEnd:
    """Train `dataset` on `args.gpus` worker processes; events reach `reporter` as they happen.

    `resume`: continue run `args.name` from its last checkpoint, with the rows and config it was
    launched with (its folder's data.parquet and launch.json; `dataset` is not used).
    """
    import psutil

    from ipylora.engine.train import StopFlag, _SigintToFlag

    flag = flag or StopFlag()
    if resume:
        name, run_dir = args.name, Path(args.output) / args.name
        _prepare_resume(run_dir, name)
    else:
        name, run_dir = claim_run_dir(Path(args.output), args.name)
        args = replace(args, name=name)
        write_inputs(session, dataset, args, run_dir)
    tail = _Tail(run_dir / "metrics.jsonl")
    tail.skip_existing()  # a resumed run appends: only its new events go to the panel
    ended: list[RunEnd] = []

    def deliver(event: Event) -> None:
        session._on_event(event)
        if reporter is not None:
            reporter(event)
        if isinstance(event, RunEnd):
            ended.append(event)

    import torch

    if args.strategy == "fsdp" and not torch.cuda.is_available():  # accelerate shards GPU ranks only
        deliver(Notice("FSDP shards the model across GPUs; these CPU ranks train with DDP instead."))
    _release_gpu_cache()
    # The workers watch this process: if the kernel dies, they save the step they are on and exit.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", KERNEL_PID: str(os.getpid()),
           KERNEL_STARTED: repr(psutil.Process().create_time())}
    with open(run_dir / LOG, "ab" if resume else "wb") as log:
        process = subprocess.Popen(launch_command(run_dir, args.gpus, resume), stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    family: dict[int, psutil.Process] = {}
    stop_sent = False
    try:
        with _SigintToFlag(flag):
            while process.poll() is None:
                family.update({p.pid: p for p in _descendants(process.pid)})
                if flag.is_set() and not stop_sent:
                    (run_dir / STOP).write_text(flag.reason or "stopped")
                    stop_sent = True
                try:
                    for event in tail.events():
                        deliver(event)
                    time.sleep(0.1)
                except KeyboardInterrupt:  # raised by a reporter, or a second Ctrl-C: stop, still save
                    flag.set("interrupted")
        for event in tail.events():
            deliver(event)
    finally:
        _kill_tree(process, family)
    if process.returncode != 0 or not ended:
        message = failure_message(run_dir, process.returncode)
        _mark_failed(run_dir, message)
        if not ended:
            deliver(RunEnd(name=name, status="failed", step=(session.run_state or {}).get("step", 0),
                           total_steps=(session.run_state or {}).get("total", 0), final_loss=None,
                           adapter_dir=None, elapsed=0.0, message=f"failed: {message}"))
        raise WorkerError(message)
    return ended[-1]


class _Tail:
    """New complete lines of a growing metrics.jsonl, as events."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = path, 0, b""

    def skip_existing(self) -> None:
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def events(self) -> list[Event]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        self.offset += len(chunk)
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        return [event for event in map(event_from_line, lines) if event is not None]


def event_from_line(line: bytes | str) -> Event | None:
    """The event a metrics.jsonl line was written from (None for a blank or unknown line)."""
    try:
        data = json.loads(line)
    except ValueError:
        return None
    cls = EVENTS.get(data.pop("event", None))
    return cls(**data) if cls is not None else None


def failure_message(run_dir: Path, returncode: int | None) -> str:
    """One line: which rank failed, at which step, and why."""
    where = f"(log: {Path(run_dir) / LOG})"
    errors = []
    for path in Path(run_dir).glob("error-rank*.json"):
        try:
            errors.append(read_json(path))
        except (OSError, ValueError):
            continue
    if errors:  # the first to fail is the cause; the others usually lost their peer
        first = min(errors, key=lambda e: e.get("time", 0))
        return f"Training worker rank {first['rank']} failed at step {first['step']}: {first['cause']} {where}"
    log = (Path(run_dir) / LOG).read_text(errors="replace") if (Path(run_dir) / LOG).exists() else ""
    root = log.split("Root Cause")[-1]
    ranks = re.findall(r"^\s*rank\s*:\s*(\d+)", root, re.M)
    codes = re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", root, re.M)
    if ranks and codes:
        code = int(codes[0])
        if code < 0:
            signame = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
            cause = f"killed by {signame}" + (" (usually the machine running out of memory)" if code == -9 else "")
        else:
            cause = f"exited with code {code}"
        return f"Training worker rank {ranks[0]} {cause} {where}"
    last = next((line.strip() for line in reversed(log.splitlines()) if line.strip()), "no output")
    return f"Training workers ended with exit code {returncode}: {last[:200]} {where}"


def _mark_failed(run_dir: Path, message: str) -> None:
    path = Path(run_dir) / "run.json"
    record = read_json(path) if path.exists() else {}
    if record.get("status") in (None, "launching", "running", "failed"):
        write_json(path, {**record, "status": "failed", "error": message, "finished": time.time()})


def _release_gpu_cache() -> None:
    """Give the kernel's cached-but-free GPU memory back: rank 0 shares GPU 0 with the kernel."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        from ipylora.engine.models import free_memory

        free_memory()


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def end_processes(processes, timeout: float) -> None:
    """SIGTERM each psutil process, then SIGKILL whatever is still running after `timeout` s."""
    import psutil

    for proc in processes:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, survivors = psutil.wait_procs(processes, timeout=timeout)
    for proc in survivors:
        try:
            proc.kill()
        except psutil.Error:
            pass


def _kill_tree(process: subprocess.Popen, family: dict) -> None:
    """End torchrun and every worker it started (workers run in sessions of their own)."""
    family = {**family, **{p.pid: p for p in _descendants(process.pid)}}
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end_processes([p for p in family.values() if p.is_running()], timeout=10)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
