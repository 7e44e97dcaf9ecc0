"""Training methods are plugins: a third-party package's `ipylora.methods` entry point is listed and trains."""

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from ipylora.engine import TrainArgs
from ipylora.engine.events import StepEnd

PLUGIN = '''
from ipylora.engine.methods.preference import DPO


class Hinge(DPO):
    """DPO with the hinge loss and a stronger beta, as a package of its own would ship it."""

    name = "dpo-hinge"
    summary = "DPO with the hinge loss"
    knobs = {"beta": 0.5, "loss_type": "hinge"}


HINGE = Hinge  # the registry takes a class or an instance
'''

PAIRS = pd.DataFrame([{"prompt": f"Name thing {i}", "chosen": f"The {w} is bright.", "rejected": f"No {w} here, sorry."}
                      for i, w in enumerate("apple river stone cloud tiger lemon piano rocket".split())])


@pytest.fixture
def plugin_installed(tmp_path, monkeypatch):
    """A package `hinge_plugin` with a dist-info declaring an ipylora.methods entry point, on sys.path."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "hinge_plugin.py").write_text(PLUGIN)
    info = site / "hinge_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hinge-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[ipylora.methods]\ndpo-hinge = hinge_plugin:HINGE\n")
    from ipylora.engine import plugins

    monkeypatch.syspath_prepend(str(site))
    plugins._declared.clear()  # scan the entry points again, with the plugin's dist-info
    yield
    sys.modules.pop("hinge_plugin", None)
    plugins._declared.clear()  # forget the temporary plugin for the next tests
    plugins._loaded.pop((plugins.METHODS, "hinge_plugin:HINGE"), None)


def test_a_method_from_an_entry_point_is_listed_and_trains(fresh_session, plugin_installed):
    from ipylora.engine import methods
    from ipylora.ui.forms import TrainForm

    assert "dpo-hinge" in methods.names() and {"sft", "dpo", "simpo", "orpo", "kto"} <= set(methods.names())
    assert "dpo-hinge" in TrainForm(shell=object()).method.options
    fresh_session.add_dataset("pairs", PAIRS)
    events = []

    end = fresh_session.train("pairs", TrainArgs(method="dpo-hinge", name="hinge", steps=4), reporter=events.append)

    assert end.status == "finished" and end.step == 4
    train = json.loads(Path("runs/hinge/run.json").read_text())["train"]
    assert (train["method"], train["beta"], train["loss_type"]) == ("dpo-hinge", 0.5, "hinge")
    steps = [e for e in events if isinstance(e, StepEnd)]
    assert steps[-1].loss < steps[0].loss and "margin" in steps[-1].metrics


def test_without_the_package_the_method_is_unknown(fresh_session):
    from ipylora.engine import ConfigError, methods

    with pytest.raises(ConfigError, match="Unknown --method 'dpo-hinge'"):
        methods.get("dpo-hinge")
