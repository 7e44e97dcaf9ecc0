"""One eval loss: the live panel's and `%lora_eval`'s are the same figure on the same rows; a run
that overfits says so once; %lora_eval shows messages rows' real prompts and scores text rows
only when they have a prompt/answer split."""

import json
from pathlib import Path

import pandas as pd
import pytest

from ipylora.engine import DataArgs, TrainArgs
from ipylora.engine.evaluate import EvalArgs, dataset_examples
from ipylora.engine.events import EvalEnd, Notice, RunEnd
from ipylora.engine.runs import read_metrics
from ipylora.engine.session import Session
from ipylora.engine.train import overfitting
from support import PROMPT, ipython_shell, run_cell_output

SYSTEM = "You are a terse art director. Answer with one stable diffusion prompt."


def _chats(concepts: pd.DataFrame) -> pd.DataFrame:
    """Two-turn conversations that share a system prompt: the last user turn names the concept."""
    return pd.DataFrame({"messages": [[
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Which style do you like?"},
        {"role": "assistant", "content": "Digital art."},
        {"role": "user", "content": f"Now draw {row.concept}."},
        {"role": "assistant", "content": row.description},
    ] for row in concepts.head(24).itertuples()]})


@pytest.fixture(scope="module")
def session(concepts, tmp_path_factory):
    s = Session()
    s.add_dataset("held", concepts, DataArgs(prompt=PROMPT, response="{description}", eval=0.2, seed=3))
    s.add_dataset("chats", _chats(concepts), DataArgs(eval=6, seed=3))
    s.runs = str(tmp_path_factory.mktemp("runs"))
    return s


def _train(session, dataset, name, **kwargs):
    events = []
    end = session.train(dataset, TrainArgs(name=name, output=session.runs, **kwargs), reporter=events.append)
    return end, events


def _final_eval(session, name, events):
    """The last EvalEnd as the reporter got it, as metrics.jsonl has it, and run.json's eval loss."""
    run_dir = Path(session.runs) / name
    logged = [e for e in read_metrics(run_dir) if e["event"] == "EvalEnd"][-1]
    reported = [e for e in events if isinstance(e, EvalEnd)][-1]
    assert logged["loss"] == reported.loss and logged["step"] == reported.step
    return reported, json.loads((run_dir / "run.json").read_text())["eval_loss"]


def test_panel_eval_loss_equals_lora_eval(session, monkeypatch, capsys):
    # 25 steps with an eval every 10: the run evaluates its final adapter too (step 25).
    end, events = _train(session, "held", "agree", steps=25, eval_every=10)
    last, recorded = _final_eval(session, "agree", events)
    assert [e.step for e in events if isinstance(e, EvalEnd)] == [10, 20, 25]
    assert end.eval_loss == last.loss == recorded

    result = session.evaluate("agree", "held", "eval", output=session.runs)
    assert result["metrics"]["eval_loss"] == pytest.approx(last.loss, abs=1e-4)
    assert result["settings"]["max_length"] == 1024  # the run's, from run.json

    # The magic prints the same figure (4 decimals), and its own batch size changes nothing.
    shell = ipython_shell(monkeypatch, session)
    out, err = run_cell_output(shell, capsys, f"%lora_eval agree --on held:eval --batch-size 3 --output {session.runs}")
    assert not err and f"{last.loss:.4f}" in next(line for line in out.splitlines() if "eval loss" in line)


def test_multi_turn_eval_loss_is_over_the_training_tokens(session):
    # max_length 100 cuts the system prompt and the first turn from the start of every row: the
    # eval loss must be over those cut rows (what training saw), not over the full conversations.
    end, events = _train(session, "chats", "chat-agree", steps=12, eval_every=4, max_length=100)
    last, recorded = _final_eval(session, "chat-agree", events)
    assert last.step == 12 and end.eval_loss == recorded == last.loss

    same = session.evaluate("chat-agree", "chats", "eval", output=session.runs)
    assert same["settings"]["max_length"] == 100
    assert same["metrics"]["eval_loss"] == pytest.approx(last.loss, abs=1e-4)
    whole = session.evaluate("chat-agree", "chats", "eval", EvalArgs(max_length=1024), output=session.runs)
    assert abs(whole["metrics"]["eval_loss"] - last.loss) > 1e-3  # the cut rows are a different measure


def test_messages_eval_shows_and_answers_the_real_prompt_side(session):
    examples = dataset_examples(session.dataset("chats"), "eval")
    assert all(SYSTEM in e.prompt_side and "Which style do you like?" in e.prompt_side for e in examples)
    result = session.evaluate("chat-agree", "chats", "eval", output=session.runs)
    prompts = [row["prompt"] for row in result["answers"]]
    assert len(prompts) == 6 and all(p.startswith("Now draw ") for p in prompts) and len(set(prompts)) == 6
    assert {row["prompt"] for row in result["worst"]} <= set(prompts) and result["worst"]


def _overfit_data(concepts: pd.DataFrame) -> dict:
    """Six training pairs to memorise; eval pairs that share nothing with them."""
    train = concepts.head(6)[["concept", "description"]]
    held = pd.DataFrame({"concept": [f"item {i}" for i in range(6)],
                         "description": ["zq xv " * (3 + i) for i in range(6)]})
    return {"train": train, "eval": held}


def test_an_overfitting_run_says_so_once_with_the_best_step(concepts, tmp_path, capsys):
    from ipylora.ui.live import NotebookReporter

    s = Session()
    s.add_dataset("tiny", _overfit_data(concepts), DataArgs(prompt=PROMPT, response="{description}"))
    panel, events = NotebookReporter(), []
    end = s.train("tiny", TrainArgs(name="over", steps=60, eval_every=3, batch_size=6, output=str(tmp_path)),
                  reporter=lambda e: (events.append(e), panel(e)))
    evals = [e for e in events if isinstance(e, EvalEnd)]
    notes = [e for e in events if isinstance(e, Notice) and "overfitting" in e.message]
    assert len(notes) == 1 and notes[0].keep, [e.message for e in events if isinstance(e, Notice)]
    said_at = next(i for i, e in enumerate(events) if e is notes[0])
    before = [e for e in events[:said_at] if isinstance(e, EvalEnd)]
    best = min(before, key=lambda e: e.loss)
    assert [e.loss for e in before[-4:]] == sorted(e.loss for e in before[-4:])  # it rose 3 evals in a row
    assert f"the best eval loss was {best.loss:.4f} at step {best.step}" in notes[0].message
    assert "--early-stop 3" in notes[0].message
    assert isinstance(events[-1], RunEnd) and notes[0].message in end.message
    assert evals[-1].step == 60 and end.status == "finished"
    # Outside a kernel the panel prints each frame: the note stays under the progress line once
    # said, and the final line says it once (from the end message, not again as a note).
    frames = capsys.readouterr().out.splitlines()
    assert any(line.startswith("⚠ overfitting") for line in frames)
    final = [line for line in frames if line.startswith("over finished: 60/60 steps")][-1]
    assert final.count("overfitting: eval loss rose") == 1 and "--early-stop 3" in final, final


def test_overfitting_needs_rising_eval_and_falling_train_loss():
    rising = [(1, 1.0, 2.0), (2, 1.1, 1.5), (3, 1.2, 1.0), (4, 1.3, 0.5)]
    assert overfitting(rising)
    assert not overfitting(rising[:3])  # two rises only
    assert not overfitting([(1, 1.0, 2.0), (2, 1.1, 1.5), (3, 1.05, 1.0), (4, 1.3, 0.5)])  # a dip breaks the run
    assert not overfitting([(s, e, 1.0 + s) for s, e, _ in rising])  # train loss rose too: not overfitting


def test_text_rows_get_loss_only_unless_split_by_a_marker(monkeypatch, capsys):
    rows = [f"<s>[INST] name colour {i} [/INST] colour {i} is {c}</s>" for i, c in enumerate(["red", "blue", "teal", "gold"])]
    s = Session()
    s.add_dataset("whole", pd.DataFrame({"text": rows}), DataArgs())
    s.add_dataset("split", pd.DataFrame({"text": rows}), DataArgs(response_after="[/INST]"))
    shell = ipython_shell(monkeypatch, s)
    out, err = run_cell_output(shell, capsys, "%lora_eval base --on whole --max-new-tokens 4")
    assert not err and "text rows have no prompt/answer split: pass --response-after MARKER" in out
    rouge = next(line for line in out.splitlines() if "ROUGE-L" in line)
    assert rouge.split(":")[1].split()[-1] == "-"  # not scored, not a bogus 0.0
    record = json.loads(Path("runs/base/eval.json").read_text())["evals"][-1]
    assert set(record["metrics"]) == {"eval_loss", "perplexity"} and record["worst"] == []

    split = s.evaluate("base", "split", args=EvalArgs(max_new_tokens=4))
    assert split["note"] is None and "rouge_l" in split["metrics"] and len(split["answers"]) == 4
    assert all(row["prompt"] and "[/INST]" not in row["reference"] for row in split["answers"])


def test_token_loss_weighs_every_trained_token_the_same(session):
    from ipylora.engine.chat import _eval_mode, adapter_context
    from ipylora.engine.evaluate import token_loss

    session.ensure_model()
    tokens = session.dataset("held").eval.tokenize(session.tokenizer, 1024)
    with adapter_context(session.model, "base"), _eval_mode(session.model):
        one, count = token_loss(session.model, tokens, 1)
        four, _ = token_loss(session.model, tokens, 4)
    assert count == sum(label != -100 for row in tokens["labels"] for label in row[1:])
    assert four == pytest.approx(one, abs=1e-5)  # the batch size does not change the measure


def test_early_stop_keeps_the_best_adapter_whose_eval_lora_eval_repeats(concepts, tmp_path):
    s = Session()
    s.add_dataset("tiny", _overfit_data(concepts), DataArgs(prompt=PROMPT, response="{description}"))
    events = []
    end = s.train("tiny", TrainArgs(name="kept", steps=60, eval_every=3, batch_size=6, early_stop=3,
                                    output=str(tmp_path)), reporter=events.append)
    evals = [e for e in events if isinstance(e, EvalEnd)]
    best = min(evals, key=lambda e: e.loss)
    assert end.status == "early-stopped" and evals[-1].step - best.step == 9 and end.eval_loss == best.loss
    assert not [e for e in events if isinstance(e, Notice) and "overfitting" in e.message]  # early stop said it
    again = s.evaluate("kept", "tiny", "eval", output=str(tmp_path))
    assert again["metrics"]["eval_loss"] == pytest.approx(best.loss, abs=1e-4)
