"""ipywidgets forms that build magic lines: fill it in, read the equivalent line, press the button.

A form never calls the engine itself: its button runs the very `%lora_train ...` /
`%%lora_dataset ...` line it shows, so what the form does and what the notebook can reproduce
are the same thing by construction. The training form's method selector lists the registered
methods (plugins included) and shows only the knobs the selected one reads (`Method.knobs`);
its "Sweep this" button opens a sweep form (`ipylora.ui.sweep_form`) starting from its values.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import ipywidgets as w

from ipylora.engine import get_session, methods

PRESETS = {
    "defaults (chosen for the model)": {},
    "seed recipe: QLoRA r=64 alpha=16 dropout=0.1": {"quantization": "4bit", "r": 64, "alpha": 16.0, "dropout": 0.1},
    "quick check: 20 steps": {"steps": 20},
}


def _flag(name: str, value) -> str:
    return f"--{name} {shlex.quote(str(value))}"


class TrainForm(w.VBox):
    """A form for %lora_train; `.line` is the equivalent magic line, `.train()` runs it, `.sweep()` opens a
    sweep form from its values."""

    def __init__(self, shell=None, dataset: str | None = None):
        from IPython import get_ipython

        self.shell = shell or get_ipython()
        names = sorted(get_session().datasets)
        style = {"description_width": "110px"}
        self.dataset = w.Dropdown(options=names, value=dataset if dataset in names else (names[0] if names else None),
                                  description="dataset", style=style)
        self.name = w.Text(placeholder="(dataset name)", description="run name", style=style)
        self.model = w.Text(placeholder="(resident, else embedded tiny model)", description="model", style=style)
        self.quantization = w.Dropdown(options=["none", "4bit", "8bit"], description="quantization", style=style)
        self.r = w.IntText(0, description="LoRA r", style=style)
        self.alpha = w.FloatText(0, description="LoRA alpha", style=style)
        self.dropout = w.FloatText(-1, description="LoRA dropout", style=style)
        self.targets = w.Text(placeholder="all-linear", description="target modules", style=style)
        self.dora = w.Checkbox(False, description="DoRA", indent=False, layout=w.Layout(width="80px"))
        self.rslora = w.Checkbox(False, description="rsLoRA", indent=False, layout=w.Layout(width="90px"))
        self.init = w.Dropdown(options=["default", "gaussian", "pissa", "olora", "loftq"], description="init",
                               style=style)
        self.loraplus = w.FloatText(0, description="LoRA+ ratio", style=style)
        self.neftune = w.FloatText(0, description="NEFTune alpha", style=style)
        self.modules_to_save = w.Text(placeholder="embed_tokens,lm_head", description="train in full", style=style)
        self.add_tokens = w.Text(placeholder="<think>,</think>", description="new tokens", style=style)
        self.variants = [self.dora, self.rslora, self.init, self.loraplus, self.neftune, self.modules_to_save,
                         self.add_tokens]
        self.lr = w.FloatText(0, description="learning rate", style=style)
        self.epochs = w.FloatText(0, description="epochs", style=style)
        self.steps = w.IntText(0, description="steps", style=style)
        self.batch = w.IntText(0, description="batch size", style=style)
        self.max_length = w.IntText(1024, description="max length", style=style)
        self.eval_every = w.IntText(0, description="eval every", style=style)
        self.method = w.Dropdown(options=methods.names(), value="sft", description="method", style=style)
        self.beta = w.FloatText(0, description="beta", style=style)
        self.loss_type = w.Combobox(placeholder="sigmoid", description="loss type", style=style, ensure_option=False)
        self.gamma = w.FloatText(-1, description="gamma", style=style)
        self.from_adapter = w.Dropdown(options=["", *sorted(get_session().adapters)], description="from adapter",
                                       style=style)
        self.rewards = w.Text(placeholder="fn, exact:answer:0.5", description="rewards", style=style)
        self.num_generations = w.IntText(0, description="generations", style=style)
        self.max_completion = w.IntText(0, description="max completion", style=style)
        self.temperature = w.FloatText(0, description="temperature", style=style)
        self.knobs = {"beta": self.beta, "loss_type": self.loss_type, "gamma": self.gamma, "rewards": self.rewards,
                      "num_generations": self.num_generations, "max_completion_length": self.max_completion,
                      "temperature": self.temperature}
        self.background = w.Checkbox(True, description="in the background (Stop button)", indent=False)
        self.preset = w.Dropdown(options=list(PRESETS), description="preset", style=style)
        self.shown = w.HTML()
        self.button = w.Button(description="Train", button_style="primary", icon="play")
        self.sweep_button = w.Button(description="Sweep this", icon="sliders",
                                     tooltip="A sweep form starting from these values, each fixed: vary some")
        self.output = w.Output()
        hint = w.HTML("<small>0 or empty: the default chosen for the model (gamma: -1).</small>")
        fields = [self.dataset, self.name, self.model, self.quantization, self.r, self.alpha, self.dropout,
                  self.targets, self.lr, self.epochs, self.steps, self.batch, self.max_length, self.eval_every]
        method_fields = [self.method, self.from_adapter, *self.knobs.values()]
        for field in [*fields, *method_fields, *self.variants, self.background]:
            field.observe(lambda _change: self._refresh(), names="value")
        self.method.observe(lambda _change: self._show_knobs(), names="value")
        self.preset.observe(self._apply_preset, names="value")
        self.button.on_click(lambda _button: self.train())
        self.sweep_button.on_click(lambda _button: self.sweep())
        self.sweep_form = None  # the SweepForm "Sweep this" opened last
        variants = w.Accordion([w.VBox([w.HBox([self.dora, self.rslora, self.init]), w.HBox([self.loraplus, self.neftune]),
                                        w.HBox([self.modules_to_save, self.add_tokens])])])
        variants.set_title(0, "LoRA variant")
        variants.selected_index = None
        super().__init__([self.preset, w.HBox(method_fields), w.HBox([w.VBox(fields[:7]), w.VBox(fields[7:])]), variants,
                          hint,
                          self.background, self.shown, w.HBox([self.button, self.sweep_button]), self.output])
        self._show_knobs()
        self._refresh()

    @property
    def line(self) -> str:
        """The %lora_train line this form stands for."""
        parts = [self.dataset.value or "DATASET"]
        for field, value in self.options().items():
            if field == "quantization":
                parts.append(f"--{value}")
            elif field == "rewards":  # GRPO: each reward spec as its own --reward
                parts += [_flag("reward", spec) for spec in value]
            elif value is True:  # a switch: --dora
                parts.append(f"--{field.replace('_', '-')}")
            else:
                parts.append(_flag(field.replace("_", "-"), value))
        if self.background.value:
            parts.append("--background")
        return "%lora_train " + " ".join(parts)

    def options(self) -> dict:
        """The options set away from their defaults, by TrainArgs field name, in the line's order."""
        options = {}
        for field, box in (("name", self.name), ("model", self.model), ("target_modules", self.targets)):
            if box.value.strip():
                options[field] = box.value.strip()
        if self.quantization.value != "none":
            options["quantization"] = self.quantization.value
        numbers = {"r": self.r, "alpha": self.alpha, "lr": self.lr, "epochs": self.epochs, "steps": self.steps,
                   "batch_size": self.batch, "eval_every": self.eval_every}
        options.update({field: box.value for field, box in numbers.items() if box.value > 0})
        if self.dropout.value >= 0:
            options["dropout"] = self.dropout.value
        if self.max_length.value != 1024:
            options["max_length"] = self.max_length.value
        options.update({field: True for field, box in (("dora", self.dora), ("rslora", self.rslora)) if box.value})
        if self.init.value != "default":
            options["init"] = self.init.value
        for field, box in (("loraplus_ratio", self.loraplus), ("neftune", self.neftune)):
            if box.value > 0:
                options[field] = box.value
        for field, box in (("modules_to_save", self.modules_to_save), ("add_tokens", self.add_tokens)):
            if box.value.strip():
                options[field] = box.value.strip()
        options.update(self._method_options())
        return options

    def train(self) -> None:
        """Run the shown line, exactly as if it were typed in a cell."""
        self.output.clear_output()
        with self.output:
            self.shell.run_line_magic("lora_train", self.line[len("%lora_train "):])

    def sweep(self) -> None:
        """Show, under the form, a sweep form that starts from this form's values (each one fixed)."""
        from IPython.display import display

        from ipylora.ui.sweep_form import SweepForm

        self.sweep_form = SweepForm(shell=self.shell, dataset=self.dataset.value, values=self.options())
        self.output.clear_output()
        with self.output:
            display(self.sweep_form)

    def _method_options(self) -> dict:
        """method and the selected method's knobs that differ from its default."""
        name = self.method.value
        options = {"method": name} if name != "sft" else {}
        if self.from_adapter.value:
            options["from_adapter"] = self.from_adapter.value
        knobs = methods.get(name).knobs
        if "beta" in knobs and self.beta.value > 0:
            options["beta"] = self.beta.value
        if "loss_type" in knobs and self.loss_type.value.strip() not in ("", knobs["loss_type"]):
            options["loss_type"] = self.loss_type.value.strip()
        if "gamma" in knobs and self.gamma.value >= 0:
            options["gamma"] = self.gamma.value
        if "rewards" in knobs:  # GRPO: reward specs, comma- or space-separated
            rewards = self.rewards.value.replace(",", " ").split()
            if rewards:
                options["rewards"] = rewards
        for field in ("num_generations", "max_completion_length", "temperature"):
            box = self.knobs[field]
            if field in knobs and box.value > 0 and box.value != knobs[field]:
                options[field] = box.value
        return options

    def _show_knobs(self) -> None:
        """Only the knobs the selected method reads are on screen; each says its default."""
        knobs = methods.get(self.method.value).knobs
        for field, box in self.knobs.items():
            box.layout.display = None if field in knobs else "none"
            if field in knobs and field != "rewards":
                label = {"num_generations": "generations", "max_completion_length": "max completion"}.get(field, field)
                box.description = f"{label.replace('_', ' ')} ({knobs[field]})"  # the selected method's default
        if "loss_type" in knobs and self.method.value in ("dpo", "grpo"):
            # TRL's own list for the method (imports trl: only when such a method is picked).
            if self.method.value == "dpo":
                from ipylora.engine.methods.preference import dpo_loss_types as loss_types
            else:
                from ipylora.engine.methods.grpo import loss_types
            self.loss_type.options = tuple(loss_types())
            self.loss_type.placeholder = str(knobs["loss_type"])

    def _refresh(self) -> None:
        self.shown.value = f"<code>{self.line}</code>"

    def _apply_preset(self, change) -> None:
        boxes = {"quantization": self.quantization, "r": self.r, "alpha": self.alpha, "dropout": self.dropout,
                 "steps": self.steps}
        for key, value in PRESETS[change["new"]].items():
            boxes[key].value = value


class DatasetForm(w.VBox):
    """A form for %%lora_dataset: paste data or upload a file; `.cell` is the equivalent cell."""

    def __init__(self, shell=None, folder: str = "data"):
        from IPython import get_ipython

        self.shell = shell or get_ipython()
        self.folder = Path(folder)
        style = {"description_width": "80px"}
        self.name = w.Text("my_data", description="name", style=style)
        self.text = w.Textarea(placeholder="paste CSV, a JSON list or JSON lines", description="data",
                               layout=w.Layout(width="95%", height="140px"), style=style)
        self.upload = w.FileUpload(accept=".csv,.tsv,.json,.jsonl,.parquet", multiple=False, description="upload")
        self.prompt = w.Text(placeholder="{column} (empty: first column)", description="prompt", style=style)
        self.response = w.Text(placeholder="{column} (empty: second column)", description="response", style=style)
        self.template = w.Combobox(value="human-assistant", options=["human-assistant", "alpaca", "plain"],
                                   description="template", style=style)
        self.shown = w.HTML()
        self.button = w.Button(description="Create dataset", button_style="primary")
        self.output = w.Output()
        for field in (self.name, self.text, self.prompt, self.response, self.template):
            field.observe(lambda _change: self._refresh(), names="value")
        self.upload.observe(self._save_upload, names="value")
        self.button.on_click(lambda _button: self.create())
        self.uploaded: Path | None = None
        super().__init__([self.name, self.text, self.upload, self.prompt, self.response, self.template,
                          self.shown, self.button, self.output])
        self._refresh()

    @property
    def line(self) -> str:
        parts = [self.name.value.strip() or "NAME"]
        if self.uploaded is not None:
            parts.append(_flag("from", self.uploaded.as_posix()))
        for flag, box in (("prompt", self.prompt), ("response", self.response)):
            if box.value.strip():
                parts.append(_flag(flag, box.value))
        if self.template.value.strip() and self.template.value != "human-assistant":
            parts.append(_flag("template", self.template.value))
        return " ".join(parts)

    @property
    def cell(self) -> str:
        """The %%lora_dataset cell (or %lora_dataset line, for an upload) this form stands for."""
        if self.uploaded is not None:
            return f"%lora_dataset {self.line}"
        return f"%%lora_dataset {self.line}\n{self.text.value.strip()}"

    def create(self) -> None:
        self.output.clear_output()
        with self.output:
            if self.uploaded is not None:
                self.shell.run_line_magic("lora_dataset", self.line)
            else:
                self.shell.run_cell_magic("lora_dataset", self.line, self.text.value)

    def _save_upload(self, change) -> None:
        files = change["new"]
        if not files:
            return
        upload = files[0]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.uploaded = self.folder / Path(upload["name"]).name
        self.uploaded.write_bytes(bytes(upload["content"]))
        self._refresh()

    def _refresh(self) -> None:
        import html

        self.shown.value = f"<pre>{html.escape(self.cell)}</pre>"
