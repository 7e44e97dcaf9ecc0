"""Rewards beyond training: `%lora_eval --reward` scores one greedy answer per prompt with GRPO's reward
functions (base and adapter, prompt-only data too), and `%lora_runs --plot` overlays GRPO reward curves.

The adapters under test are test_grpo.py's two-answer SFT adapter and a short GRPO run from it. The
expected reward means come from chat's own greedy answers to the same prompts (eval lays prompts out
as chat does), scored here by hand; `contains:topic` is 1.0 only where a row's answer names that row's
own topic, so it also checks that rewards see the columns of the right rows.
"""

import json

import pytest

from ipylora.engine import GenerateArgs, TrainArgs
from ipylora.engine.evaluate import EvalArgs
from support import assert_one_line_error, ipython_shell, run_cell_output
from test_grpo import ANSWERS, PROMPTS, TOPICS, likes_yes  # the same two-answer data and reward

TOPICAL = PROMPTS.assign(topic=TOPICS)  # three columns: prompts only, with columns for the rewards
CELL = ("def likes_yes(prompts, completions, **columns):\n"
        "    return [1.0 if c.strip().startswith('yes') else 0.0 for c in completions]\n"
        "def word(prompts, completions): return ['good'] * len(completions)\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A session with the SFT adapter "sft2", a 10-step GRPO run "grpo" from it, and sft2's greedy chat answers."""
    from ipylora.engine import DataArgs
    from ipylora.engine.session import Session

    out = tmp_path_factory.mktemp("grpo-eval")
    session = Session()
    session.add_dataset("answers", ANSWERS, DataArgs())
    session.add_dataset("prompts", PROMPTS, DataArgs())
    session.add_dataset("only", TOPICAL, DataArgs())
    assert session.train("answers", TrainArgs(name="sft2", epochs=30, output=str(out))).status == "finished"
    session.namespace = {"likes_yes": likes_yes}
    end = session.train("prompts", TrainArgs(name="grpo", method="grpo", rewards=("likes_yes",), from_adapter="sft2",
                                             steps=10, output=str(out)))
    assert end.status == "finished"
    answers = [session.chat(f"say something about {t}", GenerateArgs(adapter="sft2", max_new_tokens=8))["text"]
               for t in TOPICS]
    return session, out, answers


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


@pytest.fixture
def shell(trained, monkeypatch):
    session, _, _ = trained
    ip = ipython_shell(monkeypatch, session)
    ip.run_cell(CELL)
    return ip


def saved(run_dir) -> dict:
    return json.loads((run_dir / "eval.json").read_text())["evals"][-1]


def reward_line(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(f"reward {name}: "))


def test_eval_magic_prints_and_saves_rewards_for_adapter_and_base(shell, trained, capsys):
    session, out, answers = trained
    yes = mean(a.strip().startswith("yes") for a in answers)
    exact = mean(" ".join(a.split()).casefold() == f"yes {t} is good" for t, a in zip(TOPICS, answers))
    spec = f"--reward likes_yes --reward exact:good:0.5 --max-new-tokens 8 --output {out}"
    printed, err = run_cell_output(shell, capsys, f"%lora_eval sft2 --on prompts {spec}")
    assert not err and "Traceback" not in printed
    assert reward_line(printed, "likes_yes") == f"reward likes_yes: {yes:.3f}"
    assert reward_line(printed, "exact_good") == f"reward exact_good: {exact:.3f} (weight 0.5)"
    assert reward_line(printed, "(total)").startswith(f"reward (total): {yes + 0.5 * exact:.3f}")
    record = saved(out / "sft2")
    found = record["rewards"]
    assert found["rows"] == len(TOPICS) and found["per_reward"]["likes_yes"]["mean"] == pytest.approx(yes)
    assert found["per_reward"]["exact_good"] == {"mean": pytest.approx(exact), "weight": 0.5,
                                                 "spec": "exact:good:0.5", "scored": len(TOPICS)}
    assert found["total"] == pytest.approx(yes + 0.5 * exact)
    assert "exact match" in printed and "eval_loss" in record["metrics"]  # data with answers: the rest as before

    printed, err = run_cell_output(shell, capsys, f"%lora_eval base --on prompts {spec}")
    assert not err and "exact match" in printed
    base = saved(out / "base")
    assert base["name"] == "base" and set(base["rewards"]["per_reward"]) == {"likes_yes", "exact_good"}
    assert base["rewards"]["per_reward"]["exact_good"]["mean"] == base["metrics"]["exact_match"] == 0.0
    assert reward_line(printed, "exact_good") == "reward exact_good: 0.000 (weight 0.5)"
    base_yes = base["rewards"]["per_reward"]["likes_yes"]["mean"]
    assert reward_line(printed, "likes_yes") == f"reward likes_yes: {base_yes:.3f}"


def test_prompt_only_data_gets_rewards_and_a_note(shell, trained, capsys):
    session, out, answers = trained
    named = mean(t in a for t, a in zip(TOPICS, answers))
    assert named > 0.5, answers  # else contains:topic would tell right rows from wrong ones poorly
    printed, err = run_cell_output(shell, capsys, "%lora_eval sft2 --on only --reward likes_yes --reward contains:topic"
                                                  f" --max-new-tokens 8 --output {out}")
    assert not err and "Traceback" not in printed
    assert reward_line(printed, "likes_yes") == f"reward likes_yes: {mean(a.startswith('yes') for a in answers):.3f}"
    assert reward_line(printed, "contains_topic") == f"reward contains_topic: {named:.3f}"
    assert "no reference answers" in printed and "exact match" not in printed
    record = saved(out / "sft2")
    assert record["dataset"] == "only" and record["metrics"] == {} and record["rewards"]["rows"] == len(TOPICS)


def test_python_api_looks_rewards_up_in_the_namespace_and_takes_callables(trained):
    session, out, _ = trained
    session.namespace = {"likes_yes": likes_yes}

    def short(prompts, completions):
        return [1.0 if len(c.split()) <= 4 else None for c in completions]

    result = session.evaluate("grpo", "prompts", args=EvalArgs(rewards=("likes_yes:2", short), max_new_tokens=8,
                                                               limit=6), output=str(out))
    rows = result["reward_answers"]
    assert [r["row"] for r in rows] == list(range(6)) and rows[0]["prompt"] == "say something about cats"
    yes = [float(r["answer"].strip().startswith("yes")) for r in rows]
    per = result["rewards"]["per_reward"]
    assert per["likes_yes"]["mean"] == pytest.approx(sum(yes) / 6) and per["likes_yes"]["weight"] == 2
    assert per["short"]["scored"] == sum(r["rewards"]["short"] == 1.0 for r in rows)
    totals = [2 * r["rewards"]["likes_yes"] + (r["rewards"]["short"] if r["rewards"]["short"] == 1.0 else 0)
              for r in rows]
    assert result["rewards"]["total"] == pytest.approx(sum(totals) / 6)
    assert saved(out / "grpo")["rewards"]["per_reward"]["likes_yes"]["mean"] == per["likes_yes"]["mean"]


@pytest.mark.parametrize("line, needles", [
    ("sft2 --on prompts --reward nowhere", ("nowhere", "likes_yes", "exact:COLUMN")),
    ("sft2 --on only --reward exact:answer", ("exact_answer", "answer", "topic")),
    ("sft2 --on only", ("prompts only", "--reward")),
    ("sft2 --on prompts --reward word --limit 2", ("word", "row", "string")),
])
def test_bad_rewards_are_one_line(shell, trained, capsys, line, needles):
    _, out, _ = trained
    assert_one_line_error(shell, capsys, f"%lora_eval {line} --max-new-tokens 4 --output {out}", *needles)


def test_runs_plot_overlays_grpo_rewards_under_the_losses(shell, trained, capsys, monkeypatch):
    from ipylora.magics import runs

    _, out, _ = trained
    figures = []

    def keep(*args, **kwargs):
        figures.append(runs_figure(*args, **kwargs))
        return figures[-1]

    runs_figure = runs.overlay_figure
    monkeypatch.setattr(runs, "overlay_figure", keep)
    shown = []
    monkeypatch.setattr(runs, "display", shown.append)
    shell.run_line_magic("lora_runs", f"--plot grpo,sft2 --output {out}")
    loss, reward = figures[-1].axes
    assert [line.get_label() for line in loss.lines] == ["grpo train", "sft2 train"]
    assert [line.get_label() for line in reward.lines] == ["grpo"] and reward.get_ylabel() == "reward"
    logged = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    rewards = [e["metrics"]["reward"] for e in logged if e["event"] == "StepEnd"]
    assert len(rewards) == 10 and list(reward.lines[0].get_ydata()) == pytest.approx(rewards)
    assert reward.lines[0].get_color() == loss.lines[0].get_color()  # one colour per run in both panels
    assert shown and shown[-1].data.startswith(b"\x89PNG")

    shell.run_line_magic("lora_runs", f"--plot sft2 --output {out}")
    assert len(figures[-1].axes) == 1  # no GRPO run: the loss panel alone, as before
