"""Execute examples/quickstart.ipynb headless on a real kernel; print the final loss and a chat answer.

The executed copy is written to examples/quickstart.out.ipynb (git-ignored).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from ipylora.engine.runs import list_runs

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def execute(source: Path = EXAMPLES / "quickstart.ipynb", timeout: int = 600):
    """Run every cell in `source`'s folder; return (executed notebook, seconds)."""
    notebook = nbformat.read(source, as_version=4)
    started = time.time()
    NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(source.parent)}}).execute()
    return notebook, time.time() - started


def cell_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("name") == "stdout")


def main() -> int:
    notebook, seconds = execute()
    out = EXAMPLES / "quickstart.out.ipynb"
    nbformat.write(notebook, out)
    run = list_runs(EXAMPLES / "runs")[0]  # the newest: a re-run is saved as sd-prompts-2, never over the old one
    chats = [c for c in notebook.cells if c.cell_type == "code" and c.source.startswith("%lora_chat")]
    last = chats[-1]
    print(f"notebook executed in {seconds:.1f} s -> {out.relative_to(EXAMPLES.parent)}")
    print(f"final training loss: {run['train_loss']:.4f} ({run['steps']} steps, {run['status']}, runs/{run['name']})")
    print(f"chat: {last.source.split(' ', 1)[1]}")
    print(f"  -> {cell_text(last).strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
