"""%lora_eval on preference data: preference accuracy and margin against the run's reference policy.

An SFT run on the chosen answers raises their log-probabilities above the base's, so against the
base (its reference) nearly every pair must count; a run recorded as started from that same
adapter (--from-adapter) has a reference equal to itself, so every margin must be 0. The
log-probability function is checked against a direct per-row torch computation.
"""

import json
import shutil

import pandas as pd
import pytest

from ipylora.engine import DataArgs, TrainArgs
from ipylora.engine.evaluate import EvalArgs, answer_logps
from ipylora.engine.runs import read_json, write_json
from ipylora.engine.session import Session
from support import ipython_shell, run_cell_output

QUICK = EvalArgs(max_new_tokens=8, limit=6)


def preference_frame(concepts, n=12):
    rows = concepts.head(n)
    return pd.DataFrame({"prompt": [f"describe {c}" for c in rows.concept], "chosen": list(rows.description),
                         "rejected": [" ".join(reversed(d.split())) for d in rows.description]})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def session(concepts, runs):
    """An SFT adapter trained on the chosen answers of 12 pairs (a few steps of the tiny recipe)."""
    s = Session()
    s.add_dataset("prefs", preference_frame(concepts), DataArgs())
    s.train("prefs", TrainArgs(name="sft", steps=15, output=str(runs)))
    return s


def test_answer_logps_equal_a_direct_computation(session):
    import torch

    tokenizer, model = session.tokenizer, session.model
    prompts = [tokenizer(t)["input_ids"] for t in ("describe a cat", "hi", "a much longer prompt about the sea")]
    answers = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for t in ("fur, whiskers", "hello there, friend", "waves")]
    # max_tokens small enough to split the rows over several batches of different widths
    got = answer_logps(model, prompts, answers, batch_size=2, max_tokens=24)
    model.eval()
    with torch.no_grad():
        for prompt, answer, value in zip(prompts, answers, got):
            ids = torch.tensor([prompt + answer])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            expected = sum(logp[len(prompt) - 1 + k, token].item() for k, token in enumerate(answer))
            assert value == pytest.approx(expected, abs=1e-3)
    assert len(set(round(v, 3) for v in got)) == 3


def test_sft_on_chosen_beats_the_base_reference(session, runs):
    result = session.evaluate("sft", "prefs", args=QUICK, output=str(runs))
    metrics, found = result["metrics"], result["preference"]
    assert found["reference"] == "base" and found["rows"] == 6 and found["paired"]
    assert metrics["preference_accuracy"] >= 0.9 and metrics["preference_margin"] > 1
    assert found["beta"] is None and found["reward_margin"] is None  # an SFT run has no beta
    assert "rouge_l" in metrics  # the generation metrics, against chosen
    saved = json.loads((runs / "sft" / "eval.json").read_text())["evals"][-1]
    assert saved["metrics"]["preference_accuracy"] == metrics["preference_accuracy"]
    assert saved["preference"]["reference"] == "base"


def test_the_base_is_not_scored_against_itself(session, runs):
    result = session.evaluate("base", "prefs", args=QUICK, output=str(runs))
    assert "preference_accuracy" not in result["metrics"]
    assert "its own reference" in result["preference"]["note"]


def test_a_run_from_an_adapter_is_measured_against_it_loaded_from_disk(session, runs, concepts):
    # A run recorded as started from "sft" with sft's weights: policy == reference, so every margin is 0.
    shutil.copytree(runs / "sft", runs / "chained")
    record = read_json(runs / "chained" / "run.json")
    record["name"] = "chained"
    record["train"].update(from_adapter="sft", method="dpo", beta=0.5)
    write_json(runs / "chained" / "run.json", record)
    (runs / "chained" / "eval.json").unlink()
    fresh = Session()  # after a restart: neither adapter is loaded
    fresh.add_dataset("prefs", preference_frame(concepts), DataArgs())
    result = fresh.evaluate("chained", "prefs", args=QUICK, output=str(runs))
    found = result["preference"]
    assert found["reference"] == "sft" and "sft" in fresh.adapters
    assert fresh.active_adapter == "chained"  # loading the reference did not switch chat to it
    assert abs(found["margin"]) < 1e-3 and found["accuracy"] == 0.0
    assert found["beta"] == 0.5 and found["reward_margin"] == pytest.approx(0.5 * found["margin"])
    # Without the reference on disk or loaded: one line naming it and how to load it.
    record["train"]["from_adapter"] = "gone"
    write_json(runs / "chained" / "run.json", record)
    with pytest.raises(Exception, match=r"'gone'.*%lora_adapters --load FOLDER --as gone"):
        fresh.evaluate("chained", "prefs", args=QUICK, output=str(runs))


def test_unpaired_rows_score_by_the_labels_sign(session, runs, concepts):
    frame = preference_frame(concepts, 4)
    unpaired = pd.DataFrame({"prompt": list(frame.prompt) * 2, "completion": list(frame.chosen) + list(frame.rejected),
                             "label": [True] * 4 + [False] * 4})
    session.add_dataset("kto", unpaired, DataArgs())
    found = session.evaluate("sft", "kto", args=EvalArgs(max_new_tokens=4), output=str(runs))["preference"]
    assert not found["paired"] and found["rows"] == 8
    assert found["accuracy"] >= 0.5 and found["margin"] > 1  # desirable log-ratios well above undesirable ones


def test_eval_magic_prints_the_preference_line(session, runs, monkeypatch, capsys):
    shell = ipython_shell(monkeypatch, session)
    out, err = run_cell_output(shell, capsys, f"%lora_eval sft --on prefs --limit 4 -n 4 --output {runs}")
    line = next(line for line in out.splitlines() if line.startswith("preference accuracy: "))
    assert not err and "the base (adapters disabled)" in line and "beta-free" in line and "of 4 pairs" in line
    assert "preference accuracy" in out.split(line)[0]  # also a row of the eval table
    out, _ = run_cell_output(shell, capsys, f"%lora_eval base --on prefs --limit 2 -n 2 --output {runs}")
    assert "preference accuracy: - (not measured for base" in out
