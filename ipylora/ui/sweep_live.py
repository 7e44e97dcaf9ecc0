"""The live sweep panel: every trial's loss curve on one plot, a leaderboard, a progress line, Stop.

Built like the training panel (`ipylora.ui.live`): each artifact is one display handle, created up
front by the cell's own thread (a background sweep reports from a worker thread, and outputs first
opened from there land outside the cell) and updated in place, throttled, so a saved notebook
keeps one final frame of each, however many trials ran. The plot overlays the trials' curves:
eval loss once any trial has one (that is what trials are scored on), else train loss. A pruned
trial's curve is faded and ends at the step it was cut; the best trial so far is thick and
labelled. Trials are numbered from 1 on screen, as the engine's messages and run names do.
"""

from __future__ import annotations

import html
import io
import json
import math
import time
from pathlib import Path

from IPython.display import display

from ipylora.engine.events import EvalEnd, Event, Notice, RunStart, StepEnd, SweepEnd, SweepStart, TrialEnd, TrialStart
from ipylora.ui.live import duration, stop_button
from ipylora.ui.render import Rendered

# More trials than this and the legend names only the best one (the colours still tell them apart).
LEGEND_TRIALS = 10


def number(value) -> str:
    """A parameter value, short: 0.00021234 -> 0.000212, 1e-05 -> 1e-05, 16 -> 16, cosine -> cosine."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def params_text(params: dict) -> str:
    return " ".join(f"{name}={number(value)}" for name, value in params.items())


def sweep_png(series: list[dict], title: str, ylabel: str) -> bytes:
    """One line per trial (`series` items: trial, steps, values, status, best, cut), coloured by trial."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.6), dpi=80)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colors = colormaps["tab10"]
    named = len(series) <= LEGEND_TRIALS
    for line in series:
        if not line["steps"]:
            continue
        label = f"trial {line['trial'] + 1}"
        style = {"color": colors(line["trial"] % 10), "linewidth": 1.2, "alpha": 0.85,
                 "label": label if named else "_" + label}
        if line["status"] == "pruned":
            style.update(alpha=0.3, linestyle="--", label=f"{label} (pruned)" if named else "_" + label)
        elif line["status"] == "failed":
            style.update(alpha=0.5, linestyle=":", label=f"{label} (failed)" if named else "_" + label)
        if line["best"]:
            style.update(linewidth=2.8, alpha=1.0, zorder=3, label=f"{label} (best)")
        marker = "o" if len(line["steps"]) == 1 else None  # a single eval point is still seen
        axes.plot(line["steps"], line["values"], marker=marker, markersize=3, **style)
        if line["cut"] is not None:
            axes.plot(line["steps"][-1:], line["values"][-1:], "x", color=style["color"], alpha=0.6)
        if line["best"]:
            axes.annotate(f"best: trial {line['trial'] + 1}", (line["steps"][-1], line["values"][-1]),
                          textcoords="offset points", xytext=(-2, 7), ha="right", fontsize=8, color=style["color"])
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    if any(line["steps"] for line in series):
        axes.legend(loc="upper right", fontsize=7)
    figure.subplots_adjust(left=0.11, right=0.97, top=0.9, bottom=0.14)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


class SweepPlot:
    """The panel's plot: PNG for notebooks, a text line saying what was drawn; `.series` is what was drawn."""

    def __init__(self, series: list[dict], title: str, ylabel: str):
        self.series = series
        self._png = sweep_png(series, title, ylabel)
        drawn = ", ".join(f"trial {s['trial'] + 1} ({len(s['steps'])} points"
                          + (f", cut at step {s['cut']}" if s["cut"] is not None else "")
                          + (", best" if s["best"] else "") + ")" for s in series)
        self._text = f"<sweep plot: {title}: {ylabel}: {drawn or 'no points yet'}>"

    def _repr_png_(self) -> bytes:
        return self._png

    def __repr__(self) -> str:
        return self._text


def read_curve(run_dir: Path) -> dict:
    """A finished trial's losses from its metrics.jsonl (a resumed sweep draws them again); empty if unreadable."""
    curve = {"steps": [], "loss": [], "eval_steps": [], "eval_loss": []}
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return curve
    for text in lines:
        try:
            event = json.loads(text)
            if event.get("event") == "StepEnd":
                curve["steps"].append(event["step"])
                curve["loss"].append(event["loss"])
            elif event.get("event") == "EvalEnd":
                curve["eval_steps"].append(event["step"])
                curve["eval_loss"].append(event["loss"])
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a line cut short by a crash
    return curve


class SweepReporter:
    """Turns sweep events into an in-place panel. `background=True` adds a working Stop button."""

    def __init__(self, background: bool = False, plot_every_s: float = 1.0, line_every_s: float = 0.25):
        self.background = background
        self.plot_every_s, self.line_every_s = plot_every_s, line_every_s
        self.sweep = ""
        self.total = 0
        self.metric, self.direction = "", "minimize"
        self.trials: dict[int, dict] = {}  # trial -> its leaderboard record (status "running" until it ends)
        self.curves: dict[int, dict] = {}  # trial -> steps, loss, eval_steps, eval_loss
        self.current: int | None = None
        self.best_trial: int | None = None
        self.best_score: float | None = None
        self.warnings: list[str] = []  # notices kept under the progress line until the trial ends
        self.last_line = ""
        self.stop_button = None
        self._last_plot = self._last_line = 0.0
        self._draw_cost = 0.0
        self._eval_loss: float | None = None
        # Made here, in the cell's own thread, for the reason the module docstring gives.
        if background:
            self._show_stop_button()
        self._line = display(Rendered("", ""), display_id=True)
        self._plot = display(Rendered("", ""), display_id=True)
        self._board = display(Rendered("", ""), display_id=True)
        self._update_line("sweep: preparing the data and the model..." if background else "sweep: starting...")

    def __call__(self, event: Event) -> None:
        now = time.monotonic()
        if isinstance(event, SweepStart):
            self._start(event)
        elif isinstance(event, TrialStart):
            self.current, self._eval_loss, self.warnings = event.trial, None, []
            self.trials[event.trial] = {"trial": event.trial, "run": event.run, "params": dict(event.params),
                                        "status": "running", "score": None, "steps": 0, "elapsed": None,
                                        "pruned_at": None, "message": ""}
            self.curves[event.trial] = {"steps": [], "loss": [], "eval_steps": [], "eval_loss": []}
            self._show_board()
            self._update_line(f"{self._trial_name(event.trial)} ({event.run}): starting, "
                              f"{params_text(event.params)}{self._best_part()}")
        elif isinstance(event, RunStart) and self.current is not None:
            self._update_line(f"{self._trial_name(self.current)} ({event.name}): {event.total_steps} steps, "
                              f"{params_text(self.trials[self.current]['params'])}{self._best_part()}")
        elif isinstance(event, StepEnd) and self.current is not None:
            curve = self.curves[self.current]
            curve["steps"].append(event.step)
            curve["loss"].append(event.loss)
            self.trials[self.current]["steps"] = event.step
            # Drawing runs inside the training loop: keep it under ~2% of wall time whatever it costs.
            if now - self._last_plot >= max(self.plot_every_s, self._draw_cost / 0.02):
                self._draw()
                self._draw_cost = time.monotonic() - now
                self._last_plot = now
            if now - self._last_line >= self.line_every_s:
                self._update_line(self._progress(event))
                self._last_line = now
        elif isinstance(event, EvalEnd) and self.current is not None:
            self.curves[self.current]["eval_steps"].append(event.step)
            self.curves[self.current]["eval_loss"].append(event.loss)
            self._eval_loss = event.loss
        elif isinstance(event, Notice):
            if event.keep:
                self.warnings.append(event.message)
            self._update_line(event.message)
        elif isinstance(event, TrialEnd):
            self._end_trial(event)
        elif isinstance(event, SweepEnd):
            self._end(event)

    # -- events ------------------------------------------------------------------------------------
    def _start(self, e: SweepStart) -> None:
        self.sweep, self.total, self.metric, self.direction = e.sweep, e.total, e.metric, e.direction
        for record in e.done:  # a resumed sweep: its ended trials, and their curves where their runs are
            self.trials[record["trial"]] = self._record(record)
            if e.sweep_dir:
                self.curves[record["trial"]] = read_curve(Path(e.sweep_dir).parent / record["run"])
        self._find_best()
        space = " ".join(f"{name}={spec}" for name, spec in e.space.items())
        resumed = f", {len(e.done)} done" if e.done else ""
        self._update_line(f"{e.sweep}: {e.total} trials{resumed}, {e.search} search over {space}, "
                          f"{e.metric} ({e.direction}), pruning {e.prune}")
        self._show_board()
        if any(curve["steps"] for curve in self.curves.values()):
            self._draw()

    def _end_trial(self, e: TrialEnd) -> None:
        self.trials[e.trial] = self._record(e.to_dict())
        if e.best_trial is not None:
            self.best_trial, self.best_score = e.best_trial, e.best_score
        else:
            self._find_best()
        self.current, self.warnings = None, []
        self._draw()
        self._show_board()
        score = f", {self.metric} {e.score:.4f}" if e.score is not None else ""
        cut = f" at step {e.pruned_at}" if e.pruned_at is not None else ""
        message = f": {e.message}" if e.message else ""
        self._update_line(f"{self._trial_name(e.trial)} ({e.run}) {e.status}{cut} after {e.steps} steps in "
                          f"{duration(e.elapsed)}{score}{message}{self._best_part()}")

    def _end(self, e: SweepEnd) -> None:
        for record in e.trials:
            if record.get("status") in ("finished", "pruned", "failed", "stopped"):
                self.trials[record["trial"]] = self._record(record)
        if e.best_trial is not None:
            self.best_trial, self.best_score = e.best_trial, e.best_score
        self.current = None
        self._draw(e.status)
        self._show_board()
        elapsed = sum(t["elapsed"] or 0.0 for t in self.trials.values())
        self._update_line(f"{e.sweep} {e.status}: {len(self.trials)}/{self.total} trials in {duration(elapsed)}; "
                          f"{e.message}")
        if self.stop_button is not None:
            self.stop_button.disabled = True
            self.stop_button.description = e.status

    @staticmethod
    def _record(record: dict) -> dict:
        keys = ("trial", "run", "params", "status", "score", "steps", "elapsed", "pruned_at", "message")
        return {key: record.get(key) for key in keys}

    def _find_best(self) -> None:
        """The best finished trial by score, for records that do not say (a resumed sweep's first frame)."""
        scored = [t for t in self.trials.values() if t["status"] == "finished" and _finite(t["score"])]
        if scored:
            pick = max if self.direction == "maximize" else min
            best = pick(scored, key=lambda t: t["score"])
            self.best_trial, self.best_score = best["trial"], best["score"]

    # -- what is shown -----------------------------------------------------------------------------
    def series(self) -> tuple[list[dict], str]:
        """The curves the plot draws, and what they are (eval loss once any trial has one, else train loss)."""
        use_eval = any(curve["eval_steps"] for curve in self.curves.values())
        lines = []
        for trial, curve in sorted(self.curves.items()):
            steps, values = (curve["eval_steps"], curve["eval_loss"]) if use_eval else (curve["steps"], curve["loss"])
            record = self.trials.get(trial, {})
            cut = record.get("pruned_at") if record.get("status") == "pruned" else None
            if cut is not None:  # the steps that ran before the stop took effect are not the trial's
                kept = [(s, v) for s, v in zip(steps, values) if s <= cut]
                steps, values = [s for s, _ in kept], [v for _, v in kept]
            lines.append({"trial": trial, "steps": list(steps), "values": list(values),
                          "status": record.get("status", "running"), "best": trial == self.best_trial, "cut": cut})
        return lines, "eval loss" if use_eval else "train loss"

    def ranked(self) -> list[dict]:
        """Leaderboard rows: finished trials by score, best first, then the rest (running, pruned, ...) by number."""
        scored = [t for t in self.trials.values() if t["status"] == "finished" and _finite(t["score"])]
        scored.sort(key=lambda t: t["score"], reverse=self.direction == "maximize")
        rest = sorted((t for t in self.trials.values() if t not in scored), key=lambda t: t["trial"])
        return scored + rest

    def _draw(self, status: str = "") -> None:
        lines, ylabel = self.series()
        if not any(line["steps"] for line in lines):
            return
        done = sum(t["status"] != "running" for t in self.trials.values())
        where = f"trial {self.current + 1}/{self.total}" if self.current is not None else f"{done}/{self.total} trials"
        title = f"{self.sweep} · {where} · {self.metric}" + (f" · {status}" if status else "")
        self._plot.update(SweepPlot(lines, title, ylabel))

    def _show_board(self) -> None:
        varying = self._varying()
        head = ("trial", "parameters", self.metric or "score", "steps", "time", "status")
        rows = []  # (is best, cells, message)
        for t in self.ranked():
            params = {k: v for k, v in (t["params"] or {}).items() if k in varying} or t["params"] or {}
            status = t["status"] + (f" at step {t['pruned_at']}" if t["pruned_at"] is not None else "")
            if t["status"] == "failed" and t["message"]:  # why it failed is the row's point
                status += f": {t['message'][:80]}"
            best = t["trial"] == self.best_trial
            cells = (("★ " if best else "") + str(t["trial"] + 1), params_text(params),
                     f"{t['score']:.4f}" if _finite(t["score"]) else "-", str(t["steps"] or 0),
                     duration(t["elapsed"]), status)
            rows.append((best, cells, t["message"] or ""))
        best_style = " style='background:#fff3b0;font-weight:bold'"
        body = "".join(
            f"<tr{best_style if best else ''} title='{html.escape(message, quote=True)}'>"
            + "".join(f"<td style='text-align:left'>{html.escape(cell)}</td>" for cell in cells) + "</tr>"
            for best, cells, message in rows)
        heads = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in head)
        widths = [max([len(h), *(len(cells[i]) for _, cells, _ in rows)]) for i, h in enumerate(head)]
        text = ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
                for cells in (head, *(cells for _, cells, _ in rows))]
        self._board.update(Rendered(f"<table><tr>{heads}</tr>{body}</table>", "\n".join(text)))

    def _varying(self) -> set[str]:
        """The parameters whose value differs between trials (a fixed one would repeat on every row)."""
        seen: dict[str, set] = {}
        for t in self.trials.values():
            for k, v in (t["params"] or {}).items():
                seen.setdefault(k, set()).add(repr(v))
        return {k for k, values in seen.items() if len(values) > 1}

    def _trial_name(self, trial: int) -> str:
        return f"{self.sweep} trial {trial + 1}/{self.total}"

    def _best_part(self) -> str:
        if self.best_trial is None or not _finite(self.best_score):
            return ""
        params = params_text(self.trials.get(self.best_trial, {}).get("params") or {})
        return f" · best: trial {self.best_trial + 1} {self.best_score:.4f}" + (f" ({params})" if params else "")

    def _progress(self, e: StepEnd) -> str:
        record = self.trials[self.current]
        eval_part = f" · eval {self._eval_loss:.4f}" if self._eval_loss is not None else ""
        return (f"{self._trial_name(self.current)} ({record['run']}): step {e.step}/{e.total_steps} · "
                f"loss {e.loss:.4f}{eval_part} · ETA {duration(e.eta_s)}{self._best_part()}")

    def _show_stop_button(self) -> None:
        self.stop_button = stop_button("Stop sweep", "Stop the running trial at its next step and end the sweep")
        display(self.stop_button)

    def _update_line(self, text: str) -> None:
        self.last_line = text
        lines = [text, *(f"⚠ {warning}" for warning in self.warnings if warning != text)]
        self._line.update(Rendered("<br>".join(f"<code>{html.escape(line)}</code>" for line in lines),
                                   "\n".join(lines)))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
