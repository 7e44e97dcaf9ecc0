"""Sweeps (%lora_sweep, Session.sweep): trials on the one resident model, sweep.json, pruning,
stop/resume, flat memory over many trials, and one-line refusals of bad specs."""

import json
import math
import threading
from dataclasses import replace

import pytest
import torch

from ipylora.engine import DataArgs, SessionBusyError, TrainArgs
from ipylora.engine.events import RunStart, StepEnd, SweepEnd, TrialEnd, TrialStart
from ipylora.engine.runs import list_runs, read_json
from ipylora.engine.sweep import SweepArgs, apply
from support import CONCEPTS, PROMPT, assert_one_line_error, ipython_shell, live_rss

ROWS = 12


@pytest.fixture
def session(fresh_session, concepts):
    fresh_session.add_dataset("c", concepts.head(ROWS), DataArgs(prompt=PROMPT, response="{description}", eval=4))
    fresh_session.add_dataset("noeval", concepts.head(8), DataArgs(prompt=PROMPT, response="{description}"))
    return fresh_session


def _events():
    seen = []
    return seen, seen.append


def test_grid_runs_every_point_on_the_resident_model(session):
    seen, report = _events()
    end = session.sweep("c", SweepArgs(name="grid", space={"lr": "1e-3,3e-3,1e-2", "r": "4,8"}),
                        TrainArgs(steps=5), reporter=report)
    assert isinstance(end, SweepEnd) and end.status == "finished"
    record = read_json("runs/grid/sweep.json")
    trials = record["trials"]
    assert len(trials) == 6 and all(t["status"] == "finished" for t in trials)
    points = {(t["params"]["lr"], t["params"]["r"]) for t in trials}
    assert points == {(lr, r) for lr in (1e-3, 3e-3, 1e-2) for r in (4, 8)}
    assert record["space"] == {"lr": {"spec": "1e-3,3e-3,1e-2", "choices": [1e-3, 3e-3, 1e-2]},
                               "r": {"spec": "4,8", "choices": [4, 8]}}
    assert record["metric"] == "eval_loss" and record["direction"] == "minimize" and record["status"] == "finished"
    # Each trial's score is its run's final eval loss; the best one is the lowest, and it is active.
    for trial in trials:
        run = read_json(f"runs/{trial['run']}/run.json")
        assert run["status"] == "finished" and math.isclose(run["eval_loss"], trial["score"])
        assert run["sweep"]["name"] == "grid" and run["sweep"]["params"] == trial["params"]
        assert run["lora"]["r"] == trial["params"]["r"] and run["train"]["lr"] == trial["params"]["lr"]
    best = min(trials, key=lambda t: t["score"])
    assert record["best"]["run"] == best["run"] == end.best_run and session.active_adapter == best["run"]
    # One resident model for all of them; only the best three adapters stay loaded.
    assert session.load_count == 1
    assert best["run"] in session.adapters and len(session.adapters) == 3
    assert {r["name"] for r in list_runs("runs")} == {t["run"] for t in trials}
    starts = [e for e in seen if isinstance(e, TrialStart)]
    assert [e.trial for e in starts] == list(range(6)) and all(e.total == 6 for e in starts)
    assert sum(isinstance(e, RunStart) for e in seen) == 6
    ends = [e for e in seen if isinstance(e, TrialEnd)]
    assert ends[-1].best_trial == best["trial"]
    # The Optuna study is kept beside sweep.json.
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="grid", storage=JournalStorage(JournalFileBackend("runs/grid/optuna.log")))
    assert sorted(t.value for t in study.trials) == sorted(t["score"] for t in trials)


def test_tpe_with_the_median_pruner_cuts_bad_trials_where_it_says(session):
    end = session.sweep("noeval", SweepArgs(name="tpe", space={"lr": "1e-5..3e-2:log"}, trials=8, search="tpe",
                                            prune="median"), TrainArgs(steps=12))
    record = read_json("runs/tpe/sweep.json")
    assert record["metric"] == "train_loss" and len(record["trials"]) == 8
    pruned = [t for t in record["trials"] if t["status"] == "pruned"]
    assert pruned, [(t["params"], t["status"], t["score"]) for t in record["trials"]]
    for trial in pruned:
        # Cut after the warm-up quarter and before its end; the run folder says the same. The step
        # judged is said while the next one runs (lagged.py), so the trial ends one step later.
        assert 3 <= trial["pruned_at"] < 12 and trial["steps"] == trial["pruned_at"] + 1
        run = read_json(f"runs/{trial['run']}/run.json")
        assert run["status"] == "pruned" and run["step"] == trial["steps"]
    finished = [t for t in record["trials"] if t["status"] == "finished"]
    assert end.best_run == min(finished, key=lambda t: t["score"])["run"]


def test_a_point_tried_before_is_not_trained_again(session):
    session.sweep("noeval", SweepArgs(name="rep", space={"lr": "1e-3,1e-2"}, trials=5, search="random"),
                  TrainArgs(steps=3))
    trials = read_json("runs/rep/sweep.json")["trials"]
    assert len(trials) == 5
    trained = [t for t in trials if "repeat_of" not in t]
    assert len(trained) == len({t["params"]["lr"] for t in trials}) == 2
    for repeat in (t for t in trials if "repeat_of" in t):
        first = trials[repeat["repeat_of"]]
        assert repeat["score"] == first["score"] and repeat["run"] == first["run"] and repeat["steps"] == 0
    assert len(list_runs("runs")) == 2


def _losses(run: str) -> list[float]:
    return [e["loss"] for e in map(json.loads, open(f"runs/{run}/metrics.jsonl")) if e.get("event") == "step_end"]


def test_trials_of_one_shape_reuse_layers_and_train_as_a_fresh_run_would(session):
    """Every trial takes the LoRA layers of the one before (recycle.py; a trial of another rank gets them
    reshaped) and still trains exactly as the same point trained alone with %lora_train, whether its
    start was drawn ahead (the first trial of its rank) or recorded; at the end the best few are loaded
    again, with their trained weights."""
    layers = {}

    def report(event):
        if isinstance(event, RunStart):
            model = session.model
            layers[event.name] = next(m.lora_A[event.name] for m in model.modules()
                                      if hasattr(m, "lora_A") and event.name in m.lora_A)

    from ipylora.engine import recycle

    draws = []
    drawn_start = recycle._drawn_start

    def counted(*args):
        draws.append(threading.current_thread().name)
        return drawn_start(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recycle, "_drawn_start", counted)
        session.sweep("noeval", SweepArgs(name="re", space={"lr": "1e-3,1e-2", "r": "4,8"}, metric="train_loss"),
                      TrainArgs(steps=4), reporter=report)
    # The other rank's start was drawn ahead, in a thread, while the first trial trained; no trial drew its own.
    assert draws and set(draws) == {"ipylora-draw-ahead"}, draws
    trials = read_json("runs/re/sweep.json")["trials"]
    assert len(trials) == 4 and all(t["status"] == "finished" for t in trials), trials
    by_rank = {}
    for t in trials:
        by_rank.setdefault(t["params"]["r"], []).append(t["run"])
    (first, second), (other, _) = by_rank.values()  # the grid trains each rank twice
    assert len({id(layers[t["run"]]) for t in trials}) == 1  # the same module objects, renamed (and reshaped)
    assert layers[other].weight.shape[0] == trials[[t["run"] for t in trials].index(other)]["params"]["r"]
    from safetensors.torch import load_file

    for run in (second, other):  # a recorded start; a drawn one on layers reshaped from the other rank
        point = next(t["params"] for t in trials if t["run"] == run)
        session.train("noeval", replace(apply(TrainArgs(steps=4), point), name=f"alone-{run}"))
        alone, trial = (load_file(f"runs/{r}/adapter/adapter_model.safetensors") for r in (f"alone-{run}", run))
        assert alone.keys() == trial.keys() and all(torch.equal(alone[k], trial[k]) for k in alone), run  # bit for bit
        assert _losses(f"alone-{run}") == _losses(run)
    # The best trials are loaded, with their trained weights: as saved in their run folders.
    assert not any(name.startswith("~") for name in session.model.peft_config)
    loaded = [t["run"] for t in trials if t["run"] in session.adapters]
    assert len(loaded) == 3
    for run in loaded:
        saved = load_file(f"runs/{run}/adapter/adapter_model.safetensors")
        params = {n: p for n, p in session.model.named_parameters() if f".{run}." in n}
        assert len(params) == len(saved)
        for key, value in saved.items():
            param = next(p for n, p in params.items() if n.endswith(key.replace(".weight", f".{run}.weight").split("model.", 1)[-1]))
            assert torch.equal(param.detach().cpu().to(value.dtype), value), key


def test_stop_mid_trial_then_resume_finishes_the_rest(session):
    at_step, checked = threading.Event(), threading.Event()
    current = {}

    def report(event):  # in the sweep's thread: hold trial 2 at step 3 while the notebook's thread acts
        if isinstance(event, TrialStart):
            current["trial"] = event.trial
        if isinstance(event, StepEnd) and current.get("trial") == 1 and event.step == 3 and not at_step.is_set():
            at_step.set()
            checked.wait(60)

    handle = session.sweep("c", SweepArgs(name="st", space={"lr": "1e-3,1e-2", "r": "4,8"}), TrainArgs(steps=6),
                           reporter=report, background=True)
    assert at_step.wait(300)
    # While the sweep runs, the model is its own: training and chat are refused in one line, as for a background run.
    with pytest.raises(SessionBusyError, match="Sweep st is running .*trial 2/4.*%lora_sweep --stop"):
        session.train("c", TrainArgs(name="other", steps=2))
    with pytest.raises(SessionBusyError, match="Sweep st is running"):
        session.chat("hello")
    assert session.request_stop()
    checked.set()
    end = handle.join(timeout=600)
    assert end.status == "stopped"
    record = read_json("runs/st/sweep.json")
    assert [t["status"] for t in record["trials"]] == ["finished", "stopped"]
    second = record["trials"][1]
    assert second["steps"] == 3 and read_json(f"runs/{second['run']}/run.json")["status"] == "stopped"
    first_score = record["trials"][0]["score"]

    resumed = session.resume_sweep("st")
    assert resumed.status == "finished"
    record = read_json("runs/st/sweep.json")
    assert [t["status"] for t in record["trials"]] == ["finished"] * 4
    assert record["trials"][0]["score"] == first_score  # the finished trial is not run again
    run = read_json(f"runs/{second['run']}/run.json")
    assert run["resumed_from"] == 3 and run["step"] == 6  # continued from its checkpoint, not restarted
    assert len({(t["params"]["lr"], t["params"]["r"]) for t in record["trials"]}) == 4
    assert session.active_adapter == record["best"]["run"]


def test_a_kernel_interrupt_ends_the_trial_and_the_sweep(session):
    import os
    import signal

    current = {}

    def report(event):  # foreground: the sweep runs in this (the main) thread, as in a notebook cell
        if isinstance(event, TrialStart):
            current["trial"] = event.trial
        if isinstance(event, StepEnd) and current.get("trial") == 1 and event.step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    end = session.sweep("noeval", SweepArgs(name="ki", space={"lr": "1e-3,1e-2,3e-2"}), TrainArgs(steps=5),
                        reporter=report)
    assert end.status == "stopped" and "--resume ki" in end.message
    trials = read_json("runs/ki/sweep.json")["trials"]
    # Step 2 is said while step 3 runs (lagged.py): the interrupt ends the trial after step 3.
    assert [t["status"] for t in trials] == ["finished", "stopped"] and trials[1]["steps"] == 3
    assert read_json(f"runs/{trials[1]['run']}/run.json")["adapter"]  # its adapter was saved
    assert session.active_adapter == trials[0]["run"]  # the best finished trial


def test_a_failed_trial_is_recorded_and_the_sweep_goes_on(session):
    end = session.sweep("noeval", SweepArgs(name="f", space={"max_length": "8,512"}), TrainArgs(steps=3))
    trials = read_json("runs/f/sweep.json")["trials"]
    assert sorted(t["status"] for t in trials) == ["failed", "finished"]
    failed = next(t for t in trials if t["status"] == "failed")
    assert failed["params"] == {"max_length": 8} and "max-length" in failed["message"] and failed["score"] is None
    assert end.status == "finished" and end.best_run == next(t for t in trials if t["status"] == "finished")["run"]
    assert "1 failed" in end.message


def test_ten_trials_keep_memory_flat(session):
    sizes = []

    def report(event):
        if isinstance(event, TrialEnd):
            sizes.append(live_rss())

    session.sweep("noeval", SweepArgs(name="mem", space={"seed": ",".join(str(s) for s in range(10))}),
                  TrainArgs(steps=3), reporter=report)
    assert len(sizes) == 10
    assert max(sizes[1:]) < sizes[0] * 1.05, [round(s / sizes[0], 3) for s in sizes]
    assert len(session.adapters) == 3


@pytest.fixture
def shell(monkeypatch, session):
    return ipython_shell(monkeypatch, session)


@pytest.mark.parametrize("line, needles", [
    ("c --name s lr=abc", ("'abc' is not a number", "lr=1e-5..1e-3:log")),
    ("c --name s lr=1..", ("needs both ends",)),
    ("c --name s rank=8,16", ("not an option a sweep can vary", "Did you mean r")),
    ("c --name s 4bit=0..1", ("--4bit is a switch", "takes no value")),
    ("noeval --name s --metric eval_loss lr=1e-3,1e-2", ("has none", "--eval 0.1")),
    ("c --name s lr=1e-5..1e-3:log", ("a grid needs a list",)),
    ("c --name s --lr 1e-3 lr=1e-3,1e-2", ("both fixed (--lr) and swept",)),
    ("c --name s --trails 3 lr=1e-3,1e-2", ("unknown option --trails", "--trials")),
    ("c --name s --dropout 2 r=8,16", ("--dropout 2 is outside",)),
    ("c --name s --search tpe lr=0..1e-2:log", ("must start above 0",)),
])
def test_bad_specs_get_one_line_with_the_fix(shell, capsys, line, needles):
    assert_one_line_error(shell, capsys, f"%lora_sweep {line}", *needles)
    assert not (CONCEPTS.parent / "runs").exists()


def test_magic_line_runs_the_sweep_and_lists_its_trials(shell, capsys, monkeypatch):
    shell.run_line_magic("lora_sweep", "c --name m --steps 3 lr=1e-3,1e-2")
    out = capsys.readouterr().out
    assert "sweep m finished" in out and "trial 2" in out
    record = json.loads(open("runs/m/sweep.json").read())
    assert record["line"] == "%lora_sweep c --name m --steps 3 lr=1e-3,1e-2"
    assert record["base"]["train"]["steps"] == 3
    shell.run_line_magic("lora_runs", "")
    listing = capsys.readouterr().out
    assert "m-1" in listing and "m-2" in listing and "m #2" in listing  # the sweep column
    shown = []
    monkeypatch.setattr(shell.display_pub, "publish", lambda data, **kwargs: shown.append(data))
    shell.run_line_magic("lora_runs", "--plot m")  # a sweep's name plots all of its trials
    assert shown and "image/png" in shown[-1]
    assert_one_line_error(shell, capsys, "%lora_sweep c --name m lr=1e-3,1e-2", "exists", "--resume m")


def test_the_forms_start_runs_the_sweep_its_line_shows(shell, session):
    from ipylora.ui import SweepForm

    form = SweepForm(shell=shell, dataset="c")
    form.name.value = "fromform"
    form.params["lr"].text.value = "1e-3,1e-2"  # typed: the mode follows (list)
    form.params["r"].mode.value, form.params["r"].text.value = "list", "4 8"
    form.params["steps"].text.value = "3"
    form.background.value = False
    line = form.line
    assert line == "%lora_sweep c --name fromform lr=1e-3,1e-2 r=4,8 steps=3"
    form.button.click()
    record = read_json("runs/fromform/sweep.json")
    assert record["line"] == line and record["status"] == "finished"
    assert {name: spec["spec"] for name, spec in record["space"].items()} == form.space
    assert len(record["trials"]) == 4 and session.active_adapter == record["best"]["run"]


def test_a_drawn_start_is_what_peft_draws_and_leaves_the_generator_where_peft_does():
    """recycle._drawn_start (a recycled trial's start when none was recorded or drawn ahead) against
    PEFT attaching a fresh adapter at the same random state: the same A, the same generator state after."""
    from peft import LoraConfig, get_peft_model

    from ipylora.engine import recycle

    for init in (True, "gaussian"):
        model = torch.nn.Sequential(torch.nn.Linear(12, 20))
        torch.manual_seed(3)
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["0"], init_lora_weights=init))
        expected, after = peft_model.base_model.model[0].lora_A["default"].weight, torch.random.get_rng_state()
        torch.manual_seed(3)
        got = recycle._drawn_start(torch.default_generator, 12, 20, 4, init)
        assert torch.equal(got, expected) and torch.equal(torch.random.get_rng_state(), after), init
