"""Frozen configs, one per step. Each field is also the magic's long flag (`lora_r` <-> `--lora-r`).

Fields left `None` are resolved by the engine from the model: the embedded tiny model needs a
large learning rate and many epochs to learn anything, a 7B model the usual 2e-4 and a few
epochs. `resolve` fills them and checks ranges, raising one `ConfigError` listing every problem.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace

from ipylora.engine.errors import ConfigError

QUANTIZATIONS = (None, "4bit", "8bit")
INITS = (None, "gaussian", "pissa", "olora", "loftq")
SCHEDULERS = ("constant", "linear", "cosine", "constant_with_warmup")
STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DataArgs:
    """How rows of a table become training text."""

    prompt: str | None = None
    """Format string over the columns for the prompt, e.g. "describe {concept}". None: first column."""
    response: str | None = None
    """Format string over the columns for the response, e.g. "{description}". None: second column."""
    template: str = "human-assistant"
    """Template name (human-assistant, alpaca, chatml, plain, model, or a plugin's), a string with
    {prompt} and {response}, or a Jinja chat template (text or a .jinja file)."""
    train_on_prompt: bool = False
    """Put loss on the prompt tokens too (default: response and EOS only)."""
    format: str | None = None
    """Data format: text, alpaca, prompt-completion, messages, sharegpt (or a plugin's). None: detected."""
    columns: str | None = None
    """Field-to-column mapping, e.g. "prompt=concept,response=description"."""
    eval: float | None = None
    """Held-out share (< 1) or row count (>= 1) for evaluation; None: no eval split."""
    eval_from: str | None = None
    """Where the eval rows came from (recorded; the rows are passed to the dataset)."""
    shuffle: bool = False
    """Shuffle the rows (seeded) before --limit and the eval split."""
    limit: int | None = None
    """Keep only the first N rows (after shuffling)."""
    seed: int = 42
    """Seed for --shuffle and the eval split."""
    source: str | None = None
    """Where the data came from (recorded in run.json)."""
    response_after: str | None = None
    """Text format only: train just what follows the first occurrence of this marker in each row
    (e.g. "[/INST]"); the text up to and including it is the prompt. None: the whole text is trained."""


@dataclass(frozen=True)
class LoraArgs:
    """The adapter's shape."""

    r: int | None = None
    """LoRA rank."""
    alpha: float | None = None
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float | None = None
    """Dropout on the LoRA input."""
    target_modules: str | None = None
    """Comma-separated module names, "all-linear", or a regular expression over module paths
    (PEFT matches it in full, e.g. `.*[.](q|v)_proj`)."""
    dora: bool = False
    """DoRA: a learned magnitude per output and LoRA on the direction (PEFT's use_dora)."""
    rslora: bool = False
    """rsLoRA: scale by alpha / sqrt(r) instead of alpha / r (PEFT's use_rslora)."""
    init: str | None = None
    """How the adapter starts: None (PEFT's default, B = 0), gaussian, pissa, olora (from the base
    weights' SVD / QR; the base is restored after training), loftq (4-bit base only)."""
    modules_to_save: str | None = None
    """Comma-separated modules trained in full beside the adapter, e.g. "embed_tokens,lm_head"."""
    add_tokens: str | None = None
    """Comma-separated new tokens (e.g. "<think>,</think>"), added to the tokenizer as whole tokens; the
    vocabulary grows to fit them, the input and output embeddings are trained in full with the adapter,
    and the tokenizer is saved beside it."""


@dataclass(frozen=True)
class TrainArgs:
    """One training run."""

    model: str | None = None
    """Hub id or local folder; None: the embedded tiny model."""
    name: str | None = None
    """Run and adapter name; None: derived from the dataset name."""
    quantization: str | None = None
    """None, "4bit" (QLoRA, nf4) or "8bit"."""
    lr: float | None = None
    """Peak learning rate."""
    scheduler: str | None = None
    """Learning-rate schedule: constant, linear, cosine, constant_with_warmup."""
    warmup_ratio: float | None = None
    """Share of steps spent warming up the learning rate."""
    epochs: float | None = None
    """Passes over the data; give this or steps, not both. None: the model's default (the tiny
    model's scales down with the data's tokens). A resolved record holds it even when steps is set."""
    steps: int | None = None
    """Optimizer steps; when set, the run's length (epochs is then not used)."""
    batch_size: int | None = None
    """Sequences per optimizer step."""
    micro_batch_size: int | None = None
    """Sequences per forward pass; batch_size / micro_batch_size steps are accumulated (None: all at once)."""
    max_grad_norm: float | None = None
    """Gradient clipping norm; 0 turns clipping off."""
    max_length: int = 1024
    """Longest sequence in tokens; longer rows are truncated."""
    seed: int = 42
    """Seed for LoRA init and data order."""
    output: str = "runs"
    """Folder that holds runs/<name>/."""
    trust_remote_code: bool = False
    """Allow a hub model's own Python code (never implied)."""
    eval_every: int | None = None
    """Steps between eval-loss measurements on the dataset's eval split (None: about 10 per run)."""
    early_stop: int | None = None
    """Stop after this many evals without a better eval loss, and keep the best adapter."""
    save_every: int | None = None
    """Steps between resumable checkpoints (optimizer, scheduler, data position) in runs/<name>/checkpoints."""
    samples: tuple[str, ...] = ()
    """Prompts to answer during training, so the answers can be watched changing."""
    sample_every: int | None = None
    """Steps between samples (None: about 5 per run)."""
    sample_max_new_tokens: int = 64
    """Length cap for those answers."""
    gpus: int = 1
    """Processes (one per GPU) to train on; above 1 the run goes to torchrun workers outside the kernel."""
    strategy: str = "ddp"
    """How several GPUs share the work: ddp (each holds the model) or fsdp (the model is sharded)."""
    method: str = "sft"
    """Training method (engine/methods): sft, dpo, simpo, orpo, kto, or a plugin's."""
    beta: float | None = None
    """Preference methods: DPO/KTO's KL strength, SimPO's reward scale, ORPO's odds-ratio weight
    (None: the method's default)."""
    loss_type: str | None = None
    """DPO: TRL's loss_type (sigmoid, ipo, hinge, ...; None: sigmoid); GRPO: TRL's (dapo, grpo, dr_grpo, ...)."""
    gamma: float | None = None
    """SimPO: the target reward margin gamma (TRL's simpo_gamma; None: the method's default, 1.0 with beta 2.0)."""
    from_adapter: str | None = None
    """Start from this adapter's weights (SFT -> DPO); preference methods then use it, frozen, as the reference."""
    rewards: tuple = ()
    """GRPO: reward functions, each a callable `fn(prompts, completions, **columns) -> list[float | None]`
    or a spec string: a name in the notebook's namespace, a built-in (`exact:COLUMN`, `contains:COLUMN`,
    `regex:PATTERN`, `length:MIN-MAX`) or `module:function`, with an optional `:WEIGHT` (engine/rewards.py)."""
    num_generations: int | None = None
    """GRPO: completions sampled per prompt (a group; rewards are compared within it)."""
    max_completion_length: int | None = None
    """GRPO: the most tokens a sampled completion may have."""
    temperature: float | None = None
    """GRPO: sampling temperature of the completions."""
    loraplus_ratio: float | None = None
    """LoRA+: the B matrices learn this many times faster than the A matrices (PEFT's LoRA+ optimizer; ~16)."""
    neftune: float | None = None
    """NEFTune: noise of this alpha on the input embeddings while training (the Trainer's neftune_noise_alpha; ~5)."""
    memory: float | None = None
    """GPU only: the most memory (GiB) the run may hold, resident model included; batches and
    activation checkpointing are planned to stay under it (None: plan from free memory)."""
    offload: bool | None = None
    """GPU only: hold the checkpointed layer inputs in pinned host memory (TRL's activation offloading),
    for rows too long for the GPU otherwise. None: only where the longest row needs it (and as the
    last retry after running out of memory at micro-batch 1); True: always, with checkpointing."""
    compile: bool | None = None
    """GPU only: compile the decoder layers for training (torch.compile, compiled_layers.py): fewer,
    fused kernels and far less host time a step; the first steps pay the compile. None: the engine's
    default (`compiled_layers.DEFAULT`) where the plan allows it (not with checkpointing, 4-bit bases
    or the dropout drawn again); True / False: asked for / never."""
    report_to: str = "none"
    """Experiment trackers the Trainer logs to, comma-separated: tensorboard, wandb, mlflow, trackio, or none
    (engine/trackers.py: TensorBoard in runs/<name>/tb, W&B offline without a login or network, MLflow to
    runs/mlflow.db unless MLFLOW_TRACKING_URI is set)."""
    lora: LoraArgs = LoraArgs()
    """Adapter shape."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GenerateArgs:
    """One generation."""

    adapter: str | None = None
    """Adapter name, "base" for no adapter, None for the active one."""
    max_new_tokens: int = 256
    """Most tokens to generate."""
    temperature: float = 0.0
    """0 is greedy decoding; above 0 samples."""
    top_p: float = 1.0
    """Nucleus sampling threshold (with temperature > 0)."""
    compile: bool = False
    """CUDA only: torch.compile the decode step's decoder layers (one compilation for all of them,
    decode_layers.py) before the step is captured as a CUDA graph. The first answer pays the
    compile (again for another adapter rank, batch or cache size; inductor's disk cache keeps it
    across kernels)."""


# Measured on the tiny model: 300 steps at lr 1e-2 without clipping memorise 55/55 pairs; with
# clipping at 1.0 the same run reaches only ~40/55.
TINY_DEFAULTS = dict(lr=1e-2, scheduler="constant", warmup_ratio=0.0, epochs=43.0, batch_size=8, max_grad_norm=0.0)
TINY_LORA = LoraArgs(r=32, alpha=32.0, dropout=0.0, target_modules="all-linear")
# No batch_size: on a GPU the engine sizes batches from a token budget (speed.py); on CPU it uses 8.
MODEL_DEFAULTS = dict(lr=2e-4, scheduler="cosine", warmup_ratio=0.03, epochs=3.0, max_grad_norm=1.0)
MODEL_LORA = LoraArgs(r=16, alpha=32.0, dropout=0.05, target_modules="all-linear")
# The tiny model's 43 epochs are tuned on the quickstart demo: 55 short pairs, 5,061 tokens through
# its template, 301 steps in ~30 s on 2 CPU cores. Larger data gets proportionally fewer epochs, so
# a default run trains about the demo's tokens x epochs (50 rows of ~600 tokens: 8 epochs, not 43,
# which took 5-22 min), but never fewer than TINY_MIN_EPOCHS. The reference sits a little above
# the demo's count so that other prompt wordings or templates of the demo keep their 43.
TINY_REFERENCE_TOKENS = 5500
TINY_MIN_EPOCHS = 3.0


def tiny_epochs(tokens: int) -> float:
    """The embedded model's default epochs for `tokens` training tokens: 43 up to the demo's size, fewer above."""
    full = TINY_DEFAULTS["epochs"]
    if tokens <= TINY_REFERENCE_TOKENS:
        return full
    return max(TINY_MIN_EPOCHS, float(round(full * TINY_REFERENCE_TOKENS / tokens)))


def _variant_problems(args: TrainArgs) -> list[str]:
    """The LoRA variants' own refusals (what they need, what they cannot be combined with)."""
    import re

    lora, problems = args.lora, []
    if lora.init not in INITS:
        problems.append(f"--init {lora.init!r} is not one of {', '.join(i for i in INITS if i)}")
    elif lora.init == "loftq" and args.quantization != "4bit":
        problems.append("--init loftq initialises an adapter for a 4-bit base: add --4bit (or use --init pissa on a "
                        "16-bit one)")
    elif lora.init in ("pissa", "olora") and args.quantization:
        problems.append(f"--init {lora.init} rewrites the base weights, which a {args.quantization} base cannot take: "
                        "drop --4bit/--8bit, or use --init loftq with --4bit")
    if lora.init in ("pissa", "olora", "loftq") and lora.dora:
        problems.append(f"--dora starts from the base weights itself: drop --init {lora.init} (or --dora)")
    if lora.add_tokens is not None and (not lora.add_tokens.strip()
                                        or any(not t.strip() for t in lora.add_tokens.split(","))):
        problems.append(f'--add-tokens {lora.add_tokens!r} has an empty token name: give names like "<think>,</think>"')
    targets = lora.target_modules
    if targets and is_pattern(targets):
        try:
            re.compile(targets)
        except re.error as exc:
            problems.append(f"--target-modules {targets!r} is not a valid regular expression ({exc})")
    return problems


def is_pattern(targets: str) -> bool:
    """Whether --target-modules is a regular expression (PEFT's string form) rather than a list of names."""
    return targets != "all-linear" and any(c in targets for c in "*+?[]()|^$\\")


def args_from_record(train: dict, lora: dict) -> TrainArgs:
    """TrainArgs from run.json's "train" and "lora" entries (a --resume, a worker, a sweep's base);
    lists come back as tuples, and keys this version does not know are left out."""
    known = {f.name for f in fields(TrainArgs)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in train.items() if k in known and k != "lora"}
    shape = {k: v for k, v in lora.items() if k in {f.name for f in fields(LoraArgs)}}
    return TrainArgs(**values, lora=LoraArgs(**shape))


def _fill(value, defaults):
    return replace(value, **{f.name: defaults[f.name] for f in fields(value)
                             if getattr(value, f.name) is None and f.name in defaults})


def resolve(args: TrainArgs, tiny: bool, *, tokens: int | Callable[[], int] | None = None,
            from_user: bool = False) -> TrainArgs:
    """Fill unset fields with the defaults for this model and check every value.

    `tokens`: the training rows' token count, or a function that counts them (called only when
    needed): with neither --epochs nor --steps, the tiny model's epochs scale down with it
    (`tiny_epochs`). `from_user`: `args` are what the user asked for, so --epochs with --steps is
    refused; a resolved run's record (for --resume) holds both and is not checked.
    """
    problems = []
    if from_user and args.epochs is not None and args.steps is not None:
        problems.append(f"--epochs {args.epochs:g} and --steps {args.steps} both set the length of the run: "
                        "pass only one of them")
    from ipylora.engine import methods

    method = methods.get(args.method)  # an unknown name is refused here, listing the known ones
    method_defaults = method.defaults(tiny)
    if tiny and args.epochs is None and args.steps is None and tokens is not None and "epochs" not in method_defaults:
        args = replace(args, epochs=tiny_epochs(tokens() if callable(tokens) else tokens))
    defaults, lora = (TINY_DEFAULTS, TINY_LORA) if tiny else (MODEL_DEFAULTS, MODEL_LORA)
    args = _fill(args, {**defaults, **method_defaults})
    args = replace(args, **{k: v for k, v in method.knobs.items() if getattr(args, k) is None})
    problems += method.check(args)
    args = replace(args, lora=_fill(args.lora, asdict(lora)))
    if args.quantization not in QUANTIZATIONS:
        problems.append(f"quantization {args.quantization!r} is not one of 4bit, 8bit")
    if args.strategy not in STRATEGIES:
        problems.append(f"--strategy {args.strategy!r} is not one of {', '.join(STRATEGIES)}")
    problems += _variant_problems(args)
    if args.scheduler not in SCHEDULERS:
        problems.append(f"--scheduler {args.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    from ipylora.engine import trackers

    problems += trackers.problems(args.report_to)  # unknown or not installed: before any weights load
    args = replace(args, report_to=trackers.normalized(args.report_to))
    checks = [
        ("--lr", args.lr, 0, 1, False),
        ("--epochs", args.epochs, 0, 1e6, False),
        ("--batch-size", 1 if args.batch_size is None else args.batch_size, 1, 1e6, True),
        ("--micro-batch-size", 1 if args.micro_batch_size is None else args.micro_batch_size, 1,
         args.batch_size or 1e6, True),
        ("--max-length", args.max_length, 8, 1e7, True),
        ("--warmup-ratio", args.warmup_ratio, 0, 1, True),
        ("--max-grad-norm", args.max_grad_norm, 0, 1e6, True),
        ("--r", args.lora.r, 1, 4096, True),
        ("--alpha", args.lora.alpha, 0, 1e6, False),
        ("--dropout", args.lora.dropout, 0, 0.95, True),
        ("--gpus", args.gpus, 1, 1024, True),
    ]
    if args.memory is not None:
        checks.append(("--memory", args.memory, 0, 1e6, False))
    if args.loraplus_ratio is not None:
        checks.append(("--loraplus-ratio", args.loraplus_ratio, 0, 1e4, False))
    if args.neftune is not None:
        checks.append(("--neftune", args.neftune, 0, 1e4, False))
    for flag, value in (("--steps", args.steps), ("--eval-every", args.eval_every), ("--early-stop", args.early_stop),
                        ("--save-every", args.save_every), ("--sample-every", args.sample_every),
                        ("--sample-max-new-tokens", args.sample_max_new_tokens)):
        if value is not None:
            checks.append((flag, value, 1, 1e9, True))
    for flag, value, low, high, inclusive in checks:
        ok = low <= value <= high if inclusive else low < value <= high
        if not ok:
            bound = f"[{low:g}, {high:g}]" if inclusive else f"({low:g}, {high:g}]"
            problems.append(f"{flag} {value:g} is outside {bound}")
    if problems:
        raise ConfigError("; ".join(problems) + ". Fix the value(s) and run again.")
    return args
