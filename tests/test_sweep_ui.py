"""The sweep's notebook front end: the live panel (fed synthetic events, no training) and the sweep form."""

import json

import pytest

from ipylora.engine.events import EvalEnd, Notice, RunEnd, RunStart, StepEnd, SweepEnd, SweepStart, TrialEnd, TrialStart

PNG = b"\x89PNG\r\n\x1a\n"


class Handle:
    def __init__(self, first):
        self.frames = [first]

    def update(self, content):
        self.frames.append(content)

    @property
    def last(self):
        return self.frames[-1]


@pytest.fixture
def shown(monkeypatch):
    """The panel's display() calls: each opened output, and (for handles) every frame shown in it."""
    from ipylora.ui import sweep_live

    opened = []

    def display(content, display_id=False):
        opened.append(Handle(content) if display_id else content)
        return opened[-1] if display_id else None

    monkeypatch.setattr(sweep_live, "display", display)
    return opened


def trial_events(trial, losses, status, score, best, pruned_at=None, evals=(), message=""):
    run = f"s-{trial + 1}"
    total = 8
    params = {"lr": [1e-4, 2e-4, 5e-4, 1e-3][trial], "r": 16}
    yield TrialStart(sweep="s", trial=trial, run=run, params=params, total=4)
    yield RunStart(name=run, total_steps=total, run_dir=f"runs/{run}", rows=8)
    for step, loss in enumerate(losses, 1):
        yield StepEnd(step=step, total_steps=total, loss=loss, lr=1e-4, tokens=100 * step, elapsed=0.1 * step)
        if step in evals:
            yield EvalEnd(step=step, loss=loss + 0.1, best=loss + 0.1)
    yield RunEnd(name=run, status=status, step=len(losses), total_steps=total,
                 final_loss=losses[-1] if losses else None, adapter_dir=None, elapsed=1.0, message=message)
    yield TrialEnd(sweep="s", trial=trial, run=run, params=params, status=status, score=score, steps=len(losses),
                   elapsed=1.0 + trial, pruned_at=pruned_at, message=message, best_trial=best,
                   best_score={None: None, 0: 0.9, 1: 0.4}[best])


def sweep_events():
    """Four trials: a finished one, a better finished one, one pruned at step 4 (its stop took effect a
    step later, at 5), and one that failed after two steps."""
    yield SweepStart(sweep="s", total=4, search="grid", metric="train_loss", direction="minimize", prune="median",
                     space={"lr": "1e-4,2e-4,5e-4,1e-3", "r": "16"}, sweep_dir="runs/s")
    yield from trial_events(0, [2.0, 1.6, 1.3, 1.1, 1.0, 0.95, 0.92, 0.9], "finished", 0.9, best=0)
    yield from trial_events(1, [2.0, 1.2, 0.8, 0.6, 0.5, 0.45, 0.42, 0.4], "finished", 0.4, best=1)
    yield Notice(message="out of memory at batch 8: retrying with 4", keep=False)
    yield from trial_events(2, [2.0, 1.9, 1.9, 1.85, 1.84], "pruned", None, best=1, pruned_at=4,
                            message="pruned at step 4")
    yield from trial_events(3, [2.0, 3.0], "failed", None, best=1, message="ValueError: loss is nan")
    records = [{"trial": t, "run": f"s-{t + 1}", "params": {"lr": [1e-4, 2e-4, 5e-4, 1e-3][t], "r": 16},
                "status": status, "score": score, "steps": steps, "elapsed": 1.0 + t,
                "pruned_at": 4 if status == "pruned" else None, "message": message}
               for t, status, score, steps, message in (
                   (0, "finished", 0.9, 8, ""), (1, "finished", 0.4, 8, ""), (2, "pruned", None, 5, "pruned at step 4"),
                   (3, "failed", None, 2, "ValueError: loss is nan"))]
    yield SweepEnd(sweep="s", status="finished", trials=tuple(records), best_trial=1, best_run="s-2", best_score=0.4,
                   sweep_dir="runs/s", message="best: trial 2 (s-2), train_loss 0.4; its adapter is active")


def board_rows(content) -> list[list[str]]:
    """The leaderboard's HTML rows as cell texts (header left out)."""
    import re

    rows = re.findall(r"<tr([^>]*)>(.*?)</tr>", content._repr_html_())[1:]
    return [[("BEST " if "background" in attrs else "") + cells[0], *cells[1:]]
            for attrs, body in rows for cells in [re.findall(r"<td[^>]*>(.*?)</td>", body)]]


def test_sweep_panel_draws_every_trial_ranks_them_and_keeps_one_handle_each(shown):
    from ipylora.ui.sweep_live import SweepReporter

    panel = SweepReporter(plot_every_s=0.0, line_every_s=0.0)  # no throttle: the worst case for handles
    line, plot, board = shown
    for event in sweep_events():
        panel(event)
    assert len(shown) == 3  # the line, the plot and the leaderboard, however many events came
    assert len(line.frames) > 30 and len(plot.frames) > 5 and len(board.frames) >= 8

    final = plot.last
    assert final._repr_png_().startswith(PNG)
    series = {line["trial"]: line for line in final.series}
    assert series[2]["status"] == "pruned" and series[2]["steps"] == [1, 2, 3, 4]  # cut at 4, not at 5
    assert series[3]["steps"] == [1, 2] and series[0]["steps"] == list(range(1, 9))
    assert [t for t, line in series.items() if line["best"]] == [1]
    assert "trial 3 (5 points" not in repr(final) and "trial 3 (4 points, cut at step 4)" in repr(final)

    rows = board_rows(board.last)
    assert [row[0] for row in rows] == ["BEST ★ 2", "1", "3", "4"]  # by score, then the unscored by number
    assert rows[0][1] == "lr=0.0002" and rows[0][2] == "0.4000"  # r=16 is in every trial: not repeated
    assert rows[2][5] == "pruned at step 4" and rows[3][5].startswith("failed: ValueError: loss is nan")
    assert repr(board.last).splitlines()[1].startswith("★ 2 ")  # the text twin marks it too

    assert panel.last_line.startswith("s finished: 4/4 trials") and "best: trial 2 (s-2)" in panel.last_line


def test_progress_line_names_trial_step_loss_and_the_best_so_far(shown):
    from ipylora.ui.sweep_live import SweepReporter

    panel = SweepReporter(plot_every_s=0.0, line_every_s=0.0)
    events = list(sweep_events())
    second_trial = [i for i, e in enumerate(events) if isinstance(e, TrialStart)][1]
    for event in events[:second_trial + 5]:  # trial 2: TrialStart, RunStart, three steps
        panel(event)
    assert panel.last_line.startswith("s trial 2/4 (s-2): step 3/8 · loss 0.8000")
    assert "best: trial 1 0.9000 (lr=0.0001 r=16)" in panel.last_line
    notice = next(e for e in events if isinstance(e, Notice))
    panel(notice)
    assert panel.last_line == notice.message


def test_plot_uses_eval_loss_once_trials_have_it_and_throttles(shown):
    from ipylora.ui.sweep_live import SweepReporter

    panel = SweepReporter()  # default throttling: one frame a second at most while steps come
    _, plot, _ = shown
    panel(SweepStart(sweep="s", total=2, search="grid", metric="eval_loss", direction="minimize", prune="none",
                     space={"lr": "1e-4,2e-4"}))
    for trial in (0, 1):
        for event in trial_events(trial, [2.0, 1.5, 1.2, 1.0, 0.9, 0.8], "finished", 1.0 - trial / 10,
                                  best=trial, evals=(3, 6)):
            panel(event)
    lines, ylabel = panel.series()
    assert ylabel == "eval loss" and [line["steps"] for line in lines] == [[3, 6], [3, 6]]
    assert len(plot.frames) <= 8  # two trials' ends and run ends, a first frame each: not one per step
    assert "eval loss" in repr(plot.last)


def test_a_resumed_sweep_shows_its_ended_trials_and_their_curves(shown, tmp_path):
    from ipylora.ui.sweep_live import SweepReporter

    run_dir = tmp_path / "runs" / "s-1"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"event": "StepEnd", "step": s, "loss": 2.0 / s}) + "\n" for s in (1, 2, 3)) + '{"event": "Ste')
    done = ({"trial": 0, "run": "s-1", "params": {"lr": 1e-4}, "status": "finished", "score": 0.67, "steps": 3,
             "elapsed": 12.0, "pruned_at": None, "message": ""},)
    panel = SweepReporter()
    _, plot, board = shown
    panel(SweepStart(sweep="s", total=3, search="grid", metric="train_loss", direction="minimize", prune="none",
                     space={"lr": "1e-4,2e-4,5e-4"}, sweep_dir=str(tmp_path / "runs" / "s"), done=done))
    assert board_rows(board.last) == [["BEST ★ 1", "lr=0.0001", "0.6700", "3", "0:00:12", "finished"]]
    assert plot.last.series[0]["steps"] == [1, 2, 3] and plot.last.series[0]["best"]
    assert "1 done" in panel.last_line


def test_background_stop_button_asks_the_session_to_stop(shown, fresh_session, monkeypatch):
    from ipylora.ui.sweep_live import SweepReporter

    asked = []
    monkeypatch.setattr(fresh_session, "request_stop", lambda: asked.append(True) or True)
    panel = SweepReporter(background=True)
    assert shown[0] is panel.stop_button and len(shown) == 4  # the button, then the three handles
    panel.stop_button.click()
    assert asked == [True] and panel.stop_button.disabled
    panel(SweepEnd(sweep="s", status="stopped", trials=(), best_trial=None, best_run=None, best_score=None,
                   sweep_dir="runs/s", message="continue with %lora_sweep --resume s"))
    assert panel.stop_button.description == "stopped"


class Shell:
    """Records the magics a form runs."""

    def __init__(self):
        self.calls = []

    def run_line_magic(self, name, line):
        self.calls.append((name, line))


@pytest.fixture
def session(fresh_session, concepts):
    from support import PROMPT

    from ipylora.engine import DataArgs

    fresh_session.add_dataset("c", concepts.head(8), DataArgs(prompt=PROMPT, response="{description}"))
    return fresh_session


def test_sweep_form_builds_the_line_from_each_mode(session):
    from ipylora.ui import SweepForm

    form = SweepForm(shell=Shell(), dataset="c")
    form.background.value = False
    assert form.line == "%lora_sweep c --name c-sweep"
    assert "Nothing varies yet" in form.problems.value
    form.params["lr"].text.value = "1e-4, 2e-4 5e-4"  # typed into a default row: read as a list
    assert form.params["lr"].mode.value == "list"
    form.params["r"].text.value = "16"
    assert form.params["r"].mode.value == "fixed"
    form.params["dropout"].mode.value = "range"
    form.params["dropout"].text.value = "0.0, 0.2"
    assert form.line == "%lora_sweep c --name c-sweep lr=1e-4,2e-4,5e-4 r=16 dropout=0.0..0.2"
    assert "a grid needs a list of values" in form.problems.value  # a float range: not for a grid
    form.search.value = "tpe"
    form.trials.value = 6
    form.metric.value = "eval:rouge_l"
    form.prune.value = "median"
    form.name.value = "my sweep"
    form.params["epochs"].text.value = "1..3:int"
    assert form.line == ("%lora_sweep c --name 'my sweep' --search tpe --trials 6 --metric eval:rouge_l "
                         "--prune median lr=1e-4,2e-4,5e-4 r=16 dropout=0.0..0.2 epochs=1..3:int")
    assert form.problems.value == ""
    form.params["lr"].text.value = "1e-4,fast"
    assert "&#x27;fast&#x27; is not a number" in form.problems.value
    assert form.line in form.shown.value.replace("&#x27;", "'")


def test_sweep_form_shows_and_passes_only_the_methods_knobs(session):
    from ipylora.ui import SweepForm

    form = SweepForm(shell=Shell(), dataset="c", values={"beta": 0.5, "model": "Qwen/Qwen2.5-0.5B",
                                                         "quantization": "4bit", "from_adapter": "base-run",
                                                         "target_modules": "q_proj,v_proj"})
    form.background.value = False
    form.params["lr"].text.value = "1e-4,2e-4"
    beta = form.params["beta"]
    assert beta.layout.display == "none" and "beta" not in form.line  # SFT reads no beta
    form.method.value = "dpo"
    assert beta.layout.display is None and beta.label.value == "beta (0.1)"
    assert form.params["gamma"].layout.display == "none"
    assert form.line == ("%lora_sweep c --name c-sweep --model Qwen/Qwen2.5-0.5B --4bit --method dpo lr=1e-4,2e-4 "
                         "beta=0.5 --from-adapter base-run --target-modules q_proj,v_proj")


def test_sweep_form_start_runs_the_shown_line_and_stop_stops(session):
    from ipylora.ui import SweepForm

    shell = Shell()
    form = SweepForm(shell=shell, dataset="c", values={"name": "lrs", "steps": 30})
    form.params["lr"].text.value = "1e-5..1e-3:log"
    form.search.value = "random"
    assert form.line == "%lora_sweep c --name lrs --search random --background lr=1e-5..1e-3:log steps=30"
    form.button.click()
    assert shell.calls == [("lora_sweep", form.line[len("%lora_sweep "):])]
    form.stop_button.click()
    assert shell.calls[-1] == ("lora_sweep", "--stop")


def test_train_form_sweep_this_opens_a_sweep_form_with_its_values(session):
    from ipylora.ui import TrainForm

    shell = Shell()
    form = TrainForm(shell=shell, dataset="c")
    form.name.value = "tuned"
    form.quantization.value = "8bit"
    form.r.value = 8
    form.lr.value = 0.005
    form.steps.value = 6
    form.max_length.value = 256
    form.method.value = "orpo"
    form.beta.value = 0.2
    assert form.line == ("%lora_train c --name tuned --8bit --r 8 --lr 0.005 --steps 6 --max-length 256 "
                         "--method orpo --beta 0.2 --background")
    form.sweep_button.click()
    sweep = form.sweep_form
    assert sweep is not None and sweep.params["lr"].mode.value == "fixed"
    sweep.background.value = False
    assert sweep.line == ("%lora_sweep c --name tuned --8bit --method orpo lr=0.005 r=8 steps=6 max_length=256 "
                          "beta=0.2")
    sweep.params["lr"].text.value = "0.005,0.01"
    sweep.button.click()
    assert shell.calls == [("lora_sweep", sweep.line[len("%lora_sweep "):])]
    assert sweep.line.endswith("--method orpo lr=0.005,0.01 r=8 steps=6 max_length=256 beta=0.2")
