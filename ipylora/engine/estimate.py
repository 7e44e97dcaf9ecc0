"""A training run's memory and speed, worked out before any weight is loaded (`%lora_train --dry-run`).

Only the model's config is read, the model is built on PyTorch's meta device to count its
parameters and find its linear layers, and the dataset is tokenized as training would tokenize it.
The batch plan is not re-derived: the same `speed.plan_batch` and `train.planned_args` that a real
run calls get estimated figures (weights, adapter) in place of measured ones, so the dry run shows
the batch, token budget and checkpointing the run will use.

Memory, as `torch.cuda.max_memory_allocated` counts it on a GPU (process RSS growth on CPU):
weights at their stored width (nf4 ~0.516 byte a weight), the adapter in fp32 with its grads and
Adam's two moments, activations of the largest micro-batch the run is expected to draw (its rows'
lengths are simulated from the real token counts), the LM head's tile and a small allowance.

Speed on a GPU comes from a two-term fit (per-micro-batch overhead + FLOPs at a fixed efficiency)
to the H200 measurements in bench/RESULTS.md for the same path, scaled to other GPUs by SM count;
on CPU from a ~0.2 s matmul probe and constants measured here. Both are estimates, and say so.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass

from ipylora.engine import methods, speed
from ipylora.engine.config import TrainArgs, resolve
from ipylora.engine.errors import ConfigError, ModelLoadError
from ipylora.engine.tiny import TINY_MODEL_ID

GIB = speed.GIB
MIB = 2**20
# nf4 (bitsandbytes, blocksize 64, double quantization): 4 bits a weight, one 8-bit absmax per 64
# weights, one fp32 scale per 256 absmax blocks: +3.2% over half a byte.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# Liger off measured +19 GiB on the 7B bf16 run's ~84 GiB of activations (bench/RESULTS.md, run 2).
NO_LIGER_FACTOR = 1.23
# SDPA on packed rows instead of varlen flash: 104.0 vs 98.7 GiB peak (same run).
NO_FLASH_FACTOR = 1.06
# cuBLAS workspaces, optimizer temporaries, allocator rounding, inside max_memory_allocated.
GPU_ALLOWANCE = GIB // 4
# The CUDA context and kernels are outside PyTorch's count (nvidia-smi shows them).
CUDA_CONTEXT = GIB // 2
# H200 reference for speed: bench/RESULTS.md's peak (790 TFLOP/s bf16), 132 SMs.
H200_FLOPS = 790e12
H200_SMS = 132
# bf16 tensor-core throughput per SM relative to Hopper, by compute capability major (rough).
PER_SM_BY_ARCH = {7: 0.15, 8: 0.39, 9: 1.0, 10: 2.0, 12: 0.6}
# GPU step time = accumulation x OVERHEAD x layers / 28 + FLOPs / (EFFICIENCY x peak), FLOPs =
# 4 per linear weight per token (forward and input gradient; frozen weights get no weight grad), 6
# under checkpointing (the forward runs twice). Fitted to the two shapes measured on an H200 in
# bench/RESULTS.md run 2 (random-init Qwen2, alpaca-like lengths, ~12.5k tokens a step, LoRA r16
# all-linear dropout 0.05): bf16 7B 14,186 and 1.5B 38,703 tokens/s (50.8% / 30.2% MFU);
# 4-bit (checkpointing) 7B 9,623 and 1.5B 20,202 tokens/s (34.5% / 15.8% MFU). A fixed MFU
# (0.52 bf16, 0.34 4-bit) fits 7B only: it would put the 1.5B model 1.7x too fast.
GPU_FIT = {"16bit": (0.635, 0.170), "4bit": (0.765, 0.428)}  # (efficiency, seconds per micro-batch)
# CPU: a micro-batch costs CPU_STEP_S + CPU_LAYER_S per layer, plus its FLOPs (rows x longest row,
# 4 per linear weight) at CPU_EFFICIENCY x the matmul probe's FLOP/s. Measured on this 2-core
# machine through Session.train, fp32, batch 8 of the concepts demo (~800 padded tokens): the tiny
# model 0.036 s a step (estimate 0.042), Llama hidden 512 x 6 layers 0.49 s (0.36), hidden
# 1024 x 4 layers 0.82 s (0.88), with the probe at ~360 GFLOP/s. Other jobs on the machine made
# the same runs up to 8x slower: a CPU figure is rough.
CPU_STEP_S = 0.025
CPU_LAYER_S = 0.004
CPU_EFFICIENCY = 0.55
# CPU activations against the bf16/Liger formula: fp32, eager RMSNorm/SwiGLU and SDPA keep more.
# Measured as RSS growth minus weights, adapter state and CPU_ALLOWANCE: 1.56x the fp32 formula
# for both larger models above (x2 for fp32 x 1.23 for no Liger x 1.56 = 3.8).
CPU_ACTIVATION_FACTOR = 3.8
# RSS a CPU training adds beyond its tensors (Trainer, datasets, optimizer bookkeeping, allocator):
# the tiny model's run grew RSS by 176-189 MiB of which ~40 MiB are tensors.
CPU_ALLOWANCE = 150 * MIB


@dataclass(frozen=True)
class Shape:
    """What the meta model says about a model and the adapter it would get."""

    params: int
    """Every parameter (tied ones once)."""
    quantizable: int
    """Weights of the linear layers bitsandbytes quantizes (all but the LM head)."""
    quantizable_rows: int
    """Their output rows (8-bit keeps a fp32 scale per row)."""
    linear: int
    """Weights of every linear layer, LM head included: matmul FLOPs per token / 2."""
    lora: int
    """LoRA parameters for the requested target modules and rank."""
    lora_modules: int
    """Layers that get an adapter."""


@dataclass(frozen=True)
class Estimate:
    """A dry run's answer: what would be loaded, the batch plan, memory, speed and time."""

    model: str
    device: str
    precision: str
    quantization: str | None
    shape: Shape
    lora_r: int
    target_modules: str
    rows: int
    mean_tokens: float
    weights_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    lm_head_bytes: int
    allowance_bytes: int
    peak_bytes: int
    batch_size: int
    micro_batch: int
    accumulation: int
    step_tokens: int | None
    largest_micro_tokens: int
    checkpointing: bool
    tokens_per_step: float
    tokens_per_s: float
    speed_basis: str
    steps: int
    epochs: float
    eta_s: float
    notes: tuple[str, ...] = ()
    offload: bool = False
    """Checkpointed layer inputs held in pinned host memory (rows too long for the GPU otherwise)."""
    rollout_bytes: int = 0
    """Methods that sample (GRPO): the KV cache and last-step logits of one micro-batch of completions,
    held between training steps (the peak is the larger of the two phases)."""

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> list[tuple[str, str]]:
        """(label, value) rows for a front end to print."""
        quant = {"4bit": "4-bit nf4 (QLoRA)", "8bit": "8-bit"}.get(self.quantization, "none")
        unit = "GPU memory (allocated)" if self.device == "cuda" else "RAM (RSS growth)"
        budget = f", token budget {self.step_tokens:,}" if self.step_tokens else ""
        return [
            ("model", f"{self.model} on {self.device}"),
            ("precision", f"{self.precision}, quantization: {quant}"),
            ("parameters", _count(self.shape.params)),
            ("trainable (LoRA)", f"{_count(self.shape.lora)} (r={self.lora_r}, {self.shape.lora_modules} layers, "
                                 f"{self.target_modules})"),
            ("weights", _size(self.weights_bytes)),
            ("optimizer + adapter", _size(self.optimizer_bytes)),
            ("activations", f"{_size(self.activation_bytes)} (largest micro-batch ~{self.largest_micro_tokens:,} tokens)"),
            *([("rollout (KV cache)", f"{_size(self.rollout_bytes)} for {self.micro_batch} completions at a time")]
              if self.rollout_bytes else []),
            ("estimated peak", f"{_size(self.peak_bytes)} {unit}"),
            ("batch", f"{self.batch_size} rows = {self.micro_batch} per micro-batch x {self.accumulation} "
                      f"accumulation{budget}"),
            ("tokens per step", f"~{self.tokens_per_step:,.0f} (mean row {self.mean_tokens:,.0f} tokens, {self.rows:,} rows)"),
            ("checkpointing", ("yes, layer inputs offloaded to host memory" if self.offload else "yes")
                              if self.checkpointing else "no"),
            ("tokens/s", f"~{self.tokens_per_s:,.0f} ({self.speed_basis})"),
            ("steps", f"{self.steps:,} ({self.epochs:g} epochs)"),
            ("ETA", f"~{_duration(self.eta_s)} (training only, not loading)"),
        ]


def estimate(args: TrainArgs, dataset, device: str | None = None, *, session=None,
             gpu_free_bytes: int | None = None) -> Estimate:
    """The dry run of training `dataset` with `args`: nothing is loaded, no run folder is made.

    With `session`, its resident model counts as a real run would see it (no --model: that one).
    `device`: "cuda" or "cpu" (default: what a run would use). `gpu_free_bytes`: plan for a GPU with
    this much free memory instead of reading it (what-if, and tests on machines without one).
    """
    from ipylora.engine import models, train

    if session is not None:
        model_id, source = session._target_model(args.model)
    else:
        model_id, source = models.resolve_model_id(args.model)
    args = resolve(args, tiny=model_id == TINY_MODEL_ID)
    device = device or models.device_name()
    cuda = device == "cuda"
    precision = _precision(device)
    config = _config(source, args.trust_remote_code)
    shape = _known_shape(config, args.lora.r, args.lora.target_modules, args.trust_remote_code)
    resident = session is not None and session.model is not None and \
        (session.model_id, session.quantization) == (model_id, args.quantization)
    tokenizer = session.tokenizer if resident else models.load_tokenizer(source, args.trust_remote_code)
    train_part, _ = train._parts(dataset)
    method = methods.get(args.method)  # what one row costs depends on the method (DPO: both answers)
    dataset.require(method.shape, who=f"--method {method.name}")
    tokens = method.tokens(train_part, tokenizer, args.max_length)
    lengths = method.lengths(tokens, args)

    dtype_bytes = 2 if cuda else 4
    weights = weight_bytes(shape, args.quantization, dtype_bytes)
    trainable = speed.param_state_bytes(shape.lora)  # weights, grads, Adam moments, all fp32
    notes = []
    batch = None
    packed, padded_extra = cuda, 0.0
    dropout = args.lora.dropout or 0.0
    if cuda:
        free, resident_bytes = _gpu_memory(session, resident, weights, 4 * shape.lora, gpu_free_bytes)
        path = speed.attention_path(_model_class(config), config, device)
        packed = path.packed
        if not packed:  # padded batches, as the run will train them (speed.fast_settings)
            notes.append(path.note)
        planned_lengths, padded_extra = speed.padded_plan(config, path, lengths)
        def plan(dropout: float):
            return speed.plan_batch(config, planned_lengths, free_bytes=free, resident_bytes=resident_bytes,
                                    trainable_bytes=trainable, quantization=args.quantization,
                                    dropout=dropout, batch_size=args.batch_size,
                                    memory_cap=train.memory_cap(args), attention_bytes_per_token=padded_extra,
                                    host_free_bytes=speed.host_free_bytes(), offload=args.offload)

        batch, _kept_error = speed.kept_plan(plan, dropout)
        if dropout > 0.0:
            deferred = plan(0.0)
            if speed.defers_dropout(batch, deferred):
                batch, dropout = deferred, 0.0  # drawn again in the backward pass: nothing kept for it
    planned = train.whole_groups(train.planned_args(args, batch), method.batch_multiple(args))
    micro = train.micro_batch(planned)
    accumulation = planned.batch_size // micro
    steps = train.total_steps(method.examples(len(next(iter(tokens.values()))), planned), planned)
    checkpointing = bool(batch and batch.checkpointing)
    offload = bool(batch and batch.offload)
    if offload:
        notes.append(f"rows of up to {max(lengths):,} tokens: checkpointed layer inputs offloaded to pinned host "
                     "memory (the copies overlap compute; their cost is not in the tokens/s)")
    largest, micro_tokens = micro_batch_tokens(lengths, micro, steps * accumulation, padded=not packed, seed=args.seed)
    mean = sum(lengths) / max(1, len(lengths))
    per_token, attention_bytes = _activation_costs(config, dropout, checkpointing, cuda, notes, offload)
    per_token += padded_extra / (config.num_hidden_layers if checkpointing else 1)
    activations = int(largest * per_token + attention_bytes(micro, largest))
    lm_head = lm_head_bytes(config, largest, dtype_bytes)
    allowance = GPU_ALLOWANCE if cuda else CPU_ALLOWANCE
    rollout = rollout_bytes(config, micro, max(lengths), dtype_bytes) if method.generates else 0
    peak = weights + trainable + max(activations + lm_head, rollout) + allowance
    tokens_per_step = mean * planned.batch_size
    if cuda:
        context = sum(n * n for n in lengths) / 2 / max(1, sum(lengths)) if packed else max(lengths) / 2
        tokens_per_s, basis = gpu_tokens_per_s(config, shape.linear, args.quantization, checkpointing, accumulation,
                                               tokens_per_step, context)
        notes.append(f"plus ~{_size(CUDA_CONTEXT)} CUDA context outside PyTorch's count")
    else:
        tokens_per_s, basis = cpu_tokens_per_s(config, shape.linear, accumulation, micro, micro_tokens,
                                               tokens_per_step)
    if args.gpus > 1:
        notes.append(f"--gpus {args.gpus}: per GPU figures; steps and ETA are for one process")
    if train_part is not dataset or getattr(dataset, "eval", None) is not None:
        notes.append("eval passes are not in the ETA")
    if method.generates:
        notes.append("sampling the completions is not in the tokens/s or the ETA (on a GPU it took 76-92% of a "
                     "GRPO step: bench/RESULTS.md)")
    epochs = steps * planned.batch_size / max(1, len(lengths)) if args.steps else args.epochs
    return Estimate(
        model=model_id, device=device, precision=precision, quantization=args.quantization, shape=shape,
        lora_r=args.lora.r, target_modules=args.lora.target_modules, rows=len(lengths), mean_tokens=mean,
        weights_bytes=weights, optimizer_bytes=trainable, activation_bytes=activations,
        lm_head_bytes=lm_head, allowance_bytes=allowance, peak_bytes=peak, batch_size=planned.batch_size,
        micro_batch=micro, accumulation=accumulation, step_tokens=batch.step_tokens if batch else None,
        largest_micro_tokens=int(largest), checkpointing=checkpointing, offload=offload, tokens_per_step=tokens_per_step,
        tokens_per_s=tokens_per_s, speed_basis=basis, steps=steps, epochs=round(epochs, 2),
        eta_s=steps * tokens_per_step / max(tokens_per_s, 1e-9), notes=tuple(notes), rollout_bytes=rollout,
    )


def rollout_bytes(config, rows: int, length: int, dtype_bytes: int) -> int:
    """Keys and values of `rows` sequences of `length` tokens in every layer, plus one decode step's fp32 logits."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = 2 * (getattr(config, "num_key_value_heads", None) or heads)
    cache = rows * length * config.num_hidden_layers * kv * head_dim * dtype_bytes
    return int(cache + rows * config.vocab_size * 4)


# -- the model, without its weights ----------------------------------------------------------
def _model_class(config):
    """The causal-LM class transformers builds for `config` (None for remote code it does not list)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, ValueError):
        return None


def _config(source: str, trust_remote_code: bool):
    from transformers import AutoConfig

    from ipylora.engine.models import _load_message

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:  # OSError, ValueError, hub errors: the same one line a real load gives
        raise ModelLoadError(_load_message(source, exc, trust_remote_code)) from None


_SHAPES: dict = {}
"""model_shape's results in this process, by (config JSON, rank, targets, trust_remote_code)."""


def _known_shape(config, r: int, target_modules: str, trust_remote_code: bool) -> Shape:
    """`model_shape`, built once per config, rank and targets: a CPU sweep estimates every trial (0.13 s
    each for a 28-layer model on the meta device, measured)."""
    key = (config.to_json_string(), r, target_modules, trust_remote_code)
    if key not in _SHAPES:
        if len(_SHAPES) >= 16:
            _SHAPES.clear()
        _SHAPES[key] = model_shape(config, r, target_modules, trust_remote_code)
    return _SHAPES[key]


def model_shape(config, r: int, target_modules: str, trust_remote_code: bool = False) -> Shape:
    """Count parameters on the meta device (no memory) and the adapter PEFT would attach."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"Could not build {type(config).__name__} as a causal LM: {exc}") from None
    head = model.get_output_embeddings()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    body = {name: m for name, m in linears.items() if m is not head}
    if target_modules == "all-linear":  # PEFT: every linear layer but the output one
        chosen = list(body.values())
    else:
        wanted = [t.strip() for t in target_modules.split(",") if t.strip()]
        chosen = [m for name, m in model.named_modules()
                  if isinstance(m, (torch.nn.Linear, Conv1D, torch.nn.Embedding))
                  and any(name == t or name.endswith("." + t) for t in wanted)]
        if not chosen:
            known = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in body}))
            raise ConfigError(f"--target-modules {target_modules!r} matches no layer of this model: "
                              f"its linear layers are {known}, or use all-linear.")
    return Shape(
        params=sum(p.numel() for p in model.parameters()),
        quantizable=sum(m.weight.numel() for m in body.values()),
        quantizable_rows=sum(_in_out(m)[1] for m in body.values()),
        linear=sum(m.weight.numel() for m in linears.values()),
        lora=sum(r * sum(_in_out(m)) for m in chosen),
        lora_modules=len(chosen),
    )


def _in_out(module) -> tuple[int, int]:
    import torch

    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]  # Conv1D stores (in, out)


def weight_bytes(shape: Shape, quantization: str | None, dtype_bytes: int) -> int:
    """Bytes of the loaded base model: quantized linears, everything else at the compute width."""
    rest = (shape.params - shape.quantizable) * dtype_bytes
    if quantization == "4bit":
        return int(shape.quantizable * NF4_BYTES + rest)
    if quantization == "8bit":
        return int(shape.quantizable + 4 * shape.quantizable_rows + rest)
    return shape.params * dtype_bytes


# -- memory of a step ------------------------------------------------------------------------
def micro_batch_tokens(lengths: list[int], micro: int, draws: int, padded: bool, seed: int = 42,
                       trials: int = 8) -> tuple[float, float]:
    """(expected tokens of the largest of `draws` micro-batches, mean tokens of one), drawn as the
    Trainer draws them: a shuffled epoch cut into micro-batches. Padded batches count rows x their
    longest row (what is computed and stored); padding-free ones their real tokens."""
    import numpy as np

    lengths = np.asarray(lengths or [1], dtype=np.int64)
    micro = max(1, min(micro, len(lengths)))
    draws = max(1, min(draws, 4096))  # the expected maximum barely moves past a few thousand
    rng = np.random.default_rng(seed)
    largest, sizes_seen = [], []
    for _ in range(trials):
        drawn = []
        while sum(len(d) for d in drawn) < draws:
            order = lengths[rng.permutation(len(lengths))]
            full = len(order) // micro * micro
            for chunk in [order[:full].reshape(-1, micro)] + ([order[full:][None, :]] if full < len(order) else []):
                drawn.append(chunk.max(axis=1) * chunk.shape[1] if padded else chunk.sum(axis=1))
        sizes = np.concatenate(drawn)[:draws]
        largest.append(sizes.max())
        sizes_seen.append(sizes.mean())
    return float(np.mean(largest)), float(np.mean(sizes_seen))


def _activation_costs(config, dropout: float, checkpointing: bool, cuda: bool, notes: list[str],
                      offload: bool = False):
    """(bytes per token, f(micro rows, tokens) -> attention bytes) for this device's training path.

    The GPU path is the one speed.py sets up (bf16, Liger, varlen flash); without Liger or flash the
    measured increases apply. The CPU path trains in fp32 without Liger, padded, and SDPA keeps the
    attention probabilities of every layer for backward.
    """
    per_token = speed.activation_bytes_per_token(config, dropout, checkpointing, offload)
    if cuda:
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            per_token *= NO_LIGER_FACTOR
            notes.append("liger-kernel is not installed: more activation memory, slower")
        if not speed.flash_varlen_available():
            per_token *= NO_FLASH_FACTOR
        return per_token, lambda rows, tokens: 0
    per_token *= CPU_ACTIVATION_FACTOR
    heads, layers = config.num_attention_heads, config.num_hidden_layers

    def attention(rows: int, tokens: float) -> float:
        seq = tokens / max(rows, 1)
        return rows * heads * seq * seq * 4 * layers

    return per_token, attention


def lm_head_bytes(config, tokens: float, dtype_bytes: int) -> int:
    """TRL's fused LM head in backward: one (4096 x 32768) logits tile and the fp32 hidden grad."""
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE

    vocab_tile = 32768 if config.vocab_size >= 32768 else config.vocab_size
    return int(min(tokens, TOKEN_CHUNK_SIZE) * vocab_tile * dtype_bytes + tokens * config.hidden_size * 4)


def _gpu_memory(session, resident: bool, weights: int, adapter: int,
                gpu_free_bytes: int | None) -> tuple[int, int]:
    """(free, allocated) bytes as the real run will measure them when it plans, model loaded."""
    if gpu_free_bytes is not None:
        return gpu_free_bytes - weights - adapter, weights + adapter
    import torch

    free, allocated = speed._free_bytes(), torch.cuda.memory_allocated()
    if resident:  # the model stays where it is: only the adapter is added
        return free - adapter, allocated + adapter
    dropped = allocated if session is not None and session.model is not None else 0  # a reload frees it first
    return free + dropped - weights - adapter, allocated - dropped + weights + adapter


def _precision(device: str) -> str:
    if device != "cuda":
        return "float32"
    import torch

    if not torch.cuda.is_available():  # what-if planning for a GPU from a machine without one
        return "bfloat16"
    from ipylora.engine.models import choose_precision

    return choose_precision(device, None).dtype


# -- speed -----------------------------------------------------------------------------------
def gpu_tokens_per_s(config, linear: int, quantization: str | None, checkpointing: bool, accumulation: int,
                     tokens_per_step: float, context: float = 0.0) -> tuple[float, str]:
    """Tokens/s from the fit to the H200 measurements for this path (GPU_FIT).

    `context`: the tokens a token attends to on average over a row, weighted by row (sum of squared
    lengths / 2 / sum of lengths). Attention's FLOPs are added at the same efficiency: at alpaca-like
    lengths they are under 1% of a step (inside the fit), at 32k-token rows of the 7B shape ~70%.
    """
    import torch

    efficiency, overhead = GPU_FIT["4bit" if quantization else "16bit"]
    flops = H200_FLOPS
    basis = "fit to H200 measurements"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        if "H200" not in props.name and "H100" not in props.name:
            flops *= props.multi_processor_count / H200_SMS * PER_SM_BY_ARCH.get(props.major, 0.5)
            basis = f"H200 fit scaled to {props.name}, rough"
    if quantization == "8bit":
        basis += "; 8-bit not measured, taken as 4-bit"
    heads = config.num_attention_heads
    width = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    # QK^T and PV over the context in the forward pass, 2.5x that in flash attention's backward,
    # and the forward again under checkpointing.
    attention = 2 * 2 * width * context * config.num_hidden_layers * (4.5 if checkpointing else 3.5)
    step_s = (accumulation * overhead * config.num_hidden_layers / 28
              + ((6 if checkpointing else 4) * linear + attention) * tokens_per_step / (efficiency * flops))
    return tokens_per_step / step_s, basis


def cpu_tokens_per_s(config, linear: int, accumulation: int, micro: int, micro_tokens: float,
                     tokens_per_step: float) -> tuple[float, str]:
    """Tokens/s from a short fp32 matmul probe and the overheads measured on this kind of run.

    `micro_tokens`: tokens a padded micro-batch computes on (rows x longest row), on average.
    """
    probe = cpu_flops()
    # Attention scores and their backward (~12 s^2 h per row and layer) matter for long padded rows.
    seq = micro_tokens / max(micro, 1)
    attention = 12 * seq * micro_tokens * config.hidden_size * config.num_hidden_layers
    step_s = accumulation * (CPU_STEP_S + CPU_LAYER_S * config.num_hidden_layers
                             + (4 * linear * micro_tokens + attention) / (probe * CPU_EFFICIENCY))
    return tokens_per_step / step_s, f"CPU: matmul probe {probe / 1e9:,.0f} GFLOP/s, rough"


@functools.cache
def cpu_flops() -> float:
    """`matmul_probe`, once per process: every CPU run's estimate used to cost 0.24 s (a sweep's every trial)."""
    return matmul_probe()


def matmul_probe(seconds: float = 0.2) -> float:
    """FLOP/s of this CPU on fp32 matmuls: the best 20 ms window of `seconds`.

    One fixed, mid-sized shape: tiny matmuls measured anywhere from 4 to 130 GFLOP/s from one call
    to the next on this shared 2-core machine; (256 x 1024) @ (1024 x 2816) was steady within 15%.
    """
    import torch

    x, w = torch.randn(256, 1024), torch.randn(1024, 2816)
    x @ w  # warm-up (thread pool, first-call allocation)
    best, started = 0.0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        runs, window = 0, time.perf_counter()
        while time.perf_counter() - window < 0.02:
            x @ w
            runs += 1
        best = max(best, 2 * 256 * 1024 * 2816 * runs / (time.perf_counter() - window))
    return best


# -- formatting ------------------------------------------------------------------------------
def _size(n: float) -> str:
    return f"{n / GIB:,.2f} GiB" if n >= GIB / 10 else f"{n / MIB:,.1f} MiB"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return str(n)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


