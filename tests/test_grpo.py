"""GRPO (issue #16) on the embedded model: reward functions written in the notebook move the adapter.

An SFT adapter first learns two answers per prompt ("yes TOPIC is good" and "no TOPIC is bad"), so
sampling gives both; GRPO from it, with a reward that prefers one, makes that answer the greedy one
for (nearly) every prompt, and the reward curve in metrics.jsonl rises. Built-in rewards train the
same way; two weighted rewards sum as stated; interrupt / resume; bad rewards are one line naming the
function and the row, the last finished step's adapter is kept, the session takes the next command.
"""

import json
import os
import signal
from pathlib import Path

import pandas as pd
import pytest

from ipylora.engine import GenerateArgs, TrainArgs
from ipylora.engine.events import Sample, StepEnd
from support import assert_one_line_error, ipython_shell, run_cell_output

TOPICS = "cats dogs rain tea maps jazz salt ice".split()
ANSWERS = pd.DataFrame([{"prompt": f"say something about {t}", "completion": f"{word} {t} is {judgement}"}
                        for t in TOPICS for word, judgement in (("yes", "good"), ("no", "bad"))])
PROMPTS = pd.DataFrame({"prompt": [f"say something about {t}" for t in TOPICS],
                        "good": [f"yes {t} is good" for t in TOPICS]})


def likes_yes(prompts, completions, **columns):
    return [1.0 if c.strip().startswith("yes") else 0.0 for c in completions]


def short(prompts, completions):
    return [1.0 if len(c.split()) <= 4 else 0.0 for c in completions]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A session with the two-answer SFT adapter, and the share of its greedy answers that say yes."""
    from ipylora.engine import DataArgs
    from ipylora.engine.session import Session

    out = tmp_path_factory.mktemp("grpo")
    session = Session()
    session.add_dataset("answers", ANSWERS, DataArgs())
    session.add_dataset("prompts", PROMPTS, DataArgs())
    end = session.train("answers", TrainArgs(name="sft2", epochs=30, output=str(out)))
    assert end.status == "finished"
    session.namespace = {"likes_yes": likes_yes, "short": short, "ANSWERS": ANSWERS}
    return session, out, yes_share(session, "sft2")


def yes_share(session, adapter: str) -> float:
    answers = [session.chat(f"say something about {t}", GenerateArgs(adapter=adapter, max_new_tokens=8))["text"]
               for t in TOPICS]
    return sum(a.strip().startswith("yes") for a in answers) / len(answers)


def steps(run_dir: Path) -> list[dict]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == "StepEnd"]


def test_a_notebook_reward_makes_its_answer_the_greedy_one(trained):
    session, out, before = trained
    events = []
    end = session.train("prompts", TrainArgs(name="yes", method="grpo", rewards=("likes_yes",), from_adapter="sft2",
                                             steps=40, output=str(out)), reporter=events.append)
    assert end.status == "finished" and end.step == 40
    after = yes_share(session, "yes")
    print(f"greedy answers saying yes: {before:.2f} after SFT, {after:.2f} after GRPO")
    assert before <= 0.6 and after >= 0.9
    rewards = [e["metrics"]["reward"] for e in steps(out / "yes")]
    assert len(rewards) == 40 and sum(rewards[-10:]) / 10 > sum(rewards[:5]) / 5 + 0.2
    assert all(key in steps(out / "yes")[0]["metrics"] for key in ("reward std", "completion length",
                                                                    "cut at length cap", "reward: likes_yes"))
    samples = [e for e in events if isinstance(e, Sample)]
    assert samples and all(s.reward in (0.0, 1.0) for s in samples)
    record = json.loads((out / "yes" / "run.json").read_text())
    assert record["train"]["rewards"] == ["likes_yes"] and record["train"]["num_generations"] == 4


def test_a_builtin_reward_trains_the_same_way(trained):
    session, out, before = trained
    end = session.train("prompts", TrainArgs(name="exact", method="grpo", rewards=("exact:good",),
                                             from_adapter="sft2", steps=40, output=str(out)))
    assert end.status == "finished"
    assert yes_share(session, "exact") >= 0.9
    assert "reward: exact_good" in steps(out / "exact")[-1]["metrics"]


def test_two_weighted_rewards_sum_as_stated(trained):
    session, out, _ = trained
    session.train("prompts", TrainArgs(name="two", method="grpo", rewards=("likes_yes:2", "short:0.5"),
                                       from_adapter="sft2", steps=4, output=str(out)))
    for step in steps(out / "two"):
        m = step["metrics"]
        assert m["reward"] == pytest.approx(2 * m["reward: likes_yes"] + 0.5 * m["reward: short"], abs=1e-6)


def test_interrupt_saves_a_loadable_adapter_and_resume_continues(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ipylora.engine.tiny import tiny_model_path

    session, out, _ = trained

    def interrupt_at_3(event):
        if isinstance(event, StepEnd) and event.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    end = session.train("prompts", TrainArgs(name="cut", method="grpo", rewards=("likes_yes",), steps=6,
                                             output=str(out)), reporter=interrupt_at_3)
    assert end.status == "interrupted" and end.step == 3
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path()), str(out / "cut" / "adapter"))
    end = session.resume("cut", output=str(out))
    assert end.status == "finished" and end.step == 6
    assert [s["step"] for s in steps(out / "cut")] == [1, 2, 3, 4, 5, 6]


# -- bad rewards: one line, the last step's adapter kept, the session goes on ---------------------
def raises_at_third_call():
    calls = []

    def flaky(prompts, completions, **columns):
        calls.append(1)
        if len(calls) == 3:
            raise ZeroDivisionError("division by zero")
        return [0.0] * len(completions)

    return flaky


def test_a_reward_that_raises_mid_run_keeps_the_last_step_and_names_the_row(trained):
    from ipylora.engine.rewards import RewardError

    session, out, _ = trained
    session.namespace["flaky"] = raises_at_third_call()
    with pytest.raises(RewardError) as err:
        session.train("prompts", TrainArgs(name="flaky", method="grpo", rewards=("flaky",), steps=6, output=str(out)))
    message = str(err.value)
    assert "\n" not in message and "flaky" in message and "row" in message and "ZeroDivisionError" in message
    record = json.loads((out / "flaky" / "run.json").read_text())
    assert record["status"] == "failed" and record["step"] == 2 and (out / "flaky" / "adapter").is_dir()
    assert not session.training and session.chat("say something about tea")["text"] is not None


@pytest.fixture
def shell(fresh_session, tiny_tokenizer, monkeypatch):
    ip = ipython_shell(monkeypatch, fresh_session)
    fresh_session._tiny_tokenizer = tiny_tokenizer
    fresh_session.add_dataset("prompts", PROMPTS)
    fresh_session.add_dataset("texts", pd.DataFrame({"text": ["a whole text", "another"]}))
    fresh_session.add_dataset("only", PROMPTS[["prompt"]])  # one column: prompts, no answers
    ip.run_cell("def two_values(prompts, completions): return [1.0, 2.0]\n"
                "def nan_reward(prompts, completions): return [float('nan')] * len(completions)\n"
                "def word(prompts, completions): return ['good'] * len(completions)\n"
                "def needs_answer(prompts, completions, answer): return [0.0] * len(completions)\n")
    return ip


@pytest.mark.parametrize("line, needles", [
    ("prompts --method grpo", ("needs a reward", "--reward FN")),
    ("prompts --method grpo --reward nowhere", ("nowhere", "two_values", "exact:COLUMN")),
    ("prompts --method grpo --reward needs_answer", ("needs_answer", "answer", "good")),
    ("prompts --method grpo --reward exact:answer", ("answer", "good")),
    ("prompts --method grpo --reward regex:( --steps 1", ("regex",)),
    ("prompts --method grpo --reward likes --num-generations 1", ("--num-generations 1",)),
    ("prompts --method grpo --reward likes --beta -1", ("--beta -1",)),
    ("prompts --method grpo --reward likes --loss-type squared", ("--loss-type 'squared'", "dr_grpo")),
    ("texts --method grpo --reward likes", ("no prompt", "--format prompts")),
    ("only --steps 2", ("prompts only", "--method grpo")),
])
def test_bad_rewards_and_data_are_one_line(shell, capsys, line, needles):
    shell.run_cell("def likes(prompts, completions): return [1.0] * len(completions)")
    assert_one_line_error(shell, capsys, f"%lora_train {line}", *needles)
    from ipylora.engine import get_session

    assert not get_session().training


@pytest.mark.parametrize("reward, needles", [
    ("two_values", ("two_values", "returned 2 values", "one float per completion")),
    ("nan_reward", ("nan_reward", "nan", "row", "None")),
    ("word", ("word", "row", "string")),
])
def test_bad_reward_values_end_the_run_in_one_line(shell, capsys, reward, needles):
    """Found only once completions exist: the run's own lines, then one error line, no traceback."""
    from ipylora.engine import get_session

    out, err = run_cell_output(shell, capsys, f"%lora_train prompts --method grpo --reward {reward} --steps 1")
    text = (out + err).strip()
    assert "Traceback" not in text, text
    last = text.splitlines()[-1]
    assert last.startswith("UsageError: "), text
    for needle in needles:
        assert needle in last, f"{needle!r} not in {last!r}"
    assert not get_session().training


def test_dry_run_plans_whole_groups_and_the_rollout_cache(shell, capsys):
    from ipylora.engine import get_session
    from ipylora.engine.estimate import estimate

    shell.run_cell("def likes(prompts, completions): return [1.0] * len(completions)")
    shell.run_cell("%lora_train prompts --method grpo --reward likes --num-generations 3 --dry-run")
    out = capsys.readouterr().out
    assert "batch" in out and "Traceback" not in out and "sampling the completions" in out
    session = get_session()
    plan = estimate(TrainArgs(method="grpo", rewards=("likes",), num_generations=3), session.dataset("prompts"),
                    device="cuda", gpu_free_bytes=8 * 2**30, session=session)
    assert plan.batch_size % 3 == 0 and plan.rollout_bytes > 0
    assert ("rollout (KV cache)" in dict(plan.table())) and plan.peak_bytes >= plan.weights_bytes + plan.rollout_bytes


def test_two_workers_train_grpo_with_a_builtin_reward(fresh_session):
    """`--gpus 2` (gloo on CPU): the workers rebuild `exact:good` from its spec and train; the adapter is loaded."""
    import psutil

    fresh_session.add_dataset("prompts", PROMPTS)
    events = []
    end = fresh_session.train("prompts", TrainArgs(method="grpo", rewards=("exact:good",), name="gdist", steps=2,
                                                   gpus=2), reporter=events.append)
    assert end.status == "finished" and end.step == 2
    assert [e.step for e in events if isinstance(e, StepEnd)] == [1, 2]
    assert "reward: exact_good" in [e for e in events if isinstance(e, StepEnd)][-1].metrics
    assert "gdist" in fresh_session.model.peft_config
    assert psutil.Process().children(recursive=True) == []


def test_two_workers_refuse_a_notebook_reward_in_one_line(shell, capsys):
    shell.run_cell("def likes(prompts, completions): return [1.0] * len(completions)")
    assert_one_line_error(shell, capsys, "%lora_train prompts --method grpo --reward likes --gpus 2",
                          "--gpus 2", "likes", "module")


def test_panel_shows_each_completions_reward():
    from ipylora.engine.events import RunStart
    from ipylora.ui.live import NotebookReporter

    shown = []
    reporter = NotebookReporter()
    reporter._samples = type("Handle", (), {"update": lambda self, content: shown.append(content)})()
    reporter(RunStart(name="g", total_steps=2, run_dir="runs/g", rows=1))
    reporter(Sample(step=1, prompt="say something about tea", text="yes tea is good", reward=1.0))
    reporter(Sample(step=2, prompt="say something about tea", text="no tea is bad", reward=0.25, detail="a 0.00, b 0.50"))
    text = repr(shown[-1])
    assert "<th>reward</th>" in shown[-1]._repr_html_()
    assert "reward 1.000" in text and "reward 0.250 (a 0.00, b 0.50)" in text
    assert text.index("no tea is bad") < text.index("yes tea is good")  # newest first


def test_form_shows_grpo_knobs_and_builds_the_line(shell):
    from ipylora.ui import TrainForm

    form = TrainForm(shell=shell, dataset="prompts")
    assert form.rewards.layout.display == "none"  # SFT reads no rewards
    form.method.value = "grpo"
    assert form.rewards.layout.display is None and form.gamma.layout.display == "none"
    assert "dr_grpo" in form.loss_type.options and form.num_generations.description == "generations (8)"
    form.rewards.value = "likes, exact:good:0.5"
    form.num_generations.value = 4
    form.background.value = False
    assert form.line == "%lora_train prompts --method grpo --reward likes --reward exact:good:0.5 --num-generations 4"
    form.method.value = "dpo"
    assert form.rewards.layout.display == "none" and "ipo" in form.loss_type.options


def test_trl_loss_types_are_accepted():
    from ipylora.engine import methods

    grpo = methods.get("grpo")
    assert {"grpo", "dr_grpo", "dapo", "bnpo"} <= set(methods.grpo.loss_types())
    assert grpo.check(TrainArgs(method="grpo", rewards=("exact:good",), loss_type="dr_grpo")) == []


def test_a_run_whose_completions_are_all_cut_says_so(trained):
    from ipylora.engine.events import Notice

    session, out, _ = trained
    events = []
    session.train("prompts", TrainArgs(name="capped", method="grpo", rewards=("likes_yes",), steps=3,
                                       max_completion_length=1, output=str(out)), reporter=events.append)
    said = [e.message for e in events if isinstance(e, Notice) and "--max-completion-length 1" in e.message]
    assert len(said) == 1 and "raise --max-completion-length" in said[0]
