"""Training in the notebook: background runs with Stop, resume, forms, runs table, adapters, memory."""

import json
import threading
from pathlib import Path

import pytest

from ipylora.engine import DataArgs, SessionBusyError, TrainArgs
from ipylora.engine.events import StepEnd
from support import PROMPT, ipython_shell, live_rss

ROWS = 8


@pytest.fixture
def session(fresh_session, concepts):
    fresh_session.add_dataset("c", concepts.head(ROWS), DataArgs(prompt=PROMPT, response="{description}"))
    return fresh_session


@pytest.fixture
def shell(session):
    return ipython_shell()


def test_background_stop_button_stops_within_one_step(session, concepts):
    from ipylora.ui.live import NotebookReporter

    panel = NotebookReporter(background=True)
    reached, release = threading.Event(), threading.Event()
    seen = []

    def reporter(event):
        panel(event)
        if isinstance(event, StepEnd):
            seen.append(event.step)
            if event.step == 5:
                reached.set()
                release.wait(30)  # hold the run at step 5 while the main thread acts

    handle = session.train("c", TrainArgs(name="bg", steps=500), reporter=reporter, background=True)
    assert reached.wait(120), "the background run never reached step 5"
    with pytest.raises(SessionBusyError, match=r"Training is running \(step 5/500\): run %lora_train --stop"):
        session.chat("hello")
    with pytest.raises(SessionBusyError):
        session.train("c", TrainArgs(name="other", steps=2))
    panel.stop_button.click()
    release.set()
    end = handle.join(60)
    assert end.status == "stopped" and end.step <= 6, end
    assert panel.stop_button.disabled
    run = json.loads(Path("runs/bg/run.json").read_text())
    assert run["status"] == "stopped" and run["step"] == end.step
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(session.model_source), "runs/bg/adapter")
    assert session.chat(PROMPT.format(concept=concepts.concept[0]))["tokens"] > 0  # no longer busy


def test_wait_queues_behind_a_running_training(session):
    first = session.train("c", TrainArgs(name="q1", steps=30), background=True)
    second = session.train("c", TrainArgs(name="q2", steps=3), background=True, wait=True)
    assert first.join(120).status == "finished" and second.join(120).status == "finished"
    assert json.loads(Path("runs/q2/run.json").read_text())["started"] >= json.loads(
        Path("runs/q1/run.json").read_text())["finished"]


def _losses(events):
    return {e.step: e.loss for e in events if isinstance(e, StepEnd)}


def test_resume_reproduces_the_uninterrupted_trajectory(session):
    straight = []
    session.train("c", TrainArgs(name="straight", steps=24), reporter=straight.append)

    def stop_at_10(event):
        if isinstance(event, StepEnd) and event.step == 10:
            session.request_stop()

    first_half, second_half = [], []
    end = session.train("c", TrainArgs(name="resumed", steps=24), reporter=lambda e: (first_half.append(e), stop_at_10(e)))
    # Step 10 is said while step 11 runs (lagged.py): the stop comes at the end of step 11.
    assert end.status == "stopped" and end.step == 11
    assert (Path("runs/resumed/checkpoints") / "checkpoint-11").is_dir()
    end = session.resume("resumed", reporter=second_half.append)
    assert end.status == "finished" and end.step == 24
    expected, got = _losses(straight), {**_losses(first_half), **_losses(second_half)}
    assert sorted(got) == list(range(1, 25))
    assert max(abs(expected[s] - got[s]) for s in expected) < 1e-5
    run = json.loads(Path("runs/resumed/run.json").read_text())
    assert run["resumed_from"] == 11 and run["status"] == "finished"


def test_form_train_button_runs_the_line_it_shows(shell, session):
    from ipylora.ui import TrainForm

    form = TrainForm(shell=shell, dataset="c")
    form.name.value = "from-form"
    form.steps.value = 6
    form.r.value = 8
    form.lr.value = 0.005
    form.background.value = False
    assert form.line == "%lora_train c --name from-form --r 8 --lr 0.005 --steps 6"
    form.button.click()
    assert json.loads(Path("runs/from-form/run.json").read_text())["status"] == "finished"
    shell.run_line_magic("lora_train", form.line[len("%lora_train "):] + " --output typed")
    by_form = json.loads(Path("runs/from-form/run.json").read_text())
    typed = json.loads(Path("typed/from-form/run.json").read_text())
    assert by_form["lora"] == typed["lora"] and by_form["dataset"] == typed["dataset"]
    assert {k: v for k, v in by_form["train"].items() if k != "output"} == \
        {k: v for k, v in typed["train"].items() if k != "output"}


def test_runs_table_adapters_and_unload(shell, session, capsys):
    session.train("c", TrainArgs(name="one", steps=3))
    session.train("c", TrainArgs(name="two", steps=3))
    capsys.readouterr()
    shell.run_line_magic("lora_runs", "")
    out = capsys.readouterr().out
    assert "one" in out and "two" in out and "finished" in out
    shell.run_line_magic("lora_runs", "--plot one,two")
    shell.run_line_magic("lora_adapters", "--use one")
    assert session.active_adapter == "one"
    shell.run_line_magic("lora_adapters", "--delete two")
    assert set(session.adapters) == {"one"}
    shell.run_line_magic("lora_unload", "")
    assert session.model is None and not session.adapters
    # A new session (as after a kernel restart) still lists the runs and can load an adapter back.
    from ipylora.engine import session as session_module

    session_module._session = None
    capsys.readouterr()
    shell.run_line_magic("lora_runs", "")
    assert "two" in capsys.readouterr().out
    shell.run_line_magic("lora_adapters", "--load two")
    assert session_module.get_session().active_adapter == "two"


def test_config_and_pyproject_defaults(shell, session, tmp_path):
    from ipylora.magics.settings import Lora, get_settings

    (tmp_path / "pyproject.toml").write_text('[tool.ipylora]\nruns-dir = "from-pyproject"\n')
    assert Lora().load_project() == tmp_path / "pyproject.toml"
    shell.run_line_magic("config", "Lora.runs_dir = 'from-config'")
    assert get_settings().runs_dir == "from-config"
    shell.run_line_magic("lora_train", "c --name cfg --steps 2")
    assert Path("from-config/cfg/run.json").exists()


def test_ten_runs_do_not_leak_memory(session):
    sizes = []
    for i in range(10):
        session.train("c", TrainArgs(name="leak", steps=3))
        sizes.append(live_rss())
    assert session.load_count == 1
    assert sizes[-1] <= sizes[0] * 1.05, [s // 2**20 for s in sizes]


def test_dataset_form_pastes_and_uploads(shell, session, tmp_path):
    from datetime import datetime, timezone

    from ipylora.ui import DatasetForm

    form = DatasetForm(shell=shell)
    form.name.value = "pasted"
    form.text.value = "q,a\nhello,world\nfoo,bar\n"
    form.template.value = "plain"
    assert form.cell == "%%lora_dataset pasted --template plain\nq,a\nhello,world\nfoo,bar"
    form.button.click()
    assert session.datasets["pasted"].pairs()[0] == ("hello", "world")
    upload = DatasetForm(shell=shell, folder=str(tmp_path / "uploads"))
    upload.name.value = "uploaded"
    upload.upload.value = ({"name": "../../evil name.csv", "content": memoryview(b"q,a\nx,y\n"), "type": "text/csv",
                            "size": 8, "last_modified": datetime.now(timezone.utc)},)
    assert (tmp_path / "uploads" / "evil name.csv").exists()  # the file name is kept, its path is not
    assert upload.cell.startswith("%lora_dataset uploaded --from ")
    upload.button.click()
    assert len(session.datasets["uploaded"]) == 1


def test_early_stop_keeps_the_best_eval_adapter(fresh_session, concepts):
    from ipylora.engine.events import EvalEnd

    fresh_session.add_dataset("held", concepts, DataArgs(prompt=PROMPT, response="{description}", eval=0.2, seed=1))
    events = []
    end = fresh_session.train("held", TrainArgs(name="early", steps=400, eval_every=10, early_stop=3),
                              reporter=events.append)
    evals = [e for e in events if isinstance(e, EvalEnd)]
    best = min(evals, key=lambda e: e.loss)
    assert end.status == "early-stopped" and end.step < 400
    assert [e.step for e in evals][-1] - best.step == 30  # three evals without improvement
    assert f"kept the best eval loss {best.loss:.4f} from step {best.step}" in end.message
    record = json.loads(Path("runs/early/run.json").read_text())
    assert record["best_eval_loss"] == pytest.approx(best.loss)
