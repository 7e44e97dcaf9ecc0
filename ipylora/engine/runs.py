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

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "w")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
