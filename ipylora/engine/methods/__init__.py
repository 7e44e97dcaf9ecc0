"""Training methods: how one run turns tokens into a TRL trainer (SFT, DPO, SimPO, ORPO, KTO, ...).

The shared loop (`engine/train.py`) does everything that does not depend on the method: the
adapter on the resident model, batch planning, run folder and run.json, events, the stop flag and
checkpoints, OOM retry, `--gpus` workers, saving. A method only says

- which dataset shape it trains on (`shape`: "sft", "preference", "unpaired-preference" or
  "prompt", checked with `LoraDataset.require`), and how a split becomes token columns (`tokens`);
- which TRL config and trainer it builds from the loop's common settings (`build`);
- which of the trainer's logged metrics the live panel shows (`metrics`), and its own knobs
  (`knobs`, TrainArgs fields such as beta) with their defaults and checks.

Methods are plugins in the `ipylora.methods` entry-point group, declared in pyproject.toml like
readers, formats and templates; ipylora's built-ins are registered the same way.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from ipylora.engine import plugins
from ipylora.engine.errors import ConfigError

METHODS = plugins.METHODS


@dataclass
class Context:
    """What the loop hands a method to build its trainer."""

    model: object
    """The PeftModel with the run's adapter active and trainable."""
    tokenizer: object
    args: object
    """The run's TrainArgs (batch sizes planned)."""
    settings: dict
    """Common TrainingArguments keyword arguments (steps, batch, lr, precision, saving, eval...)."""
    train_data: object
    """The train split as a `datasets.Dataset` of this method's token columns."""
    eval_data: object | None
    eval_tokens: dict | None
    """The eval split's token columns as a dict of lists (None without an eval split)."""
    callbacks: list
    reference: str | None = None
    """The adapter that is the reference policy (the frozen start of `--from-adapter`), None: the base."""
    session: object = None
    dataset: object = None
    """The run's LoraDataset (its table's columns feed GRPO's reward functions)."""
    emit: object = None
    """The loop's event sink (`emit(Sample(...))` shows a sample in the live panel and metrics.jsonl)."""


class Method:
    """Base of every training method. Subclasses set the attributes and implement `build`."""

    name: str = ""
    shape: str = "sft"
    """The dataset kind it trains on: "sft", "preference" or "unpaired-preference"."""
    summary: str = ""
    """One line for --method help and the form."""
    metrics: dict[str, str] = {}
    """Trainer log key -> live-panel label for the extra metrics it reports."""
    knobs: dict[str, object] = {}
    """TrainArgs fields the method reads (beta, loss_type, gamma) -> their defaults."""
    uses_reference: bool = False
    """Whether it compares against a reference policy (DPO, KTO): `--from-adapter` makes that the start adapter."""
    packed: bool = False
    """Whether its batches run padding-free on a GPU (varlen attention): SFT's collator packs them, DPO
    packs its padded batches in the forward (engine/packed.py); the others keep padded batches and SDPA."""
    generates: bool = False
    """Whether each step samples completions (GRPO): `--dry-run` adds the rollout's KV cache."""
    min_micro_batch: int = 1
    """Fewest rows per forward pass the trainer accepts (KTO pairs neighbours: 2); the OOM retry stops there."""

    def defaults(self, tiny: bool) -> dict:
        """TrainArgs defaults this method changes (lr, epochs...) for the tiny model or a real one."""
        return {}

    def check_data(self, args, dataset, session) -> None:
        """Refuse, in one line, what only the data or the session can tell is wrong (GRPO: rewards
        that name missing columns). Runs before any weights load."""

    def examples(self, rows: int, args) -> int:
        """Training examples an epoch over `rows` table rows makes (GRPO: rows x completions per prompt)."""
        return rows

    def batch_multiple(self, args) -> int:
        """The batch size must be a multiple of this (GRPO: completions per prompt)."""
        return 1

    def metric_values(self, logs: dict) -> dict[str, float]:
        """Live-panel label -> value of this method's metrics in one trainer log."""
        return {label: float(logs[key]) for key, label in self.metrics.items() if key in logs}

    def check(self, args) -> list[str]:
        """Problems with the method's knobs in `args` (each names the flag and the fix)."""
        return []

    def tokens(self, part, tokenizer, max_length: int) -> dict:
        """Token columns of one split (a LoraDataset), fitted into max_length."""
        raise NotImplementedError

    def lengths(self, tokens: dict, args=None) -> list[int]:
        """Tokens per training example (what one costs), for batch planning; `args` the run's TrainArgs."""
        raise NotImplementedError

    def build(self, ctx: Context):
        """The TRL trainer for this run."""
        raise NotImplementedError


def names() -> list[str]:
    return plugins.names(METHODS)


def get(name: str) -> Method:
    """The registered method `name`; an unknown name lists the known ones."""
    method = plugins.get(METHODS, name)
    if method is None:
        known = names()
        guess = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {guess[0]}?" if guess else ""
        raise ConfigError(f"Unknown --method {name!r}: use one of {', '.join(known)}.{hint}")
    if isinstance(method, type) and issubclass(method, Method):
        method = method()
    if not isinstance(method, Method):
        raise ConfigError(f"The method plugin {name!r} is a {type(method).__name__}: it must be an "
                          "ipylora.engine.methods.Method.")
    return method
