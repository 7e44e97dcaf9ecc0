"""%lora_eval after the quick-start training: loss, exact match, F1, ROUGE-L, EOS stops; eval.json history."""

import json

import pytest

from ipylora.engine import DataArgs, TrainArgs
from ipylora.engine.evaluate import EvalArgs, normalize, rouge_scorer, score, token_f1
from ipylora.engine.session import Session
from support import PROMPT, assert_one_line_error, ipython_shell


@pytest.fixture(scope="module")
def session(concepts, tmp_path_factory):
    """The quick-start run, once for the module: all 55 concepts, the tiny model's default recipe."""
    s = Session()
    s.add_dataset("concepts", concepts, DataArgs(prompt=PROMPT, response="{description}"))
    s.train("concepts", TrainArgs(name="sd", output=str(tmp_path_factory.mktemp("runs"))))
    return s


@pytest.fixture
def shell(session, monkeypatch):
    return ipython_shell(monkeypatch, session)


def test_trained_adapter_answers_the_trained_rows_and_stops(session):
    result = session.evaluate("sd", "concepts")
    metrics = result["metrics"]
    assert result["rows"] == 55
    assert metrics["exact_match"] >= 0.9 and metrics["eos_stop"] == 1.0
    assert metrics["rouge_l"] >= 0.95 and metrics["f1"] >= 0.95 and metrics["eval_loss"] < 0.5
    assert 20 < metrics["answer_tokens"] < 100
    saved = json.loads((session.adapters["sd"].run_dir / "eval.json").read_text())["evals"]
    assert saved[-1]["metrics"] == metrics and saved[-1]["dataset"] == "concepts" and saved[-1]["split"] == "all"
    assert len(result["worst"]) == 5 and result["worst"][0]["rouge_l"] <= result["worst"][-1]["rouge_l"]


def test_base_model_matches_nothing_and_never_stops(session):
    result = session.evaluate("base", "concepts", args=EvalArgs(max_new_tokens=40, limit=20))
    metrics = result["metrics"]
    assert result["rows"] == 20 and metrics["exact_match"] == 0 and metrics["eos_stop"] < 0.5
    assert metrics["eval_loss"] > 2 and metrics["perplexity"] > 10
    assert session.active_adapter == "sd"  # evaluating the base switches nothing


def test_eval_magic_shows_the_new_eval_beside_earlier_ones(shell, session, capsys):
    before = len(json.loads((session.adapters["sd"].run_dir / "eval.json").read_text())["evals"])
    for _ in range(2):
        capsys.readouterr()
        shell.run_cell("%lora_eval sd --on concepts --limit 6", store_history=False)
        out, err = capsys.readouterr()
    assert not err and "exact match" in out and "stops at EOS" in out and "ROUGE-L" in out
    history = json.loads((session.adapters["sd"].run_dir / "eval.json").read_text())["evals"]
    assert len(history) == before + 2
    exact_line = next(line for line in out.splitlines() if "exact match" in line)
    assert exact_line.count("%") == min(len(history), 5)  # one column per eval shown


@pytest.mark.parametrize("line, needle", [
    ("%lora_eval sd --on concepts:eval", "no eval split"),
    ("%lora_eval sd --on nope", "No dataset named 'nope'"),
    ("%lora_eval ghost --on concepts", "No adapter named 'ghost'"),
    ("%lora_eval sd --on concepts --limit 0", "--limit 0"),
    ("%lora_eval sd", "--on"),
])
def test_eval_mistakes_are_one_line(shell, capsys, line, needle):
    assert_one_line_error(shell, capsys, line, needle)


def test_scores():
    scorer = rouge_scorer()
    assert normalize("  The Cat, sat!") == "cat sat"
    assert score("A cat sat.", "a cat sat", scorer) == {"exact_match": 1.0, "f1": 1.0, "rouge_l": 1.0}
    assert token_f1("red cat", "red dog") == pytest.approx(0.5)
    assert score("dog", "cat", scorer)["rouge_l"] == 0.0
    # CJK text is scored per character (rouge-score's default tokenizer would drop it entirely).
    assert score("机器学习", "机器学", scorer)["rouge_l"] == pytest.approx(2 * 3 / 7)


def test_eval_batches_keep_similar_lengths_within_the_token_budget():
    from ipylora.engine.evaluate import _batches

    lengths = [5000, 5000, 100, 100, 4000, 90]
    batches = _batches(lengths, batch_size=2, max_tokens=8192)
    assert sorted(i for b in batches for i in b) == list(range(6))  # every row once
    assert batches[0] == [5, 2] and all(len(b) * max(lengths[i] for i in b) <= 8192 or len(b) == 1 for b in batches)
    assert _batches([20000], 8, 8192) == [[0]]  # a row longer than the budget still gets scored
