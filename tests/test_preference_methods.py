"""Preference methods (issue #15): DPO, SimPO, ORPO and KTO through Session.train on the embedded model.

DPO learns the preferences against its reference (the base, or the SFT adapter it starts from)
without changing the base; SimPO, ORPO and KTO lower their loss; the live panel gets each method's
metrics; interrupt / resume keep DPO's trajectory; `--gpus 2` trains DPO in two workers; user
mistakes are one line.
"""

import json
import os
import signal
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import pytest
import torch

from ipylora.engine import TrainArgs
from ipylora.engine.events import StepEnd
from ipylora.engine.methods import preference
from support import assert_one_line_error, ipython_shell

WORDS = "apple river stone cloud tiger lemon piano rocket candle forest ocean silver winter garden mirror violin".split()
# 16 pairs whose chosen and rejected answers are equally plausible to the random base: it prefers
# the chosen one in about half of them.
PAIRS = pd.DataFrame([{"prompt": f"Name thing {i}", "chosen": f"The {w} is bright.",
                       "rejected": f"No {WORDS[(i + 5) % 16]} here."} for i, w in enumerate(WORDS)])


@pytest.fixture
def session(fresh_session):
    fresh_session.add_dataset("pairs", PAIRS)
    return fresh_session


def answer_logps(session, adapter: str | None) -> list[tuple[float, float]]:
    """(summed log-prob of chosen, of rejected) per pair under `adapter` (None: the base, adapters disabled)."""
    model, tokens = session.model, session.datasets["pairs"].preference_tokens(session.tokenizer, 1024)
    model.eval()
    if adapter is not None:
        model.set_adapter(adapter)
    out = []
    with torch.no_grad(), (base_only(model) if adapter is None else nullcontext()):
        for prompt, chosen, rejected in zip(tokens["prompt_ids"], tokens["chosen_ids"], tokens["rejected_ids"]):
            pair = []
            for answer in (chosen, rejected):
                logits = model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1]
                pair.append(logits.log_softmax(-1).gather(-1, torch.tensor(answer)[:, None]).sum().item())
            out.append(tuple(pair))
    return out


def preference_accuracy(policy, reference) -> float:
    """Share of pairs whose implicit reward margin (policy minus reference log-ratio) is positive."""
    return sum((pc - pr) > (rc - rr) for (pc, pr), (rc, rr) in zip(policy, reference)) / len(policy)


def losses(events) -> dict[int, float]:
    return {e.step: e.loss for e in events if isinstance(e, StepEnd)}


def base_only(model):
    """Adapters disabled (a model without any is the base already)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()


def base_logits(session):
    session.model.eval()
    with torch.no_grad(), base_only(session.model):
        return session.model(input_ids=torch.tensor([[1, 40, 41, 42, 43]])).logits


# -- DPO ----------------------------------------------------------------------------------------
def test_dpo_learns_the_preferences_and_leaves_the_base_unchanged(session):
    session.ensure_model()
    base = answer_logps(session, None)
    assert 0.2 <= sum(c > r for c, r in base) / len(base) <= 0.8  # the base is about at chance
    before = base_logits(session)
    events = []

    end = session.train("pairs", TrainArgs(method="dpo", name="dpo"), reporter=events.append)

    assert end.status == "finished"
    policy = answer_logps(session, "dpo")
    assert preference_accuracy(policy, base) >= 0.9
    assert sum(c > r for c, r in policy) / len(policy) >= 0.9  # the adapter itself now prefers the chosen answers
    assert torch.equal(base_logits(session), before)  # adapters disabled: the base answers as before
    assert answer_logps(session, None) == base
    steps = [e for e in events if isinstance(e, StepEnd)]
    assert set(steps[-1].metrics) == {"margin", "reward accuracy"} and steps[-1].metrics["margin"] > 0
    run = json.loads(Path("runs/dpo/run.json").read_text())
    assert run["train"]["method"] == "dpo" and run["train"]["beta"] == 0.1 and run["train"]["loss_type"] == "sigmoid"


def test_sft_then_dpo_from_the_adapter_uses_it_as_the_frozen_reference(session, monkeypatch):
    computed = []
    original = preference.reference_columns

    def spy(trainer, dataset, batch_size, columns):
        out = original(trainer, dataset, batch_size, columns)
        computed.append(out)
        return out

    monkeypatch.setattr(preference, "reference_columns", spy)
    assert session.train("pairs", TrainArgs(name="sft", steps=10)).status == "finished"  # SFT reads the chosen answers
    sft = answer_logps(session, "sft")
    sft_weights = {k: v.clone() for k, v in session.model.state_dict().items() if ".sft." in k}

    end = session.train("pairs", TrainArgs(method="dpo", name="dpo", from_adapter="sft"))

    assert end.status == "finished"
    (reference,) = computed
    rows = session.datasets["pairs"].preference_tokens(session.tokenizer, 1024)
    assert reference["chosen_ids"] == rows["chosen_ids"]  # in the dataset's order
    assert reference["ref_chosen_logps"] == pytest.approx([c for c, _ in sft], abs=1e-4)
    assert reference["ref_rejected_logps"] == pytest.approx([r for _, r in sft], abs=1e-4)
    assert preference_accuracy(answer_logps(session, "dpo"), sft) >= 0.9
    # The reference stayed frozen, and the run trained the start adapter's shape.
    assert all(torch.equal(v, session.model.state_dict()[k]) for k, v in sft_weights.items())
    assert session.model.peft_config["dpo"].r == session.model.peft_config["sft"].r
    assert json.loads(Path("runs/dpo/run.json").read_text())["train"]["from_adapter"] == "sft"


def test_dpo_interrupt_saves_a_loadable_adapter_and_resume_follows_the_same_trajectory(session):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ipylora.engine.tiny import tiny_model_path

    straight = []
    session.train("pairs", TrainArgs(method="dpo", name="straight", steps=8), reporter=straight.append)

    def interrupt_at_3(event):
        first.append(event)
        if isinstance(event, StepEnd) and event.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # a kernel interrupt: stop after this step, with a checkpoint

    first, second = [], []
    end = session.train("pairs", TrainArgs(method="dpo", name="cut", steps=8), reporter=interrupt_at_3)
    assert end.status == "interrupted" and end.step == 3
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path()), "runs/cut/adapter")

    end = session.resume("cut", reporter=second.append)

    assert end.status == "finished" and end.step == 8
    expected, got = losses(straight), {**losses(first), **losses(second)}
    assert sorted(got) == list(range(1, 9))
    assert max(abs(expected[s] - got[s]) for s in expected) < 1e-5


# -- SimPO, ORPO, KTO ---------------------------------------------------------------------------
@pytest.mark.parametrize("method, metric", [("simpo", "margin"), ("orpo", "margin"), ("kto", "KL")])
def test_reference_free_and_unpaired_methods_lower_their_loss(session, method, metric):
    events = []
    end = session.train("pairs", TrainArgs(method=method, name=method), reporter=events.append)
    assert end.status == "finished"
    steps = [e for e in events if isinstance(e, StepEnd)]
    first, last = steps[0].loss, sum(e.loss for e in steps[-2:]) / 2
    assert last < first * 0.8, (method, first, last)
    assert metric in steps[-1].metrics


def test_kto_reads_unpaired_rows(fresh_session):
    rows = [{"prompt": p, "completion": c, "label": label}
            for p, c, r in PAIRS.itertuples(index=False) for c, label in ((c, True), (r, False))]
    fresh_session.add_dataset("unpaired", pd.DataFrame(rows))
    end = fresh_session.train("unpaired", TrainArgs(method="kto", name="kto", steps=4))
    assert end.status == "finished" and end.step == 4


# -- the form and the panel ---------------------------------------------------------------------
def test_panel_plots_the_methods_metric_and_says_reward_accuracy(session):
    from ipylora.ui.live import NotebookReporter

    panel = NotebookReporter()
    session.train("pairs", TrainArgs(method="dpo", name="dpo", steps=4), reporter=panel)
    assert panel.curves["metrics"].keys() == {"margin", "reward accuracy"}
    assert len(panel.curves["metrics"]["margin"]) == 4
    assert "reward accuracy" in panel.last_line and "margin" in panel.last_line


# -- one-line errors ------------------------------------------------------------------------------
@pytest.fixture
def shell(fresh_session, tiny_tokenizer, monkeypatch):
    ip = ipython_shell(monkeypatch, fresh_session)
    fresh_session._tiny_tokenizer = tiny_tokenizer
    fresh_session.add_dataset("pairs", PAIRS)
    fresh_session.add_dataset("sft", pd.DataFrame({"question": ["a", "b"], "answer": ["x", "y"]}))
    return ip


@pytest.mark.parametrize("line, needles", [
    ("sft --method dpo", ("rejected", "--columns")),
    ("pairs --method dpx", ("Unknown --method 'dpx'", "dpo")),
    ("pairs --method dpo --from-adapter nowhere", ("--from-adapter 'nowhere'",)),
    ("pairs --method dpo --beta -1", ("--beta -1 must be above 0",)),
    ("pairs --method dpo --loss-type squared", ("--loss-type 'squared'", "ipo")),
    ("pairs --method simpo --gamma -2", ("--gamma -2",)),
    ("pairs --method kto --micro-batch-size 1", ("--micro-batch-size",)),
])
def test_bad_inputs_are_one_line(shell, capsys, line, needles):
    assert_one_line_error(shell, capsys, f"%lora_train {line}", *needles)
    from ipylora.engine import get_session

    assert not get_session().training  # the session takes the next command


def test_kto_label_that_is_not_boolean_is_one_line(shell, capsys):
    body = "prompt,completion,label\nhi,hello,maybe\nbye,ciao,true\n"
    assert_one_line_error(shell, capsys, f"%%lora_dataset bad --format unpaired-preference\n{body}", "label")


def test_form_has_a_method_selector_and_shows_its_knobs(shell):
    from ipylora.ui import TrainForm

    form = TrainForm(shell=shell, dataset="pairs")
    assert "dpo" in form.method.options and form.beta.layout.display == "none"  # SFT reads no beta
    form.method.value = "dpo"
    form.beta.value = 0.2
    form.loss_type.value = "ipo"
    assert form.gamma.layout.display == "none" and form.beta.description == "beta (0.1)"
    assert "ipo" in form.loss_type.options  # TRL's list
    form.method.value = "simpo"
    form.gamma.value = 0.8
    assert form.loss_type.layout.display == "none" and form.beta.description == "beta (2.0)"
    form.background.value = False
    assert form.line == "%lora_train pairs --method simpo --beta 0.2 --gamma 0.8"
    form.steps.value = 2
    form.train()
    run = json.loads(Path("runs/pairs/run.json").read_text())["train"]
    assert (run["method"], run["beta"], run["gamma"], run["steps"]) == ("simpo", 0.2, 0.8, 2)


# -- several processes --------------------------------------------------------------------------
def test_two_workers_train_dpo_and_the_adapter_is_loaded(session):
    import psutil

    events = []
    end = session.train("pairs", TrainArgs(method="dpo", name="dist", steps=4, gpus=2), reporter=events.append)

    assert end.status == "finished" and end.step == 4
    steps = [e for e in events if isinstance(e, StepEnd)]
    assert [e.step for e in steps] == [1, 2, 3, 4] and steps[-1].loss < steps[0].loss
    assert "margin" in steps[-1].metrics
    assert "dist" in session.model.peft_config and session.active_adapter == "dist"
    assert json.loads(Path("runs/dist/run.json").read_text())["train"]["method"] == "dpo"
    assert psutil.Process().children(recursive=True) == []  # no worker outlives its run
