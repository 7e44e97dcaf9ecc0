"""The sweep form: pick what varies and how, read the equivalent `%lora_sweep` line, press Start.

Like the training form (`ipylora.ui.forms`), it never calls the engine: Start runs the very line
it shows, so a sweep started here can be typed again from the notebook. Each sweepable option
(`ipylora.engine.sweep.TUNABLE`) has a mode, default (left out), fixed (`r=16`), list
(`lr=1e-4,2e-4`) or range (`lr=1e-5..1e-3:log`), and a text box; typing into the box of a
default one picks the mode the text reads as. The common options are on screen, the rarer ones
folded away, and a method's own knobs (beta, loss type, ...) appear only for the methods that
read them. Specs are checked as the engine parses them, so a bad one says why under the line.
"""

from __future__ import annotations

import html
import shlex

import ipywidgets as w

from ipylora.engine import get_session, methods
from ipylora.engine.errors import ConfigError
from ipylora.engine.sweep import PRUNERS, SEARCHES, TUNABLE, parse_param

MODES = ("default", "fixed", "list", "range")
COMMON = ("lr", "r", "alpha", "dropout", "epochs", "steps", "batch_size", "warmup_ratio", "scheduler", "max_length")
METRICS = ("eval_loss", "train_loss", "eval:rouge_l", "eval:exact_match", "eval:f1")
# Form values that are their own controls, not sweep parameters.
OWN = ("dataset", "name", "model", "quantization", "method")


def _method_knobs() -> set[str]:
    """Sweepable options that only some methods read (DPO's beta, GRPO's temperature, ...)."""
    return {knob for name in methods.names() for knob in methods.get(name).knobs} & set(TUNABLE)


def _listed(name: str, value) -> bool:
    """A fixed value a spec would read as a list (`target_modules=q_proj,v_proj`): it goes as a flag instead."""
    return name in TUNABLE and TUNABLE[name][0] is str and "," in _text(value)


def _flag(name: str, value) -> str:
    flag = f"--{name.replace('_', '-')}"
    return flag if value is True else f"{flag} {shlex.quote(_text(value))}"  # a switch (--dora) takes no value


def _text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


class ParamRow(w.HBox):
    """One sweepable option: its mode and its values; `.spec` is what goes after `NAME=` (None: left out)."""

    def __init__(self, name: str):
        self.param = name
        kind = TUNABLE[name][0]
        modes = [m for m in MODES if m != "range" or kind is not str]  # names have no range
        self.mode = w.Dropdown(options=modes, value="default", layout=w.Layout(width="90px"))
        self.text = w.Text(layout=w.Layout(width="180px"))
        self.label = w.Label(name, layout=w.Layout(width="160px"))
        self.mode.observe(lambda _change: self._placeholder(), names="value")
        self.text.observe(self._guess_mode, names="value")
        super().__init__([self.label, self.mode, self.text])
        self._placeholder()

    @property
    def spec(self) -> str | None:
        text = self.text.value.strip()
        if self.mode.value == "default" or not text:
            return None
        if self.mode.value == "range" and ".." not in text:
            ends = text.replace(",", " ").split()
            if len(ends) == 2:  # "1e-5, 1e-3" read as the range's two ends
                return f"{ends[0]}..{ends[1]}"
        if self.mode.value == "list":
            return ",".join(text.replace(",", " ").split())
        return text

    def set_fixed(self, value) -> None:
        self.text.value = _text(value)
        self.mode.value = "fixed"

    def problem(self) -> str | None:
        """What the engine would say about this spec, or None."""
        spec = self.spec
        if spec is None:
            return None
        try:
            param = parse_param(self.param, spec)
        except ConfigError as exc:
            return str(exc)
        if self.mode.value == "fixed" and not param.fixed:
            return f"{self.param}={spec}: a fixed value is one value; use the list mode for several."
        return None

    def _placeholder(self) -> None:
        kind = TUNABLE[self.param][0]
        example = {"lr": ("2e-4", "1e-4,2e-4,5e-4", "1e-5..1e-3:log"), "scheduler": ("cosine", "cosine,constant", ""),
                   "target_modules": ("all-linear", "all-linear,q_proj", "")}.get(
            self.param, ("16", "8,16,32", "8..64:log") if kind is int else ("0.1", "0.0,0.05,0.1", "0.0..0.2"))
        self.text.placeholder = {"default": "(default)", "fixed": example[0], "list": example[1],
                                 "range": example[2]}[self.mode.value]

    def _guess_mode(self, change) -> None:
        text = change["new"].strip()
        if self.mode.value == "default" and text:
            guess = "range" if ".." in text else "list" if "," in text else "fixed"
            if guess in self.mode.options:
                self.mode.value = guess


class SweepForm(w.VBox):
    """A form for %lora_sweep; `.line` is the equivalent magic line, `.start()` runs it, `.stop()` stops it.

    `values`: option values to prefill as fixed (TUNABLE names), and dataset, name, model,
    quantization ("4bit"/"8bit"), method; any other %lora_train option (from_adapter, rewards, ...)
    goes, as its flag, into the "other options" box that every trial gets as it is.
    """

    def __init__(self, shell=None, dataset: str | None = None, values: dict | None = None):
        from IPython import get_ipython

        self.shell = shell or get_ipython()
        values = dict(values or {})
        dataset = values.pop("dataset", dataset)
        names = sorted(get_session().datasets)
        if dataset and dataset not in names:
            names.append(dataset)  # prefilled from a line or form before the dataset is (re)made
        style = {"description_width": "110px"}
        self.dataset = w.Dropdown(options=names, value=dataset if dataset in names else (names[0] if names else None),
                                  description="dataset", style=style)
        self.name = w.Text(str(values.pop("name", "") or ""), placeholder="(DATASET-sweep)", description="sweep name",
                           style=style)
        self.model = w.Text(str(values.pop("model", "") or ""), placeholder="(resident, else embedded tiny model)",
                            description="model", style=style)
        quantization = values.pop("quantization", None) or "none"
        self.quantization = w.Dropdown(options=["none", "4bit", "8bit"], value=quantization,
                                       description="quantization", style=style)
        method = values.pop("method", None) or "sft"
        self.method = w.Dropdown(options=methods.names(), value=method, description="method", style=style)
        self.search = w.Dropdown(options=SEARCHES, value="grid", description="search", style=style)
        self.trials = w.IntText(0, description="trials", style=style)
        self.metric = w.Combobox(options=METRICS, placeholder="(eval_loss with an eval split, else train_loss)",
                                 description="metric", style=style, ensure_option=False)
        self.prune = w.Dropdown(options=PRUNERS, value="none", description="prune", style=style)
        self.extra = w.Text(" ".join(self._pass_through(values)), placeholder="--eval-every 10 --seed 1",
                            description="other options", style=style, layout=w.Layout(width="95%"))
        self.background = w.Checkbox(True, description="in the background (Stop button)", indent=False)
        knobs = _method_knobs()
        # On screen and in the line in this order: the common options, the method's knobs, the rest.
        order = [*(n for n in COMMON if n in TUNABLE), *(n for n in TUNABLE if n in knobs),
                 *(n for n in TUNABLE if n not in COMMON and n not in knobs)]
        self.params = {name: ParamRow(name) for name in order}
        for name, value in values.items():
            if name in self.params and value is not None and not _listed(name, value):
                self.params[name].set_fixed(value)
        self.shown = w.HTML()
        self.problems = w.HTML()
        self.button = w.Button(description="Start sweep", button_style="primary", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop")
        self.output = w.Output()

        self.knob_rows = [self.params[name] for name in order if name in knobs]
        common = [self.params[name] for name in COMMON if name in self.params]
        rest = [row for name, row in self.params.items() if name not in COMMON and name not in knobs]
        more = w.Accordion([w.VBox(rest)])
        more.set_title(0, "more parameters")
        more.selected_index = 0 if any(row.mode.value != "default" for row in rest) else None
        half = (len(common) + 1) // 2
        for field in (self.dataset, self.name, self.model, self.quantization, self.method, self.search, self.trials,
                      self.metric, self.prune, self.extra, self.background):
            field.observe(lambda _change: self._refresh(), names="value")
        for row in self.params.values():
            for box in (row.mode, row.text):
                box.observe(lambda _change: self._refresh(), names="value")
        self.method.observe(lambda _change: self._show_knobs(), names="value")
        self.button.on_click(lambda _button: self.start())
        self.stop_button.on_click(lambda _button: self.stop())
        hint = w.HTML("<small>Per parameter: default (left out), fixed (one value), list (comma-separated) or "
                      "range (low..high, :log for a log scale, :int for whole numbers). A grid needs lists or "
                      "integer ranges; random and TPE sample ranges too. trials 0: the whole grid, or 10.</small>")
        super().__init__([
            w.HBox([w.VBox([self.dataset, self.name, self.model]), w.VBox([self.quantization, self.method])]),
            w.HBox([w.VBox(common[:half]), w.VBox(common[half:])]), w.VBox(self.knob_rows), more,
            w.HBox([w.VBox([self.search, self.trials]), w.VBox([self.metric, self.prune])]), self.extra, hint,
            self.background, self.shown, self.problems, w.HBox([self.button, self.stop_button]), self.output,
        ])
        self._show_knobs()
        self._refresh()

    @property
    def line(self) -> str:
        """The %lora_sweep line this form stands for."""
        dataset = self.dataset.value or "DATASET"
        parts = [dataset, _flag("name", self.name.value.strip() or f"{dataset}-sweep")]
        if self.model.value.strip():
            parts.append(_flag("model", self.model.value.strip()))
        if self.quantization.value != "none":
            parts.append(f"--{self.quantization.value}")
        if self.method.value != "sft":
            parts.append(_flag("method", self.method.value))
        if self.search.value != "grid":
            parts.append(_flag("search", self.search.value))
        if self.trials.value > 0:
            parts.append(_flag("trials", self.trials.value))
        if self.metric.value.strip():
            parts.append(_flag("metric", self.metric.value.strip()))
        if self.prune.value != "none":
            parts.append(_flag("prune", self.prune.value))
        if self.background.value:
            parts.append("--background")
        parts += [shlex.quote(f"{name}={spec}") for name, spec in self.space.items()]
        if self.extra.value.strip():
            parts.append(self.extra.value.strip())  # typed as flags: passed on as they are
        return "%lora_sweep " + " ".join(parts)

    @property
    def space(self) -> dict[str, str]:
        """Option -> spec for every parameter not left at its default (knobs only of the selected method)."""
        return {name: row.spec for name, row in self.params.items() if self._applies(name) and row.spec is not None}

    def start(self) -> None:
        """Run the shown line, exactly as if it were typed in a cell."""
        self.output.clear_output()
        with self.output:
            self.shell.run_line_magic("lora_sweep", self.line[len("%lora_sweep "):])

    def stop(self) -> None:
        with self.output:
            self.shell.run_line_magic("lora_sweep", "--stop")

    def _applies(self, name: str) -> bool:
        return name not in _method_knobs() or name in methods.get(self.method.value).knobs

    @staticmethod
    def _pass_through(values: dict) -> list[str]:
        """Options that are not sweep parameters nor own controls, as %lora_train flags."""
        flags = []
        for name, value in values.items():
            if (name in TUNABLE and not _listed(name, value)) or name in OWN or value is None:
                continue
            if name == "rewards":  # one --reward per reward spec, as %lora_train takes them
                flags += [_flag("reward", spec) for spec in value]
            else:
                flags.append(_flag(name, value))
        return flags

    def _show_knobs(self) -> None:
        knobs = methods.get(self.method.value).knobs
        for row in self.knob_rows:
            row.layout.display = None if row.param in knobs else "none"
            if row.param in knobs:
                row.label.value = f"{row.param} ({knobs[row.param]})"  # the selected method's default
        self._refresh()

    def _refresh(self) -> None:
        self.shown.value = f"<code>{html.escape(self.line)}</code>"
        problems = [problem for name, row in self.params.items() if self._applies(name)
                    for problem in [row.problem()] if problem]
        if self.search.value == "grid":
            for name, spec in self.space.items():
                try:
                    parse_param(name, spec).grid()
                except ConfigError as exc:
                    problems.append(str(exc))
        if not problems and all(parse_param(name, spec).fixed for name, spec in self.space.items()):
            problems.append("Nothing varies yet: give a parameter a list or a range (e.g. lr=1e-4,2e-4,5e-4).")
        self.problems.value = "".join(f"<div style='color:#b00'>⚠ {html.escape(problem)}</div>"
                                      for problem in dict.fromkeys(problems))  # each once
