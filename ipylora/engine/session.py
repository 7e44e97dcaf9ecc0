"""The one piece of kernel state: the resident base model, named datasets, adapters and runs.

A `Session` loads the base model once and keeps it; a second training run or a chat reuses it,
and only a different model id or quantization triggers a reload. Adapters live side by side in
one PeftModel, so switching between them (or back to the base) costs nothing.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from ipylora.engine import adapters, conversation, graphdecode
from ipylora.engine import chat as chat_module
from ipylora.engine.adapters import Adapter
from ipylora.engine.config import DataArgs, GenerateArgs, LoraArgs, TrainArgs, args_from_record, resolve
from ipylora.engine.data import LoraDataset
from ipylora.engine.errors import ConfigError, OutOfMemoryError, SessionBusyError, UnknownNameError
from ipylora.engine.events import Event, Notice, RunEnd, StepEnd
from ipylora.engine.notes import before_training, train_tokens
from ipylora.engine.runs import check_name
from ipylora.engine.tiny import TINY_MODEL_ID

_session: Session | None = None
_session_lock = threading.Lock()


def get_session() -> Session:
    """The kernel's session, created on first use."""
    global _session
    with _session_lock:
        if _session is None:
            _session = Session()
        return _session


class RunHandle:
    """A training running in the background: `join()` it, or read `result` / `error` once `done`."""

    def __init__(self, name: str, future):
        self.name = name
        self._future = future

    @property
    def done(self) -> bool:
        return self._future.done()

    @property
    def result(self) -> RunEnd | None:
        return self._future.result() if self.done and self.error is None else None

    @property
    def error(self) -> BaseException | None:
        return self._future.exception() if self.done else None

    def join(self, timeout: float | None = None) -> RunEnd:
        return self._future.result(timeout)


class ModelLock:
    """Who holds the resident model: one training or answer at a time. A sweep holds it for all of
    its trials, and the sweep's own thread takes it again for each trial and its evals (`hold`):
    nothing else (a chat, another training) gets in between two trials. Otherwise a plain lock,
    which a streaming answer releases from its worker thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._holder: int | None = None  # the thread that `hold`s it (a sweep's)
        self._depth = 0

    def acquire(self, blocking: bool = True) -> bool:
        if self._holder is not None and self._holder == threading.get_ident():
            self._depth += 1
            return True
        return self._lock.acquire(blocking)

    def release(self) -> None:
        if self._depth:
            self._depth -= 1
        else:
            self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def held_here(self) -> bool:
        """Whether this thread holds the model for a sweep (its trials may then load and drop adapters)."""
        return self._holder == threading.get_ident()

    @contextlib.contextmanager
    def hold(self, blocking: bool):
        """Hold the model for this thread until the block ends; False if another holds it (and not `blocking`)."""
        if not self._lock.acquire(blocking):
            yield False
            return
        self._holder = threading.get_ident()
        try:
            yield True
        finally:
            self._holder, self._depth = None, 0
            self._lock.release()


def oom_retry(args: TrainArgs, least: int, device: str) -> tuple[TrainArgs, str]:
    """The next try after running out of memory, and the notice that says so: half the micro-batch
    (the effective batch kept), or at the smallest one (`least`), on a GPU, the checkpointed
    activations in host memory; OutOfMemoryError where nothing is left to try."""
    from ipylora.engine.train import micro_batch

    micro = micro_batch(args)
    if micro // 2 >= least:
        args = replace(args, micro_batch_size=micro // 2)
        return args, (f"Out of memory at micro-batch {micro}: retrying with {micro // 2} "
                      f"x {args.batch_size // micro_batch(args)} accumulation steps (same batch).")
    if args.offload is None and device == "cuda":
        return replace(args, offload=True), (f"Out of memory at micro-batch {micro}: retrying with the checkpointed "
                                             "activations offloaded to host memory (--offload).")
    raise OutOfMemoryError(f"Out of GPU memory even at micro-batch {micro} (run {args.name}): lower --max-length, "
                           "use --4bit, or a smaller model. The session is still usable.")


class Session:
    """Resident model + tokenizer, datasets, adapters; the engine's entry point."""

    def __init__(self):
        self.namespace: dict | None = None
        """Where `--reward NAME` is looked up: the notebook's namespace (the magics set it)."""
        self.model = None
        self.tokenizer = None
        self.model_id: str | None = None
        self.model_source: str | None = None
        self.quantization: str | None = None
        self.trust_remote_code = False
        self.precision = None
        self.device: str | None = None
        self.datasets: dict[str, LoraDataset] = {}
        self.adapters: dict[str, Adapter] = {}
        self.active_adapter: str | None = None
        self.run_state: dict | None = None
        self.load_count = 0
        self._stop_flag = None
        self.background_run: RunHandle | None = None
        self._worker: ThreadPoolExecutor | None = None
        self._tiny_tokenizer = None
        self._listeners: list = []
        self._busy = ModelLock()
        self.recycler = None
        """While a sweep runs: its trials' unloaded adapters, for the next trials (engine/recycle.py)."""
        self.sweep_state: dict | None = None
        """The running sweep: name, trial (1-based), total."""
        self._sweep_flag = None
        self.notices_given: set[str] = set()
        """Once-per-session notices already shown (engine/notes.py)."""

    # -- datasets ---------------------------------------------------------------------------
    def add_dataset(self, name: str, frame, args: DataArgs = DataArgs()) -> LoraDataset:
        check_name(name, "dataset")
        dataset = LoraDataset(name, frame, args)
        dataset.pairs()  # render now: a bad column or empty cell fails here, not mid-training
        self.datasets[name] = dataset
        self._changed()
        return dataset

    def dataset(self, name: str) -> LoraDataset:
        if name not in self.datasets:
            known = ", ".join(sorted(self.datasets)) or "none yet"
            raise UnknownNameError(
                f"No dataset named {name!r} (known: {known}). Create it with %%lora_dataset {name}."
            )
        return self.datasets[name]

    def preview_tokenizer(self):
        """(tokenizer, name) to measure datasets with: the resident one, else the tiny model's."""
        from ipylora.engine import models

        if self.tokenizer is not None:
            return self.tokenizer, self.model_id
        if self._tiny_tokenizer is None:
            _quiet_transformers()
            self._tiny_tokenizer = models.load_tokenizer(models.resolve_model_id(None)[1])
        return self._tiny_tokenizer, TINY_MODEL_ID

    # -- model ------------------------------------------------------------------------------
    def ensure_model(self, model: str | None = None, quantization: str | None = None,
                     trust_remote_code: bool = False, tokenizer=None) -> None:
        """Load the base model unless the same one is already resident (`tokenizer`: its tokenizer,
        already loaded by `_check_data`)."""
        from ipylora.engine import models

        model_id, source = self._target_model(model)
        if self.model is not None and (model_id, quantization) == (self.model_id, self.quantization):
            return
        self._drop_model()
        _quiet_transformers()
        device = models.device_name()
        precision = models.choose_precision(device, None)
        tokenizer = tokenizer or models.load_tokenizer(source, trust_remote_code)
        self.model = models.load_model(source, quantization, precision, device, trust_remote_code)
        self.tokenizer = tokenizer
        self.model_id, self.quantization, self.device, self.precision = model_id, quantization, device, precision
        self.model_source = source
        self.trust_remote_code = trust_remote_code
        self.load_count += 1
        self._changed()

    def _target_model(self, model: str | None) -> tuple[str, str]:
        """(id, source) for a --model value; no value means the resident model, else the tiny one."""
        from ipylora.engine.models import resolve_model_id

        if model is None and self.model is not None:
            return self.model_id, self.model_source
        return resolve_model_id(model)

    def unload(self) -> None:
        """Drop the resident model and its adapters (saved adapters stay on disk)."""
        self._check_idle()
        self._drop_model()

    def _drop_model(self) -> None:
        from ipylora.engine.models import release_resident

        self.model = self.tokenizer = None
        self.model_id = None
        self.adapters.clear()
        self.active_adapter = None
        release_resident()
        self._changed()

    # -- adapters ---------------------------------------------------------------------------
    def attach_adapter(self, name: str, lora: LoraArgs, start: str | None = None):
        """A fresh trainable LoRA adapter `name` (`start`: a copy of that adapter's weights); see adapters.attach."""
        return adapters.attach(self, name, lora, start)

    def lora_args(self, name: str) -> LoraArgs:
        """The shape of loaded adapter `name`."""
        return adapters.lora_args(self, name)

    def use_adapter(self, name: str) -> None:
        """Make `name` the adapter chat uses by default; "base" for none."""
        if name != "base":
            self.adapter(name)
        self.active_adapter = None if name == "base" else name
        self._changed()

    def load_adapter(self, source: str, name: str | None = None, output: str = "runs") -> str:
        """Load a saved adapter (a run name under `output`, or a PEFT folder) into the resident model."""
        return adapters.load(self, source, name, output)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` from the resident model (its saved copy on disk stays)."""
        adapters.delete(self, name)

    def adapter(self, name: str) -> Adapter:
        if name not in self.adapters:
            known = ", ".join(["base", *sorted(self.adapters)])
            raise UnknownNameError(f"No adapter named {name!r} (known: {known}). Train one with %lora_train DATASET --name {name}.")
        return self.adapters[name]

    # -- training ---------------------------------------------------------------------------
    def train(self, dataset: str, args: TrainArgs = TrainArgs(), reporter=None, background: bool = False,
              wait: bool = False, resume: bool = False):
        """Train an adapter on a named dataset with the resident (or requested) model.

        Foreground: returns the RunEnd event. `background=True`: returns a `RunHandle` at once and
        trains in a thread. `wait=True`: queue behind a running training instead of refusing.
        """
        data = self.dataset(dataset)
        args = replace(args, name=args.name or dataset)
        check_name(args.name, "run")
        self._check_start(args)
        model_id, _ = self._target_model(args.model)
        args = resolve(args, tiny=model_id == TINY_MODEL_ID, from_user=not resume,
                       tokens=lambda: train_tokens(self, data, args.max_length))
        if not background:
            return self._train_now(data, args, reporter, wait, resume)
        if not wait and self._busy.locked():
            raise self._busy_error()
        if self._worker is None:
            # One long-lived thread for every background run: a new thread per run would get a new
            # malloc arena each time, and the process would grow by ~4 MB a run (measured).
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ipylora-train")
        future = self._worker.submit(self._train_now, data, args, reporter, True, resume)
        self.background_run = RunHandle(args.name, future)
        return self.background_run

    def resume(self, name: str, output: str = "runs", reporter=None, background: bool = False, wait: bool = False):
        """Continue run `name` from its last checkpoint with the config recorded in its run.json.

        A --gpus run continues in its workers with the config it was launched with (launch.json):
        the same global batch and rows, so the same trajectory as if it had never stopped.
        """
        from ipylora.engine.distributed import launch_record
        from ipylora.engine.runs import read_json

        path = Path(output) / check_name(name, "run") / "run.json"
        if not path.exists():
            raise UnknownNameError(f"No run {name!r} in {output}/ to resume: %lora_runs lists the runs.")
        record = launch_record(path.parent) or read_json(path)
        args = args_from_record(record["train"], record["lora"])
        return self.train(record["dataset"]["name"], args, reporter, background, wait, resume=True)

    def sweep(self, dataset: str, sweep, base: TrainArgs = TrainArgs(), reporter=None, background: bool = False,
              resume: bool = False):
        """Train the trials of `sweep` (a SweepArgs) on `dataset`, one after another on the resident
        model, and leave the best trial's adapter active (engine/sweep.py). `base`: every other
        %lora_train setting, the same for every trial. Foreground: returns the SweepEnd event;
        `background=True`: a RunHandle at once, the sweep in the training thread."""
        from ipylora.engine.sweep import SweepRunner

        self.dataset(dataset)
        runner = SweepRunner(self, dataset, sweep, base, reporter, resume=resume)
        model_id, _ = self._target_model(base.model)
        from ipylora.engine.sweep import check_values

        check_values(base, runner.space, tiny=model_id == TINY_MODEL_ID)
        if not background:
            return self._sweep_now(runner, blocking=False)
        if self._busy.locked():
            raise self._busy_error()
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ipylora-train")
        self.background_run = RunHandle(runner.sweep.name, self._worker.submit(self._sweep_now, runner, True))
        return self.background_run

    def resume_sweep(self, name: str, output: str = "runs", reporter=None, background: bool = False):
        """Continue sweep `name` from runs/NAME/sweep.json: a stopped trial from its checkpoint, then the
        trials not run yet, in the same Optuna study."""
        from ipylora.engine.runs import read_json
        from ipylora.engine.sweep import SweepArgs, base_from_record

        path = Path(output) / check_name(name, "sweep") / "sweep.json"
        if not path.exists():
            raise UnknownNameError(f"No sweep {name!r} in {output}/ (no {path}): start it with %lora_sweep DATASET --name {name} ...")
        record = read_json(path)
        sweep = SweepArgs(name=name, space={k: v["spec"] for k, v in record["space"].items()},
                          trials=record["trials_planned"], search=record["search"], metric=record["metric"],
                          prune=record["prune"], seed=record.get("seed", 42), line=record.get("line"))
        base = replace(base_from_record(record["base"]), output=output)
        return self.sweep(record["dataset"], sweep, base, reporter, background, resume=True)

    def _sweep_now(self, runner, blocking: bool):
        from ipylora.engine.train import StopFlag

        with self._busy.hold(blocking) as held:
            if not held:
                raise self._busy_error()
            flag = self._sweep_flag = StopFlag()
            self.sweep_state = {"name": runner.sweep.name, "trial": 0, "total": runner.sweep.trials}

            def watch(event):  # the session's view of which trial runs (busy messages, the lab panel)
                from ipylora.engine.events import TrialStart

                if isinstance(event, TrialStart):
                    self.sweep_state = {**self.sweep_state, "trial": event.trial + 1}
                if reporter is not None:
                    reporter(event)

            reporter, runner.reporter = runner.reporter, watch
            try:
                return runner.run(flag)
            finally:
                self._sweep_flag = self.sweep_state = None
                self._changed()

    def _train_now(self, data, args: TrainArgs, reporter, wait: bool, resume: bool):
        from ipylora.engine import methods
        from ipylora.engine.train import StopFlag, run_training

        if not self._busy.acquire(blocking=wait):
            raise self._busy_error()
        try:
            self._stop_flag = StopFlag()
            self.run_state = {"name": args.name, "status": "loading", "step": 0, "total": 0, "loss": [],
                              "tokens_per_s": 0.0, "eta_s": None}
            tokenizer = self._check_data(data, args, reporter)
            if args.gpus > 1:
                return self._train_distributed(data, args, reporter, resume)
            before_training(self, data, args, reporter, resume)
            self.ensure_model(args.model, args.quantization, args.trust_remote_code, tokenizer)
            if args.from_adapter and args.from_adapter not in self.adapters:
                self.load_adapter(args.from_adapter, output=args.output)  # a saved run: bring it back first
            graphdecode.release(self.model)  # chat's static cache and graph: training wants the memory
            end = run_training(self, data, args, reporter, self._stop_flag, resume)
            # Out of memory: halve the micro-batch and accumulate, so the effective batch is the
            # same, and start the run again in its folder; at the smallest micro-batch, once more with
            # the checkpointed activations in host memory; then give up.
            least = methods.get(args.method).min_micro_batch
            while end.status == "oom":
                args, notice = oom_retry(replace(args, name=end.name), least, self.device)
                if reporter is not None:
                    reporter(Notice(notice))
                end = run_training(self, data, args, reporter, self._stop_flag, reuse_dir=True)
            return end
        finally:
            self._stop_flag = None
            self._busy.release()
            self._changed()

    def _check_start(self, args: TrainArgs) -> None:
        """--from-adapter names a loaded adapter or a saved run (refused before anything loads)."""
        start = args.from_adapter
        if start is None or start in self.adapters or (Path(args.output) / start / "run.json").exists():
            return
        known = ", ".join(sorted(self.adapters)) or "none loaded"
        raise UnknownNameError(f"--from-adapter {start!r} is neither a loaded adapter ({known}) nor a run in "
                               f"{args.output}/: train it first (%lora_train DATASET --name {start}) or check %lora_runs.")

    def _check_data(self, data: LoraDataset, args: TrainArgs, reporter):
        """Tokenize the run's data with the model's tokenizer before any weights load: refuse data that
        would train on nothing, say what --max-length cuts. Returns the tokenizer (for ensure_model)."""
        from ipylora.engine import methods, models

        method = methods.get(args.method)
        # Before any notice, so a mistake is the one line the user sees.
        data.require(method.shape, who=f"--method {method.name}")
        method.check_data(args, data, self)
        if args.early_stop and "eval" not in data.splits():
            raise ConfigError("--early-stop needs an eval split: add --eval 0.1 to %%lora_dataset.")
        model_id, source = self._target_model(args.model)
        same = self.model is not None and (model_id, args.quantization) == (self.model_id, self.quantization)
        if same:
            tokenizer = self.tokenizer
        else:
            _quiet_transformers()
            tokenizer = models.load_tokenizer(source, args.trust_remote_code)
        adapters.add_tokens(tokenizer, args.lora.add_tokens)  # before tokenizing: the data may use them
        reports = data.check_trainable(tokenizer, args.max_length, shape=method.shape)
        if args.gpus > 1:  # the workers tokenize for themselves: drop the tokens kept for this process
            data.splits()["train"]._tokens = None
        lines = [(split, report.summary()) for split, report in reports.items() if report.summary()]
        if reporter is not None:
            for split, line in lines:
                reporter(Notice(message=("" if split == "train" else f"{split} split: ") + line))
        return None if same else tokenizer

    def _train_distributed(self, data, args: TrainArgs, reporter, resume: bool) -> RunEnd:
        """Train (or with `resume` continue) in `args.gpus` torchrun workers, then load the adapter here for chat."""
        from ipylora.engine.distributed import run_distributed

        end = run_distributed(self, data, args, reporter, self._stop_flag, resume)
        if end.adapter_dir:
            self._stop_flag = None  # the workers are gone: the resident model is free again
            self.ensure_model(args.model, args.quantization, args.trust_remote_code)
            if end.name in self.adapters:
                self.delete_adapter(end.name)
            self.load_adapter(end.name, output=args.output)
        return end

    def request_stop(self) -> bool:
        """Ask the running training to stop at the next step boundary; False if none runs."""
        flags = [flag for flag in (self._stop_flag, self._sweep_flag) if flag is not None]
        for flag in flags:
            flag.set("stopped")
        return bool(flags)

    @property
    def training(self) -> bool:
        return self._busy.locked() and (self._stop_flag is not None or self._sweep_flag is not None)

    def _after_run(self, name: str, run_dir: Path, dataset: LoraDataset, saved: bool) -> None:
        if saved:
            self.adapters[name] = Adapter(name, run_dir, dataset.template.source, dataset.name)
            self.active_adapter = name

    def _on_event(self, event: Event) -> None:
        if isinstance(event, StepEnd):
            state = self.run_state or {"loss": []}
            self.run_state = {
                "name": state.get("name"), "status": "running", "step": event.step, "total": event.total_steps,
                "loss": (state["loss"] + [event.loss])[-200:], "tokens_per_s": event.tokens_per_s, "eta_s": event.eta_s,
            }
        elif isinstance(event, RunEnd):
            status = {"interrupted": "stopped"}.get(event.status, event.status)
            self.run_state = {**(self.run_state or {"loss": [], "tokens_per_s": 0.0}), "name": event.name,
                              "status": status, "step": event.step, "total": event.total_steps, "eta_s": None}
        else:
            self.run_state = {"name": getattr(event, "name", None), "status": "running", "step": 0,
                              "total": getattr(event, "total_steps", 0), "loss": [], "tokens_per_s": 0.0, "eta_s": None}
        self._changed()

    # -- chat -------------------------------------------------------------------------------
    def chat(self, text: str, args: GenerateArgs = GenerateArgs(), on_text=None, raw: bool = False,
             history: list[tuple[str, str]] = (), system: str | None = None) -> dict:
        """Answer `text` after `history` with the active adapter (or `args.adapter`), as it was trained;
        `system` None: the trained system prompt, "": none (conversation.chat)."""
        return conversation.chat(self, text, args, on_text, raw, history, system)

    def start_chat(self, text: str, args: GenerateArgs = GenerateArgs(), history: list[tuple[str, str]] = (),
                   raw: bool = False, system: str | None = None) -> chat_module.Generation:
        """Like `chat`, generating in a worker thread: iterate it for text pieces, `stop()` it."""
        return conversation.start_chat(self, text, args, history, raw, system)

    def system_prompt(self, adapter: str | None = None) -> chat_module.SystemPrompt:
        """The system prompt chat sends `adapter` by default (conversation.system_prompt)."""
        return conversation.system_prompt(self, adapter)

    def prompt_format(self, adapter: str, raw: bool = False) -> chat_module.PromptFormat:
        """How prompts for `adapter` ("base": none) are built (conversation.prompt_format)."""
        return conversation.prompt_format(self, adapter, raw)

    def _chat_adapter(self, requested: str | None) -> str:
        adapter = requested or self.active_adapter or "base"
        if adapter != "base":
            self.adapter(adapter)
        return adapter

    def _reserve_model(self) -> None:
        """Take the resident model for a generation (loading the default one if none is resident)."""
        if not self._busy.acquire(blocking=False):
            if self.training:
                raise self._busy_error()
            raise SessionBusyError("An answer is being generated: press Stop in the chat (or wait for it), then run this again.")
        try:
            if self.model is None:
                self.ensure_model()
        except BaseException:
            self._busy.release()
            raise

    @contextlib.contextmanager
    def _holding_model(self):
        self._reserve_model()
        try:
            yield
        finally:
            self._busy.release()

    # -- state for front ends ---------------------------------------------------------------
    def add_listener(self, callback) -> None:
        self._listeners.append(callback)

    def remove_listener(self, callback) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def _changed(self) -> None:
        for callback in list(self._listeners):
            try:
                callback()
            except Exception:  # a broken front end must never break training
                pass

    def snapshot(self) -> dict:
        from ipylora import __version__

        model = None
        if self.model is not None:
            model = {"id": self.model_id, "dtype": self.precision.dtype, "quantization": self.quantization,
                     "device": self.device, "memory": _memory_text(self.model)}
        return {
            "version": __version__,
            "model": model,
            "datasets": [{"name": n, "rows": len(d)} for n, d in self.datasets.items()],
            "adapters": [{"name": n, "active": n == self.active_adapter} for n in self.adapters],
            "run": dict(self.run_state) if self.run_state else None,
        }

    def _check_idle(self) -> None:
        if self.training and not self._busy.held_here():
            raise self._busy_error()

    def _busy_error(self) -> SessionBusyError:
        if not self.training:  # the lock is held by a streaming chat answer
            return SessionBusyError("An answer is being generated: press Stop in the chat, or wait for it to end.")
        state = self.run_state or {}
        where = f" (step {state.get('step', 0)}/{state.get('total', '?')})" if state else ""
        sweep = self.sweep_state
        if sweep:
            return SessionBusyError(f"Sweep {sweep['name']} is running (trial {sweep['trial']}/{sweep['total']}{where}): "
                                    "run %lora_sweep --stop or wait for it to finish.")
        return SessionBusyError(f"Training is running{where}: run %lora_train --stop or wait for it to finish.")

    # -- compare, evaluate, export ------------------------------------------------------------
    def compare(self, prompts: list, adapters: list[str], args: GenerateArgs = GenerateArgs(),
                system: str | None = None) -> dict:
        """Each adapter's ("base": none) answer to each prompt, on the one resident model (conversation.compare)."""
        return conversation.compare(self, prompts, adapters, args, system)

    def evaluate(self, name: str, dataset: str, split: str = "all", args=None, output: str = "runs") -> dict:
        """Eval loss, perplexity and answer metrics of adapter `name` ("base": none) on a dataset split,
        appended to runs/NAME/eval.json (evaluate.run_eval)."""
        from ipylora.engine.evaluate import run_eval

        return run_eval(self, name, dataset, split, args, output)

    def save(self, name: str, path: str, merge: bool = False, dtype: str | None = None, output: str = "runs",
             gguf: bool = False, quant: str | None = None):
        """Write adapter `name` to `path` (PEFT format), with `merge` base + adapter as one model, with `gguf`
        as one GGUF file and an Ollama Modelfile (`quant`: f16, bf16, q8_0, q4_0) (export.save_run)."""
        from ipylora.engine.export import save_run

        return save_run(self, name, path, merge, dtype, output, gguf=gguf, quant=quant)

    def export_script(self, name: str, path: str, data: str | None = None, output: str = "runs") -> Path:
        """Write a standalone transformers + peft + trl script that retrains run `name` (export.export_script)."""
        from ipylora.engine.export import export_script

        return export_script(self, name, path, data, output)





def _memory_text(model) -> str:
    import torch

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    text = f"{params / 2**20:,.1f} MiB weights"
    if torch.cuda.is_available():
        text += f", {torch.cuda.memory_allocated() / 2**30:,.2f} GiB on GPU"
    copies = graphdecode.copies_bytes(model)
    if copies:
        text += f" ({copies / 2**30:,.2f} GiB of it the adapter merged into copies for decoding: training frees them)"
    return text


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
