"""Training on the resident tiny model: it learns, saves a standard PEFT adapter, stops cleanly."""

import json
import os
import signal
from pathlib import Path

import pytest

from ipylora.engine import DataArgs, TrainArgs
from ipylora.engine.events import RunEnd, StepEnd

from support import PROMPT

ROWS = 8


@pytest.fixture
def session(fresh_session, concepts):
    fresh_session.add_dataset("c", concepts.head(ROWS), DataArgs(prompt=PROMPT, response="{description}"))
    return fresh_session


def _prompt(concepts, i):
    return PROMPT.format(concept=concepts.concept[i])


def test_train_learns_saves_and_reuses_model(session, concepts):
    events = []
    end = session.train("c", TrainArgs(name="first", steps=120), reporter=events.append)
    assert end.status == "finished" and end.step == 120
    losses = [e.loss for e in events if isinstance(e, StepEnd)]
    assert len(losses) == 120 and losses[-1] < losses[0] / 4
    run = json.loads(Path("runs/first/run.json").read_text())
    assert run["status"] == "finished" and run["step"] == 120 and run["dataset"]["template_name"] == "human-assistant"
    assert run["lora"]["r"] == 32 and run["train"]["lr"] == 0.01
    lines = Path("runs/first/metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["event"] == "RunStart" and json.loads(lines[-1])["event"] == "RunEnd"
    answers = [session.chat(_prompt(concepts, i))["text"] for i in range(ROWS)]
    assert sum(a == d for a, d in zip(answers, concepts.description)) >= 4

    # The saved adapter is plain PEFT: a fresh base + PeftModel.from_pretrained answers the same.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ipylora.engine.chat import generate
    from ipylora.engine import GenerateArgs

    base = AutoModelForCausalLM.from_pretrained(session.model_source)
    reloaded = PeftModel.from_pretrained(base, "runs/first/adapter")
    prompt_text = session.datasets["c"].template.prompt_text(_prompt(concepts, 0))
    assert generate(reloaded, session.tokenizer, prompt_text, GenerateArgs(), None)["text"] == answers[0]

    # A second run reuses the resident model, and both adapters stay usable.
    session.train("c", TrainArgs(name="second", steps=5))
    assert session.load_count == 1
    assert set(session.adapters) == {"first", "second"} and session.active_adapter == "second"
    assert session.chat(_prompt(concepts, 0), _args(adapter="first"))["text"] == answers[0]
    base_answer = session.chat(_prompt(concepts, 0), _args(adapter="base", max_new_tokens=30))
    assert base_answer["text"] != answers[0] and not base_answer["stopped_at_eos"]


def _args(**kw):
    from ipylora.engine import GenerateArgs

    return GenerateArgs(**kw)


def _interrupt_at(step, how):
    def reporter(event):
        if isinstance(event, StepEnd) and event.step == step:
            if how == "raise":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)

    return reporter


@pytest.mark.parametrize("how", ["raise", "sigint"])
def test_interrupt_saves_adapter_at_that_step(session, concepts, how):
    k = 7
    events = []
    interrupt = _interrupt_at(k, how)
    end = session.train("c", TrainArgs(name="cut", steps=50), reporter=lambda e: (events.append(e), interrupt(e)))
    # Step k is said while step k+1 runs (lagged.py): the interrupt comes after step k+1, and the run
    # reports that step too, the one its adapter holds.
    steps = [e.step for e in events if isinstance(e, StepEnd)]
    assert isinstance(end, RunEnd) and end.status == "interrupted" and end.step == k + 1
    assert steps == list(range(1, k + 2))
    run = json.loads(Path("runs/cut/run.json").read_text())
    assert run["status"] == "interrupted" and run["step"] == end.step
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(session.model_source), "runs/cut/adapter")
    assert session.chat(_prompt(concepts, 0), _args(max_new_tokens=8))["tokens"] > 0
    # The next run works on the same resident model.
    assert session.train("c", TrainArgs(name="next", steps=3)).status == "finished"
    assert session.load_count == 1


def test_config_errors_name_the_flag(session):
    from ipylora.engine import ConfigError

    with pytest.raises(ConfigError, match=r"--lr -1 .*--r 0"):
        session.train("c", TrainArgs(lr=-1, lora=__import__("ipylora.engine", fromlist=["LoraArgs"]).LoraArgs(r=0)))
    with pytest.raises(Exception, match="name 'bad name'"):
        session.train("c", TrainArgs(name="bad name"))
    assert session.model is None  # validation happens before any loading
