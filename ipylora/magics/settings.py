"""Defaults users set once: `%config Lora.<trait> = ...`, or `[tool.ipylora]` in pyproject.toml.

Precedence: a flag on the magic line, then `%config`, then the nearest pyproject.toml (searched
from the working directory upwards), then the built-in default.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from traitlets import Enum, Unicode
from traitlets.config import Configurable

_settings: Lora | None = None


class Lora(Configurable):
    """ipylora's defaults, settable with %config Lora.<name> = value."""

    default_model = Unicode(None, allow_none=True, help="Model used when %lora_train has no --model "
                            "(None: the resident model, else the embedded tiny one).").tag(config=True)
    runs_dir = Unicode("runs", help="Folder that holds runs/<name>/.").tag(config=True)
    quantization = Enum([None, "4bit", "8bit"], default_value=None, allow_none=True,
                        help="Quantization when no --4bit/--8bit flag is given.").tag(config=True)
    report_to = Unicode("none", help="Experiment trackers when %lora_train has no --report-to: tensorboard, wandb, "
                        "mlflow, trackio (comma-separated) or none.").tag(config=True)

    def load_project(self, start: Path | None = None) -> Path | None:
        """Apply [tool.ipylora] from the nearest pyproject.toml to traits %config did not set."""
        for folder in [start or Path.cwd(), *(start or Path.cwd()).parents]:
            path = folder / "pyproject.toml"
            if path.is_file():
                break
        else:
            return None
        try:
            table = tomllib.loads(path.read_text()).get("tool", {}).get("ipylora", {})
        except (OSError, tomllib.TOMLDecodeError):
            return None
        configured = set(self.config.get("Lora", {}))
        for key, value in table.items():
            trait = key.replace("-", "_")
            if trait in self.trait_names(config=True) and trait not in configured:
                setattr(self, trait, value)
        return path


def register_settings(shell) -> Lora:
    global _settings
    _settings = Lora(parent=shell)
    _settings.load_project()
    shell.configurables.append(_settings)
    return _settings


def get_settings() -> Lora:
    """The registered settings, or built-in defaults when the extension is not loaded."""
    return _settings if _settings is not None else Lora()
