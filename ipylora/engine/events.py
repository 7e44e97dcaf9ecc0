"""Typed events a training run emits, and the reporter protocol that consumes them.

The engine never prints or displays: it calls `reporter(event)`. The notebook front end turns
events into one live plot; the console reporter into log lines; `metrics.jsonl` gets every one.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol


@dataclass(frozen=True)
class Event:
    time: float = field(default_factory=time.time, kw_only=True)

    def to_dict(self) -> dict:
        return {"event": type(self).__name__, **asdict(self)}


@dataclass(frozen=True)
class RunStart(Event):
    name: str
    total_steps: int
    run_dir: str
    rows: int


@dataclass(frozen=True)
class StepEnd(Event):
    step: int
    total_steps: int
    loss: float
    lr: float
    tokens: int
    elapsed: float
    memory_mb: float = 0.0
    metrics: dict = field(default_factory=dict)
    """The method's extra metrics at this step, by panel label (DPO: margin, reward accuracy)."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        return self.elapsed / self.step * (self.total_steps - self.step) if self.step else None


@dataclass(frozen=True)
class EvalEnd(Event):
    """Eval loss: mean cross-entropy per trained token of the eval split (`evaluate.token_loss`)."""

    step: int
    loss: float
    best: float
    best_step: int | None = None


@dataclass(frozen=True)
class Sample(Event):
    step: int
    prompt: str
    text: str
    reward: float | None = None
    """GRPO: the completion's total reward (weighted sum of the --reward functions)."""
    detail: str = ""
    """GRPO with several rewards: each one's value."""


@dataclass(frozen=True)
class Notice(Event):
    """Something the engine did on the user's behalf and should say (e.g. an OOM retry)."""

    message: str
    keep: bool = False
    """A warning the live panel keeps on screen until the run ends (e.g. overfitting)."""


@dataclass(frozen=True)
class RunEnd(Event):
    name: str
    status: str  # finished | interrupted | stopped | failed
    step: int
    total_steps: int
    final_loss: float | None
    adapter_dir: str | None
    elapsed: float
    message: str = ""
    eval_loss: float | None = None
    """The last eval loss, or the best one when early stopping kept the best adapter."""


@dataclass(frozen=True)
class SweepStart(Event):
    """A sweep begins (or resumes): its space and how trials are chosen and scored."""

    sweep: str
    total: int
    """Trials planned (all of them, finished ones of a resumed sweep included)."""
    search: str
    metric: str
    direction: str
    """"minimize" or "maximize" (the metric's better side)."""
    prune: str
    space: dict
    """Parameter -> its spec as the user wrote it (`1e-5..1e-3:log`, `8,16`)."""
    sweep_dir: str = ""
    done: tuple = ()
    """A resumed sweep's trials that already ended (TrialEnd.to_dict() records), to draw them again."""


@dataclass(frozen=True)
class TrialStart(Event):
    """Trial `trial` (0-based) of sweep `sweep` starts as run `run` with `params`. Its RunStart, StepEnd,
    EvalEnd, Sample and RunEnd events follow, then its TrialEnd."""

    sweep: str
    trial: int
    run: str
    params: dict
    total: int


@dataclass(frozen=True)
class TrialEnd(Event):
    sweep: str
    trial: int
    run: str
    params: dict
    status: str
    """finished | pruned | failed | stopped"""
    score: float | None
    steps: int
    elapsed: float
    pruned_at: int | None = None
    """The step a pruned trial was cut at."""
    message: str = ""
    best_trial: int | None = None
    """The best trial so far (after this one), None while no trial has a score."""
    best_score: float | None = None


@dataclass(frozen=True)
class SweepEnd(Event):
    sweep: str
    status: str
    """finished | stopped"""
    trials: tuple
    """Every trial's record, as in sweep.json."""
    best_trial: int | None
    best_run: str | None
    best_score: float | None
    sweep_dir: str
    message: str = ""


class Reporter(Protocol):
    def __call__(self, event: Event) -> None: ...


def console_reporter(every: int = 10, write: Callable[[str], None] = print) -> Reporter:
    """Log lines for scripts: one every `every` steps, plus start and end."""

    def report(event: Event) -> None:
        if isinstance(event, RunStart):
            write(f"[ipylora] {event.name}: {event.rows} rows, {event.total_steps} steps -> {event.run_dir}")
        elif isinstance(event, StepEnd) and (event.step % every == 0 or event.step == event.total_steps):
            write(f"[ipylora] step {event.step}/{event.total_steps} loss {event.loss:.4f} "
                  f"{event.tokens_per_s:,.0f} tok/s")
        elif isinstance(event, EvalEnd):
            best = f" at step {event.best_step}" if event.best_step is not None else ""
            write(f"[ipylora] step {event.step} eval loss {event.loss:.4f} (best {event.best:.4f}{best})")
        elif isinstance(event, Sample):
            write(f"[ipylora] step {event.step} sample {event.prompt!r} -> {event.text!r}")
        elif isinstance(event, Notice):
            write(f"[ipylora] {event.message}")
        elif isinstance(event, RunEnd):
            write(f"[ipylora] {event.name} {event.status} at step {event.step}: {event.message}")

    return report


def sweep_console_reporter(write: Callable[[str], None] = print) -> Reporter:
    """Log lines for a sweep in a script or terminal: one per trial, plus start and end."""

    def report(event: Event) -> None:
        if isinstance(event, SweepStart):
            space = " ".join(f"{k}={v}" for k, v in event.space.items())
            write(f"[ipylora] sweep {event.sweep}: {event.total} trials, {event.search} search, {event.direction} "
                  f"{event.metric}, pruner {event.prune}: {space}")
        elif isinstance(event, TrialEnd):
            score = "-" if event.score is None else f"{event.score:.4g}"
            where = f" at step {event.pruned_at}" if event.pruned_at is not None else ""
            write(f"[ipylora] trial {event.trial + 1} {event.run} {event.params}: {event.status}{where}, "
                  f"score {score}, {event.steps} steps, {event.elapsed:.1f} s")
        elif isinstance(event, SweepEnd):
            write(f"[ipylora] sweep {event.sweep} {event.status}: {event.message}")
        elif isinstance(event, Notice):
            write(f"[ipylora] {event.message}")

    return report
