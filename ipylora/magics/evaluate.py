"""%lora_eval: measure an adapter (or the base) on a dataset, beside its earlier evals."""

from __future__ import annotations

from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.display import display

from ipylora.engine import get_session
from ipylora.magics.args import parse
from ipylora.magics.common import user_errors


@magics_class
class EvalMagics(Magics):
    """%lora_eval."""

    @magic_arguments()
    @argument("name", help='Adapter (or run) name, or "base" for the model without adapters.')
    @argument("-o", "--on", required=True, help="DATASET, DATASET:eval or DATASET:train.")
    @argument("-l", "--limit", type=int, default=None, help="Only the first N rows of the split.")
    @argument("-n", "--max-new-tokens", type=int, default=256, help="Most tokens per answer.")
    @argument("-b", "--batch-size", type=int, default=8, help="Rows per forward pass / batched generation.")
    @argument("-w", "--worst", type=int, default=5, help="How many of the worst rows to show.")
    @argument("-m", "--max-length", type=int, default=None,
              help="Longest row for the eval loss, in tokens (default: the run's --max-length, so the loss "
                   "is the one its live panel showed; 1024 for base).")
    @argument("-r", "--reward", action="append", default=None, metavar="FN[:WEIGHT]",
              help="Score one greedy answer per prompt with a reward (repeatable), as %%lora_train --method grpo "
                   "takes it: a function in the notebook, exact:COLUMN, contains:COLUMN, regex:PATTERN, "
                   "length:MIN-MAX or module:function, with an optional :WEIGHT.")
    @argument("--output", default="runs", help="Folder that holds runs/<name>/ (eval.json goes there).")
    @line_magic
    @user_errors
    def lora_eval(self, line):
        """Eval loss, perplexity, exact match, token F1, ROUGE-L, EOS-stop share and answer length of an
        adapter on a dataset split; saved to runs/NAME/eval.json and shown beside earlier evals.

        The eval loss is the live panel's: mean cross-entropy per trained token over the tokens
        training uses. Text rows without --response-after get the loss and perplexity only.
        On a preference dataset answers are scored against chosen, and a line gives the preference
        accuracy (share of pairs whose implicit reward margin against the run's reference, its
        --from-adapter or the base, is positive) and the mean margin. With --reward, each reward's mean
        over one greedy answer per prompt, and their weighted total (prompt-only data gets these only).

            %lora_eval sd-prompts --on concepts
            %lora_eval base --on concepts:eval --limit 20
            %lora_eval grpo-run --on questions --reward exact:answer --reward short:0.5
        """
        from ipylora.engine.evaluate import EvalArgs, parse_dataset_spec
        from ipylora.ui.compare import eval_table, preference_line

        opts = parse(self.lora_eval, line)
        dataset, split = parse_dataset_spec(opts.on)
        args = EvalArgs(max_new_tokens=opts.max_new_tokens, batch_size=opts.batch_size, limit=opts.limit,
                        worst=opts.worst, max_length=opts.max_length, rewards=tuple(opts.reward or ()))
        session = get_session()
        session.namespace = self.shell.user_ns  # --reward NAME: a function defined in the notebook
        result = session.evaluate(opts.name, dataset, split, args, output=opts.output)
        if result["metrics"]:
            display(eval_table(result, result["history"]))
        line = preference_line(result)
        if line:
            print(line)
        for line in reward_lines(result.get("rewards")):
            print(line)
        if result.get("note"):
            print(f"Loss and perplexity only: {result['note']}." if result["metrics"] else f"Note: {result['note']}.")


def reward_lines(rewards: dict | None) -> list[str]:
    """`reward NAME: MEAN` per reward, then the weighted total's mean (none without --reward)."""
    if not rewards:
        return []

    def shown(value):
        return "-" if value is None else f"{value:.3f}"

    lines = []
    for name, found in rewards["per_reward"].items():
        notes = ([f"weight {found['weight']:g}"] if found["weight"] != 1 else []) + (
            [f"{found['scored']} of {rewards['rows']} rows scored"] if found["scored"] < rewards["rows"] else [])
        lines.append(f"reward {name}: {shown(found['mean'])}" + (f" ({', '.join(notes)})" if notes else ""))
    lines.append(f"reward (total): {shown(rewards['total'])} (one greedy answer to each of {rewards['rows']} prompts)")
    return lines
