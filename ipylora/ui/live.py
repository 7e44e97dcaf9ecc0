"""The live training panel: one loss plot and one progress line, each a display handle.

Both handles are created up front by the main thread and updated in place (throttled), so a
saved notebook keeps exactly one final image and one final line. The plot is drawn with
matplotlib's object API on an Agg canvas, not pyplot, so it is safe from any thread.
"""

from __future__ import annotations

import io
import time
from datetime import timedelta

import html

from IPython.display import Image, display

from ipylora.engine.events import Event, RunEnd, RunStart, StepEnd
from ipylora.ui.render import Rendered


def loss_png(steps: list[int], losses: list[float], title: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.0), dpi=80)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(steps, losses, color="#1f77b4", linewidth=1.2, label="train loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _duration(seconds: float | None) -> str:
    return str(timedelta(seconds=int(seconds))) if seconds is not None else "-"


class NotebookReporter:
    """Turns training events into an in-place plot and progress line."""

    def __init__(self, plot_every_s: float = 1.0, line_every_s: float = 0.25):
        self.plot_every_s, self.line_every_s = plot_every_s, line_every_s
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.name = ""
        self._plot = self._line = None
        self._last_plot = self._last_line = 0.0

    def __call__(self, event: Event) -> None:
        now = time.monotonic()
        if isinstance(event, RunStart):
            self.name = event.name
            self._update_line(f"{event.name}: starting, {event.total_steps} steps")
        elif isinstance(event, StepEnd):
            self.steps.append(event.step)
            self.losses.append(event.loss)
            if self._plot is None:
                self._plot = display(Image(self._png(event.step, event.total_steps)), display_id=True)
                self._last_plot = now
            elif now - self._last_plot >= self.plot_every_s:
                self._plot.update(Image(self._png(event.step, event.total_steps)))
                self._last_plot = now
            if now - self._last_line >= self.line_every_s:
                self._update_line(self._progress(event))
                self._last_line = now
        elif isinstance(event, RunEnd):
            if self.steps:
                image = Image(self._png(event.step, event.total_steps, event.status))
                if self._plot is None:
                    self._plot = display(image, display_id=True)
                else:
                    self._plot.update(image)
            loss = f"final loss {event.final_loss:.4f}" if event.final_loss is not None else "no loss"
            self._update_line(f"{event.name} {event.status}: {event.step}/{event.total_steps} steps in "
                              f"{_duration(event.elapsed)}, {loss}; {event.message}")

    def _png(self, step: int, total: int, status: str = "") -> bytes:
        title = f"{self.name} · step {step}/{total}" + (f" · {status}" if status else "")
        return loss_png(self.steps, self.losses, title)

    def _progress(self, e: StepEnd) -> str:
        return (f"{self.name}: step {e.step}/{e.total_steps} · loss {e.loss:.4f} · "
                f"{e.tokens_per_s:,.0f} tok/s · ETA {_duration(e.eta_s)}")

    def _update_line(self, text: str) -> None:
        content = Rendered(f"<code>{html.escape(text)}</code>", text)
        if self._line is None:
            self._line = display(content, display_id=True)
        else:
            self._line.update(content)
