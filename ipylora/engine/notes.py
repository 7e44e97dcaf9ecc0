"""What a user should hear before a run starts, and the run's length when they did not choose one.

Two notices go to the run's reporter before any weight loads: the first training on the embedded
tiny model in a session says that it memorises and does not generalise (and how to use a real
model), and a CPU run that the dry-run estimate (estimate.py: the model's config and the
tokenized data, no weights) puts over LONG_CPU_RUN_S says how long it will take and how to
shorten it. `run_args` resolves a run's config as `Session.train` does, so a dry run shows the
epochs a run would use.
"""

from __future__ import annotations

import random

from ipylora.engine.config import TINY_DEFAULTS, TINY_REFERENCE_TOKENS, TrainArgs, resolve
from ipylora.engine.errors import IpyloraError
from ipylora.engine.events import Notice
from ipylora.engine.tiny import TINY_MODEL_ID

LONG_CPU_RUN_S = 120
"""A CPU run estimated longer than this (seconds) gets a notice with a shorter --steps / --epochs."""
TOKEN_SAMPLE = 1000
"""Above this many rows, the token count is a seeded sample's mean times the rows (as the preview measures)."""
REAL_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
TINY_NOTICE = (
    "The embedded tiny model memorises its training rows and does not generalise to new prompts: for a real "
    f"model pass --model {REAL_MODEL} (or set %config Lora.default_model = \"{REAL_MODEL}\")."
)


def train_tokens(session, data, max_length: int) -> int:
    """Tokens of the training rows as the run will cut them, with the tokenizer previews use."""
    from ipylora.engine.train import _parts

    train, _ = _parts(data)
    tokenizer, _ = session.preview_tokenizer()
    rows = len(train)
    sample = sorted(random.Random(0).sample(range(rows), TOKEN_SAMPLE)) if rows > TOKEN_SAMPLE else list(range(rows))
    lengths = [len(ids) for ids in train.tokenize(tokenizer, max_length, rows=sample)["input_ids"]]
    return round(sum(lengths) / max(1, len(lengths)) * rows)


def run_args(session, data, args: TrainArgs, resume: bool = False) -> TrainArgs:
    """`args` resolved for training `data` in `session`: the model's defaults, the tiny model's epochs
    scaled to the data, and (unless resuming a recorded run) --epochs with --steps refused."""
    model_id, _ = session._target_model(args.model)
    return resolve(args, tiny=model_id == TINY_MODEL_ID, from_user=not resume,
                   tokens=lambda: train_tokens(session, data, args.max_length))


def before_training(session, data, args: TrainArgs, reporter, resume: bool = False) -> None:
    """Send the pre-run notices for this run (`args` resolved) to `reporter`."""
    if reporter is None:
        return
    tiny = session._target_model(args.model)[0] == TINY_MODEL_ID
    told = _told(session)
    if tiny and "tiny" not in told:
        told.add("tiny")
        reporter(Notice(TINY_NOTICE))
    message = long_run_notice(session, data, args, tiny, resume)
    if message:
        reporter(Notice(message))


def long_run_notice(session, data, args: TrainArgs, tiny: bool, resume: bool = False) -> str | None:
    """One line when a CPU run is estimated over LONG_CPU_RUN_S, else None."""
    from ipylora.engine import models
    from ipylora.engine.estimate import _duration, estimate

    if resume or args.gpus > 1 or models.device_name() == "cuda":
        return None  # a resumed run's remaining steps are not what the estimate counts
    if tiny and not args.steps and args.epochs * train_tokens(session, data, args.max_length) \
            <= TINY_DEFAULTS["epochs"] * TINY_REFERENCE_TOKENS:
        return None  # no more work than the demo's ~30 s default run: not worth an estimate
    try:
        plan = estimate(args, data, session=session)
    except IpyloraError:
        return None  # loading the model will say what is wrong, in its own words
    if plan.eta_s <= LONG_CPU_RUN_S:
        return None
    steps = max(1, int(plan.steps * LONG_CPU_RUN_S / plan.eta_s))
    epochs = steps * plan.batch_size / max(1, plan.rows)
    epochs = round(epochs) if epochs >= 10 else max(0.1, round(epochs, 1))
    return (f"This CPU run is estimated at ~{_duration(plan.eta_s)} ({plan.steps:,} steps, rough): for about "
            f"{_duration(LONG_CPU_RUN_S)} pass --steps {steps} (or --epochs {epochs:g}); --dry-run shows the plan.")


def _told(session) -> set[str]:
    """The once-per-session notices already given, kept on the session (a new kernel hears them again)."""
    return session.notices_given
