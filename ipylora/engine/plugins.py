"""The plugin registry: dataset readers, formats and templates found through entry points.

A package adds a reader, format or template by declaring an entry point in one of the groups
below (pyproject.toml: `[project.entry-points."ipylora.templates"] mine = "my_pkg:TEMPLATE"`).
ipylora's own built-ins are declared the same way in its pyproject.toml. `BUILTINS` repeats those
declarations so that an install whose metadata predates a built-in still finds it (a test checks
that the two lists agree); entry points win on a name clash, so a plugin can replace a built-in.

Lookups are cached; a name that is not found triggers one rescan, so a plugin installed while
the kernel runs is picked up without a restart.
"""

from __future__ import annotations

import importlib
from importlib import metadata

from ipylora.engine.errors import ConfigError

READERS = "ipylora.readers"
FORMATS = "ipylora.formats"
TEMPLATES = "ipylora.templates"
METHODS = "ipylora.methods"
REWARDS = "ipylora.rewards"

BUILTINS: dict[str, dict[str, str]] = {
    READERS: {
        "csv": "ipylora.engine.readers:CSV",
        "tsv": "ipylora.engine.readers:TSV",
        "json": "ipylora.engine.readers:JSON",
        "jsonl": "ipylora.engine.readers:JSONL",
        "yaml": "ipylora.engine.readers:YAML",
        "parquet": "ipylora.engine.readers:PARQUET",
        "arrow": "ipylora.engine.readers:ARROW",
        "disk": "ipylora.engine.readers:SAVED",
    },
    FORMATS: {  # detection order: the preference formats first
        "preference": "ipylora.engine.preference:PREFERENCE",
        "unpaired-preference": "ipylora.engine.preference:UNPAIRED_PREFERENCE",
        "messages": "ipylora.engine.formats:MESSAGES",
        "sharegpt": "ipylora.engine.formats:SHAREGPT",
        "alpaca": "ipylora.engine.formats:ALPACA",
        "prompt-completion": "ipylora.engine.formats:PROMPT_COMPLETION",
        "text": "ipylora.engine.formats:TEXT",
        "prompts": "ipylora.engine.prompts:PROMPTS",
    },
    TEMPLATES: {
        "human-assistant": "ipylora.engine.templates:HUMAN_ASSISTANT",
        "alpaca": "ipylora.engine.templates:ALPACA",
        "chatml": "ipylora.engine.templates:CHATML",
        "plain": "ipylora.engine.templates:PLAIN",
        "model": "ipylora.engine.templates:MODEL",
    },
    METHODS: {
        "sft": "ipylora.engine.methods.sft:SFT",
        "dpo": "ipylora.engine.methods.preference:DPO",
        "simpo": "ipylora.engine.methods.preference:SIMPO",
        "orpo": "ipylora.engine.methods.preference:ORPO",
        "kto": "ipylora.engine.methods.kto:KTO",
        "grpo": "ipylora.engine.methods.grpo:GRPO",
    },
    REWARDS: {  # factories called with the text after `kind:` (engine/rewards.py)
        "exact": "ipylora.engine.rewards:exact",
        "contains": "ipylora.engine.rewards:contains",
        "regex": "ipylora.engine.rewards:regex",
        "length": "ipylora.engine.rewards:length",
    },
}

# The plugin registry: group -> name -> "module:attr" (declared) and loaded objects.
_declared: dict[str, dict[str, str]] = {}
_loaded: dict[tuple[str, str], object] = {}


def _scan(group: str) -> dict[str, str]:
    found = dict(BUILTINS.get(group, {}))
    for entry in metadata.entry_points(group=group):
        found[entry.name] = entry.value
    _declared[group] = found
    return found


def rescan(group: str) -> None:
    """Look for newly installed plugins in `group` (lookups by name do this on a miss)."""
    _scan(group)


def names(group: str) -> list[str]:
    """Every registered name in `group`, built-ins first."""
    return list(_declared.get(group) or _scan(group))


def get(group: str, name: str):
    """The object registered as `name` in `group`, or None."""
    declared = _declared.get(group) or _scan(group)
    if name not in declared:
        declared = _scan(group)  # installed since the last look?
        if name not in declared:
            return None
    target = declared[name]
    key = (group, target)
    if key not in _loaded:
        _loaded[key] = _load(group, name, target)
    return _loaded[key]


def all_of(group: str) -> list:
    """Every registered object in `group` (loads them all)."""
    return [get(group, name) for name in names(group)]


def _load(group: str, name: str, target: str):
    module_name, _, attr = target.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split(".") if attr else []:
            obj = getattr(obj, part)
    except Exception as exc:  # a broken plugin must say which one it is
        raise ConfigError(
            f"The {group} plugin {name!r} ({target}) failed to load: {type(exc).__name__}: {exc}. "
            "Reinstall or uninstall the package that provides it."
        ) from None
    return obj
