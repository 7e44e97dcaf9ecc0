"""The shared training loop: one run of any method (engine/methods) on a LoRA adapter over the resident model.

setup (method tokens, attach adapter, plan batches, write run.json) -> fit (the method's TRL
trainer, events per step) -> save. Everything here is method-agnostic: the method only says
which data shape it takes, how a split becomes tokens, and which trainer it builds.

Stopping is cooperative: a kernel interrupt (SIGINT), `request_stop()` or the Stop button set a
flag that the callback reads at the step boundary, so the adapter saved is exactly the one after
the last finished step, and a resumable checkpoint (optimizer, scheduler, data position) is
written beside it. A KeyboardInterrupt that escapes anyway (a second Ctrl-C, or one raised by a
callback) is caught too: the adapter is saved either way and the resident model stays usable.
"""

from __future__ import annotations

import contextlib
import math
import re
import signal
import tempfile
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

from ipylora.engine import adapters, methods
from ipylora.engine.config import GenerateArgs, TrainArgs
from ipylora.engine.data import LoraDataset
from ipylora.engine.errors import ConfigError
from ipylora.engine.events import EvalEnd, Event, Notice, RunEnd, RunStart, Sample, StepEnd
from ipylora.engine.runs import MetricsLog, check_name, claim_run_dir, read_json, replace_dir, write_json
from ipylora.engine.trackers import Trackers, trainer_settings

CHECKPOINTS = "checkpoints"


# TrainingArguments under which a step does not wait for the GPU (lagged.py says why that matters).
NO_WAIT_SETTINGS = dict(
    # The Trainer's check that each micro-batch's loss is finite reads it back, and it logs a
    # stand-in for a NaN; the run's Callback says when a logged loss is not finite instead.
    logging_nan_inf_filter=False,
    # Batches go to the GPU from pinned memory, without a blocking copy.
    dataloader_pin_memory=True,
    accelerator_config={"non_blocking": True},
)


def total_steps(rows: int, args: TrainArgs) -> int:
    """Optimizer steps of a run over `rows` training examples (a method's `examples`)."""
    if args.steps:
        return args.steps
    return max(1, math.ceil(args.epochs * math.ceil(rows / args.batch_size)))


def training_settings(args: TrainArgs, steps: int, precision, output_dir: str, device: str, has_eval: bool,
                      fast: dict | None = None) -> dict:
    """The TrainingArguments keyword arguments every method's TRL config starts from."""
    from ipylora.engine import distributed

    # TRL's config defaults (bf16 on CPU, lr 2e-5, gradient checkpointing, periodic saves) are
    # not what we mean, so every one that matters is set here.
    eval_every = args.eval_every or max(1, steps // 10)
    settings = dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=micro_batch(args),
        per_device_eval_batch_size=micro_batch(args),
        gradient_accumulation_steps=args.batch_size // micro_batch(args),
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
        # Checkpoints only when asked (--save-every) or when a run is stopped; see _Callback.
        save_strategy="steps",
        save_steps=args.save_every or steps + 1,
        save_total_limit=2,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_every if has_eval else None,
        **trainer_settings(args.report_to, args.name),  # --report-to: the Trainer's own integrations
        ddp_backend=distributed.ddp_backend(device),
        ddp_find_unused_parameters=False,  # every LoRA weight is used: skip DDP's extra graph walk
        disable_tqdm=True,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        **NO_WAIT_SETTINGS,
        remove_unused_columns=False,
        neftune_noise_alpha=args.neftune,
    )
    if args.strategy == "fsdp" and args.gpus > 1:
        # accelerate applies FSDP to GPU ranks only: CPU (gloo) ranks run DDP. Not yet run on GPUs.
        settings["fsdp"] = "full_shard auto_wrap"
    # GPU speed settings (padding-free batches, checkpointing only when needed...); the batch
    # shape stays the one computed above from args, so an OOM retry can shrink it.
    fast = {k: v for k, v in (fast or {}).items()
            if v is not None and k not in ("per_device_train_batch_size", "gradient_accumulation_steps")}
    return {**settings, **fast}


def plan_batches(model, session, lengths: list[int], args: TrainArgs,
                 packed: bool = True) -> tuple[TrainArgs, dict, dict | None]:
    """(args with batch sizes filled, TRL config overrides, the speed plan) for this device.

    `packed`: the method's trainer takes padding-free batches (SFT); others keep padded batches
    and SDPA attention.
    """
    from ipylora.engine import speed

    fast = speed.fast_settings(model, session.tokenizer, lengths, session.precision, session.device,
                               quantization=args.quantization, batch_size=args.batch_size, dropout=args.lora.dropout,
                               attention=None if packed else "sdpa", memory_cap=memory_cap(args),
                               offload=args.offload, compile_layers=args.compile)
    if not packed:
        fast.pop("padding_free", None)
    plan = fast.pop("_plan", None)
    return planned_args(args, plan), fast, asdict(plan) if plan is not None else None


def memory_cap(args: TrainArgs) -> int | None:
    """--memory in bytes (None without it)."""
    return int(args.memory * 2**30) if args.memory else None


def planned_args(args: TrainArgs, plan) -> TrainArgs:
    """`args` with the batch sizes the run uses: the speed plan's on a GPU, else batch_size (8 if unset).

    `plan` is a `speed.Plan` or `speed.BatchPlan` (a dry run has no model to patch, only the latter).
    """
    if plan is None:
        return replace(args, batch_size=args.batch_size or 8)
    micro = min(args.micro_batch_size or plan.batch_size, math.ceil(plan.batch_size / plan.accumulation))
    return replace(args, batch_size=plan.batch_size, micro_batch_size=micro)


def whole_groups(args: TrainArgs, multiple: int) -> TrainArgs:
    """`args` with batch_size rounded up to a multiple of `multiple` (GRPO's completions per prompt),
    keeping the micro-batch a divisor of it."""
    if multiple <= 1 or args.batch_size % multiple == 0:
        return args
    batch = math.ceil(args.batch_size / multiple) * multiple
    micro = args.micro_batch_size
    if micro is not None and batch % micro:
        micro = math.gcd(batch, micro)
    return replace(args, batch_size=batch, micro_batch_size=micro)


def micro_batch(args: TrainArgs) -> int:
    """The largest micro-batch <= micro_batch_size that divides batch_size (the effective batch is kept)."""
    micro = min(args.micro_batch_size or args.batch_size, args.batch_size)
    while args.batch_size % micro:
        micro -= 1
    return micro


def _compile_errors_run_eagerly(plan: dict | None):
    """Under compiled decoder layers (compiled_layers.py): a layer the compiler fails on runs eagerly
    (dynamo's suppress_errors) instead of ending the run."""
    if not (plan and plan.get("compiled")):
        return contextlib.nullcontext()
    import torch._dynamo

    return torch._dynamo.config.patch(suppress_errors=True)


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


def _memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class _Samples:
    """Greedy answers to fixed prompts with the adapter as it is at that step."""

    def __init__(self, session, dataset: LoraDataset, args: TrainArgs, steps: int):
        self.session, self.prompts = session, list(args.samples)
        self.every = args.sample_every or max(1, steps // 5)
        self.template = dataset.template
        # The system prompt the rows shared (or the most common): samples see what chat will send.
        self.system = dataset.system_summary()["system"]
        self.generate_args = GenerateArgs(max_new_tokens=args.sample_max_new_tokens)

    def due(self, step: int, total: int) -> bool:
        return bool(self.prompts) and (step % self.every == 0 or step == total)

    def __call__(self, model, step: int):
        from ipylora.engine.chat import chat_messages, generate, template_prompt_ids

        from ipylora.engine import compiled_layers

        tokenizer = self.session.tokenizer
        for prompt in self.prompts:
            ids = template_prompt_ids(tokenizer, self.template, chat_messages(prompt, system=self.system))
            with compiled_layers.eager(model):  # decoding's cache and shapes are not the training graph's
                answer = generate(model, tokenizer, ids, self.generate_args, adapter=None)
            yield Sample(step=step, prompt=prompt, text=answer["text"])


OVERFIT_RISES = 3
"""Evals in a row whose eval loss rose (while train loss fell) before the run says it overfits."""


def overfitting(evals: list[tuple[int, float, float]], rises: int = OVERFIT_RISES) -> bool:
    """Whether eval loss rose at each of the last `rises` evals while train loss fell over them.

    `evals` holds (step, eval loss, mean train loss logged since the eval before), oldest first.
    """
    if len(evals) <= rises:
        return False
    recent = evals[-(rises + 1):]
    rising = all(later[1] > earlier[1] for earlier, later in zip(recent, recent[1:]))
    return rising and recent[-1][2] < recent[0][2]


def overfit_note(best_step: int, best_loss: float, last_loss: float, early_stop: int | None) -> str:
    if early_stop:
        advice = f"--early-stop {early_stop} stops after {early_stop} evals without a better one and keeps that adapter"
    else:
        advice = f"train with --early-stop {OVERFIT_RISES} to stop there and keep that adapter"
    return (f"overfitting: eval loss rose {OVERFIT_RISES} evals in a row (now {last_loss:.4f}) while train loss fell; "
            f"the best eval loss was {best_loss:.4f} at step {best_step}: {advice}")


def recorded_args(args: TrainArgs) -> dict:
    """run.json's "train" entry: the args without the adapter shape; rewards given as callables are
    recorded by the spec that rebuilds them (rewards.to_spec) or their name."""
    record = {k: v for k, v in asdict(args).items() if k != "lora"}
    if args.rewards:
        from ipylora.engine import rewards

        record["rewards"] = [rewards.record_of(r) for r in args.rewards]
    return record


def _callback(flag: StopFlag, emit, steps: int, started: float, samples: _Samples, early_stop: int | None,
              run_dir: Path, adapter: str, has_eval: bool = False, metrics=None):
    from peft import get_peft_model_state_dict
    from transformers import TrainerCallback

    from ipylora.engine import distributed

    class Callback(TrainerCallback):
        best_loss = math.inf
        best_state = None
        best_step = None
        bad_evals = 0
        agreed = False  # under torchrun: every rank decided together to stop after this step
        overfit = ""  # the overfitting note, said once per run
        diverged = False  # a logged loss was NaN or infinite (said once per run)

        def __init__(self):
            self.evals: list[tuple[int, float, float]] = []  # (step, eval loss, mean train loss since the last eval)
            self.window: list[float] = []  # train losses logged since the last eval

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if distributed.world_size() > 1:
                self.agreed = distributed.agree_to_stop(flag, run_dir)
            if has_eval and state.global_step == steps:
                control.should_evaluate = True  # the final eval loss is the saved adapter's
            if state.global_step >= steps and not flag.is_set() and state.global_step % args.save_steps:
                # The Trainer checkpoints every run's last step (optimizer state and all: 0.2 s on the tiny
                # model, seconds on 7B, each sweep trial); a finished run keeps its adapter instead.
                control.should_save = False
            self._maybe_stop(control)
            if samples.due(state.global_step, steps) and distributed.is_main():  # rank 0 reports them
                for sample in samples(model, state.global_step):
                    emit(sample)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.window.append(float(logs["loss"]))
                if not self.diverged and not math.isfinite(logs["loss"]):
                    self.diverged = True
                    clip = "" if args.max_grad_norm else " or with --max-grad-norm 1.0"
                    emit(Notice(f"step {state.global_step}'s loss is {logs['loss']}: training diverged. Stop it "
                                f"(%lora_train --stop) and train again with a lower --lr (this run's is "
                                f"{args.learning_rate:g}){clip}.", keep=True))
                emit(StepEnd(
                    step=state.global_step, total_steps=steps, loss=float(logs["loss"]),
                    lr=float(logs.get("learning_rate", 0.0)), tokens=int(state.num_input_tokens_seen),
                    elapsed=time.time() - started, memory_mb=_memory_mb(),
                    metrics=metrics(logs) if metrics is not None else {},
                ))
            self._maybe_stop(control)  # a stop asked for while this step was logged ends the run here

        def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
            loss = float((metrics or {}).get("eval_loss", math.nan))
            train = sum(self.window) / len(self.window) if self.window else math.nan
            self.window = []
            self.evals.append((state.global_step, loss, train))
            stopping = False
            if loss < self.best_loss:
                self.best_loss, self.best_step, self.bad_evals = loss, state.global_step, 0
                if early_stop:
                    self.best_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}
            else:
                self.bad_evals += 1
                if early_stop and self.bad_evals >= early_stop:
                    stopping = True
                    flag.set("early-stopped")
                    control.should_training_stop = True
            emit(EvalEnd(step=state.global_step, loss=loss, best=self.best_loss, best_step=self.best_step))
            self._maybe_stop(control)  # a stop this eval led to (a sweep's pruner) ends the run at this step
            # Early stopping that fires now already keeps the best adapter and says so.
            if not self.overfit and not stopping and self.best_step is not None and overfitting(self.evals):
                self.overfit = overfit_note(self.best_step, self.best_loss, loss, early_stop)
                emit(Notice(self.overfit, keep=True))

        def _maybe_stop(self, control):
            # Several ranks must stop at the same step, so they read only the flag they agreed on.
            stopping = self.agreed if distributed.world_size() > 1 else flag.is_set()
            if stopping and not control.should_training_stop:
                control.should_training_stop = True
                # A resumable checkpoint at the step we stop on; a pruned trial is not meant to go on.
                control.should_save = flag.reason != "pruned"

    return Callback()


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


def last_checkpoint(run_dir: Path) -> Path | None:
    folder = run_dir / CHECKPOINTS
    found = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").exists()] if folder.is_dir() else []
    return max(found, key=lambda p: int(p.name.split("-")[-1])) if found else None


def _to_hf(tokens: dict, part=None):
    """`tokens` as a datasets.Dataset. Within `tokens_kept()` (a sweep: every trial trains on the same
    token lists) the Dataset made for them is kept on `part` as well, for the next trial."""
    import datasets as hf_datasets

    kept = getattr(part, "_hf", None)
    if kept is not None and kept[0] is tokens:
        return kept[1]
    data = hf_datasets.Dataset.from_dict(dict(tokens))
    if getattr(part, "_keep", False):
        part._hf = (tokens, data)
    return data


def _parts(dataset: LoraDataset) -> tuple[LoraDataset, LoraDataset | None]:
    splits = dataset.splits() if hasattr(dataset, "splits") else {"train": dataset}
    return splits["train"], splits.get("eval")


def run_training(session, dataset: LoraDataset, args: TrainArgs, reporter=None, flag: StopFlag | None = None,
                 resume: bool = False, reuse_dir: bool = False) -> RunEnd:
    """Train one adapter named `args.name` on `dataset` (or continue it); returns the RunEnd event."""
    from transformers import set_seed

    from ipylora.engine import distributed
    from ipylora.engine.models import keep_resident

    name = check_name(args.name, "run")
    flag = flag or StopFlag()
    keep_resident()
    if resume:
        run_dir = Path(args.output) / name
        checkpoint = last_checkpoint(run_dir)
        if checkpoint is None:
            raise ConfigError(f"Run {name!r} has no checkpoint to resume from in {run_dir / CHECKPOINTS}: "
                              "train it with --save-every N, or stop it (checkpoints are written on stop).")
    else:
        run_dir = checkpoint = None  # claimed below, once the data is known to be usable
    method = methods.get(args.method)
    dataset.require(method.shape, who=f"--method {method.name}")
    train_part, eval_part = _parts(dataset)
    train_tokens = method.tokens(train_part, session.tokenizer, args.max_length)
    train_data = _to_hf(train_tokens, train_part)
    # The eval loss is over exactly these tokens, the ones %lora_eval scores at this max_length.
    eval_tokens = method.tokens(eval_part, session.tokenizer, args.max_length) \
        if eval_part is not None and len(eval_part) else None
    eval_data = _to_hf(eval_tokens, eval_part) if eval_tokens is not None else None
    if args.early_stop and eval_data is None:
        raise ConfigError("--early-stop needs an eval split: add --eval 0.1 to %%lora_dataset.")
    if reuse_dir:
        run_dir = Path(args.output) / name
    elif not resume:
        name, run_dir = claim_run_dir(Path(args.output), name)
        args, checkpoint = replace(args, name=name), None
    set_seed(args.seed)
    if args.from_adapter:  # the run trains the start adapter's shape
        args = replace(args, lora=session.lora_args(args.from_adapter))
    model = session.attach_adapter(name, args.lora, start=args.from_adapter)
    residual = args.lora.init in adapters.RESIDUAL_INITS and not args.from_adapter
    initial = adapters.keep_initial(model, name, run_dir) if residual and distributed.is_main() else None
    args, fast, plan = plan_batches(model, session, method.lengths(train_tokens, args), args, packed=method.packed)
    args = whole_groups(args, method.batch_multiple(args))
    steps = total_steps(method.examples(len(train_data), args), args)
    main = distributed.is_main()  # under torchrun only rank 0 writes the run folder
    metrics = MetricsLog(run_dir / "metrics.jsonl", append=resume) if main else None
    last: dict = {"step": 0, "loss": None, "eval_loss": None}

    def emit(event: Event) -> None:
        if metrics is not None:
            metrics.write(event.to_dict())
        trackers(event)
        if isinstance(event, StepEnd):
            last.update(step=event.step, loss=event.loss, tokens_per_s=event.tokens_per_s)
        elif isinstance(event, EvalEnd):
            last.update(eval_loss=event.loss, best_eval_loss=event.best, best_eval_step=event.best_step)
        session._on_event(event)
        if reporter is not None:
            reporter(event)

    record = read_json(run_dir / "run.json") if resume else {}
    record.update({
        "name": name, "status": "running", "model": session.model_id, "model_source": session.model_source,
        "quantization": args.quantization, "precision": session.precision.dtype, "device": session.device,
        "dataset": dataset.describe(), "train": recorded_args(args),
        "lora": asdict(args.lora), "total_steps": steps, "train_rows": len(train_data),
        "truncation": {split: asdict(part.truncation) for split, part in (("train", train_part), ("eval", eval_part))
                       if part is not None and getattr(part, "truncation", None) is not None},
        "eval_rows": len(eval_data) if eval_data is not None else 0, "versions": _versions(), "started": time.time(),
    })
    if checkpoint is not None:
        record["resumed_from"] = int(checkpoint.name.split("-")[-1])
    if plan is not None:
        record["speed_plan"] = plan
    trackers = Trackers(args.report_to, run_dir, name, record, emit, main)
    if main:
        write_json(run_dir / "run.json", record)
    started = time.time()
    emit(RunStart(name=name, total_steps=steps, run_dir=str(run_dir), rows=len(train_data)))
    status, message = "finished", ""
    callback = _callback(flag, emit, steps, started, _Samples(session, dataset, args, steps), args.early_stop,
                         run_dir, name, has_eval=eval_data is not None, metrics=method.metric_values)
    trainer = None
    hooks = _ModuleHooks(model) if fast.get("activation_offloading") else None
    try:
        settings = training_settings(args, steps, session.precision, str(run_dir / CHECKPOINTS), session.device,
                                     eval_data is not None, fast)
        trackers.open({k: record[k] for k in ("model", "dataset", "train", "lora")})
        with trackers.building():
            trainer = method.build(methods.Context(
                model=model, tokenizer=session.tokenizer, args=args, settings=settings, train_data=train_data,
                eval_data=eval_data, eval_tokens=eval_tokens, callbacks=[callback],
                reference=args.from_adapter if method.uses_reference else None, session=session, dataset=dataset,
                emit=emit))
        trackers.attach(trainer)
        # The Trainer's own printer/progress callbacks would print from the training loop.
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.get_decay_parameter_names = decay_parameter_names
        trainer.floating_point_ops = step_flops(model)
        if session.recycler is not None:  # a sweep's trial
            _keep_device_cache(trainer)
        if args.loraplus_ratio:
            trainer.optimizer = loraplus_optimizer(trainer, model, args)
        from ipylora.engine.speed import packed_rows_unchecked

        with _SigintToFlag(flag), _compile_errors_run_eagerly(plan), packed_rows_unchecked(plan, fast):
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        # A stop asked for once the last step was under way (it is said as the step after it runs,
        # lagged.py) comes too late to stop anything: the run finished.
        if flag.is_set() and not (flag.reason == "stopped" and last["step"] >= steps):
            status = flag.reason
    except KeyboardInterrupt:
        status = "interrupted"
    except Exception as exc:
        if _is_oom(exc):
            status, message = "oom", f"out of memory at micro-batch {micro_batch(args)}; "
        else:
            status, message = "failed", f"{type(exc).__name__}: {exc}; "
            raise
    finally:
        if status == "early-stopped" and callback.best_state is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, callback.best_state, adapter_name=name)
            message = f"kept the best eval loss {callback.best_loss:.4f} from step {callback.best_step}; "
            last["eval_loss"] = callback.best_loss
        full_state = _gathered_state(trainer, status)
        del trainer
        if hooks is not None:
            hooks.remove_added()
        if plan is not None and plan.get("compiled"):
            from ipylora.engine import compiled_layers

            compiled_layers.restore(model)  # chat and generation run the eager layers they always ran
        model.eval()
        if status == "oom":
            from ipylora.engine.models import free_memory

            free_memory()
        saving = last["step"] > 0 and status != "oom" and main
        adapter = _save_adapter(model, name, run_dir, full_state, initial,
                                session.tokenizer if args.lora.add_tokens else None) if saving else None
        if initial is not None:  # the resident base is every adapter's: give it its weights back
            adapters.restore_base(session, name, initial, adapter)
        elapsed = time.time() - started
        message += f"adapter saved to {adapter}" if adapter else "no step finished, nothing saved"
        if callback.overfit:
            message += f"; {callback.overfit}"
        if status == "failed":
            message = f"failed: {message}"
        end = RunEnd(name=name, status=status, step=last["step"], total_steps=steps, final_loss=last["loss"],
                     adapter_dir=str(adapter) if adapter else None, elapsed=elapsed, message=message,
                     eval_loss=last["eval_loss"])
        record.update(status=status, step=last["step"], final_loss=last["loss"], eval_loss=last["eval_loss"],
                      best_eval_loss=last.get("best_eval_loss"), best_eval_step=last.get("best_eval_step"),
                      tokens_per_s=last.get("tokens_per_s"),
                      elapsed=elapsed + record.get("elapsed_before", 0.0), adapter=str(adapter) if adapter else None,
                      finished=time.time())
        record["elapsed_before"] = record["elapsed"]
        trackers.close(status, last["step"])
        if main:
            write_json(run_dir / "run.json", record)
        emit(end)
        if metrics is not None:
            metrics.close()
        session._after_run(name, run_dir, dataset, saved=adapter is not None)
    return end


NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")
"""Trainer.get_decay_parameter_names' name rule, as one pattern."""


def decay_parameter_names(model) -> set[str]:
    """The Trainer's weight-decay rule (no biases, no norm weights) over the trained parameters only.

    transformers walks every module of the model and returns a list that create_optimizer then
    searches once per parameter: 0.3 s of every run on a 28-layer model, measured, for a split
    that only the trained parameters (the adapter's) take part in.
    """
    from torch import nn

    names = set()
    for name, param in model.named_parameters():
        owner = name.rpartition(".")[0]
        if param.requires_grad and not NO_DECAY.search(name.lower()) \
                and not isinstance(model.get_submodule(owner) if owner else model, nn.LayerNorm):
            names.add(name)
    return names


def step_flops(model):
    """Trainer.floating_point_ops (6 x input tokens x non-embedding parameters, its `total_flos`) with the
    parameter count taken once: transformers counts every parameter again at every step, 18 ms a step
    on a 28-layer model on CPU, 4-10% of the 1.5B shape's tokens/s on the H200 (bench/RESULTS.md), for a
    number that does not change."""
    count = model.num_parameters(exclude_embeddings=True) if hasattr(model, "num_parameters") else 0
    main_input = getattr(model, "main_input_name", "input_ids")

    def floating_point_ops(inputs) -> int:
        return 6 * inputs[main_input].numel() * count if main_input in inputs else 0

    return floating_point_ops


class _ModuleHooks:
    """The forward hooks on `model`'s modules now, to take off those added later.

    TRL's activation offloading (`get_act_offloading_ctx_manager`, run by each trainer built with
    it) hooks the LM head so that its activations stay on the GPU, and keeps no handle: on a
    resident model every run would add two more hooks for good."""

    def __init__(self, model):
        self.model = model
        self.before = {(id(m), kind, key) for m in model.modules() for kind in ("_forward_pre_hooks", "_forward_hooks")
                       for key in getattr(m, kind)}

    def remove_added(self) -> None:
        for module in self.model.modules():
            for kind in ("_forward_pre_hooks", "_forward_hooks"):
                hooks = getattr(module, kind)
                for key in [k for k in hooks if (id(module), kind, k) not in self.before]:
                    del hooks[key]
                    for extra in ("_forward_hooks_always_called", "_forward_hooks_with_kwargs",
                                  "_forward_pre_hooks_with_kwargs"):
                        getattr(module, extra, {}).pop(key, None)


def _keep_device_cache(trainer) -> None:
    """The Trainer's `accelerator.free_memory()` as training starts, less its `gc.collect()` and
    `empty_cache()`: what it resets is set the same way, for a Trainer that has prepared nothing yet.

    For a sweep's trial: the trial before freed its activations, gradients and optimizer state to the
    CUDA caching allocator, and they are what this trial needs; emptying the cache hands them to the
    driver and makes the first step allocate them all again. An out-of-memory run still empties the
    cache (models.free_memory) before it is retried."""
    accelerator = trainer.accelerator

    def free_memory(*objects):
        accelerator._schedulers, accelerator._optimizers, accelerator._models, accelerator._dataloaders = [], [], [], []
        accelerator.step = 0
        return [None] * len(objects)

    accelerator.free_memory = free_memory


def loraplus_optimizer(trainer, model, args: TrainArgs):
    """LoRA+ (PEFT's create_loraplus_optimizer): the optimizer the Trainer would make, with the B
    matrices' learning rate `args.loraplus_ratio` times the A matrices'. The Trainer builds its
    scheduler on it and saves/restores its state in checkpoints as it would its own."""
    from peft.optimizers import create_loraplus_optimizer

    optimizer_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, model)
    kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
    return create_loraplus_optimizer(model, optimizer_cls, lr=args.lr, loraplus_lr_ratio=args.loraplus_ratio,
                                     loraplus_weight_decay=trainer.args.weight_decay, **kwargs)


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _gathered_state(trainer, status: str) -> dict | None:
    """Under torchrun, the model's full state dict, gathered by every rank (None in one process).

    With FSDP each rank holds a shard of every weight and only a collective that all ranks join
    can assemble them (accelerate's `get_state_dict`, which FSDP-unwraps or DDP-unwraps alike);
    the ranks agreed on the step they stop after, so they all get here. Not after a failure:
    the other ranks are gone.
    """
    from ipylora.engine import distributed

    if trainer is None or distributed.world_size() <= 1 or status in ("failed", "oom"):
        return None
    if trainer.state.global_step == 0:
        return None
    return trainer.accelerator.get_state_dict(trainer.model_wrapped)


def _save_adapter(model, name: str, run_dir: Path, state_dict: dict | None = None, initial: Path | None = None,
                  tokenizer=None) -> Path:
    """The adapter into runs/NAME/adapter; `initial`: a PiSSA/OLoRA start, saved as the plain LoRA of the change;
    `tokenizer`: saved beside it (--add-tokens: the tokens it was trained with)."""
    convert = {"path_initial_model_for_weight_conversion": str(initial)} if initial is not None else {}
    with tempfile.TemporaryDirectory(prefix=".adapter-", dir=run_dir) as tmp, _no_model_card(model, name):
        # Not the base's embeddings: PEFT adds them once the vocabulary grew (--add-tokens), to every adapter
        # saved after that, though an --add-tokens adapter keeps its own trained copies (modules_to_save).
        model.save_pretrained(tmp, selected_adapters=[name], state_dict=state_dict, save_embedding_layers=False,
                              **convert)
        # PEFT writes a non-"default" adapter into a subfolder named after it.
        saved = Path(tmp) / name if (Path(tmp) / name / "adapter_config.json").exists() else Path(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(saved)
        final = run_dir / "adapter"
        if saved == Path(tmp):  # the temp dir itself is removed on exit: move a copy of it instead
            saved = saved.rename(run_dir / f".adapter-new-{time.time_ns()}")
        replace_dir(saved, final)
    return final


@contextlib.contextmanager
def _no_model_card(model, name: str):
    """PEFT writes its model card (README.md) into the save folder's root, which for an adapter not
    named "default" is not the adapter's folder and is thrown away here; rendering it compiles a
    Jinja template on every save (35-70 ms of each run, measured). So, for those, it is skipped."""
    if name == "default":
        yield
        return
    model.create_or_update_model_card = lambda output_dir: None
    try:
        yield
    finally:
        del model.create_or_update_model_card


def _versions() -> dict:
    import peft
    import torch
    import transformers
    import trl

    from ipylora import __version__

    return {"ipylora": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "trl": trl.__version__}
