"""%lora_sweep: many %lora_train runs over one resident model, chosen by a search, with a live leaderboard.

    %lora_sweep concepts --name lr-r lr=1e-3,3e-3,1e-2 r=8,16            # a 3x2 grid
    %lora_sweep concepts --name tpe --search tpe --trials 12 --prune median lr=1e-4..1e-2:log epochs=1..5:int
    %lora_sweep --stop            # ends the running trial at its next step, and the sweep
    %lora_sweep --resume tpe      # the stopped trial from its checkpoint, then the rest

The line is the sweep's own options, `PARAM=SPEC` words (engine/sweep.py) and any other
%lora_train option, which every trial gets unchanged (`--model`, `--4bit`, `--steps 30`).
"""

from __future__ import annotations

import argparse
import difflib
import shlex

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.display import display

from ipylora.engine import get_session
from ipylora.engine.sweep import PRUNERS, SEARCHES, SweepArgs, option_name
from ipylora.magics.args import parse
from ipylora.magics.common import in_kernel, user_errors
from ipylora.magics.settings import get_settings

# %lora_train options that are the sweep's own business (or make no sense per trial).
_NOT_PER_TRIAL = {"--resume": "%lora_sweep --resume SWEEP", "--stop": "%lora_sweep --stop",
                  "--form": "%lora_sweep --form", "--dry-run": "%lora_train ... --dry-run on one trial's values",
                  "--wait": "a sweep started after another run ends", "--gpus": "a sweep on one GPU"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="%lora_sweep", add_help=False)
    parser.add_argument("dataset", nargs="?")
    parser.add_argument("--name", default=None)
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--search", default="grid", choices=SEARCHES)
    parser.add_argument("--metric", default=None)
    parser.add_argument("--prune", default="none", choices=PRUNERS)
    parser.add_argument("--background", action="store_true")
    parser.add_argument("--stop", action="store_true")
    parser.add_argument("--resume", default=None, metavar="SWEEP")
    parser.add_argument("--form", action="store_true")
    return parser


class _Refused(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"%lora_sweep: {message}. Example: %lora_sweep DATASET --name SWEEP lr=1e-4,2e-4 r=8,16.")


def split_line(line: str):
    """(sweep options, {param: spec}, the %lora_train words every trial gets)."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"{exc} in {line.strip()!r}: close the quote, or escape it with a backslash.") from None
    parser = _parser()
    own = {o for a in parser._actions for o in a.option_strings}
    takes_value = {o for a in parser._actions for o in a.option_strings if a.nargs != 0}
    from ipylora.magics.args import _option_strings
    from ipylora.magics.train import TrainMagics

    known = sorted(own | set(_option_strings(TrainMagics.lora_train.parser)))
    mine, space, rest = [], {}, []
    index = 0
    while index < len(words):
        word = words[index]
        flag = word.split("=", 1)[0]
        if flag.startswith("--") and flag not in known:
            guess = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
            hint = f" Did you mean {guess[0]}?" if guess else " A parameter to sweep is written PARAM=SPEC (lr=1e-4,2e-4)."
            raise UsageError(f"%lora_sweep: unknown option {flag}.{hint}")
        if flag in own:
            mine.append(word)
            if flag in takes_value and "=" not in word and index + 1 < len(words):
                index += 1
                mine.append(words[index])
        elif not word.startswith("-") and "=" in word:
            name, spec = word.split("=", 1)
            if name in space:
                raise UsageError(f"{name} is given twice: give it once, as a list or a range.")
            space[name] = spec
        elif not word.startswith("-") and not mine and not rest and not space:
            mine.append(word)  # the dataset
        else:
            rest.append(word)
        index += 1
    refused = _Refused(prog="%lora_sweep", add_help=False)
    for action in parser._actions:
        refused._add_action(action)
    opts = refused.parse_args(mine)
    return opts, space, rest


@magics_class
class SweepMagics(Magics):
    """%lora_sweep."""

    @line_magic
    @user_errors
    def lora_sweep(self, line):
        """Run a hyper-parameter sweep: one run per trial on the resident model, a live overlay and leaderboard.

            %lora_sweep DATASET --name SWEEP [--trials N] [--search grid|random|tpe]
                        [--metric eval_loss|train_loss|eval:METRIC] [--prune none|median|asha] [--background]
                        PARAM=SPEC ... [any other %lora_train option, applied to every trial]
            SPEC: a list (lr=1e-4,2e-4,5e-4), a range (lr=1e-5..1e-3:log, epochs=1..5:int) or a fixed value (r=16).
            %lora_sweep --stop | --resume SWEEP | --form [DATASET]
        """
        from ipylora.magics.train import TrainMagics, train_args

        opts, space, rest = split_line(line)
        session = get_session()
        session.namespace = self.shell.user_ns
        if opts.form:
            from ipylora.ui.sweep_form import SweepForm

            display(SweepForm(shell=self.shell, dataset=opts.dataset))
            return
        if opts.stop:
            if not session.request_stop():
                raise UsageError("No sweep or training is running.")
            print("Stopping the running trial at its next step (its adapter is saved) and the sweep after it.")
            return
        trial_options = parse(TrainMagics.lora_train, " ".join(shlex.quote(w) for w in rest))
        output = trial_options.output or get_settings().runs_dir
        if opts.resume:
            result = session.resume_sweep(opts.resume, output, self._reporter(opts.background), opts.background)
            self._said(result, opts.background)
            return
        if not opts.dataset:
            known = ", ".join(sorted(session.datasets)) or "none yet: create one with %%lora_dataset NAME"
            raise UsageError(f"Which dataset? %lora_sweep DATASET --name SWEEP PARAM=SPEC ... (known: {known}).")
        if not opts.name:
            raise UsageError("Name the sweep: %lora_sweep DATASET --name SWEEP ... (its trials are runs SWEEP-1, SWEEP-2, ...).")
        for word in rest:
            flag = word.split("=", 1)[0]
            if flag in _NOT_PER_TRIAL:
                raise UsageError(f"{flag} does not go on a sweep's line: use {_NOT_PER_TRIAL[flag]}.")
            name = option_name(flag)
            if flag.startswith("--") and name in {option_name(p) for p in space}:
                raise UsageError(f"{name} is both fixed ({flag}) and swept ({name}=...): give it once.")
        if trial_options.dataset:
            raise UsageError(f"{trial_options.dataset!r}: one dataset per sweep, first on the line; "
                             "a parameter is written PARAM=SPEC (lr=1e-4,2e-4).")
        base = train_args(trial_options)
        sweep = SweepArgs(name=opts.name, space=space, trials=opts.trials, search=opts.search, metric=opts.metric,
                          prune=opts.prune, seed=base.seed, line="%lora_sweep " + line.strip())
        result = session.sweep(opts.dataset, sweep, base, self._reporter(opts.background), opts.background)
        self._said(result, opts.background)

    @staticmethod
    def _said(result, background: bool) -> None:
        if background:
            print(f"Sweep {result.name} runs in the background: %lora_sweep --stop (or the Stop button) ends it.")

    def _reporter(self, background: bool):
        if in_kernel(self.shell):
            from ipylora.ui.sweep_live import SweepReporter

            return SweepReporter(background=background)
        from ipylora.engine.events import sweep_console_reporter

        return sweep_console_reporter()
