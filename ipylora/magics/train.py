"""%lora_train: train a LoRA adapter on the resident model with a live panel."""

from __future__ import annotations

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.display import display

from ipylora.engine import LoraArgs, TrainArgs, get_session
from ipylora.magics.args import parse
from ipylora.magics.common import in_kernel, user_errors
from ipylora.magics.settings import get_settings


def train_args(opts) -> TrainArgs:
    """TrainArgs from parsed %lora_train options, with %config / pyproject defaults filled in."""
    settings = get_settings()
    if opts.q4 and opts.q8:
        raise UsageError("Choose one of --4bit and --8bit.")
    if opts.compile and opts.no_compile:
        raise UsageError("Choose one of --compile and --no-compile.")
    quantization = "4bit" if opts.q4 else "8bit" if opts.q8 else settings.quantization
    return TrainArgs(
        model=opts.model or settings.default_model, name=opts.name, quantization=quantization,
        lr=opts.lr, scheduler=opts.scheduler, warmup_ratio=opts.warmup_ratio, epochs=opts.epochs,
        steps=opts.steps, batch_size=opts.batch_size, micro_batch_size=opts.micro_batch_size,
        max_length=opts.max_length,
        max_grad_norm=opts.max_grad_norm, seed=opts.seed, output=opts.output or settings.runs_dir,
        report_to=opts.report_to or settings.report_to,
        trust_remote_code=opts.trust_remote_code, eval_every=opts.eval_every, early_stop=opts.early_stop,
        save_every=opts.save_every, samples=tuple(opts.sample or ()), sample_every=opts.sample_every,
        gpus=opts.gpus, strategy=opts.strategy, method=opts.method, beta=opts.beta, loss_type=opts.loss_type,
        gamma=opts.gamma, from_adapter=opts.from_adapter, memory=opts.memory, offload=opts.offload or None,
        compile=True if opts.compile else False if opts.no_compile else None, rewards=tuple(opts.reward or ()),
        num_generations=opts.num_generations, max_completion_length=opts.max_completion_length,
        temperature=opts.temperature,
        loraplus_ratio=opts.loraplus_ratio, neftune=opts.neftune,
        lora=LoraArgs(r=opts.r, alpha=opts.alpha, dropout=opts.dropout, target_modules=opts.target_modules,
                      dora=opts.dora, rslora=opts.rslora, init=opts.init, modules_to_save=opts.modules_to_save,
                      add_tokens=opts.add_tokens),
    )


@magics_class
class TrainMagics(Magics):
    """%lora_train."""

    @magic_arguments()
    @argument("dataset", nargs="?", help="Name given to %%%%lora_dataset.")
    @argument("--model", default=None, help="Hub id or local folder (default: the resident model, else the embedded tiny model).")
    @argument("--name", default=None, help="Run and adapter name (default: the dataset name).")
    @argument("--4bit", dest="q4", action="store_true", help="Load the base model in 4-bit nf4 (QLoRA).")
    @argument("--8bit", dest="q8", action="store_true", help="Load the base model in 8-bit.")
    @argument("--r", type=int, default=None, help="LoRA rank.")
    @argument("--alpha", type=float, default=None, help="LoRA alpha.")
    @argument("--dropout", type=float, default=None, help="LoRA dropout.")
    @argument("--target-modules", default=None,
              help='Comma-separated module names, "all-linear", or a regular expression over module paths.')
    @argument("--dora", action="store_true", help="DoRA: learn a magnitude per output beside the LoRA direction.")
    @argument("--rslora", action="store_true", help="rsLoRA: scale by alpha/sqrt(r) (steadier at high ranks).")
    @argument("--init", default=None, choices=("gaussian", "pissa", "olora", "loftq"),
              help="Adapter init: gaussian, pissa or olora (from the base weights), loftq (with --4bit).")
    @argument("--loraplus-ratio", type=float, default=None, metavar="R",
              help="LoRA+: B matrices learn R times faster than A (PEFT's LoRA+ optimizer; 16 is typical).")
    @argument("--modules-to-save", default=None, metavar="A,B",
              help="Modules trained in full beside the adapter, e.g. embed_tokens,lm_head.")
    @argument("--add-tokens", default=None, metavar='"<a>,<b>"',
              help="New tokens for the tokenizer; their embeddings (and the output layer) train with the adapter, "
                   "the tokenizer is saved beside it.")
    @argument("--neftune", type=float, default=None, metavar="ALPHA",
              help="NEFTune: noise on the input embeddings while training (alpha 5 is typical).")
    @argument("--lr", type=float, default=None, help="Peak learning rate.")
    @argument("--scheduler", default=None, help="constant, linear, cosine or constant_with_warmup.")
    @argument("--warmup-ratio", type=float, default=None, help="Share of steps for learning-rate warmup.")
    @argument("--epochs", type=float, default=None,
              help="Passes over the data (tiny model: 43 for the demo's size, fewer for larger data).")
    @argument("--steps", type=int, default=None, help="Optimizer steps, instead of --epochs.")
    @argument("--batch-size", type=int, default=None, help="Sequences per step.")
    @argument("--micro-batch-size", type=int, default=None,
              help="Sequences per forward pass; the rest of --batch-size is accumulated (halved on out-of-memory).")
    @argument("--max-length", type=int, default=1024, help="Longest sequence in tokens.")
    @argument("--memory", type=float, default=None, metavar="GIB",
              help="GPU: the most memory the run may take, model included (default: plan from free memory).")
    @argument("--offload", action="store_true",
              help="GPU: checkpoint the layers and keep their inputs in host memory, for very long rows "
                   "(default: only where the longest row needs it).")
    @argument("--compile", action="store_true",
              help="GPU: compile the decoder layers (torch.compile; the first steps compile).")
    @argument("--no-compile", action="store_true", help="GPU: keep the decoder layers eager.")
    @argument("--max-grad-norm", type=float, default=None, help="Gradient clipping; 0 turns it off.")
    @argument("--seed", type=int, default=42, help="Seed for adapter init and data order.")
    @argument("--output", default=None, help="Folder for runs/<name>/ (default: %%config Lora.runs_dir, 'runs').")
    @argument("--trust-remote-code", action="store_true", help="Allow the model's own Python code.")
    @argument("--eval-every", type=int, default=None, help="Steps between eval losses on the dataset's eval split.")
    @argument("--early-stop", type=int, default=None, metavar="PATIENCE",
              help="Stop after PATIENCE evals without improvement; keep the best adapter.")
    @argument("--save-every", type=int, default=None, help="Steps between resumable checkpoints.")
    @argument("--sample", action="append", default=None, metavar="PROMPT",
              help="A prompt to answer during training (repeatable).")
    @argument("--sample-every", type=int, default=None, help="Steps between samples.")
    @argument("--report-to", default=None, metavar="TRACKERS",
              help="Log to tensorboard, wandb, mlflow or trackio (comma-separated; default: %%config Lora.report_to, "
                   "'none'); local when offline: runs/NAME/tb, W&B offline, runs/mlflow.db.")
    @argument("--gpus", type=int, default=1, metavar="N",
              help="Train on N GPUs in torchrun worker processes outside the kernel (metrics stream back here).")
    @argument("--strategy", default="ddp", choices=("ddp", "fsdp"),
              help="With --gpus: ddp (each GPU holds the model) or fsdp (the model is sharded across GPUs).")
    @argument("--method", default="sft",
              help="Training method: sft (default), dpo, simpo, orpo, kto (preference data), grpo (prompts + --reward), "
                   "or a plugin's.")
    @argument("--beta", type=float, default=None,
              help="DPO/KTO KL strength (0.1), SimPO reward scale, ORPO odds-ratio weight; GRPO KL to the reference (0).")
    @argument("--loss-type", default=None, help="DPO: TRL's loss type (sigmoid, ipo, hinge, ...); GRPO: dapo, grpo, dr_grpo, ...")
    @argument("--gamma", type=float, default=None, help="SimPO: target reward margin gamma (default 1.0, with beta 2.0).")
    @argument("--reward", action="append", default=None, metavar="FN[:WEIGHT]",
              help="GRPO: a reward function (repeatable): a function in the notebook, exact:COLUMN, contains:COLUMN, "
                   "regex:PATTERN, length:MIN-MAX or module:function, with an optional :WEIGHT.")
    @argument("--num-generations", type=int, default=None, help="GRPO: completions sampled per prompt (default 8).")
    @argument("--max-completion-length", type=int, default=None,
              help="GRPO: the most tokens per sampled completion (default 256).")
    @argument("--temperature", type=float, default=None, help="GRPO: sampling temperature (default 1.0).")
    @argument("--from-adapter", default=None, metavar="NAME",
              help="Start from adapter NAME's weights (SFT -> DPO); preference methods use it, frozen, as the reference.")
    @argument("--background", action="store_true", help="Return at once; train in a thread with a Stop button.")
    @argument("--wait", action="store_true", help="Queue behind a running training instead of refusing.")
    @argument("--stop", action="store_true", help="Stop the running training at the next step and save it.")
    @argument("--resume", default=None, metavar="NAME", help="Continue run NAME from its last checkpoint.")
    @argument("--form", action="store_true", help="Show a form that builds this line.")
    @argument("--dry-run", action="store_true",
              help="Print the plan, estimated peak memory, tokens/s and ETA; load nothing, train nothing.")
    @line_magic
    @user_errors
    def lora_train(self, line):
        """Train a LoRA adapter on a dataset, with a live loss plot. Interrupt (or --stop) stops and saves.

            %lora_train concepts --name sd-prompts
            %lora_train concepts --model Qwen/Qwen2.5-7B-Instruct --4bit --r 64 --alpha 16 --dropout 0.1
            %lora_train concepts --background --sample "describe a cat"   # then %lora_train --stop
            %lora_train --resume sd-prompts
            %lora_train concepts --model Qwen/Qwen2-1.5B --gpus 2             # DDP over 2 GPUs
            %lora_train concepts --model Qwen/Qwen2.5-7B-Instruct --4bit --dry-run   # memory, speed, ETA
            %lora_train prefs --method dpo --from-adapter sd-prompts --name sd-dpo    # SFT -> DPO chain
        """
        opts = parse(self.lora_train, line)
        session = get_session()
        session.namespace = self.shell.user_ns  # --reward NAME: a function defined in the notebook
        if opts.form:
            from ipylora.ui.forms import TrainForm

            display(TrainForm(shell=self.shell, dataset=opts.dataset))
            return
        if opts.stop:
            if not session.request_stop():
                raise UsageError("No training is running.")
            print("Stopping at the next step boundary; the adapter will be saved.")
            return
        if opts.dry_run:
            self._dry_run(session, opts)
            return
        reporter = self._reporter(opts.background)
        if opts.resume:
            result = session.resume(opts.resume, opts.output or get_settings().runs_dir, reporter,
                                    background=opts.background, wait=opts.wait)
        else:
            if not opts.dataset:
                known = ", ".join(sorted(session.datasets)) or "none yet: create one with %%lora_dataset NAME"
                raise UsageError(f"Which dataset? %lora_train DATASET (known: {known}).")
            result = session.train(opts.dataset, train_args(opts), reporter=reporter,
                                   background=opts.background, wait=opts.wait)
        if opts.background:
            print(f"Training {result.name} in the background: %lora_train --stop (or the Stop button) ends it.")

    def _dry_run(self, session, opts) -> None:
        from ipylora.engine.estimate import estimate
        from ipylora.engine.notes import run_args

        if opts.resume or not opts.dataset:
            raise UsageError("--dry-run estimates a new run: %lora_train DATASET ... --dry-run.")
        data = session.dataset(opts.dataset)
        result = estimate(run_args(session, data, train_args(opts)), data, session=session)
        print(f"Dry run of %lora_train {opts.dataset} (nothing loaded, nothing trained):")
        width = max(len(label) for label, _ in result.table())
        for label, value in result.table():
            print(f"  {label:<{width}}  {value}")
        for note in result.notes:
            print(f"  note: {note}")

    def _reporter(self, background: bool):
        if in_kernel(self.shell):
            from ipylora.ui.live import NotebookReporter

            return NotebookReporter(background=background)
        from ipylora.engine.events import console_reporter

        return console_reporter()
