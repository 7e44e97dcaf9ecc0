"""Sweeps: many training runs over one resident base model, chosen by Optuna, pruned as they go.

A sweep is a search space (`PARAM=SPEC` per tunable `%lora_train` option), a search (Optuna's
grid, random or TPE sampler), a metric and a pruner. Every trial is a normal run
(`runs/SWEEP-<k>/`) trained on the resident model, one after another, with no reload between
them: that is the point against `Trainer.hyperparameter_search`, which rebuilds the model for
every trial. `runs/SWEEP/sweep.json` records the space and every trial; Optuna's study lives
beside it (`optuna.log`, a journal file), so `--resume` continues the same study.

Specs: `lr=1e-4,2e-4` (a list), `lr=1e-5..1e-3:log` (a range; `:int` for whole numbers, implied
for integer options), `r=16` (fixed). A grid needs lists or integer ranges; random and TPE sample
ranges too.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields, replace

from ipylora.engine.config import LoraArgs, SCHEDULERS, TrainArgs
from ipylora.engine.errors import ConfigError, IpyloraError

SEARCHES = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "asha")
# Metrics %lora_eval reports where higher is better; the losses (and perplexity) are lower-better.
HIGHER_BETTER = ("exact_match", "f1", "rouge_l", "reward_accuracy", "accuracy", "reward")
# Trials whose adapters stay loaded (the best ones); the others are unloaded, their folders kept.
KEEP_LOADED = 3
# A trial's first quarter of steps is never pruned: early losses say little about where a run ends.
PRUNE_WARMUP = 0.25


def _tunable() -> dict[str, tuple[type, bool]]:
    """Sweepable option -> (value type, whether it is a LoraArgs field)."""
    kinds = {"lr": float, "epochs": float, "steps": int, "batch_size": int, "micro_batch_size": int,
             "warmup_ratio": float, "scheduler": str, "max_grad_norm": float, "max_length": int, "seed": int,
             "beta": float, "gamma": float, "loss_type": str, "num_generations": int,
             "max_completion_length": int, "temperature": float, "eval_every": int, "early_stop": int,
             "loraplus_ratio": float, "neftune": float}
    table = {name: (kind, False) for name, kind in kinds.items()}
    table.update({"r": (int, True), "alpha": (float, True), "dropout": (float, True), "target_modules": (str, True),
                  "init": (str, True)})
    return table


TUNABLE = _tunable()
"""The options a sweep can vary, by name (as `%lora_train`'s flags, with `_` for `-`)."""
# %lora_train switches: they take no value, so there is nothing to sweep over.
SWITCHES = {"4bit": "--4bit", "8bit": "--8bit", "trust_remote_code": "--trust-remote-code",
            "background": "--background", "wait": "--wait", "dora": "--dora", "rslora": "--rslora"}


# What other tools call the options (PEFT, TrainingArguments, TRL), for the "did you mean".
_OTHER_NAMES = {"rank": "r", "lora_r": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
                "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs", "max_steps": "steps",
                "per_device_train_batch_size": "batch_size", "max_seq_length": "max_length",
                "lr_scheduler_type": "scheduler", "warmup": "warmup_ratio"}


@dataclass(frozen=True)
class Param:
    """One dimension of the space: `choices` (a list, or one fixed value), or a range `low..high`."""

    name: str
    spec: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    @property
    def is_range(self) -> bool:
        return self.low is not None

    @property
    def fixed(self) -> bool:
        return not self.is_range and len(self.choices) == 1

    def grid(self) -> list:
        """The values a grid tries."""
        if not self.is_range:
            return list(self.choices)
        if not self.integer:
            raise ConfigError(f"{self.name}={self.spec}: a grid needs a list of values, e.g. "
                              f"{self.name}={_example(self.name)} (or a whole-number range, {self.name}=1..5:int), "
                              "or use --search random / tpe for a range.")
        return list(range(int(self.low), int(self.high) + 1))

    def suggest(self, trial):
        """This parameter's value for Optuna trial `trial`."""
        if not self.is_range:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def extremes(self) -> list:
        """Values that bound the space (checked against %lora_train's ranges before anything trains)."""
        return list(self.choices) if not self.is_range else [self.low, self.high]

    def to_dict(self) -> dict:
        return {"spec": self.spec, **({"choices": list(self.choices)} if not self.is_range else
                                      {"low": self.low, "high": self.high, "log": self.log, "integer": self.integer})}


def _example(name: str) -> str:
    examples = {"lr": "1e-4,2e-4,5e-4", "scheduler": "cosine,constant", "target_modules": "all-linear",
                "epochs": "1,2,3", "alpha": "16,32", "beta": "0.05,0.1,0.5", "temperature": "0.7,1.0",
                "max_grad_norm": "0.3,1.0", "warmup_ratio": "0.0,0.03,0.1", "loss_type": "sigmoid,ipo"}
    return examples.get(name, "8,16,32" if TUNABLE.get(name, (float, False))[0] is int else "0.0,0.05,0.1")


def option_name(text: str) -> str:
    """`batch-size`, `--batch-size` and `batch_size` all name the option batch_size."""
    return text.strip().lstrip("-").replace("-", "_")


def parse_param(name: str, spec: str) -> Param:
    """One `PARAM=SPEC`, typed as %lora_train types that option; a bad spec is one line with the fix."""
    key = option_name(name)
    if key in SWITCHES:
        raise ConfigError(f"{key}={spec}: {SWITCHES[key]} is a switch that takes no value, so it cannot be swept; "
                          f"pass {SWITCHES[key]} to use it in every trial, or leave it out.")
    if key not in TUNABLE:
        guess = [_OTHER_NAMES[key]] if key in _OTHER_NAMES else difflib.get_close_matches(key, list(TUNABLE), n=1,
                                                                                           cutoff=0.6)
        hint = f" Did you mean {guess[0]}?" if guess else f" Sweepable: {', '.join(sorted(TUNABLE))}."
        raise ConfigError(f"{name}={spec}: {name} is not an option a sweep can vary.{hint} "
                          "Other %lora_train options (--model, --4bit, ...) apply to every trial as they are.")
    kind = TUNABLE[key][0]
    text = spec.strip()
    if not text:
        raise ConfigError(f"{name}=: give values, e.g. {key}={_example(key)}.")
    if ".." in text:
        return _parse_range(key, text, kind)
    values = tuple(_value(key, part, kind, text) for part in text.split(","))
    if key == "scheduler":
        bad = [v for v in values if v not in SCHEDULERS]
        if bad:
            raise ConfigError(f"scheduler={text}: {bad[0]!r} is not a scheduler; choose from {', '.join(SCHEDULERS)}.")
    if len(set(values)) != len(values):
        raise ConfigError(f"{key}={text}: a value is listed twice; list each once.")
    return Param(key, text, choices=values)


def _parse_range(key: str, text: str, kind: type) -> Param:
    body, *flags = text.split(":")
    if kind is str:
        raise ConfigError(f"{key}={text}: {key} takes names, not a range; list them, e.g. {key}={_example(key)}.")
    unknown = [f for f in flags if f not in ("log", "int")]
    if unknown:
        raise ConfigError(f"{key}={text}: unknown range flag :{unknown[0]}; use :log and/or :int, "
                          f"e.g. {key}=1e-5..1e-3:log.")
    low_text, _, high_text = body.partition("..")
    if not low_text.strip() or not high_text.strip():
        raise ConfigError(f"{key}={text}: a range needs both ends, e.g. {key}=1e-5..1e-3:log or {key}=1..5:int.")
    integer = kind is int or "int" in flags
    low, high = (_value(key, part, int if integer else float, text) for part in (low_text, high_text))
    if not low < high:
        raise ConfigError(f"{key}={text}: the range's low end must be below its high end.")
    log = "log" in flags
    if log and low <= 0:
        raise ConfigError(f"{key}={text}: a :log range must start above 0.")
    return Param(key, text, low=low, high=high, log=log, integer=integer)


def _value(key: str, part: str, kind: type, spec: str):
    part = part.strip()
    if not part:
        raise ConfigError(f"{key}={spec}: an empty value in the list; write it as {key}={_example(key)}.")
    if kind is str:
        return part
    try:
        number = float(part)
    except ValueError:
        raise ConfigError(f"{key}={spec}: {part!r} is not a number; give a list ({key}={_example(key)}) "
                          f"or a range ({key}=1e-5..1e-3:log).") from None
    if kind is int:
        if not number.is_integer():
            raise ConfigError(f"{key}={spec}: {key} takes whole numbers, not {part}.")
        return int(number)
    if not math.isfinite(number):
        raise ConfigError(f"{key}={spec}: {part!r} is not a finite number.")
    return number


def parse_space(space: dict) -> dict[str, Param]:
    """{option: spec text or Param} -> {option: Param}, every spec checked."""
    parsed = {}
    for name, spec in space.items():
        param = spec if isinstance(spec, Param) else parse_param(name, str(spec))
        if param.name in parsed:
            raise ConfigError(f"{param.name} is given twice: give it once, as a list or a range.")
        parsed[param.name] = param
    if not parsed:
        raise ConfigError("A sweep needs at least one PARAM=SPEC, e.g. lr=1e-4,2e-4,5e-4 r=8,16.")
    return parsed


def apply(base: TrainArgs, values: dict) -> TrainArgs:
    """`base` with the trial's values in their fields (LoRA shape or training)."""
    lora_names = {f.name for f in fields(LoraArgs)}
    lora = {k: v for k, v in values.items() if k in lora_names}
    train = {k: v for k, v in values.items() if k not in lora_names}
    if "steps" in train and base.epochs is not None:
        base = replace(base, epochs=None)
    if "epochs" in train and base.steps is not None:
        base = replace(base, steps=None)
    return replace(base, **train, lora=replace(base.lora, **lora))


def direction(metric: str) -> str:
    """Optuna's direction for a metric: the losses are minimised, answer metrics maximised."""
    name = metric.split(":", 1)[1] if metric.startswith("eval:") else metric
    return "maximize" if any(name.startswith(word) for word in HIGHER_BETTER) else "minimize"


def grid_size(space: dict[str, Param]) -> int:
    return math.prod(len(param.grid()) for param in space.values())


@dataclass(frozen=True)
class SweepArgs:
    """One sweep: its name, space and how trials are chosen, scored and pruned."""

    name: str
    space: dict
    """Option -> spec text (`1e-5..1e-3:log`) or a `Param`."""
    trials: int | None = None
    """Trials to run; None: the whole grid, or 10 for random and TPE."""
    search: str = "grid"
    metric: str | None = None
    """eval_loss, train_loss or eval:METRIC (a %lora_eval metric); None: eval_loss when the dataset has an
    eval split, else train_loss."""
    prune: str = "none"
    seed: int = 42
    """Seed of the sampler (each trial's own training seed is --seed, the same for every trial)."""
    line: str | None = None
    """The %lora_sweep line the sweep came from (recorded in sweep.json)."""


def checked(sweep: SweepArgs, has_eval: bool) -> tuple[SweepArgs, dict[str, Param]]:
    """The sweep with its metric and trial count filled in, and its parsed space; every problem is one line."""
    from ipylora.engine.runs import check_name

    check_name(sweep.name, "sweep")
    if sweep.search not in SEARCHES:
        raise ConfigError(f"--search {sweep.search!r} is not one of {', '.join(SEARCHES)}.")
    if sweep.prune not in PRUNERS:
        raise ConfigError(f"--prune {sweep.prune!r} is not one of {', '.join(PRUNERS)}.")
    space = parse_space(sweep.space)
    metric = sweep.metric or ("eval_loss" if has_eval else "train_loss")
    if metric.startswith("eval") and not has_eval:
        raise ConfigError(f"--metric {metric} scores each trial on the eval split, and this dataset has none: add "
                          "--eval 0.1 to %%lora_dataset, or use --metric train_loss.")
    if metric not in ("eval_loss", "train_loss") and not (metric.startswith("eval:") and metric[5:]):
        raise ConfigError(f"--metric {metric!r}: use eval_loss, train_loss or eval:METRIC (e.g. eval:rouge_l).")
    if sweep.search == "grid":
        size = grid_size(space)
        trials = sweep.trials or size
        if trials > size:
            raise ConfigError(f"--trials {trials}: the grid has only {size} points; lower --trials or use "
                              "--search random / tpe.")
    else:
        trials = sweep.trials or 10
    if trials < 1:
        raise ConfigError(f"--trials {trials}: a sweep needs at least 1 trial.")
    if all(param.fixed for param in space.values()) and trials > 1:
        raise ConfigError("Every parameter is fixed, so every trial would be the same run: give one a list or "
                          "a range (lr=1e-4,2e-4).")
    return replace(sweep, metric=metric, trials=trials), space


def check_values(base: TrainArgs, space: dict[str, Param], tiny: bool) -> None:
    """Refuse, before anything trains, a value of the space that %lora_train would refuse."""
    from ipylora.engine.config import resolve

    resolve(base, tiny=tiny, tokens=1000, from_user=True)  # the options every trial gets, on their own
    for param in space.values():
        for value in param.extremes():
            try:
                resolve(apply(base, {param.name: value}), tiny=tiny, tokens=1000, from_user=True)
            except ConfigError as exc:
                raise ConfigError(f"{param.name}={param.spec}: {exc}") from None


class Scorer:
    """Watches one trial's events: reports its intermediate losses to Optuna (pruning it when the
    pruner says so) and keeps what its score is computed from."""

    def __init__(self, trial, metric: str, direction: str, prune: bool, on_prune):
        self.trial, self.metric, self.prune, self.on_prune = trial, metric, prune, on_prune
        self.sign = -1.0 if direction == "maximize" else 1.0
        self.losses: list[float] = []
        self.pruned_at: int | None = None
        self.steps = 0
        self.total = 0

    def __call__(self, event) -> None:
        from ipylora.engine.events import EvalEnd, StepEnd

        if isinstance(event, StepEnd):
            self.losses.append(event.loss)
            self.steps, self.total = event.step, event.total_steps
            if self.metric == "train_loss":
                self._report(self.recent_loss(), event.step)
        elif isinstance(event, EvalEnd):
            if self.metric != "train_loss":  # eval_loss, and the eval loss standing in for an eval:METRIC
                self._report(event.loss, event.step)

    def recent_loss(self) -> float:
        """The train loss at the end of the run: the mean over its last tenth of steps (one batch's
        loss alone is noisy)."""
        window = self.losses[-max(1, len(self.losses) // 10):]
        return sum(window) / len(window)

    def _report(self, value: float, step: int) -> None:
        # Intermediate values are losses; an eval:METRIC study maximises, so they go in negated.
        if not self.prune or self.pruned_at is not None or not math.isfinite(value):
            return
        if step < PRUNE_WARMUP * self.total:
            return
        self.trial.report(self.sign * value, step)
        if self.trial.should_prune():
            self.pruned_at = step
            self.on_prune()


def _study(folder, sweep: SweepArgs, space: dict[str, Param], study_direction: str):
    """The sweep's Optuna study, kept in a journal file in the sweep folder (created or loaded)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the live view says what each trial did
    if sweep.search == "grid":
        sampler = _grid_sampler({name: param.grid() for name, param in space.items()}, sweep.seed)
    elif sweep.search == "random":
        sampler = optuna.samplers.RandomSampler(seed=sweep.seed)
    else:
        # TPE samples at random for its first trials; a third of a short sweep is enough to model from.
        sampler = optuna.samplers.TPESampler(seed=sweep.seed, n_startup_trials=min(10, max(3, sweep.trials // 3)))
    pruner = {"none": optuna.pruners.NopPruner(),
              "median": optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
              "asha": optuna.pruners.SuccessiveHalvingPruner()}[sweep.prune]
    storage = JournalStorage(JournalFileBackend(str(folder / "optuna.log")))
    return optuna.create_study(study_name=sweep.name, storage=storage, load_if_exists=True, sampler=sampler,
                               pruner=pruner, direction=study_direction)


def _grid_sampler(grid: dict, seed: int):
    import optuna

    class AskTellGrid(optuna.samplers.GridSampler):
        """Optuna's grid, driven by ask/tell: its after_trial calls `study.stop()` once the grid is
        covered, which Optuna allows only inside `optimize()`. The sweep counts its trials itself."""

        def after_trial(self, study, trial, state, values) -> None:
            pass

    return AskTellGrid(grid, seed=seed)


def _recorded_base(base: TrainArgs) -> dict:
    from ipylora.engine.train import recorded_args

    return {"train": recorded_args(base), "lora": {f.name: getattr(base.lora, f.name) for f in fields(LoraArgs)}}


def base_from_record(record: dict) -> TrainArgs:
    from ipylora.engine.config import args_from_record

    return args_from_record(record["train"], record["lora"])


def best_of(trials: list[dict], study_direction: str) -> dict | None:
    scored = [t for t in trials if t["status"] == "finished" and t.get("score") is not None
              and math.isfinite(t["score"])]
    if not scored:
        return None
    pick = max if study_direction == "maximize" else min
    return pick(scored, key=lambda t: t["score"])


def ranked(trials: list[dict], study_direction: str) -> list[dict]:
    """Finished trials, best first."""
    scored = [t for t in trials if t["status"] == "finished" and t.get("score") is not None
              and math.isfinite(t["score"])]
    return sorted(scored, key=lambda t: t["score"], reverse=study_direction == "maximize")


class SweepRunner:
    """Runs a sweep's trials one after another on the session's resident model (see the module doc)."""

    def __init__(self, session, dataset: str, sweep: SweepArgs, base: TrainArgs, reporter=None, resume: bool = False):
        from pathlib import Path

        from ipylora.engine.runs import read_json

        self.session, self.dataset, self.reporter = session, dataset, reporter
        data = session.dataset(dataset)
        self.folder = Path(base.output) / sweep.name
        if resume:
            self.record = read_json(self.folder / "sweep.json")
        self.sweep, self.space = checked(sweep, "eval" in data.splits())
        self.base = base
        self.direction = direction(self.sweep.metric)
        self.resume = resume

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, stop):
        """Every remaining trial, then the best one's adapter active; returns the SweepEnd event.
        `stop`: the sweep's StopFlag (Stop button, --stop, a kernel interrupt between trials)."""
        import time

        from ipylora.engine.events import SweepStart

        if not self.resume:
            self._claim()
        self.study = _study(self.folder, self.sweep, self.space, self.direction)
        trials = self.record["trials"]
        self.record["status"] = "running"
        self._write()
        done = tuple(t for t in trials if t["status"] in ("finished", "pruned", "failed"))
        self._emit(SweepStart(sweep=self.sweep.name, total=self.sweep.trials, search=self.sweep.search,
                              metric=self.sweep.metric, direction=self.direction, prune=self.sweep.prune,
                              space={name: param.spec for name, param in self.space.items()},
                              sweep_dir=str(self.folder), done=done))
        from ipylora.engine.recycle import recycling

        # Every trial trains on the same tokens, and takes the LoRA layers of an unloaded trial of its shape.
        with self.session.dataset(self.dataset).tokens_kept(), recycling(self.session) as recycler:
            rank = self.space.get("r")
            recycler.expect(rank.choices if rank is not None and not rank.is_range else (),
                            None if "seed" in self.space else self.base.seed)
            try:
                for unfinished in [t for t in trials if t["status"] in ("stopped", "running")]:
                    if stop.is_set():
                        break
                    self._trial(unfinished["trial"], unfinished["params"], stop, again=unfinished)
                while not stop.is_set() and len(trials) < self.sweep.trials:
                    trial = self.study.ask()
                    params = {name: param.suggest(trial) for name, param in self.space.items()}
                    same = next((t for t in trials if t["params"] == params and t["status"] in ("finished", "pruned")), None)
                    if same is not None:
                        self._repeat(trial, params, same)
                    else:
                        self._trial(trial.number, params, stop, optuna_trial=trial)
            except KeyboardInterrupt:  # between trials (a trial's own Ctrl-C ends only that trial)
                stop.set("interrupted")
                for entry in trials:
                    if entry["status"] == "running":  # it had not started training: run again on --resume
                        entry["status"] = "stopped"
            self._keep_best()
        self.record["status"] = "stopped" if stop.is_set() else "finished"
        self.record["finished"] = time.time()
        return self._finish()

    def _trial(self, number: int, params: dict, stop, optuna_trial=None, again: dict | None = None) -> None:
        import time

        import optuna

        from ipylora.engine.events import TrialEnd, TrialStart

        session = self.session
        if optuna_trial is None:  # a trial resumed from the study's journal
            frozen = next(t for t in self.study.get_trials(deepcopy=False) if t.number == number)
            optuna_trial = optuna.trial.Trial(self.study, frozen._trial_id)
        run = again["run"] if again else f"{self.sweep.name}-{number + 1}"
        entry = again or {"trial": number, "run": run, "params": params}
        if again is None:
            self.record["trials"].append(entry)
        entry.update(status="running", started=time.time())
        self._write()
        self._emit(TrialStart(sweep=self.sweep.name, trial=number, run=run, params=params, total=self.sweep.trials))

        def prune():
            if session._stop_flag is not None:
                session._stop_flag.set("pruned")

        scorer = Scorer(optuna_trial, self.sweep.metric, self.direction, self.sweep.prune != "none", prune)

        def report(event):
            scorer(event)
            self._emit(event)

        started = time.time()
        status, score, message, end = "failed", None, "", None
        try:
            end = self._train(run, params, report, again)
            run = end.name
            status = {"finished": "finished", "early-stopped": "finished", "pruned": "pruned"}.get(end.status, "stopped")
            if end.status == "failed":
                status = "failed"
            message = end.message
            if status == "stopped":
                stop.set("stopped")
            elif status == "finished":
                score = self._score(run, end, scorer)
        except KeyboardInterrupt:
            status, message = "stopped", "interrupted"
            stop.set("interrupted")
        except IpyloraError as exc:  # out of memory after the retries, a trial value the model refuses...
            message = str(exc)
        except Exception as exc:  # a failed trial is recorded and the sweep goes on
            message = f"{type(exc).__name__}: {exc}"
        if status == "finished" and (score is None or not math.isfinite(score)):
            status, message = "failed", message or "no score (the metric came out empty)"
        entry.update(run=run, status=status, score=score, message=message.splitlines()[0][:300] if message else "",
                     steps=end.step if end else scorer.steps, total_steps=end.total_steps if end else scorer.total,
                     elapsed=round(time.time() - started + entry.get("elapsed", 0.0), 3),
                     pruned_at=scorer.pruned_at if status == "pruned" else None, ended=time.time())
        state = {"finished": None, "pruned": optuna.trial.TrialState.PRUNED, "failed": optuna.trial.TrialState.FAIL}
        if status in state:
            self.study.tell(optuna_trial.number, score if status == "finished" else None, state=state[status])
        self._tag_run(entry)
        self._unload_rest()
        best = best_of(self.record["trials"], self.direction)
        self.record["best"] = best and {k: best[k] for k in ("trial", "run", "score", "params")}
        self._write()
        self._emit(TrialEnd(sweep=self.sweep.name, trial=number, run=run, params=params, status=status,
                            score=score, steps=entry["steps"], elapsed=entry["elapsed"], pruned_at=entry["pruned_at"],
                            message=entry["message"], best_trial=best and best["trial"],
                            best_score=best and best["score"]))

    def _repeat(self, trial, params: dict, same: dict) -> None:
        """A point the search already tried (TPE and random repeat points of a list space): the trial
        gets that trial's result without training it again, as Optuna's FAQ advises."""
        import optuna

        from ipylora.engine.events import TrialEnd, TrialStart

        self._emit(TrialStart(sweep=self.sweep.name, trial=trial.number, run=same["run"], params=params,
                              total=self.sweep.trials))
        entry = {"trial": trial.number, "run": same["run"], "params": params, "status": same["status"],
                 "score": same["score"], "steps": 0, "total_steps": 0, "elapsed": 0.0, "pruned_at": same.get("pruned_at"),
                 "message": f"the same point as trial {same['trial'] + 1}: its result, not trained again",
                 "repeat_of": same["trial"]}
        self.record["trials"].append(entry)
        if same["status"] == "finished":
            self.study.tell(trial.number, same["score"])
        else:
            self.study.tell(trial.number, state=optuna.trial.TrialState.PRUNED)
        best = best_of(self.record["trials"], self.direction)
        self._write()
        self._emit(TrialEnd(sweep=self.sweep.name, trial=trial.number, run=same["run"], params=params,
                            status=same["status"], score=same["score"], steps=0, elapsed=0.0,
                            pruned_at=entry["pruned_at"], message=entry["message"], best_trial=best and best["trial"],
                            best_score=best and best["score"]))

    def _train(self, run: str, params: dict, report, again: dict | None):
        """Train trial `run` (or continue a stopped one from its checkpoint) in the sweep's thread."""
        from ipylora.engine.train import last_checkpoint

        session = self.session
        if again is not None and last_checkpoint(self.folder.parent / run) is not None:
            return session.resume(run, self.base.output, reporter=report, wait=True)
        args = replace(apply(self.base, params), name=run)
        return session.train(self.dataset, args, reporter=report, wait=True)

    def _score(self, run: str, end, scorer: Scorer) -> float | None:
        if self.sweep.metric == "eval_loss":
            return end.eval_loss
        if self.sweep.metric == "train_loss":
            return scorer.recent_loss() if scorer.losses else None
        name = self.sweep.metric[len("eval:"):]
        result = self.session.evaluate(run, self.dataset, split="eval", output=self.base.output)
        metrics = result["metrics"]
        if name not in metrics:
            raise ConfigError(f"--metric eval:{name}: %lora_eval has no metric {name!r} for this data "
                              f"(it has: {', '.join(sorted(metrics))}).")
        return float(metrics[name])

    # -- records ----------------------------------------------------------------------------------
    def _claim(self) -> None:
        import time

        if (self.folder / "sweep.json").exists():
            raise ConfigError(f"A sweep named {self.sweep.name!r} exists in {self.folder}: continue it with "
                              f"%lora_sweep --resume {self.sweep.name}, or choose another --name.")
        try:
            self.folder.mkdir(parents=True)
        except FileExistsError:
            raise ConfigError(f"{self.folder} exists (a run of that name?): choose another --name for the sweep.") from None
        self.record = {
            "name": self.sweep.name, "dataset": self.dataset, "line": self.sweep.line, "search": self.sweep.search,
            "metric": self.sweep.metric, "direction": self.direction, "prune": self.sweep.prune,
            "trials_planned": self.sweep.trials, "seed": self.sweep.seed,
            "space": {name: param.to_dict() for name, param in self.space.items()},
            "base": _recorded_base(self.base), "status": "running", "started": time.time(), "best": None,
            "trials": [],
        }

    def _write(self) -> None:
        from ipylora.engine.runs import write_json

        write_json(self.folder / "sweep.json", self.record)

    def _emit(self, event) -> None:
        if self.reporter is not None:
            self.reporter(event)

    def _tag_run(self, entry: dict) -> None:
        """The trial's run.json says which sweep and parameters it came from (%lora_runs shows it)."""
        from ipylora.engine.runs import read_json, write_json

        path = self.folder.parent / entry["run"] / "run.json"
        if path.exists():
            record = read_json(path)
            record["sweep"] = {"name": self.sweep.name, "trial": entry["trial"], "params": entry["params"],
                               "status": entry["status"], "score": entry["score"]}
            write_json(path, record)

    def _unload_rest(self) -> None:
        """Only the best few trials' adapters stay loaded, so memory stays flat over many trials.

        While the sweep runs, the best few are parked as well where they can be (recycle.py): no
        trial uses them, and the next trial of the same shape takes a parked adapter's layers
        instead of building its own (the best ones' last); `_keep_best` gives back those untouched."""
        keep = {t["run"] for t in ranked(self.record["trials"], self.direction)[:KEEP_LOADED]}
        recycler = self.session.recycler
        if recycler is not None:
            recycler.protected = keep
        for entry in self.record["trials"]:
            run = entry["run"]
            if run not in self.session.adapters:
                continue
            if run not in keep:
                self.session.delete_adapter(run)
            elif recycler is not None:
                recycler.park(self.session, run)  # a DoRA, saved-modules... adapter stays as it is

    def _keep_best(self) -> None:
        """The best few trials' adapters loaded at the end: back from parking, or from their run folders."""
        recycler = self.session.recycler
        for entry in ranked(self.record["trials"], self.direction)[:KEEP_LOADED]:
            run = entry["run"]
            if run in self.session.adapters or (recycler is not None and recycler.unpark(self.session, run)):
                continue
            try:
                self.session.load_adapter(run, output=self.base.output)
            except IpyloraError:  # its folder went away: %lora_runs still lists the trial
                pass

    def _finish(self):
        from ipylora.engine.events import SweepEnd

        best = self.record.get("best")
        message = ""
        if best:
            if best["run"] not in self.session.adapters:
                self.session.load_adapter(best["run"], output=self.base.output)
            self.session.use_adapter(best["run"])
            message = f"best: trial {best['trial'] + 1} ({best['run']}), {self.sweep.metric} {best['score']:.4g}; its adapter is active"
        else:
            message = "no trial finished with a score"
        counts = {}
        for entry in self.record["trials"]:
            counts[entry["status"]] = counts.get(entry["status"], 0) + 1
        message += "; " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        if self.record["status"] == "stopped":
            message += f"; continue with %lora_sweep --resume {self.sweep.name}"
        self.record["message"] = message
        self._write()
        end = SweepEnd(sweep=self.sweep.name, status=self.record["status"], trials=tuple(self.record["trials"]),
                       best_trial=best and best["trial"], best_run=best and best["run"],
                       best_score=best and best["score"], sweep_dir=str(self.folder), message=message)
        self._emit(end)
        return end
