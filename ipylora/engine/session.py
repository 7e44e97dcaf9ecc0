"""The one piece of kernel state: the resident base model, named datasets, adapters and runs.

A `Session` loads the base model once and keeps it; a second training run or a chat reuses it,
and only a different model id or quantization triggers a reload. Adapters live side by side in
one PeftModel, so switching between them (or back to the base) costs nothing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from pathlib import Path

from ipylora.engine import chat as chat_module
from ipylora.engine.config import DataArgs, GenerateArgs, LoraArgs, TrainArgs, resolve
from ipylora.engine.data import LoraDataset
from ipylora.engine.errors import ConfigError, SessionBusyError, UnknownNameError
from ipylora.engine.events import Event, RunEnd, StepEnd
from ipylora.engine.runs import check_name
from ipylora.engine.templates import get_template
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
    """A training running in a background thread: `join()` it, or read `result` / `error` when `done`."""

    def __init__(self, name: str):
        self.name = name
        self.result: RunEnd | None = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, work) -> None:
        def run():
            try:
                self.result = work()
            except BaseException as exc:  # kept for the caller: a thread has nobody to raise to
                self.error = exc

        self._thread = threading.Thread(target=run, name=f"ipylora-train-{self.name}", daemon=True)
        self._thread.start()

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def join(self, timeout: float | None = None) -> RunEnd | None:
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.result


@dataclass
class Adapter:
    name: str
    run_dir: Path
    template: str
    dataset: str


class Session:
    """Resident model + tokenizer, datasets, adapters; the engine's entry point."""

    def __init__(self):
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
        self._tiny_tokenizer = None
        self._listeners: list = []
        self._busy = threading.Lock()

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
                     trust_remote_code: bool = False) -> None:
        """Load the base model unless the same one is already resident."""
        from ipylora.engine import models

        model_id, source = self._target_model(model)
        if self.model is not None and (model_id, quantization) == (self.model_id, self.quantization):
            return
        self._drop_model()
        _quiet_transformers()
        device = models.device_name()
        precision = models.choose_precision(device, None)
        tokenizer = models.load_tokenizer(source, trust_remote_code)
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
        from ipylora.engine.models import free_memory

        self.model = self.tokenizer = None
        self.model_id = None
        self.adapters.clear()
        self.active_adapter = None
        free_memory()
        self._changed()

    @property
    def is_tiny(self) -> bool:
        return self.model_id == TINY_MODEL_ID

    # -- adapters ---------------------------------------------------------------------------
    def attach_adapter(self, name: str, lora: LoraArgs):
        """A fresh trainable LoRA adapter `name` on the resident model (replacing one of that name)."""
        from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

        config = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none", task_type="CAUSAL_LM",
            target_modules=_targets(lora.target_modules),
        )
        if isinstance(self.model, PeftModel) and name in self.model.peft_config:
            if len(self.model.peft_config) == 1:
                self.model = self.model.unload()
            else:
                other = next(n for n in self.model.peft_config if n != name)
                self.model.set_adapter(other)
                self.model.delete_adapter(name)
            self.adapters.pop(name, None)
        if not isinstance(self.model, PeftModel):
            if self.quantization:
                self.model = prepare_model_for_kbit_training(self.model, use_gradient_checkpointing=False)
            self.model = get_peft_model(self.model, config, adapter_name=name)
        else:
            self.model.add_adapter(name, config)
        self.model.set_adapter(name)
        for param_name, param in self.model.named_parameters():
            param.requires_grad = "lora_" in param_name and f".{name}." in param_name
        return self.model

    def use_adapter(self, name: str) -> None:
        """Make `name` the adapter chat uses by default; "base" for none."""
        if name != "base":
            self.adapter(name)
        self.active_adapter = None if name == "base" else name
        self._changed()

    def load_adapter(self, source: str, name: str | None = None, output: str = "runs") -> str:
        """Load a saved adapter (a run name under `output`, or a PEFT folder) into the resident model."""
        from peft import PeftModel

        from ipylora.engine.runs import adapter_dir, read_json

        self._check_idle()
        run_dir = Path(output) / source
        folder = adapter_dir(run_dir) if (run_dir / "run.json").exists() else Path(source)
        if folder is None or not (folder / "adapter_config.json").exists():
            raise UnknownNameError(f"No saved adapter at {source!r}: give a run name from %lora_runs or a PEFT folder.")
        record = read_json(run_dir / "run.json") if (run_dir / "run.json").exists() else {}
        name = check_name(name or record.get("name") or folder.name, "adapter")
        if record.get("model_source") and self.model is None:
            self.ensure_model(record.get("model") if record.get("model") != TINY_MODEL_ID else None,
                              record.get("quantization"))
        self.ensure_model()
        if isinstance(self.model, PeftModel):
            if name in self.model.peft_config:
                raise ConfigError(f"Adapter {name!r} is already loaded: delete it first or pass another name.")
            self.model.load_adapter(str(folder), adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name)
        dataset = record.get("dataset", {})
        self.adapters[name] = Adapter(name, run_dir if record else folder, dataset.get("template", "{prompt}{response}"),
                                      dataset.get("name", ""))
        self.active_adapter = name
        self._changed()
        return name

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` from the resident model (its saved copy on disk stays)."""
        self._check_idle()
        self.adapter(name)
        if len(self.model.peft_config) == 1:
            self.model = self.model.unload()
        else:
            if self.model.active_adapter == name:
                self.model.set_adapter(next(n for n in self.model.peft_config if n != name))
            self.model.delete_adapter(name)
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.adapters), None)
        self._changed()

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
        model_id, _ = self._target_model(args.model)
        args = resolve(args, tiny=model_id == TINY_MODEL_ID)
        if not background:
            return self._train_now(data, args, reporter, wait, resume)
        if not wait and self._busy.locked():
            raise self._busy_error()
        handle = RunHandle(args.name)
        self.background_run = handle
        handle.start(lambda: self._train_now(data, args, reporter, True, resume))
        return handle

    def resume(self, name: str, output: str = "runs", reporter=None, background: bool = False, wait: bool = False):
        """Continue run `name` from its last checkpoint with the config recorded in its run.json."""
        from ipylora.engine.runs import read_json

        path = Path(output) / check_name(name, "run") / "run.json"
        if not path.exists():
            raise UnknownNameError(f"No run {name!r} in {output}/ to resume: %lora_runs lists the runs.")
        record = read_json(path)
        train = {**record["train"], "samples": tuple(record["train"].get("samples") or ())}
        args = TrainArgs(**{**train, "lora": LoraArgs(**record["lora"])})
        return self.train(record["dataset"]["name"], args, reporter, background, wait, resume=True)

    def _train_now(self, data, args: TrainArgs, reporter, wait: bool, resume: bool):
        from ipylora.engine.train import StopFlag, run_training

        if not self._busy.acquire(blocking=wait):
            raise self._busy_error()
        try:
            self._stop_flag = StopFlag()
            self.run_state = {"name": args.name, "status": "loading", "step": 0, "total": 0, "loss": [],
                              "tokens_per_s": 0.0, "eta_s": None}
            self.ensure_model(args.model, args.quantization, args.trust_remote_code)
            return run_training(self, data, args, reporter, self._stop_flag, resume)
        finally:
            self._stop_flag = None
            self._busy.release()
            self._changed()

    def request_stop(self) -> bool:
        """Ask the running training to stop at the next step boundary; False if none runs."""
        flag = self._stop_flag
        if flag is None:
            return False
        flag.set("stopped")
        return True

    @property
    def training(self) -> bool:
        return self._busy.locked() and self._stop_flag is not None

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
    def chat(self, text: str, args: GenerateArgs = GenerateArgs(), on_text=None, raw: bool = False) -> dict:
        """Answer `text` with the active adapter (or `args.adapter`), in its training template."""
        if not self._busy.acquire(blocking=False):
            raise self._busy_error()
        try:
            self.ensure_model()
            adapter = args.adapter or self.active_adapter or "base"
            if adapter != "base":
                self.adapter(adapter)
            prompt = text if raw else self._template_for(adapter).prompt_text(text)
            return chat_module.generate(self.model, self.tokenizer, prompt, args, adapter, on_text)
        finally:
            self._busy.release()

    def _template_for(self, adapter: str):
        if adapter != "base":
            return get_template(self.adapters[adapter].template)
        if self.datasets:  # the base answers in the format the user is about to train on
            return list(self.datasets.values())[-1].template
        return get_template("plain")

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
        if self._busy.locked() and self._stop_flag is not None:
            raise self._busy_error()

    def _busy_error(self) -> SessionBusyError:
        state = self.run_state or {}
        where = f" (step {state.get('step', 0)}/{state.get('total', '?')})" if state else ""
        return SessionBusyError(f"Training is running{where}: run %lora_train --stop or wait for it to finish.")


def _targets(spec: str):
    return spec if spec == "all-linear" else [t.strip() for t in spec.split(",") if t.strip()]


def _memory_text(model) -> str:
    import torch

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    text = f"{params / 2**20:,.1f} MiB weights"
    if torch.cuda.is_available():
        text += f", {torch.cuda.memory_allocated() / 2**30:,.2f} GiB on GPU"
    return text


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
