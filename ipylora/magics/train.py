"""%lora_train: train a LoRA adapter on the resident model with a live panel."""

from __future__ import annotations

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from ipylora.engine import LoraArgs, TrainArgs, get_session
from ipylora.magics.args import parse
from ipylora.magics.common import in_kernel, user_errors

@magics_class
class TrainMagics(Magics):
    """%lora_train."""

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
        if in_kernel(self.shell):
            from ipylora.ui.live import NotebookReporter

            reporter = NotebookReporter()
        else:
            reporter = console_reporter()
        get_session().train(opts.dataset, args, reporter=reporter)
