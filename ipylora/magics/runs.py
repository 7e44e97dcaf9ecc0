"""%lora_runs, %lora_adapters, %lora_unload: what has been trained, what is loaded, freeing memory.

`%lora_runs --plot A,B` overlays the runs' loss curves; GRPO runs among them also get their reward
curve (the weighted total, metrics.jsonl's "reward") in a second panel under the loss.
"""

from __future__ import annotations

from pathlib import Path

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.display import Image, display

from ipylora.engine import get_session
from ipylora.engine.runs import list_runs, loss_curves, read_json, read_metrics, sweep_trials
from ipylora.magics.args import parse
from ipylora.magics.common import user_errors
from ipylora.magics.settings import get_settings
from ipylora.ui.render import table

RUN_COLUMNS = ["name", "status", "dataset", "model", "r", "alpha", "lr", "batch", "steps", "train_loss",
               "eval_loss", "time_s", "tokens_per_s"]


@magics_class
class RunsMagics(Magics):
    """%lora_runs, %lora_adapters, %lora_unload."""

    @magic_arguments()
    @argument("--plot", default=None, metavar="A,B,C",
              help="Overlay the loss curves of these runs (a sweep's name: all its trials; GRPO runs: their rewards too).")
    @argument("--output", default=None, help="Runs folder (default: %%config Lora.runs_dir).")
    @line_magic
    @user_errors
    def lora_runs(self, line):
        """A table of the runs in the runs folder (read from disk, so it survives kernel restarts)."""
        opts = parse(self.lora_runs, line)
        root = Path(opts.output or get_settings().runs_dir)
        rows = list_runs(root)
        if opts.plot:
            names = []
            for name in (n.strip() for n in opts.plot.split(",") if n.strip()):
                names += sweep_trials(root, name) or [name]  # a sweep's name: all of its trials
            known = {row["name"] for row in rows}
            missing = [n for n in names if n not in known]
            if missing:
                raise UsageError(f"No run {', '.join(missing)} in {root}/ (runs: {', '.join(sorted(known)) or 'none'}).")
            rewards = {n: reward_curve(root / n) for n in names if _method(root / n) == "grpo"}
            display(Image(overlay_png({n: loss_curves(root / n) for n in names}, rewards)))
            return
        if not rows:
            print(f"No runs in {root}/ yet: %lora_train DATASET writes one.")
            return
        swept = any(row["sweep"] for row in rows)
        display(table(rows, RUN_COLUMNS + (["sweep"] if swept else [])))

    @magic_arguments()
    @argument("--use", default=None, metavar="NAME", help='Make NAME the active adapter ("base" for none).')
    @argument("--delete", default=None, metavar="NAME", help="Remove NAME from the resident model (disk copy stays).")
    @argument("--load", default=None, metavar="RUN|PATH", help="Load a saved adapter into the resident model.")
    @argument("--as", dest="alias", default=None, metavar="NAME", help="Name for --load.")
    @line_magic
    @user_errors
    def lora_adapters(self, line):
        """List the adapters on the resident model; switch (--use), delete (--delete), load (--load)."""
        opts = parse(self.lora_adapters, line)
        session = get_session()
        if opts.load:
            session.load_adapter(opts.load, opts.alias, get_settings().runs_dir)
        if opts.delete:
            session.delete_adapter(opts.delete)
        if opts.use:
            session.use_adapter(opts.use)
        rows = [{"adapter": name, "active": "yes" if name == session.active_adapter else "",
                 "dataset": adapter.dataset, "saved in": str(adapter.run_dir)}
                for name, adapter in session.adapters.items()]
        if not rows:
            print("No adapters loaded: %lora_train trains one, %lora_adapters --load RUN loads a saved one.")
            return
        display(table(rows, ["adapter", "active", "dataset", "saved in"]))

    @line_magic
    @user_errors
    def lora_unload(self, line):
        """Free the resident model and its adapters (saved adapters stay on disk)."""
        if line.strip():
            raise UsageError("%lora_unload takes no arguments.")
        session = get_session()
        had = session.model_id
        session.unload()
        print(f"Unloaded {had}." if had else "No model was loaded.")


def _method(run_dir: Path) -> str | None:
    path = run_dir / "run.json"
    try:
        return read_json(path).get("train", {}).get("method") if path.exists() else None
    except (OSError, ValueError):  # a run.json cut short: no method, so loss only
        return None


def reward_curve(run_dir: Path) -> dict[str, list]:
    """A GRPO run's mean reward (the weighted total) by step; after a resume, the later value for a step wins."""
    by_step = {}
    for event in read_metrics(run_dir):
        value = (event.get("metrics") or {}).get("reward") if event.get("event") == "StepEnd" else None
        if value is not None:
            by_step[event["step"]] = value
    return {"steps": sorted(by_step), "reward": [by_step[s] for s in sorted(by_step)]}


def overlay_png(curves: dict[str, dict], rewards: dict[str, dict] | None = None) -> bytes:
    import io

    buffer = io.BytesIO()
    overlay_figure(curves, rewards).savefig(buffer, format="png")
    return buffer.getvalue()


def overlay_figure(curves: dict[str, dict], rewards: dict[str, dict] | None = None):
    """Loss curves of `curves` on one panel; with `rewards` (GRPO runs), their reward curves on a second one
    below it, each run in the same colour in both."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rewards = rewards or {}
    figure = Figure(figsize=(6.4, 5.6 if rewards else 3.2), dpi=80)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(2 if rewards else 1, 1, 1)
    colors = {name: f"C{index % 10}" for index, name in enumerate(curves)}
    for name, curve in curves.items():
        axes.plot(curve["steps"], curve["loss"], color=colors[name], linewidth=1.2, label=f"{name} train")
        if curve["eval_steps"]:
            axes.plot(curve["eval_steps"], curve["eval_loss"], "o--", color=colors[name], markersize=3,
                      label=f"{name} eval")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    if rewards:
        below = figure.add_subplot(2, 1, 2)
        for name, curve in rewards.items():
            below.plot(curve["steps"], curve["reward"], color=colors.get(name), linewidth=1.2, label=name)
        below.set_xlabel("step")
        below.set_ylabel("reward")
        below.grid(alpha=0.3)
        below.legend(fontsize=8)
    figure.tight_layout()
    return figure
