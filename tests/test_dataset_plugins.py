"""Plugins: readers, formats and templates come from entry points, built-ins included."""

import sys
import tomllib
from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = '''
from ipylora.engine.readers import Reader
import pandas as pd

# A template as a plain format string, and a reader for "key = value" files.
SHOUT = "SAY IT LOUD: {prompt}\\n>>> {response} <<<"

def _read(path):
    rows = [dict(part.split("=", 1) for part in line.split(";")) for line in path.read_text().splitlines() if line]
    return pd.DataFrame(rows)

KV = Reader("kv", (".kv",), _read)
'''


@pytest.fixture
def plugin_installed(tmp_path, monkeypatch):
    """A package `shout_plugin` with a dist-info declaring entry points, importable from tmp_path."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "shout_plugin.py").write_text(PLUGIN)
    info = site / "shout_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: shout-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[ipylora.templates]\nshout = shout_plugin:SHOUT\n\n[ipylora.readers]\nkv = shout_plugin:KV\n")
    monkeypatch.syspath_prepend(str(site))
    yield
    sys.modules.pop("shout_plugin", None)
    from ipylora.engine import plugins

    plugins._declared.clear()  # forget the temporary plugin for the next tests


def test_plugin_template_and_reader_from_a_magic(fresh_session, tiny_tokenizer, plugin_installed, tmp_path):
    ip = InteractiveShell.instance()
    ip.history_manager.enabled = False
    ip.run_line_magic("load_ext", "ipylora")
    fresh_session._tiny_tokenizer = tiny_tokenizer
    (tmp_path / "rows.kv").write_text("q=hello;a=world\nq=bye;a=moon\n")
    ip.run_line_magic("lora_dataset", "loud --from rows.kv --template shout")
    data = fresh_session.datasets["loud"]
    assert data.template.name == "shout"
    assert data.pairs()[0] == ("SAY IT LOUD: hello\n>>> ", "world <<<")
    tokens = data.tokenize(tiny_tokenizer, 256)
    trained = [i for i, label in zip(tokens["input_ids"][0], tokens["labels"][0]) if label != -100]
    assert tiny_tokenizer.decode(trained) == "world <<<<|eos|>"


def test_builtins_are_declared_as_entry_points_in_pyproject():
    from ipylora.engine import plugins

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    assert {group: declared[group] for group in plugins.BUILTINS} == plugins.BUILTINS
    for group, names in plugins.BUILTINS.items():
        for name in names:
            assert plugins.get(group, name) is not None, (group, name)


def test_broken_plugin_names_itself(tmp_path, monkeypatch):
    from ipylora.engine import ConfigError, plugins

    site = tmp_path / "site"
    (site / "broken-1.0.dist-info").mkdir(parents=True)
    (site / "broken-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 1.0\n")
    (site / "broken-1.0.dist-info" / "entry_points.txt").write_text("[ipylora.templates]\nbroken = no_such_module:X\n")
    monkeypatch.syspath_prepend(str(site))
    try:
        with pytest.raises(ConfigError, match="plugin 'broken' .* failed to load"):
            plugins.get(plugins.TEMPLATES, "broken")
    finally:
        plugins._declared.clear()
