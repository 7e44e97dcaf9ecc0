"""The live training panel: a loss plot, a progress line, samples and (in background) a Stop button.

Each artifact is one display handle, created up front by the main thread and updated in place,
throttled, so a saved notebook keeps exactly one final frame of each. The plot is drawn with
matplotlib's object API on an Agg canvas, not pyplot, so the training thread can draw it safely.

A method's own metrics (`StepEnd.metrics`, by label: DPO's chosen/rejected reward margin, KTO's
KL) get a panel of their own under the loss; shares (labels naming an accuracy) are read better
as a number, so they go in the progress line only.
"""

from __future__ import annotations

import html
import io
import time
from datetime import timedelta

from IPython.display import display

from ipylora.engine.events import EvalEnd, Event, Notice, RunEnd, RunStart, Sample, StepEnd
from ipylora.ui.render import Rendered


def plotted(curves: dict) -> list[str]:
    """The method metrics drawn under the loss (not the shares, which the progress line gives)."""
    return [label for label in curves.get("metrics", {}) if "accuracy" not in label]


def loss_png(curves: dict, title: str, lrs: list[float] | None = None) -> bytes:
    """Train (and eval) loss by step, the method's metrics under it, the learning rate in a thin panel underneath."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = plotted(curves)
    figure = Figure(figsize=(6.4, 4.6 if labels else 3.4), dpi=80)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(3 if labels else 2, 1, height_ratios=(4, 2, 1) if labels else (4, 1), hspace=0.08)
    axes = figure.add_subplot(grid[0])
    axes.plot(curves["steps"], curves["loss"], color="#1f77b4", linewidth=1.2, label="train loss")
    if curves.get("eval_steps"):
        axes.plot(curves["eval_steps"], curves["eval_loss"], "o-", color="#d62728", linewidth=1.2,
                  markersize=3, label="eval loss")
    axes.set_ylabel("loss")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right", fontsize=8)
    axes.tick_params(labelbottom=not lrs and not labels)
    if labels:
        metric_axes = figure.add_subplot(grid[1], sharex=axes)
        for label, color in zip(labels, ("#9467bd", "#ff7f0e", "#8c564b", "#e377c2")):
            metric_axes.plot(curves["metric_steps"][label], curves["metrics"][label], color=color, linewidth=1.2,
                             label=label)
        metric_axes.axhline(0.0, color="#999999", linewidth=0.6)
        metric_axes.legend(loc="upper left", fontsize=8)
        metric_axes.tick_params(labelsize=7, labelbottom=not lrs)
        metric_axes.grid(alpha=0.3)
    if lrs:
        lr_axes = figure.add_subplot(grid[-1], sharex=axes)
        lr_axes.plot(curves["steps"], lrs, color="#2ca02c", linewidth=1.0)
        lr_axes.set_ylabel("lr", fontsize=8)
        lr_axes.tick_params(labelsize=7)
        lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        lr_axes.grid(alpha=0.3)
        lr_axes.set_xlabel("step")
    else:
        axes.set_xlabel("step")
    figure.subplots_adjust(left=0.11, right=0.97, top=0.9, bottom=0.14)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


class LossPlot:
    """The panel's plot: PNG for notebooks, and a text line that says what was drawn."""

    def __init__(self, curves: dict, title: str, lrs: list[float] | None = None):
        self._png = loss_png(curves, title, lrs)
        evals = f", eval loss ({len(curves['eval_steps'])} points)" if curves.get("eval_steps") else ""
        evals += "".join(f", {label} ({len(curves['metrics'][label])} points)" for label in plotted(curves))
        self._text = f"<loss plot: {title}: train loss ({len(curves['steps'])} points){evals}>"

    def _repr_png_(self) -> bytes:
        return self._png

    def __repr__(self) -> str:
        return self._text


def duration(seconds: float | None) -> str:
    return str(timedelta(seconds=int(seconds))) if seconds is not None else "-"


def _memory(mb: float) -> str:
    return f"{mb / 1024:.2f} GiB" if mb >= 1024 else f"{mb:.0f} MiB"


def stop_button(description: str, tooltip: str):
    """A Stop button that asks the session to stop at the next step and then says it is stopping."""
    import ipywidgets

    from ipylora.engine import get_session

    button = ipywidgets.Button(description=description, icon="stop", button_style="danger", tooltip=tooltip)

    def stop(_button):
        if get_session().request_stop():
            button.description = "stopping..."
            button.disabled = True

    button.on_click(stop)
    return button


class NotebookReporter:
    """Turns training events into an in-place panel. `background=True` adds a working Stop button."""

    def __init__(self, background: bool = False, plot_every_s: float = 1.0, line_every_s: float = 0.25):
        self.background = background
        self.plot_every_s, self.line_every_s = plot_every_s, line_every_s
        self.curves = {"steps": [], "loss": [], "eval_steps": [], "eval_loss": [], "metrics": {}, "metric_steps": {}}
        self.lrs: list[float] = []
        self.samples: list[Sample] = []
        self.notices: list[str] = []
        self.warnings: list[str] = []  # notices kept under the progress line until the run ends
        self.name = ""
        self.stop_button = None
        self._plot = self._line = self._samples = None
        self._last_plot = self._last_line = 0.0
        self._last_step: StepEnd | None = None
        self._draw_cost = 0.0
        self._eval_loss: float | None = None
        self.last_line = ""
        if background:
            # Made here, in the cell's own thread: the run reports from a worker thread later (after
            # the data check and notes, seconds after the cell returned), and widgets or display
            # handles first shown from there are opened outside the cell (the browser logged
            # "Exception opening new comm" for the Stop button's comms).
            self._show_stop_button()
            self._update_line("training in the background: preparing the data and the model...")

    def __call__(self, event: Event) -> None:
        now = time.monotonic()
        if isinstance(event, RunStart):
            self.name = event.name
            self._update_line(f"{event.name}: starting, {event.total_steps} steps")
        elif isinstance(event, StepEnd):
            self.curves["steps"].append(event.step)
            self.curves["loss"].append(event.loss)
            self.lrs.append(event.lr)
            for label, value in event.metrics.items():
                self.curves["metrics"].setdefault(label, []).append(value)
                self.curves["metric_steps"].setdefault(label, []).append(event.step)
            self._last_step = event
            # Drawing runs inside the training loop: keep it under ~2% of wall time whatever it costs.
            if self._plot is None or now - self._last_plot >= max(self.plot_every_s, self._draw_cost / 0.02):
                self._draw(event.step, event.total_steps)
                self._draw_cost = time.monotonic() - now
                self._last_plot = now
            if now - self._last_line >= self.line_every_s:
                self._update_line(self._progress(event))
                self._last_line = now
        elif isinstance(event, EvalEnd):
            self.curves["eval_steps"].append(event.step)
            self.curves["eval_loss"].append(event.loss)
            self._eval_loss = event.loss
        elif isinstance(event, Notice):
            self.notices.append(event.message)
            if event.keep:
                self.warnings.append(event.message)
            self._update_line(event.message)
        elif isinstance(event, Sample):
            self.samples.append(event)
            self._show_samples()
        elif isinstance(event, RunEnd):
            if self.curves["steps"]:
                self._draw(event.step, event.total_steps, event.status)
            loss = f"final loss {event.final_loss:.4f}" if event.final_loss is not None else "no loss"
            eval_loss = event.eval_loss if event.eval_loss is not None else self._eval_loss
            if eval_loss is not None:
                loss += f", eval loss {eval_loss:.4f}"
            if self._last_step is not None:  # the method's metrics at the last step stay in the final frame
                loss += "".join(f", {label} {value:.3f}" for label, value in self._last_step.metrics.items())
            # The end message repeats what matters (the overfitting note): say it once.
            notes = "".join(f" ({note})" for note in self.notices if note not in event.message)
            self.warnings = []
            self._update_line(f"{event.name} {event.status}: {event.step}/{event.total_steps} steps in "
                              f"{duration(event.elapsed)}, {loss}; {event.message}{notes}")
            if self.stop_button is not None:
                self.stop_button.disabled = True
                self.stop_button.description = event.status

    def _show_stop_button(self) -> None:
        self.stop_button = stop_button("Stop", "Stop at the next step and save the adapter")
        display(self.stop_button)

    def _draw(self, step: int, total: int, status: str = "") -> None:
        title = f"{self.name} · step {step}/{total}" + (f" · {status}" if status else "")
        image = LossPlot(self.curves, title, self.lrs)
        if self._plot is None:
            self._plot = display(image, display_id=True)
        else:
            self._plot.update(image)

    def _progress(self, e: StepEnd) -> str:
        eval_part = f" · eval {self._eval_loss:.4f}" if self._eval_loss is not None else ""
        eval_part += "".join(f" · {label} {value:.3f}" for label, value in e.metrics.items())
        return (f"{self.name}: step {e.step}/{e.total_steps} · loss {e.loss:.4f}{eval_part} · lr {e.lr:.2e} · "
                f"{e.tokens_per_s:,.0f} tok/s · {_memory(e.memory_mb)} · ETA {duration(e.eta_s)}")

    def _show_samples(self) -> None:
        newest = sorted(self.samples, key=lambda s: s.step, reverse=True)[:12]
        rewarded = any(s.reward is not None for s in newest)  # GRPO: each completion's reward beside it

        def reward(s) -> str:
            if s.reward is None:
                return ""
            return f"{s.reward:.3f}" + (f" ({s.detail})" if s.detail else "")

        rows = "".join(
            f"<tr><td>{s.step}</td><td>{html.escape(s.prompt)}</td><td style='text-align:left'>{html.escape(s.text)}</td>"
            + (f"<td>{html.escape(reward(s))}</td>" if rewarded else "") + "</tr>"
            for s in newest
        )
        head = "<th>reward</th>" if rewarded else ""
        content = Rendered(
            f"<table><tr><th>step</th><th>prompt</th><th style='text-align:left'>sample (newest first)</th>{head}</tr>"
            f"{rows}</table>",
            "\n".join(f"step {s.step} · {s.prompt!r} -> {s.text!r}" + (f" · reward {reward(s)}" if rewarded else "")
                      for s in newest),
        )
        if self._samples is None:
            self._samples = display(content, display_id=True)
        else:
            self._samples.update(content)

    def _update_line(self, text: str) -> None:
        self.last_line = text
        lines = [text, *(f"⚠ {warning}" for warning in self.warnings if warning != text)]
        content = Rendered("<br>".join(f"<code>{html.escape(line)}</code>" for line in lines), "\n".join(lines))
        if self._line is None:
            self._line = display(content, display_id=True)
        else:
            self._line.update(content)
