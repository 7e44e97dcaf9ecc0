"""%lora_runs, %lora_adapters, %lora_unload: what has been trained, what is loaded, freeing memory."""

from __future__ import annotations

from pathlib import Path

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.display import Image, display

from ipylora.engine import get_session
from ipylora.engine.runs import list_runs, loss_curves
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
    @argument("--plot", default=None, metavar="A,B,C", help="Overlay the loss curves of these runs.")
    @argument("--output", default=None, help="Runs folder (default: %%config Lora.runs_dir).")
    @line_magic
    @user_errors
    def lora_runs(self, line):
        """A table of the runs in the runs folder (read from disk, so it survives kernel restarts)."""
        opts = parse(self.lora_runs, line)
        root = Path(opts.output or get_settings().runs_dir)
        rows = list_runs(root)
        if opts.plot:
            names = [n.strip() for n in opts.plot.split(",") if n.strip()]
            known = {row["name"] for row in rows}
            missing = [n for n in names if n not in known]
            if missing:
                raise UsageError(f"No run {', '.join(missing)} in {root}/ (runs: {', '.join(sorted(known)) or 'none'}).")
            display(Image(overlay_png({n: loss_curves(root / n) for n in names})))
            return
        if not rows:
            print(f"No runs in {root}/ yet: %lora_train DATASET writes one.")
            return
        display(table(rows, RUN_COLUMNS))

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


def overlay_png(curves: dict[str, dict]) -> bytes:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.2), dpi=80)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for index, (name, curve) in enumerate(curves.items()):
        color = f"C{index % 10}"
        axes.plot(curve["steps"], curve["loss"], color=color, linewidth=1.2, label=f"{name} train")
        if curve["eval_steps"]:
            axes.plot(curve["eval_steps"], curve["eval_loss"], "o--", color=color, markersize=3, label=f"{name} eval")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
