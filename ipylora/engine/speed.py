"""Fast GPU training defaults, chosen from the model, the data and free memory, with no user tuning.

The seed recipe pads every batch to its longest row, runs a handful of sequences per step and
recomputes every activation: an H200 sits under 4% busy. What pays, measured in
`bench/train_throughput.py` (figures in `bench/RESULTS.md`):

- Padding-free batches. TRL's collator concatenates a batch's rows into one row and passes the
  sequence boundaries (`cu_seq_lens_q`, computed on the CPU). Our attention function
  (`ipylora_varlen`) hands them to FlashAttention's varlen kernel through PyTorch's own build of it
  (`aten::_flash_attention_forward`, no flash-attn package needed), so no token attends across a
  boundary and no compute is spent on padding. Without a usable flash kernel (CPU, old GPU) the
  same function runs SDPA with a block-diagonal causal mask: correct, slower; the CPU test checks
  this path against unpacked batches.
- Batches sized by a token budget taken from free memory (after the resident model), not by a
  fixed row count; activation checkpointing only when the budget would otherwise be too small.
- Liger's RMSNorm, RoPE and SwiGLU kernels. The fused linear cross-entropy is already there: TRL's
  SFTTrainer scores the LM head in tiles without materialising the logits (and refuses Liger's).
- LoRA inputs are not copied: PEFT casts every LoRA input to the adapter's fp32 dtype (one copy
  per adapted layer, kept for backward); under bf16 autocast that copy is useless.
- 4-bit models: the non-quantized weights that `prepare_model_for_kbit_training` widened to fp32
  (embeddings, LM head, norms) go back to the compute dtype: 2 GiB less on a 7B model.

`fast_settings` is the one entry point: it patches the model in place and returns SFTConfig
overrides. On CPU it returns {} and touches nothing. Its memory arithmetic (`plan_batch`) needs no
model, so `%lora_train --dry-run` (estimate.py) runs the same plan from estimated figures.
"""

from __future__ import annotations

import functools
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass

from ipylora.engine.errors import ConfigError
from ipylora.engine.models import base_of

VARLEN = "ipylora_varlen"
GIB = 2**30
# Token budget per optimizer step: past ~16k tokens a 7B step is already compute-bound.
MAX_STEP_TOKENS = 16384
# Below this many tokens per step without checkpointing, recomputing activations pays for itself.
MIN_STEP_TOKENS = 8192
# 4-bit runs are sized to stay small: this planning budget (or the resident size, if larger).
# Measured on the 7B shape through Session.train (bench/dry_run_check.py, bench/RESULTS.md): with
# 11 GiB the step-token cap (16,384) bound instead, and a 14.8k-token batch peaked at 12.2 GiB
# (9,762 tokens/s); 8.5 GiB plans ~14.3k tokens/step: 9,148 tokens/s at an 11.1 GiB peak.
QUANTIZED_EXTRA_BYTES = int(8.5 * GIB)
# Keep at least this many steps per epoch on small datasets (the loss curve needs points).
MIN_STEPS_PER_EPOCH = 32
# Reserved for TRL's fused LM head: a fp32 token x vocab tile (4096 x 32768) and its grad.
LM_TILE_BYTES = 2 * 4096 * 32768 * 4
# Under --memory: the LM head's tiles and the allocator's slack, as measured. DPO on the 1.5B shape
# (bench/dpo_throughput.py, H200) planned with the free-memory margins above (2.5 GiB) peaked
# 0.54 GiB above weights + adapter state at 2k tokens per step, with checkpointing.
CAPPED_SLACK_BYTES = int(0.75 * GIB)
# Offloaded checkpointing: the layer inputs on the GPU at once (TRL's forward stash of 5, the
# backward's one ahead), and the share of free host memory the pinned copies may take.
OFFLOAD_IN_FLIGHT = 6
HOST_SHARE = 0.5


@dataclass(frozen=True)
class Plan:
    """What fast_settings decided, and why (recorded in run.json by the caller if it likes)."""

    attention: str
    liger: bool
    checkpointing: bool
    step_tokens: int
    batch_size: int
    accumulation: int
    budget_bytes: int
    notes: tuple[str, ...]
    offload: bool = False
    compiled: bool = False
    graphs: bool = False  # the compiled layers replayed as CUDA graphs


def fast_settings(model, tokenizer, tokenized_lengths, precision, device: str, *, quantization: str | None = None,
                  batch_size: int | None = None, dropout: float = 0.0, attention: str | None = None,
                  liger: bool | None = None, memory_budget: int | None = None, memory_cap: int | None = None,
                  force: bool = False, defer_dropout: bool | None = None, offload: bool | None = None,
                  compile_layers: bool | None = None, layer_graphs: bool | None = None) -> dict:
    """Patch `model` (a PeftModel with its adapter attached) for speed; return SFTConfig overrides.

    `tokenized_lengths`: tokens per training row. `batch_size`: rows per step the user asked for
    (None: chosen from the token budget). `attention`: force "varlen", "flex" or "sdpa" (benchmarks);
    `liger`: force Liger on/off; `memory_budget`: bytes the run may use beyond what is allocated now;
    `memory_cap`: bytes the whole run may hold, what is allocated now included (`--memory`).
    `defer_dropout`: LoRA dropout drawn again in the backward pass instead of kept (dropout.py):
    None (the default) where memory binds (`_plan_dropout`), True / False always / never (benchmarks).
    `offload`: checkpointed layer inputs in pinned host memory; None where the longest row needs it (plan_batch).
    `compile_layers`: the decoder layers compiled (compiled_layers.py) where the plan allows it;
    None: `compiled_layers.DEFAULT`. `layer_graphs`: compiled layers replayed as CUDA graphs, packed
    rows padded to a few token counts (compiled_layers.pad_to_buckets); None: `compiled_layers.GRAPHS`
    on CUDA with packed rows.
    The returned dict has a "_plan" entry (a Plan); pop it before building the SFTConfig.
    `force` plans on CPU too (the benchmark's smoke mode); otherwise CPU gets {} and no patches.
    """
    if device != "cuda" and not force:
        return {}
    import torch

    notes: list[str] = []
    base = base_of(model)
    compute_dtype = getattr(torch, precision.dtype)
    if quantization:
        _narrow_frozen_weights(base, compute_dtype)
    if precision.bf16 or precision.fp16:
        _stop_lora_input_casts(model)
    from ipylora.engine import lora_forward

    lora_forward.sync(model)  # B's product added into the base output by its GEMM (lora_forward.py)
    path = attention_path(type(base), base.config, device) if attention is None else AttentionPath(attention, True, None)
    if path.note:
        notes.append(path.note)
    if path.kind != "native":
        set_attention(base, path.kind)

    cuda = device == "cuda"
    lengths, extra = padded_plan(base.config, path, [int(n) for n in tokenized_lengths] or [1])
    free, resident, trainable = _free_bytes() if cuda else 8 * GIB, torch.cuda.memory_allocated() if cuda else 0, \
        trainable_state_bytes(model)

    def plan_for(dropout: float) -> BatchPlan:
        return plan_batch(base.config, lengths, free_bytes=free, resident_bytes=resident, trainable_bytes=trainable,
                          quantization=quantization, dropout=dropout, batch_size=batch_size,
                          memory_budget=memory_budget, memory_cap=memory_cap, attention_bytes_per_token=extra,
                          host_free_bytes=host_free_bytes(), offload=offload)

    batch, kept_error = kept_plan(plan_for, dropout)
    if dropout > 0.0:
        batch = _plan_dropout(model, batch, plan_for(0.0), defer_dropout, notes, kept_error)
    from ipylora.engine import compiled_layers

    compiled = _compiles(model, base, compile_layers, quantization, batch, notes)
    # Liger's kernels do not trace (compiled_layers.py): a compiled layer gets inductor's fusions instead.
    use_liger = _liger_once(base, notes) if liger is not False and not compiled else False
    graphs = compiled and path.packed and (compiled_layers.GRAPHS and cuda if layer_graphs is None else layer_graphs)
    if compiled:
        compiled_layers.compile_layers(model, graphs=graphs)
    if graphs:
        per_micro = batch.micro_batch * sum(lengths) / len(lengths)
        graphs = compiled_layers.pad_to_buckets(model, compiled_layers.bucket_for(per_micro),
                                                sequences=batch.micro_batch + 3, longest=max(lengths))
        notes.append("compiled layers replayed as CUDA graphs: packed rows padded to multiples of "
                     f"{compiled_layers.bucket_for(per_micro):,} tokens" if graphs else
                     "compiled layers not replayed as CUDA graphs: this model's layer stack was not found")
    if batch.offload:
        notes.append(f"rows of up to {max(lengths):,} tokens: checkpointed layer inputs offloaded to pinned host memory")
    if cuda and path.packed and not compiled:
        _warm_once(model, base, use_liger, notes)
    plan = Plan(path.kind, use_liger, batch.checkpointing, batch.step_tokens, batch.batch_size, batch.accumulation,
                batch.budget_bytes, tuple(notes), batch.offload, compiled, graphs)
    overrides = {
        "padding_free": path.packed,
        "per_device_train_batch_size": batch.micro_batch,
        "gradient_accumulation_steps": batch.accumulation,
        "gradient_checkpointing": batch.checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False} if batch.checkpointing else None,
        # Each step's logs are read while the next step runs (lagged.py): logging every step costs no wait.
        "logging_steps": 1,
        "dataloader_pin_memory": True,
        # TRL's offloading (a side stream copies each saved tensor out in the forward pass and back,
        # one ahead, in the backward); configs without the field (GRPO) leave it out.
        "activation_offloading": True if batch.offload else None,
        "_plan": plan,
    }
    return overrides


def warm_kernels(model) -> None:
    """Compile the Triton kernels of a training step in both the forms a packed row's length asks for.

    Triton compiles a kernel again for an integer argument that is a multiple of 16 (its alignment
    specialization), and a packed row's token count is such an argument: Liger's RoPE (`seq_len`),
    its norms (`n_rows`), the deferred dropout (`M`). The first step whose row is a multiple of 16
    tokens (one in 16) therefore stops to compile, for seconds on a cold cache, at a step no one can
    foresee: the live panel stalls, and so does a benchmark's timed window. bench/train_throughput.py's
    rows reach their first such step at step 5 (47 rows a step) or 8 (32 rows), inside the timed
    steps; a cold cache there may be why one 7B configuration gave 10,448 and 14,259 tokens/s in
    two runs (bench/RESULTS.md, session 16).

    One forward and backward of two tiny packed batches (32 and 33 tokens) compiles both forms before
    the run. The random state, the gradients and the train/eval mode are left as they were."""
    import torch

    device = next(p.device for p in model.parameters())
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for lengths in ((16, 16), (16, 17)):
                n = sum(lengths)
                ids = torch.full((1, n), 1, dtype=torch.long, device=device)
                positions = torch.cat([torch.arange(k, device=device) for k in lengths])[None]
                cu = torch.tensor([0, lengths[0], n], dtype=torch.int32, device=device)
                model(input_ids=ids, position_ids=positions, labels=ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                      max_length_q=max(lengths), max_length_k=max(lengths)).loss.backward()
    finally:
        for p in model.parameters():
            p.grad = None
        model.train(was_training)


def _warm_once(model, base, use_liger: bool, notes: list[str]) -> None:
    """`warm_kernels` once per resident base model and set of kernels (Liger's, the deferred
    dropout's, at each LoRA rank); a failure is a note, not a failed run."""
    from ipylora.engine import dropout as lora_dropout
    from ipylora.engine.models import base_memo

    deferred = lora_dropout.deferred(model)
    if not (use_liger or deferred):
        return  # no Triton kernel on the step's path
    ranks = sorted({m.r[a] for m in model.modules() if hasattr(m, "lora_A") and isinstance(getattr(m, "r", None), dict)
                    for a in m.active_adapters if a in m.r})

    def warm() -> str | None:
        try:
            warm_kernels(model)
        except Exception as exc:  # an architecture the tiny batch does not suit: the first steps compile instead
            return f"kernels not compiled ahead ({type(exc).__name__}: {exc}): the first steps include compiling"
        return None

    said = base_memo(base, f"warm:{use_liger}:{deferred}:{ranks}", warm)
    if said:
        notes.append(said)


def _compiles(model, base, asked: bool | None, quantization: str | None, batch: BatchPlan,
              notes: list[str]) -> bool:
    """Whether this run's decoder layers are compiled: asked for (or the default), and the plan is
    one compiling helps. Checkpointed layers and the deferred dropout break the graph (the layer
    would run eagerly in pieces); bitsandbytes' 4-bit layers and Liger's kernels (if an earlier run
    on this resident model applied them) do not trace."""
    from ipylora.engine import compiled_layers
    from ipylora.engine.models import base_memo

    if not (compiled_layers.DEFAULT if asked is None else asked):
        return False
    from ipylora.engine import dropout as lora_dropout

    liger_applied = (base_memo(base, "liger") or (False,))[0]  # (applied, notes), once a run tried it
    why = (f"the {quantization} base" if quantization else "activation checkpointing" if batch.checkpointing
           else "the dropout drawn again in the backward pass" if lora_dropout.deferred(model)
           else "Liger's kernels, applied by an earlier run" if liger_applied else None)
    if why:
        notes.append(f"decoder layers not compiled: {why} would break the compiled graph")
        return False
    notes.append("decoder layers compiled (torch.compile, dynamic shapes): the first steps include compiling")
    return True


@dataclass(frozen=True)
class AttentionPath:
    """How a family's training batches are attended: `kind` ("varlen", "sdpa", "eager", or "native"
    for a model that keeps its own attention code), whether rows are packed, and why, if not the fast path."""

    kind: str
    packed: bool
    note: str | None


def attention_path(model_class, config, device: str) -> AttentionPath:
    """The fastest attention that is exact for this model's family.

    Packed rows through FlashAttention's varlen kernel, unless: the model soft-caps attention
    logits (Gemma 2), which neither that kernel nor SDPA implement (transformers itself refuses
    SDPA for it): eager attention over padded batches, as transformers trains it; likewise if it
    adds learned attention sinks to the softmax (gpt-oss), which the varlen kernel does not take
    and transformers gives no SDPA path (`has_attention_sinks`); or the model's
    attention does not go through transformers' attention functions (Falcon), so a packed row
    would attend across its rows: padded batches with its own attention. Sliding windows (Mistral,
    Gemma 3) go to the varlen kernel as its window. Without a flash kernel: SDPA with
    transformers' packed-sequence mask (measured at half the varlen speed on an H200). Flex
    attention recompiles for every new packed length (it did not finish 8 steps of the 7B shape in
    110 s), so it is never chosen.
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    family = getattr(model_class, "__name__", "This model").removesuffix("ForCausalLM").removesuffix("LMHeadModel")
    if getattr(config, "attn_logit_softcapping", None):
        return AttentionPath("eager", False, f"{family} soft-caps attention logits, which no flash or SDPA kernel "
                                             "implements: eager attention over padded batches")
    if has_attention_sinks(model_class, config):
        return AttentionPath("eager", False, f"{family} adds learned attention sinks to the softmax, which the flash "
                                             "varlen kernel does not implement: eager attention over padded batches")
    if model_class is not None and not getattr(model_class, "_supports_attention_backend", False):
        return AttentionPath("native", False, f"{family} has its own attention code (not transformers' attention "
                                              "functions): padded batches, no packing")
    if device != "cuda" or flash_varlen_available():
        return AttentionPath("varlen", True, None)
    return AttentionPath("sdpa", True, "no FlashAttention kernel on this GPU: SDPA with a packed mask")


def has_attention_sinks(model_class, config) -> bool:
    """Whether the family hands learned attention sinks to its attention function (gpt-oss's `sinks`,
    passed as `s_aux`). transformers has no config flag for it: the modeling code that passes them
    is the sign (read once per plan; gpt-oss by its model type where the source is not there)."""
    import inspect
    import sys

    module = sys.modules.get(getattr(model_class, "__module__", None) or "")
    try:
        return "s_aux=" in inspect.getsource(module)
    except (TypeError, OSError):
        return getattr(config, "model_type", None) == "gpt_oss"


def padded_plan(config, path: AttentionPath, lengths: list[int]) -> tuple[list[int], float]:
    """(row lengths to plan with, attention bytes per token) for `path`: padded batches cost every
    row the longest one's tokens, plus what their attention keeps (`padded_attention_bytes_per_token`)."""
    if path.packed:
        return lengths, 0.0
    return [max(lengths)] * len(lengths), padded_attention_bytes_per_token(config, path.kind, max(lengths))


def padded_attention_bytes_per_token(config, kind: str, padded_length: int) -> float:
    """Attention memory per token of a padded row that the per-token activation count leaves out.

    Eager attention keeps its score matrices for backward: with soft-capping the bf16 scores,
    their tanh, the fp32 softmax and the bf16 probabilities, ~12 bytes per head and key in every
    layer; with attention sinks (gpt-oss) less is kept (its bf16 softmax), planned the same, on the
    safe side. A model's own SDPA (Falcon) keeps no score matrix.
    """
    if kind != "eager":
        return 0.0
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return 12.0 * config.num_attention_heads * padded_length * config.num_hidden_layers


@dataclass(frozen=True)
class BatchPlan:
    """The memory arithmetic of a plan: what `fast_settings` uses and `estimate.py` reproduces."""

    checkpointing: bool
    step_tokens: int
    batch_size: int
    accumulation: int
    micro_batch: int
    budget_bytes: int
    activation_bytes_per_token: float
    offload: bool = False  # checkpointed layer inputs held in pinned host memory (TRL's activation offloading)


def plan_batch(config, tokenized_lengths, *, free_bytes: int, resident_bytes: int, trainable_bytes: int,
               quantization: str | None, dropout: float, batch_size: int | None,
               memory_budget: int | None = None, memory_cap: int | None = None,
               attention_bytes_per_token: float = 0.0, host_free_bytes: int | None = None,
               offload: bool | None = None) -> BatchPlan:
    """Token budget, checkpointing and batch shape from memory figures, with no model needed.

    `free_bytes`: GPU memory free once the model is resident (`_free_bytes`); `resident_bytes`:
    what is allocated then (weights + adapter); `trainable_bytes`: `trainable_state_bytes` of the
    adapter. A real run passes measured figures, a dry run estimated ones: one arithmetic for both.
    `memory_cap` (`--memory`): total bytes the run may hold, the resident model included.
    `attention_bytes_per_token`: attention memory beyond the flash path's, all layers together
    (padded eager attention, `padded_attention_bytes_per_token`); with checkpointing one layer's.

    Long rows: a row is never split, so the longest one must fit in the memory the GPU really has
    (or --memory leaves), whatever the planning budget says. Where it would not fit with every
    activation kept, the layers are checkpointed; where it would not fit with checkpointing either,
    the checkpointed layer inputs (`layers x hidden` bf16 values a token, the bulk of what
    checkpointing keeps at long rows) go to pinned host memory, if `host_free_bytes` has room for
    them (None: not checked). Under --memory a row that fits in no way is a ConfigError.
    `offload` True checkpoints and offloads whatever the rows (--offload), False never offloads.
    """
    lengths = [int(n) for n in tokenized_lengths] or [1]
    budget = memory_budget if memory_budget is not None else int(0.88 * free_bytes)
    if quantization and memory_budget is None:
        budget = min(budget, max(QUANTIZED_EXTRA_BYTES, resident_bytes))
    fixed = fixed_training_bytes(trainable_bytes, quantization)
    if memory_cap is not None:
        # Under a cap the slack is what was measured, not the free-memory plan's margin (see CAPPED_SLACK_BYTES).
        fixed = min(fixed, trainable_bytes + CAPPED_SLACK_BYTES)
        room = memory_cap - resident_bytes - fixed
        if room < 256 * activation_bytes_per_token(config, dropout, checkpointing=True):
            need = (resident_bytes + fixed) / GIB
            raise ConfigError(f"--memory {memory_cap / GIB:g} GiB is too little: the model and the optimizer state "
                              f"alone take about {need:.1f} GiB; give --memory {math.ceil(need + 1)} or more")
        budget = min(budget, memory_cap - resident_bytes)
    budget -= fixed
    # The longest row is one micro-batch at least, however small the budget: it must fit in what the
    # GPU (or --memory) really has, not in the 4-bit runs' planning budget.
    longest = max(lengths)
    room = _hard_room(free_bytes, resident_bytes, memory_budget, memory_cap) - fixed
    per_token = activation_bytes_per_token(config, dropout, checkpointing=False) + attention_bytes_per_token
    checkpointing = budget / per_token < MIN_STEP_TOKENS or longest * per_token > room or bool(offload)
    asked, offload = offload, False
    if checkpointing:
        attention = attention_bytes_per_token / config.num_hidden_layers
        per_token = activation_bytes_per_token(config, dropout, checkpointing=True) + attention
        if asked or (asked is None and longest * per_token > room):
            offloaded = activation_bytes_per_token(config, dropout, checkpointing=True, offload=True) + attention
            host_need = longest * (per_token - offloaded)
            if asked or (host_need > 0 and (host_free_bytes is None or host_need <= HOST_SHARE * host_free_bytes)):
                offload, per_token = True, offloaded
            if memory_cap is not None and longest * per_token > room:
                raise ConfigError(_too_long(longest, per_token, room, memory_cap, resident_bytes + fixed, offload))
    step_tokens = int(max(256, min(MAX_STEP_TOKENS, budget / per_token)))
    micro = rows_for_tokens(lengths, step_tokens)
    if batch_size is None:
        batch_size = min(micro, max(8, len(lengths) // MIN_STEPS_PER_EPOCH))
    accumulation = max(1, math.ceil(batch_size / micro))
    micro = math.ceil(batch_size / accumulation)
    return BatchPlan(checkpointing, step_tokens, batch_size, accumulation, micro, budget, per_token, offload)


def _hard_room(free_bytes: int, resident_bytes: int, memory_budget: int | None, memory_cap: int | None) -> float:
    """Bytes a step may really use beyond the resident model: free memory's usable share, or what
    --memory (or an explicit budget) leaves."""
    room = memory_budget if memory_budget is not None else int(0.88 * free_bytes)
    if memory_cap is not None:
        room = min(room, memory_cap - resident_bytes)
    return room


def _too_long(longest: int, per_token: float, room: float, memory_cap: int, fixed: float, offload: bool) -> str:
    """The one line for a row that cannot fit under --memory: what it needs, and two ways out."""
    need = (fixed + longest * per_token) / GIB
    fits = int(room / per_token) // 256 * 256
    how = "with its activations offloaded to host memory" if offload else "with checkpointing"
    return (f"rows of up to {longest:,} tokens need about {need:.1f} GiB {how}, more than --memory "
            f"{memory_cap / GIB:g}: give --memory {math.ceil(need + 0.5)} or cut rows with --max-length {max(fits, 256)}")


def kept_plan(plan_for, dropout: float) -> tuple[BatchPlan | None, ConfigError | None]:
    """`plan_for(dropout)`, or (None, its error) where only the plan with nothing kept for the dropout
    might fit (the longest rows under --memory); with no dropout the error is raised."""
    try:
        return plan_for(dropout), None
    except ConfigError as exc:
        if dropout <= 0.0:
            raise
        return None, exc


def defers_dropout(kept: BatchPlan | None, deferred: BatchPlan) -> bool:
    """Whether LoRA dropout is drawn again in the backward pass, given the plans with it kept (None:
    the longest row does not fit that way) and with nothing kept for it (`_plan_dropout` says why);
    the dry run asks the same."""
    return (kept is None or (kept.checkpointing and not deferred.checkpointing)
            or (kept.offload and not deferred.offload) or deferred.step_tokens > 1.25 * kept.step_tokens)


def _dropout_gain(kept: BatchPlan | None, deferred: BatchPlan) -> str:
    if kept is None:
        return "the longest rows fit only so"
    if kept.checkpointing and not deferred.checkpointing:
        return "no activation checkpointing"
    if kept.offload and not deferred.offload:
        return "no activation offloading"
    return "more tokens a step"


def _plan_dropout(model, kept: BatchPlan | None, deferred: BatchPlan, defer: bool | None, notes: list[str],
                  kept_error: Exception | None = None) -> BatchPlan:
    """The batch plan with LoRA dropout kept (PEFT's way) or drawn again in the backward pass
    (dropout.py: nothing kept for it, one more pass over each adapted input), and the model set to match.

    Drawing again costs time (7B shape on an H200 at 47 rows a step, no checkpointing: 13,468
    tokens/s against 14,409 kept and 15,786 without dropout) and saves memory (74.6 GiB peak against
    98.7): it is taken where that memory changes the plan, i.e. spares activation checkpointing
    (a recomputed forward pass, ~30%) or offloading, fits at least a quarter more tokens a step, or
    is the only way the longest row fits (`kept` None; `kept_error` says why, raised if the layers
    cannot draw again)."""
    from ipylora.engine import dropout as lora_dropout

    if defer is None:
        defer = defers_dropout(kept, deferred)
    if kept is None and not defer:
        raise kept_error
    done, left = lora_dropout.sync(model, enabled=defer)
    if done and not left:
        notes.append(f"LoRA dropout drawn again in the backward pass (no copies kept: {_dropout_gain(kept, deferred)})")
        return deferred
    if kept is None:
        lora_dropout.sync(model, enabled=False)
        raise kept_error
    return kept


def rows_for_tokens(lengths: list[int], step_tokens: int) -> int:
    """Rows per step such that a random batch stays under `step_tokens` (mean + 3.5 sigma of its sum)."""
    n = len(lengths)
    mean = sum(lengths) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in lengths) / n)
    rows = 1
    while rows < n and (rows + 1) * mean + 3.5 * math.sqrt(rows + 1) * std <= step_tokens:
        rows += 1
    return rows


def activation_bytes_per_token(config, dropout: float, checkpointing: bool, offload: bool = False) -> float:
    """Bytes of saved activations per token for a Llama/Qwen-style decoder with LoRA on all linears.

    Counted tensor by tensor (bf16, Liger RMSNorm/SwiGLU, flash attention, LoRA inputs not copied):
    per layer 6 hidden-sized tensors, q/k/v, and 3 intermediate-sized ones (gate, up, their
    product); LoRA dropout adds a copy plus a mask for each adapted input, q/k/v's and gate/up's one
    each where they share it (lora_forward.STACK: 4 inputs a layer, not 7). With checkpointing only
    each layer's input stays, plus one layer's full set during its backward. With `offload` the layer
    inputs are in host memory: a few of them stay on the GPU while they are copied (TRL keeps up
    to 5 saved tensors in flight in the forward pass and fetches the next one ahead in the backward).
    """
    h = config.hidden_size
    inter = getattr(config, "intermediate_size", 4 * h)
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = 2 * getattr(config, "num_key_value_heads", heads) * head_dim
    layer = 6 * h + kv + 3 * inter
    if dropout > 0:
        from ipylora.engine import lora_forward

        # hidden-wide inputs copied: q/k/v's, o's, gate/up's (6 unstacked), and down's
        layer += (3 if lora_forward.STACK else 6) * 7 / 6 * h + 0.5 * inter
    layer_bytes = 2 * layer * 1.1  # 10% for what is not counted (rstd, lse, rotary cos/sin)
    top = 2 * 4 * h  # embeddings out, final norm, hidden fed to the LM head and its grad
    if checkpointing:
        kept = min(OFFLOAD_IN_FLIGHT, layers) if offload else layers
        return kept * 2 * h + layer_bytes + top
    return layers * layer_bytes + top


def trainable_state_bytes(model) -> int:
    """Bytes of the trainable weights, their grads and Adam's two fp32 moments."""
    return sum(param_state_bytes(p.numel(), p.element_size()) for p in model.parameters() if p.requires_grad)


def param_state_bytes(numel: int, element_size: int = 4) -> int:
    """A trainable tensor's weight, grad and Adam moments (PEFT keeps LoRA weights in fp32)."""
    return numel * (element_size * 2 + 8)


def fixed_training_bytes(trainable_bytes: int, quantization: str | None) -> int:
    """Optimizer state, LoRA grads, the LM head's tile and allocator slack."""
    slack = 0.5 * GIB if quantization else 1.5 * GIB
    return int(trainable_bytes + LM_TILE_BYTES + slack)


def configure_allocator() -> None:
    """Expandable segments: batches of varying token counts otherwise fragment the CUDA cache
    (measured: 99 GiB allocated at peak but 139 GiB reserved on an H200). Call before CUDA starts."""
    import os

    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def host_free_bytes() -> int:
    """Host memory available now (pinned copies of offloaded activations come out of it)."""
    import psutil

    return int(psutil.virtual_memory().available)


def _free_bytes() -> int:
    import torch

    free, _total = torch.cuda.mem_get_info()
    return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()


# -- model patches ---------------------------------------------------------------------------
def _narrow_frozen_weights(base, dtype) -> None:
    """Undo prepare_model_for_kbit_training's fp32 copies of frozen non-quantized weights."""
    import torch

    for param in base.parameters():
        if not param.requires_grad and param.dtype == torch.float32:
            param.data = param.data.to(dtype)


def _stop_lora_input_casts(model) -> None:
    """Under autocast, PEFT's cast of each LoRA input to fp32 only adds a copy per adapted layer."""
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled") and hasattr(module, "lora_A"):
            module.cast_input_dtype_enabled = False


def _liger_once(base, notes: list[str]) -> bool:
    """`_apply_liger` the first time on this base model; its patches stay on the resident modules, so
    later runs (each sweep trial) get the same answer and notes without patching again (70 ms)."""
    from ipylora.engine.models import base_memo

    def apply() -> tuple[bool, list[str]]:
        said: list[str] = []
        return _apply_liger(base, said), said

    applied, said = base_memo(base, "liger", apply)
    notes.extend(said)
    return applied


def _apply_liger(base, notes: list[str]) -> bool:
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        notes.append("liger-kernel not installed: RMSNorm/RoPE/SwiGLU unfused")
        return False
    model_type = getattr(base.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:  # Liger would log this and return quietly
        notes.append(f"Liger has no kernels for {model_type}: its norms and MLP run unfused")
        return False
    # Liger's MoE SwiGLU replaces the expert blocks' forward, which then finds PEFT's ParamWrapper
    # around the fused expert weights instead of its own layout (AttributeError: 'ParamWrapper'
    # object has no attribute 'hidden_dim', Qwen3-MoE and Mixtral on the H200): norms and RoPE only.
    swiglu = not any(p.ndim == 3 and "expert" in name for name, p in base.named_parameters())
    if not swiglu:
        notes.append("Liger's SwiGLU is off: the LoRA-wrapped MoE experts keep their own forward")
    try:
        with instance_only():
            _apply_liger_kernel_to_instance(model=base, rope=True, rms_norm=True, swiglu=swiglu,
                                            cross_entropy=False, fused_linear_cross_entropy=False)
    except Exception as exc:  # an architecture Liger does not know, or an API drift
        notes.append(f"liger not applied: {type(exc).__name__}: {exc}")
        return False
    return True


@contextmanager
def instance_only():
    """Undo, on leaving, what the block changed in transformers' modeling modules, keeping it for CUDA.

    Liger's apply functions patch the model instance and also its family's module (the RMSNorm and
    MLP classes, the rotary function), so every model of the family made afterwards in the kernel
    runs Liger's Triton kernels, on the CPU too, where they fail ("Pointer argument (at 0) cannot be
    accessed from Triton (cpu tensor?)": the GPU test run, a CPU model made after a GPU run). The
    classes go back (the instance keeps its patched modules); a function (the rotary one, which the
    attention code looks up in its module at each call) is kept for CUDA tensors only."""
    before = {name: dict(vars(module)) for name, module in list(sys.modules.items())
              if name.startswith("transformers.models.") and module is not None}
    try:
        yield
    finally:
        for name, old in before.items():
            module = sys.modules.get(name)
            for attr, new in list(vars(module).items()) if module is not None else ():
                if attr not in old or old[attr] is new:
                    continue
                if isinstance(new, type) or not callable(new):
                    setattr(module, attr, old[attr])
                else:
                    setattr(module, attr, _on_cuda(new, getattr(old[attr], "elsewhere", old[attr])))


def _on_cuda(cuda_fn, elsewhere):
    """`cuda_fn` where the call's first tensor is on a CUDA device, `elsewhere` otherwise."""
    import torch

    @functools.wraps(elsewhere)
    def dispatch(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        return (cuda_fn if first is not None and first.is_cuda else elsewhere)(*args, **kwargs)

    dispatch.cuda, dispatch.elsewhere = cuda_fn, elsewhere
    return dispatch


# -- attention -------------------------------------------------------------------------------
def flash_varlen_available() -> bool:
    """PyTorch's built-in FlashAttention (varlen entry point): CUDA, sm80 or newer."""
    import torch

    return (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
            and hasattr(torch.ops.aten, "_flash_attention_forward"))


def set_attention(model, kind: str) -> str:
    """Switch `model` to "varlen" (ours), "flex", "sdpa" or "eager"; returns the transformers name used."""
    return _use_attention(model, {"varlen": VARLEN, "flex": "flex_attention", "sdpa": "sdpa", "eager": "eager"}[kind])


def _use_attention(model, name: str) -> str:
    """Switch `model` to transformers' attention function `name`."""
    if name == VARLEN:
        register_varlen_attention()
    if getattr(model.config, "_attn_implementation", None) == name:
        return name  # already (a sweep's trials: each set it again, a walk of the model)
    try:
        model.set_attn_implementation(name)
    except Exception:
        model.config._attn_implementation = name
    return name


@contextmanager
def attention_as(model, name: str):
    """`model` attends with attention function `name` inside the block (its own one again after)."""
    previous = getattr(model.config, "_attn_implementation", None)
    if previous == name:
        yield
        return
    _use_attention(model, name)
    try:
        yield
    finally:
        _use_attention(model, previous)


def register_varlen_attention() -> None:
    """Make `attn_implementation="ipylora_varlen"` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, _varlen_mask)


@contextmanager
def packed_rows_unchecked(plan: dict | None, overrides: dict):
    """While a run whose plan (Plan as a dict) trains padding-free rows through `varlen_attention`:
    transformers' mask preparation asks at every forward whether the rows are packed
    (`find_packed_sequence_indices`) by reading a GPU tensor back, which waits for the whole queue
    (lagged.py). Our mask function ignores the answer (the kernel takes the boundaries from
    cu_seq_lens), so it gets the sequence index of every token unchecked, as transformers hands it
    over under tracing. Any other run: nothing changes."""
    if not (plan and plan.get("attention") == "varlen" and overrides.get("padding_free")):
        yield
        return
    from transformers import masking_utils

    checked = masking_utils.find_packed_sequence_indices

    def unchecked(position_ids):
        import torch

        starts = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1
        return starts.cumsum(-1)

    masking_utils.find_packed_sequence_indices = unchecked
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = checked


def _varlen_mask(*args, attention_mask=None, **kwargs):
    # Packed training rows (no attention mask) carry their boundaries in cu_seq_lens, and the
    # kernel applies any sliding window itself. Everything else (generation) gets the SDPA mask,
    # which is None for plain causal rows but keeps a sliding window that the prompt exceeds.
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, **kwargs):
    """transformers attention function: packed rows by their boundaries, anything else by SDPA.

    query/key/value: (batch, heads, seq, head_dim). Returns (batch, seq, heads, head_dim), None.
    """
    import torch

    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    if cu is None and attention_mask is None and query.shape[0] == 1 and kwargs.get("position_ids") is not None \
            and query.shape[2] == key.shape[2]:
        cu, max_len = cu_seq_lens_from_positions(kwargs["position_ids"])
    if cu is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, head_dim)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    window, softcap, sinks = kwargs.get("sliding_window"), kwargs.get("softcap"), kwargs.get("s_aux")
    # attention_path never packs a family with sinks; forced here (benchmarks), the reference kernel honours them
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and flash_varlen_available() and not softcap \
            and sinks is None:
        # transformers' sliding window: a query sees itself and the window - 1 tokens before it
        windowed = {"window_size_left": int(window) - 1, "window_size_right": 0} if window else {}
        out = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, int(max_len), int(max_len), dropout if module.training else 0.0, True, False,
            scale=scale, **windowed)[0]
    else:
        out = _block_causal_sdpa(q, k, v, cu, scale, window, softcap, sinks)
    return out.unsqueeze(0), None


def cu_seq_lens_from_positions(position_ids):
    """Boundaries of packed sequences from position ids that restart at 0 (one host sync)."""
    import torch

    pos = position_ids[0]
    starts = (pos == 0).nonzero().flatten()
    cu = torch.cat([starts, torch.tensor([pos.numel()], device=pos.device)]).to(torch.int32)
    return cu, int(cu.diff().max())


def _block_causal_sdpa(q, k, v, cu, scale, window: int | None = None, softcap: float | None = None, sinks=None):
    """Reference kernel for packed rows (CPU, old GPUs): SDPA under a block-diagonal causal mask,
    narrowed to a sliding window if given; with soft-capping or attention sinks (one logit per head
    that joins every row's softmax and is dropped after it), the eager formula transformers uses."""
    import torch

    n = q.shape[0]
    seq = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=q.device), cu.diff().long(), output_size=n)
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    mask = causal & (seq[:, None] == seq[None, :])
    if window:
        mask = mask.triu(-(int(window) - 1))
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (heads, tokens, head_dim)
    if not softcap and sinks is None:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                               enable_gqa=k.shape[0] != q.shape[0])
        return out.transpose(0, 1)
    groups = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    scores = q @ k.transpose(1, 2) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    if sinks is not None:
        scores = torch.cat([scores, sinks.to(scores.dtype).reshape(-1, 1, 1).expand(-1, n, 1)], -1)
    weights = scores.softmax(-1, dtype=torch.float32)[..., :n]
    return (weights.to(v.dtype) @ v).transpose(0, 1)
