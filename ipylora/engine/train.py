"""One training run: TRL's SFTTrainer on a LoRA adapter over the resident base model.

setup (resolve config, tokenize, attach adapter) -> fit (SFTTrainer, events per step) -> save.

Stopping is cooperative: a kernel interrupt (SIGINT), `request_stop()` or the Stop button set a
flag that the callback reads at the step boundary, so the adapter saved is exactly the one after
the last finished step. A KeyboardInterrupt that escapes anyway (a second Ctrl-C, or one raised
by a callback) is caught too: the adapter is saved either way and the resident model stays usable.
"""

from __future__ import annotations

import math
import os
import signal
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

from ipylora.engine.config import TrainArgs
from ipylora.engine.data import LoraDataset
from ipylora.engine.events import Event, RunEnd, RunStart, StepEnd
from ipylora.engine.runs import MetricsLog, check_name, replace_dir, write_json


def total_steps(rows: int, args: TrainArgs) -> int:
    if args.steps:
        return args.steps
    return max(1, math.ceil(args.epochs * math.ceil(rows / args.batch_size)))


def sft_config(args: TrainArgs, steps: int, precision, output_dir: str, device: str):
    from trl import SFTConfig

    # SFTConfig's own defaults (bf16 on CPU, lr 2e-5, gradient checkpointing, periodic saves) are
    # not what we mean, so every one that matters is set here.
    return SFTConfig(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        lr_scheduler_type=args.scheduler,
        warmup_steps=int(round(args.warmup_ratio * steps)),
        weight_decay=0.0,
        max_grad_norm=args.max_grad_norm,
        bf16=precision.bf16,
        fp16=precision.fp16,
        use_cpu=device == "cpu",
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,  # our tokenizer step already truncated
        remove_unused_columns=False,
    )


class StopFlag:
    """Set by SIGINT, request_stop() or a Stop button; read at each step boundary."""

    def __init__(self):
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        self.reason = self.reason or reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


def _callback(flag: StopFlag, emit, steps: int, started: float):
    from transformers import TrainerCallback

    class EventCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if flag.is_set():
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                emit(StepEnd(
                    step=state.global_step,
                    total_steps=steps,
                    loss=float(logs["loss"]),
                    lr=float(logs.get("learning_rate", 0.0)),
                    tokens=int(state.num_input_tokens_seen),
                    elapsed=time.time() - started,
                ))
            if flag.is_set():  # a stop asked for while this step was logged ends the run here
                control.should_training_stop = True

    return EventCallback()


class _SigintToFlag:
    """While training in the main thread, the first Ctrl-C asks to stop at the step boundary."""

    def __init__(self, flag: StopFlag):
        self.flag = flag
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.flag.is_set():  # second Ctrl-C: the user insists
            raise KeyboardInterrupt
        self.flag.set("interrupted")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def run_training(session, dataset: LoraDataset, args: TrainArgs, reporter=None, flag: StopFlag | None = None):
    """Train one adapter named `args.name` on `dataset`; returns the RunEnd event."""
    import datasets as hf_datasets
    from transformers import set_seed
    from trl import SFTTrainer

    name = check_name(args.name, "run")
    flag = flag or StopFlag()
    run_dir = Path(args.output) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenized = dataset.tokenize(session.tokenizer, args.max_length)
    train_data = hf_datasets.Dataset.from_dict(tokenized)
    steps = total_steps(len(train_data), args)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    last: dict = {"step": 0, "loss": None}

    def emit(event: Event) -> None:
        metrics.write(event.to_dict())
        if isinstance(event, StepEnd):
            last.update(step=event.step, loss=event.loss)
        session._on_event(event)
        if reporter is not None:
            reporter(event)

    record = {
        "name": name,
        "status": "running",
        "model": session.model_id,
        "quantization": args.quantization,
        "precision": session.precision.dtype,
        "device": session.device,
        "dataset": dataset.describe(),
        "train": {k: v for k, v in asdict(args).items() if k != "lora"},
        "lora": asdict(args.lora),
        "total_steps": steps,
        "versions": _versions(),
        "started": time.time(),
    }
    write_json(run_dir / "run.json", record)
    set_seed(args.seed)
    model = session.attach_adapter(name, args.lora)
    started = time.time()
    emit(RunStart(name=name, total_steps=steps, run_dir=str(run_dir), rows=len(train_data)))
    status, message = "finished", ""
    trainer = None
    try:
        with tempfile.TemporaryDirectory(prefix="ipylora-trainer-") as scratch:
            trainer = SFTTrainer(
                model=model,
                args=sft_config(args, steps, session.precision, scratch, session.device),
                train_dataset=train_data,
                processing_class=session.tokenizer,
                callbacks=[_callback(flag, emit, steps, started)],
            )
            # The Trainer's own printer/progress callbacks would print from the training loop.
            from transformers.trainer_callback import PrinterCallback, ProgressCallback

            trainer.remove_callback(PrinterCallback)
            trainer.remove_callback(ProgressCallback)
            with _SigintToFlag(flag):
                trainer.train()
        if flag.is_set():
            status = flag.reason
    except KeyboardInterrupt:
        status = "interrupted"
    except Exception as exc:
        status, message = "failed", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        del trainer
        model.eval()
        adapter = _save_adapter(model, name, run_dir) if last["step"] > 0 else None
        elapsed = time.time() - started
        if not message:
            message = (f"adapter saved to {adapter}" if adapter else "no step finished, nothing saved")
        end = RunEnd(name=name, status=status, step=last["step"], total_steps=steps,
                     final_loss=last["loss"], adapter_dir=str(adapter) if adapter else None,
                     elapsed=elapsed, message=message)
        record.update(status=status, step=last["step"], final_loss=last["loss"], elapsed=elapsed,
                      adapter=str(adapter) if adapter else None, finished=time.time())
        write_json(run_dir / "run.json", record)
        emit(end)
        metrics.close()
        session._after_run(name, run_dir, dataset, saved=adapter is not None)
    return end


def _save_adapter(model, name: str, run_dir: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=run_dir))
    model.save_pretrained(tmp, selected_adapters=[name])
    # PEFT writes a non-"default" adapter into a subfolder named after it.
    saved = tmp / name if (tmp / name / "adapter_config.json").exists() else tmp
    final = run_dir / "adapter"
    replace_dir(saved, final)
    if saved != tmp:
        os.rmdir(tmp) if not any(tmp.iterdir()) else None
    return final


def _versions() -> dict:
    import peft
    import torch
    import transformers
    import trl

    from ipylora import __version__

    return {"ipylora": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "trl": trl.__version__}
