"""Before a run: --epochs with --steps, the tiny model's epochs scaled to the data, and the notices
(tiny model memorises; a long CPU run) that come before any weight loads."""

import json
import random
from pathlib import Path

import pandas as pd
import pytest

from ipylora.engine import ConfigError, DataArgs, Session, TrainArgs, config, notes
from ipylora.engine.estimate import estimate
from ipylora.engine.events import Notice, StepEnd
from ipylora.engine.train import total_steps
from support import PROMPT, assert_one_line_error, ipython_shell, run_cell_output

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def _long_rows(rows: int = 50, words: int = 250) -> pd.DataFrame:
    """Rows of ~700 tokens (the issue's 50 rows of ~600-token chats), far more text than the demo."""
    rng = random.Random(0)
    return pd.DataFrame({"prompt": [f"question {i}: " + " ".join(rng.choices(WORDS, k=20)) for i in range(rows)],
                         "response": [" ".join(rng.choices(WORDS, k=words)) for _ in range(rows)]})


@pytest.fixture
def session(concepts):
    session = Session()
    session.add_dataset("concepts", concepts, DataArgs(prompt=PROMPT, response="{description}"))
    session.add_dataset("long", _long_rows())
    return session


def _notices(events) -> list[str]:
    return [e.message for e in events if isinstance(e, Notice)]


# -- --epochs with --steps -----------------------------------------------------------------------
def test_epochs_with_steps_is_refused_in_one_line_before_loading(session, monkeypatch, capsys):
    ip = ipython_shell(monkeypatch, session)
    for line in ("%lora_train concepts --epochs 1 --steps 5", "%lora_train concepts --epochs 1 --steps 5 --dry-run"):
        assert_one_line_error(ip, capsys, line, "--epochs 1", "--steps 5", "only one of them")
    assert session.model is None and not Path("runs").exists()
    with pytest.raises(ConfigError, match="only one of them"):
        session.train("concepts", TrainArgs(epochs=2, steps=3))


def test_resume_of_a_record_with_epochs_and_steps_still_works(session):
    def stop_at_2(event):
        if isinstance(event, StepEnd) and event.step == 2:
            session.request_stop()

    session.add_dataset("few", session.dataset("concepts").frame.head(8), DataArgs(prompt=PROMPT, response="{description}"))
    end = session.train("few", TrainArgs(name="resumable", steps=4), reporter=stop_at_2)
    assert end.status == "stopped" and end.step == 3  # step 2 is said while step 3 runs (lagged.py)
    record = json.loads(Path("runs/resumable/run.json").read_text())["train"]
    assert record["epochs"] == 43 and record["steps"] == 4  # what --resume reads back
    end = session.resume("resumable")
    assert end.status == "finished" and end.step == 4


# -- the tiny model's default epochs -----------------------------------------------------------
def test_demo_keeps_43_epochs_and_301_steps(session, monkeypatch, capsys):
    demo = session.dataset("concepts")
    args = notes.run_args(session, demo, TrainArgs())
    assert args.epochs == 43 and args.steps is None
    assert total_steps(len(demo), args) == 301
    ip = ipython_shell(monkeypatch, session)
    out, _ = run_cell_output(ip, capsys, "%lora_train concepts --dry-run")
    assert "301 (43 epochs)" in out, out


def test_long_data_gets_fewer_epochs_unless_the_user_chose(session, monkeypatch, capsys):
    long = session.dataset("long")
    tokens = notes.train_tokens(session, long, 1024)
    assert tokens > 6 * notes.train_tokens(session, session.dataset("concepts"), 1024)
    args = notes.run_args(session, long, TrainArgs())
    assert config.TINY_MIN_EPOCHS <= args.epochs < 43 / 5
    assert args.epochs * tokens <= 1.1 * 43 * config.TINY_REFERENCE_TOKENS  # about the demo's work
    assert notes.run_args(session, long, TrainArgs(epochs=20)).epochs == 20
    assert notes.run_args(session, long, TrainArgs(steps=4)).steps == 4
    ip = ipython_shell(monkeypatch, session)
    out, _ = run_cell_output(ip, capsys, "%lora_train long --dry-run")
    assert f"({args.epochs:g} epochs)" in out, out
    # Ever more text: never below the floor.
    assert config.tiny_epochs(10**9) == config.TINY_MIN_EPOCHS
    assert config.tiny_epochs(config.TINY_REFERENCE_TOKENS) == 43


def test_run_records_the_scaled_epochs_and_the_tiny_notice_comes_once(session, monkeypatch, capsys):
    # A reference of 50 tokens makes 8 demo rows "large": 3 epochs of one step, a real run in seconds.
    monkeypatch.setattr(config, "TINY_REFERENCE_TOKENS", 50)
    session.add_dataset("few", session.dataset("concepts").frame.head(8), DataArgs(prompt=PROMPT, response="{description}"))
    ip = ipython_shell(monkeypatch, session)
    out, err = run_cell_output(ip, capsys, "%lora_train few --name scaled")
    run = json.loads(Path("runs/scaled/run.json").read_text())
    assert run["status"] == "finished", out + err
    assert run["train"]["epochs"] == config.TINY_MIN_EPOCHS and run["train"]["steps"] is None
    assert out.count("memorises its training rows") == 1 and "--model Qwen/Qwen2.5-0.5B-Instruct" in out
    assert "This CPU run is estimated" not in out
    out, _ = run_cell_output(ip, capsys, "%lora_train few --name again --steps 1")
    assert "finished" in out and "memorises" not in out  # once per session, not per run
    events, fresh, few = [], Session(), session.dataset("few")
    notes.before_training(fresh, few, notes.run_args(fresh, few, TrainArgs()), events.append)
    assert _notices(events) == [notes.TINY_NOTICE]  # a new session (kernel) hears it again


# -- the long CPU run notice --------------------------------------------------------------------
def test_no_long_run_notice_for_the_demo(session):
    demo = session.dataset("concepts")
    events = []
    notes.before_training(session, demo, notes.run_args(session, demo, TrainArgs()), events.append)
    assert _notices(events) == [notes.TINY_NOTICE]
    events.clear()
    notes.before_training(session, demo, notes.run_args(session, demo, TrainArgs(name="second")), events.append)
    assert events == []


def test_long_cpu_run_gets_one_line_with_a_shorter_length(session):
    long = session.dataset("long")
    args = notes.run_args(session, long, TrainArgs(epochs=1000))  # ~7,000 steps of ~700-token rows: far over 2 min on any CPU
    plan = estimate(args, long, session=session)
    assert plan.eta_s > 4 * notes.LONG_CPU_RUN_S
    message = notes.long_run_notice(session, long, args, tiny=True)
    assert message and "\n" not in message and "estimated at ~" in message and f"{plan.steps:,} steps" in message
    steps = int(message.split("--steps ")[1].split(" ")[0])
    epochs = float(message.split("--epochs ")[1].split(")")[0])
    shorter = estimate(notes.run_args(session, long, TrainArgs(steps=steps)), long, session=session)
    assert 0.5 * notes.LONG_CPU_RUN_S < shorter.eta_s < 1.5 * notes.LONG_CPU_RUN_S  # the matmul probe varies
    assert abs(total_steps(len(long), notes.run_args(session, long, TrainArgs(epochs=epochs))) - steps) <= steps * 0.15
    events = []
    notes.before_training(session, long, args, events.append)
    assert len(_notices(events)) == 2 and _notices(events)[1].startswith("This CPU run is estimated")
    assert notes.long_run_notice(session, long, args, tiny=True, resume=True) is None
