"""The magics: parse the line, build a config, call the Session, render the result.

No ML logic lives here. Engine errors (`IpyloraError`) become IPython `UsageError`s, which
Jupyter prints as one line without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.display import display

from ipylora.engine import DataArgs, GenerateArgs, IpyloraError, LoraArgs, TrainArgs, get_session
from ipylora.engine import sources
from ipylora.magics.args import parse, split_leading_options


def user_errors(method):
    """Show engine errors as one line (UsageError), keeping the session usable."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except IpyloraError as exc:
            raise UsageError(str(exc)) from None

    return wrapper


def _in_kernel(shell) -> bool:
    return getattr(shell, "kernel", None) is not None


@magics_class
class LoraMagics(Magics):
    """%%lora_dataset, %lora_train, %lora_chat, %lora_status."""

    @magic_arguments()
    @argument("name", help="Name of the dataset, used by %%lora_train NAME.")
    @argument("--from", dest="source", default=None,
              help="A csv/tsv/json/jsonl/parquet file, or a variable holding a DataFrame or list of dicts.")
    @argument("--format", default=None, help="Format of the cell body: csv, tsv, json or jsonl (detected if omitted).")
    @argument("--prompt", default=None, help='Prompt as a format string over the columns, e.g. "describe {concept}".')
    @argument("--response", default=None, help='Response as a format string over the columns, e.g. "{description}".')
    @argument("--template", default="human-assistant",
              help="human-assistant (default), alpaca, plain, or a string with {prompt} and {response}.")
    @argument("--train-on-prompt", action="store_true", help="Also put loss on the prompt tokens.")
    @argument("--show", type=int, default=3, help="How many rendered samples to show (0: none).")
    @argument("--max-length", type=int, default=1024, help="Token length the preview measures truncation against.")
    @line_cell_magic
    @user_errors
    def lora_dataset(self, line, cell=None):
        """Define a named dataset from the cell body (CSV, JSON list, JSON lines) or --from.

            %%lora_dataset concepts --prompt "generate a prompt for {concept}" --response "{description}"
            concept,description
            Machine Learning,"a glowing brain made of circuits, digital art"

            %lora_dataset concepts --from data/concepts.csv
            %lora_dataset concepts --show 5
        """
        opts = parse(self.lora_dataset, line)
        session = get_session()
        has_body = cell is not None and cell.strip()
        if opts.source is None and not has_body:
            if opts.name in session.datasets and cell is None:
                return self._preview(session.dataset(opts.name), opts)
            raise UsageError(
                f"No data for {opts.name!r}: put CSV/JSON under %%lora_dataset, or pass --from FILE|VARIABLE."
            )
        if opts.source is not None and has_body:
            raise UsageError("Give the data either in the cell body or with --from, not both.")
        if has_body:
            frame = sources.read_text(cell, opts.format)
        elif opts.source in self.shell.user_ns:
            frame = sources.read_object(self.shell.user_ns[opts.source])
        else:
            frame = sources.read_path(opts.source)
        data_args = DataArgs(prompt=opts.prompt, response=opts.response, template=opts.template,
                             train_on_prompt=opts.train_on_prompt)
        dataset = session.add_dataset(opts.name, frame, data_args)
        return self._preview(dataset, opts)

    def _preview(self, dataset, opts):
        from ipylora.ui.render import dataset_preview

        tokenizer, tokenizer_name = get_session().preview_tokenizer()
        display(dataset_preview(dataset, tokenizer, tokenizer_name, opts.max_length, samples=max(0, opts.show)))

    @magic_arguments()
    @argument("dataset", help="Name given to %%%%lora_dataset.")
    @argument("--model", default=None, help="Hub id or local folder (default: the resident model, else the embedded tiny model).")
    @argument("--name", default=None, help="Run and adapter name (default: the dataset name).")
    @argument("--4bit", dest="q4", action="store_true", help="Load the base model in 4-bit nf4 (QLoRA).")
    @argument("--8bit", dest="q8", action="store_true", help="Load the base model in 8-bit.")
    @argument("--r", type=int, default=None, help="LoRA rank.")
    @argument("--alpha", type=float, default=None, help="LoRA alpha.")
    @argument("--dropout", type=float, default=None, help="LoRA dropout.")
    @argument("--target-modules", default=None, help='Comma-separated module names, or "all-linear".')
    @argument("--lr", type=float, default=None, help="Peak learning rate.")
    @argument("--scheduler", default=None, help="constant, linear, cosine or constant_with_warmup.")
    @argument("--warmup-ratio", type=float, default=None, help="Share of steps for learning-rate warmup.")
    @argument("--epochs", type=float, default=None, help="Passes over the data.")
    @argument("--steps", type=int, default=None, help="Optimizer steps (overrides --epochs).")
    @argument("--batch-size", type=int, default=None, help="Sequences per step.")
    @argument("--max-length", type=int, default=1024, help="Longest sequence in tokens.")
    @argument("--max-grad-norm", type=float, default=None, help="Gradient clipping; 0 turns it off.")
    @argument("--seed", type=int, default=42, help="Seed for adapter init and data order.")
    @argument("--output", default="runs", help="Folder for runs/<name>/.")
    @argument("--trust-remote-code", action="store_true", help="Allow the model's own Python code.")
    @line_magic
    @user_errors
    def lora_train(self, line):
        """Train a LoRA adapter on a dataset, with a live loss plot. Ctrl-C / interrupt stops and saves.

            %lora_train concepts --name sd-prompts
            %lora_train concepts --model Qwen/Qwen2.5-7B-Instruct --4bit --r 64 --alpha 16 --dropout 0.1
        """
        from ipylora.engine.events import console_reporter

        opts = parse(self.lora_train, line)
        if opts.q4 and opts.q8:
            raise UsageError("Choose one of --4bit and --8bit.")
        args = TrainArgs(
            model=opts.model, name=opts.name, quantization="4bit" if opts.q4 else "8bit" if opts.q8 else None,
            lr=opts.lr, scheduler=opts.scheduler, warmup_ratio=opts.warmup_ratio, epochs=opts.epochs,
            steps=opts.steps, batch_size=opts.batch_size, max_length=opts.max_length,
            max_grad_norm=opts.max_grad_norm, seed=opts.seed, output=opts.output,
            trust_remote_code=opts.trust_remote_code,
            lora=LoraArgs(r=opts.r, alpha=opts.alpha, dropout=opts.dropout, target_modules=opts.target_modules),
        )
        if _in_kernel(self.shell):
            from ipylora.ui.live import NotebookReporter

            reporter = NotebookReporter()
        else:
            reporter = console_reporter()
        get_session().train(opts.dataset, args, reporter=reporter)

    @magic_arguments()
    @argument("--adapter", default=None, help='Adapter name, or "base" for the model without adapters.')
    @argument("--max-new-tokens", type=int, default=256, help="Most tokens to generate.")
    @argument("--temperature", type=float, default=0.0, help="0 = greedy (default); above 0 samples.")
    @argument("--top-p", type=float, default=1.0, help="Nucleus sampling threshold.")
    @argument("--raw", action="store_true", help="Send the text as is, without the training template.")
    @line_magic
    @user_errors
    def lora_chat(self, line):
        """Answer TEXT with the active adapter, in the template it was trained with. Options go first.

            %lora_chat generate a stable diffusion prompt for Neural Networks
            %lora_chat --adapter base generate a stable diffusion prompt for Neural Networks
        """
        opts, text = split_leading_options(self.lora_chat, line)
        if not text:
            raise UsageError("Nothing to answer: write the text after the options, e.g. %lora_chat describe a cat.")
        args = GenerateArgs(adapter=opts.adapter, max_new_tokens=opts.max_new_tokens,
                            temperature=opts.temperature, top_p=opts.top_p)
        result = get_session().chat(text, args, on_text=lambda piece: print(piece, end=""), raw=opts.raw)
        print(flush=True)
        if not result["stopped_at_eos"]:
            print(f"[no EOS: stopped at --max-new-tokens {args.max_new_tokens}]", file=sys.stderr, flush=True)

    @line_magic
    @user_errors
    def lora_status(self, line):
        """Show the resident model (device, dtype, quantization, memory), datasets and adapters."""
        from ipylora.ui.render import status_table

        if line.strip():
            raise UsageError("%lora_status takes no arguments.")
        session = get_session()
        display(status_table(session.snapshot(), {"rss": _rss_text()}))


def _rss_text() -> str:
    try:
        import psutil

        return f"{psutil.Process().memory_info().rss / 2**20:,.0f} MiB RSS"
    except ImportError:
        return "-"
