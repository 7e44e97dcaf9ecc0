"""The run folder: runs/<name>/run.json, metrics.jsonl, adapter/.

Every write that replaces something is atomic: write beside it, then rename. A directory cannot
be swapped in one rename, so the old one is first renamed aside (`adapter.old`), the new one into
place, and the old one deleted; `adapter_dir()` falls back to `adapter.old` if a crash hit the
instant between the two renames.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from ipylora.engine.errors import ConfigError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")


def check_name(name: str, what: str = "run") -> str:
    if not NAME_PATTERN.match(name or ""):
        raise ConfigError(
            f"{what} name {name!r} is not usable: use letters, digits, '-' and '_' (up to 64), e.g. --name sd-prompts."
        )
    if name in "lora_":  # PEFT finds adapters by substring of parameter names: "a" would match "lora_A"
        raise ConfigError(f"{what} name {name!r} is too short to tell apart from PEFT's own names: use a longer one.")
    return name


def claim_run_dir(root: Path, name: str) -> tuple[str, Path]:
    """Create runs/<name>/, or <name>-2, -3... if taken: a finished run is never overwritten.

    `mkdir` is atomic, so two kernels starting the same run name at once get different folders.
    """
    root.mkdir(parents=True, exist_ok=True)
    for index in range(1, 10_000):
        candidate = name if index == 1 else f"{name}-{index}"
        try:
            (root / candidate).mkdir()
        except FileExistsError:
            continue
        return candidate, root / candidate
    raise ConfigError(f"Too many runs named {name!r} in {root}: choose another --name.")


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def replace_dir(new: Path, final: Path) -> None:
    """Move the finished folder `new` to `final`, replacing what was there."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        if final.exists():
            shutil.rmtree(old)
        else:  # a crash left only the old copy: it is the live one until now
            os.replace(old, final)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def adapter_dir(run_dir: Path) -> Path | None:
    """The run's saved adapter, recovering from a crash between the two renames."""
    for candidate in (run_dir / "adapter", run_dir / "adapter.old"):
        if (candidate / "adapter_config.json").exists():
            return candidate
    return None


class MetricsLog:
    """Appends one JSON event per line to metrics.jsonl (flushed per line)."""

    def __init__(self, path: Path, append: bool = False):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a" if append else "w")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(run_dir: Path) -> list[dict]:
    """The events of metrics.jsonl; a line cut short by a crash is skipped."""
    events = []
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return events


def loss_curves(run_dir: Path) -> dict[str, list]:
    """Train and eval loss by step; after a resume, the later value for a step wins."""
    train, evals = {}, {}
    for event in read_metrics(run_dir):
        if event.get("event") == "StepEnd":
            train[event["step"]] = event["loss"]
        elif event.get("event") == "EvalEnd":
            evals[event["step"]] = event["loss"]
    return {"steps": sorted(train), "loss": [train[s] for s in sorted(train)],
            "eval_steps": sorted(evals), "eval_loss": [evals[s] for s in sorted(evals)]}


def sweep_trials(root: str | Path, name: str) -> list[str] | None:
    """The runs of sweep `name` (runs/NAME/sweep.json) in trial order; None if it is not a sweep."""
    path = Path(root) / name / "sweep.json"
    if not path.exists():
        return None
    try:
        return [trial["run"] for trial in read_json(path).get("trials", [])]
    except (OSError, ValueError):
        return None


def list_runs(root: str | Path = "runs") -> list[dict]:
    """One summary per runs/<name>/run.json, newest first; survives kernel restarts."""
    rows = []
    for path in Path(root).glob("*/run.json"):
        try:
            record = read_json(path)
        except (OSError, ValueError):
            continue
        train, lora = record.get("train", {}), record.get("lora", {})
        rows.append({
            "name": record.get("name", path.parent.name),
            "status": record.get("status"),
            "dataset": record.get("dataset", {}).get("name"),
            "model": record.get("model"),
            "r": lora.get("r"), "alpha": lora.get("alpha"), "lr": train.get("lr"),
            "batch": train.get("batch_size"),
            "steps": f"{record.get('step', 0)}/{record.get('total_steps', '?')}",
            "train_loss": record.get("final_loss"),
            "eval_loss": record.get("eval_loss"),
            "time_s": round(record.get("elapsed") or 0.0, 1),
            "tokens_per_s": round(record.get("tokens_per_s") or 0.0),
            "sweep": f"{record['sweep']['name']} #{record['sweep']['trial'] + 1}" if record.get("sweep") else None,
            "started": record.get("started", 0),
        })
    return sorted(rows, key=lambda row: row["started"], reverse=True)
