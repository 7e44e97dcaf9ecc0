"""Batch-1 decoding with the decode step captured once as a CUDA graph and replayed per token.

transformers' generate() does the model's Python and kernel launches again for every token: on an
H200 a 7B model decodes at 31-42 tok/s in eager mode while its GPU work is ~7 ms a token, and the
compiled path (static cache + torch.compile, reduce-overhead) still spends ~0.9 ms a token in
dynamo's guard checks plus the cudagraph-tree bookkeeping and generate's own loop (118 tok/s for a
GPU step of 4.9 ms; profile in bench/RESULTS.md).

Here the prompt is prefilled eagerly into a transformers `StaticCache` (every layer a full one,
sliding-window layers too: `full_static_cache`); then one decode step,
model(token, position) -> next-token logits, is captured into a CUDA graph, optionally after
torch.compile, and replayed for each new token. The host's work per token is one graph launch,
the pick of the next token (greedy, or transformers' own logits warpers and a multinomial draw)
and a copy of it into the graph's input.

A captured step runs the model as it was at capture: the same weights (by address), the same
adapter layers in the same state and the same cache size. `StepGraph.key` records that state;
a generation whose state differs (another adapter, adapters disabled, weights changed by
training) captures again. One `StepGraph` is kept per model; `release(model)` frees it (cache and
graph memory) before training or when adapters change.

Off CUDA, and for models transformers does not mark as compilable with a static cache, chat uses
transformers' generate() instead (`usable`); the same step runs uncaptured when `capture=False`,
which is how the CPU tests check the loop.
"""

from __future__ import annotations

import functools
import inspect
import types
from contextlib import contextmanager, nullcontext
from typing import Callable, Collection

from ipylora.engine.decode import capturing, drop_kernels, kernel_linears
from ipylora.engine.models import base_of

# Attributes of the model holding its StepGraphs: chat's (one row) and batched decoding's; and the
# adapter merged into copies of the weights that both decode on (held_copies).
_SLOT = "_ipylora_step_graph"
_BATCH_SLOT = "_ipylora_batch_graph"
_COPIES = "_ipylora_merged_copies"
# Rows decoded together by `decode_batch` at most: a decode step of a 7B model reads its 15 GB of
# weights whatever the batch, so 64 rows take about as long a step as one.
BATCH_ROWS = 64
# A batch's cache is sized more tightly than chat's: each step reads every row's whole cache.
BATCH_CACHE_STEP = 256
# Static caches are sized in steps of this many tokens, so that most turns reuse the graph.
CACHE_STEP = 1024
# A decode step writes its cache slot at its position tensor (slot_layer), not from each layer's own
# counter; False: transformers' way (benchmarks compare the two).
SLOT_WRITES = True
# Generation-config settings whose logits processors this loop does not have, with their neutral
# values; a model whose config sets one (rare) is decoded by generate() instead.
_NOT_HANDLED = {"no_repeat_ngram_size": (0,), "bad_words_ids": (), "suppress_tokens": (), "begin_suppress_tokens": (),
                "forced_bos_token_id": (), "forced_eos_token_id": (), "sequence_bias": (), "min_p": (),
                "typical_p": (1.0,), "epsilon_cutoff": (0.0,), "eta_cutoff": (0.0,), "encoder_repetition_penalty": (1.0,),
                "exponential_decay_length_penalty": (), "guidance_scale": (1.0,), "watermarking_config": (),
                "renormalize_logits": (False,), "min_new_tokens": (0,), "min_length": (0,), "num_beams": (1,)}


def usable(model) -> bool:
    """Whether chat on `model` decodes through a captured step: a static-cache model on one CUDA GPU."""
    base = base_of(model)
    if not getattr(base, "_can_compile_fullgraph", False) or next(base.parameters()).device.type != "cuda":
        return False
    placed = set((getattr(base, "hf_device_map", None) or {}).values())
    return len(placed) <= 1  # a model spread over devices (device_map="auto") is not captured


def _generation_config(model):
    """The model's generation config with transformers' global defaults filled in, as generate() sees it."""
    import copy

    config = copy.deepcopy(base_of(model).generation_config)
    defaults = getattr(config, "_get_default_generation_params", None)  # transformers >= 5 keeps them apart
    if callable(defaults):
        config.update(**defaults(), defaults_only=True)
    return config


def picker(model, temperature: float, top_p: float) -> Callable | None:
    """next_token(ids_so_far, logits) as generate() would pick it (the model's generation config with
    these overrides), or None when that config needs a processor this loop does not apply."""
    import torch
    from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                         TemperatureLogitsWarper, TopKLogitsWarper,
                                                         TopPLogitsWarper)

    config = _generation_config(model)
    if any(getattr(config, name, None) not in (None, *neutral) for name, neutral in _NOT_HANDLED.items()):
        return None
    processors = LogitsProcessorList()
    penalty = getattr(config, "repetition_penalty", 1.0) or 1.0
    if penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty))
    sample = temperature > 0
    if sample:
        processors.append(TemperatureLogitsWarper(temperature))
        if config.top_k:
            processors.append(TopKLogitsWarper(config.top_k))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))

    def next_token(ids, logits):
        scores = logits.float()
        if processors:
            scores = processors(ids, scores)
        if sample:
            return torch.multinomial(scores.softmax(-1), 1).view(-1)
        return scores.argmax(-1)

    next_token.needs_ids = penalty != 1.0
    return next_token


class StepGraph:
    """A static KV cache for `batch` sequences of up to `max_len` tokens and the model's decode step
    on it, captured as a CUDA graph (`capture`), after torch.compile (`compiled`).

    A batch is left-padded to one width (`prefill_batch`): every row writes the same cache slot each
    step, and its own position is the slot less its padding (`offsets`), as generate() numbers a
    left-padded row; the padding's slots stay masked."""

    def __init__(self, model, max_len: int, compiled: bool = False, capture: bool = True, batch: int = 1):
        import torch

        self.model = base_of(model)
        self.max_len, self.compiled, self.capture, self.batch = max_len, compiled, capture, batch
        self.options = (compiled, capture)  # as asked; capture turns off if it fails
        self.device = next(self.model.parameters()).device
        self.cache = full_static_cache(self.model.config, max_len)
        self.token = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
        self.position = torch.zeros((1,), dtype=torch.long, device=self.device)
        self.offsets = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
        # An explicit all-ones mask over the whole cache: without one, some models (OPT) build it as
        # torch.ones(cache length + 1), reading the cache's length back to the host, which a
        # capture cannot do. Slots past the current position are masked by causality all the same.
        self.mask = torch.ones((batch, max_len), dtype=torch.long, device=self.device)
        for index, layer in enumerate(self.cache.layers if SLOT_WRITES else ()):
            if isinstance(layer, slot_layer()):
                layer.slot, layer.counts = self.position, index == 0
        parameters = inspect.signature(self.model.forward).parameters
        # transformers 5.x renames past_key_values to cache; both are accepted while it deprecates.
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"
        self._keep_last = "logits_to_keep" in parameters
        self._packed_prefill = _packs_prompts(self.model, self.device)
        self._step = self._forward
        self._graph = None
        self._logits = None
        self._lora_kernels = True
        self.key = None

    def _forward(self):
        output = self.model(input_ids=self.token, attention_mask=self.mask, position_ids=self.position - self.offsets,
                            cache_position=self.position, use_cache=True, **{self._cache_arg: self.cache})
        return output.logits[:, -1]

    def ready(self, key) -> None:
        """Capture the decode step for model state `key`, unless it already is (or capture is off).
        LoRA layers are captured as small compiled kernels; if those fail (no Triton, say), as plain
        matrix products; if capture itself fails, decoding goes on uncaptured, with a warning."""
        if not self.capture or (self._graph is not None and self.key == key):
            return
        failure = None
        for kernels in (True, False) if self._lora_kernels else (False,):
            try:
                self._record(key, kernels)
                return
            except Exception as exc:  # an op that cannot be captured or compiled
                failure = exc
                self._lora_kernels = False
        if self.compiled:  # capture the step uncompiled before giving up on capture
            self._warn("torch.compile", failure, "decoding with the uncompiled step")
            self.compiled, self._step = False, self._forward
            try:
                self._record(key, False)
                return
            except Exception as exc:
                failure = exc
        self._warn("CUDA graph capture", failure, "decoding without it, more slowly")
        self._graph = self._logits = None
        self.capture = False

    def prefill(self, ids: list[int]):
        """Fill the cache with the prompt `ids`; the logits after its last token."""
        import torch

        # transformers' static cache writes where its own length counter says (a tensor the graph
        # advances), not at cache_position: it starts from zero for every answer.
        self.cache.reset()
        tokens = torch.tensor([ids], device=self.device)
        positions = torch.arange(len(ids), device=self.device)
        extra = {"logits_to_keep": 1} if self._keep_last else {}
        with prefilling(self.cache):
            output = self.model(input_ids=tokens, attention_mask=self.mask, position_ids=positions.view(1, -1),
                                cache_position=positions, use_cache=True, **{self._cache_arg: self.cache}, **extra)
        return output.logits[:, -1]

    def prefill_batch(self, prompts: list[list[int]], pad: int):
        """Fill the cache with `prompts` (at most `batch`; the rows left over get one pad token, and
        their answers are to be ignored), left-padded to the longest; the logits after each one's end."""
        import torch

        self.cache.reset()
        rows = [*prompts, *[[pad]] * (self.batch - len(prompts))]
        width = max(len(ids) for ids in rows)
        pads = torch.tensor([[width - len(ids)] for ids in rows], device=self.device)
        slots = torch.arange(self.max_len, device=self.device)
        self.mask.copy_(slots >= pads)
        self.offsets.copy_(pads)
        if self._packed_prefill and len(prompts) > 1:
            logits = self._prefill_packed(rows, width)
            if logits is not None:
                return logits, width
            self._packed_prefill = False  # this model's cache did not take it: padded from now on
            self.cache.reset()
        tokens = torch.tensor([[pad] * (width - len(ids)) + ids for ids in rows], device=self.device)
        positions = (slots[:width] - pads).clamp(min=0)
        extra = {"logits_to_keep": 1} if self._keep_last else {}
        with prefilling(self.cache):
            output = self.model(input_ids=tokens, attention_mask=self.mask, position_ids=positions,
                                cache_position=slots[:width], use_cache=True, **{self._cache_arg: self.cache}, **extra)
        return output.logits[:, -1], width

    def _prefill_packed(self, rows: list[list[int]], width: int):
        """`prefill_batch` without the padding: the rows as one packed row (positions restarting at 0
        for each, attended by the varlen kernel as packed training rows are), their keys and values
        then written to the slots the left-padded batch would have filled; the padding's slots stay
        empty and masked. A 64-row batch of 40-200-token prompts computes 40% fewer tokens. None if
        the model's cache does not come out as one full layer per static layer.

        The logits are those after each row's last token (the varlen kernel's rounding, not the
        padded batch's: the CPU tests check the greedy tokens equal generate()'s)."""
        import torch
        from transformers import DynamicCache

        from ipylora.engine.speed import VARLEN, attention_as

        lengths = torch.tensor([len(ids) for ids in rows], device=self.device)
        tokens = torch.tensor([[token for ids in rows for token in ids]], device=self.device)
        row = torch.repeat_interleave(torch.arange(len(rows), device=self.device), lengths)
        starts = lengths.cumsum(0) - lengths
        positions = torch.arange(tokens.shape[1], device=self.device) - starts[row]
        packed = DynamicCache()
        extra = {"logits_to_keep": starts + lengths - 1} if self._keep_last else {}
        # The boundaries as TRL's padding-free collator hands them to training: the varlen kernel
        # would otherwise find them from the positions, with a host sync in every layer.
        bounds = torch.cat([starts, starts[-1:] + lengths[-1:]]).to(torch.int32)
        longest = max(len(ids) for ids in rows)
        extra.update(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=longest, max_length_k=longest)
        with attention_as(self.model, VARLEN):
            output = self.model(input_ids=tokens, position_ids=positions.view(1, -1), use_cache=True,
                                **{self._cache_arg: packed}, **extra)
        layers = getattr(packed, "layers", [])
        if len(layers) != len(self.cache.layers) or not all(hasattr(layer, "keys") for layer in layers):
            return None
        slot = positions + (width - lengths)[row]
        for static, fresh in zip(self.cache.layers, layers):
            keys, values = fresh.keys[0].transpose(0, 1), fresh.values[0].transpose(0, 1)  # (tokens, heads, dim)
            if not static.is_initialized:
                static.lazy_initialization(fresh.keys.expand(self.batch, -1, -1, -1),
                                           fresh.values.expand(self.batch, -1, -1, -1))
            static.keys[row, :, slot] = keys
            static.values[row, :, slot] = values
            static.cumulative_length.fill_(width)
        logits = output.logits[0]
        return logits if self._keep_last else logits[starts + lengths - 1]

    def step(self, token, position: int):
        """Logits after feeding `token` (`batch` elements on the device) at cache slot `position`, the next one."""
        self.token.copy_(token.view(-1, 1))
        self.position.fill_(position)
        if self._graph is None:
            if self.compiled:
                try:
                    with self._compiling():
                        return self._step()
                except Exception as exc:  # found at the first layer's first step: nothing written twice
                    self._warn("torch.compile", exc, "decoding with the uncompiled step")
                    self.compiled = False
            return self._step()
        self._graph.replay()
        return self._logits

    def _record(self, key, kernels: bool) -> None:
        """Capture the decode step. It runs a few times first (compiling, if asked, and letting cuBLAS
        and the allocator settle) on a side stream; the cache they filled is reset by the prefill."""
        import torch

        self._graph = self._logits = None
        self.cache.reset()
        self.token.zero_()
        self.position.zero_()
        self.offsets.zero_()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        graph = torch.cuda.CUDAGraph()
        # LoRA layers take their graph-friendly form (decode.py), one-token linear layers gemv.py's
        # kernels; Falcon splits its keys by slices.
        with capturing(kernels), _sliced_falcon_splits(self.model), \
                (kernel_linears(self.model) if kernels else nullcontext()), self._compiling():
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self._step()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            try:
                # thread_local: the notebook's main thread may touch CUDA while a chat thread captures.
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    logits = self._step()
            except Exception:
                _end_failed_capture(self.device)
                raise
        self._graph, self._logits, self.key = graph, logits, key

    @contextmanager
    def _compiling(self):
        """With `compiled`, the step's decoder layers compiled one at a time (decode_layers.py); a model
        whose layers that does not find is compiled whole instead (fullgraph)."""
        if not self.compiled:
            yield
            return
        from ipylora.engine import gemv
        from ipylora.engine.decode_layers import compiled_layers

        gemv.register_op()  # one token's linear layers keep gemv's kernel, as an operator inductor calls
        with compiled_layers(self.model, self.cache) as layered:
            if not layered and self._step == self._forward:
                import torch

                self._step = torch.compile(self._forward, fullgraph=True, dynamic=False)
            yield

    @staticmethod
    def _warn(what: str, exc: Exception, then: str) -> None:
        import warnings

        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        warnings.warn(f"{what} failed for this model ({reason}): {then}.", RuntimeWarning, stacklevel=3)


def _packs_prompts(model, device) -> bool:
    """Whether a batch prefill runs as one packed row: where training packs rows (transformers'
    attention functions, no soft-capping or sinks), through the flash varlen kernel on a GPU in half
    precision, or through its block-diagonal SDPA form on CPU."""
    import torch

    from ipylora.engine.speed import attention_path, flash_varlen_available

    if attention_path(type(model), model.config, device.type).kind != "varlen":
        return False
    if device.type == "cpu":
        return True
    dtype = model.get_input_embeddings().weight.dtype  # the hidden states', 4-bit models included
    return device.type == "cuda" and flash_varlen_available() and dtype in (torch.bfloat16, torch.float16)


@functools.cache
def slot_layer():
    """The class of `full_static_cache`'s layers (made on first use: transformers is imported late)."""
    from transformers.cache_utils import StaticLayer

    class SlotLayer(StaticLayer):
        """A full static layer whose decode step writes its token at `slot`, the step's position tensor.

        transformers' StaticLayer works out where to write from its own length counter: an arange, an
        add and the counter's increment, three small kernels a layer and a step (96 of a 7B decode
        step's ~1,300). Here the step writes at the position it is given, which is the same slot (the
        prompt's length plus the tokens since), and only the first layer keeps its counter going, the
        one `Cache.get_seq_length()` reads. A prefill (`prefilling`) writes as StaticLayer does."""

        slot = None
        counts = False

        def update(self, key_states, value_states, *args, **kwargs):
            if self.slot is None or not self.is_initialized:
                return super().update(key_states, value_states, *args, **kwargs)
            written = self.write(key_states, value_states)
            if self.counts:
                self.cumulative_length.add_(key_states.shape[-2])
            return written

        def write(self, key_states, value_states):
            """The step's keys and values at `slot`, the counter left alone (decode_layers counts apart)."""
            self.keys.index_copy_(2, self.slot, key_states)
            self.values.index_copy_(2, self.slot, value_states)
            return self.keys, self.values

    return SlotLayer


@contextmanager
def prefilling(cache):
    """The cache's slot layers write where their own counters say (a prompt of several tokens) in the block."""
    layers = [layer for layer in cache.layers if isinstance(layer, slot_layer())]
    slots = [layer.slot for layer in layers]
    for layer in layers:
        layer.slot = None
    try:
        yield
    finally:
        for layer, slot in zip(layers, slots):
            layer.slot = slot


def full_static_cache(config, max_len: int):
    """transformers' StaticCache for `config` with every layer a full static one.

    A sliding-window layer (Mistral, Gemma 2/3) keeps its length in a Python int and branches on it
    (fill, then roll), which a captured graph cannot replay. A full layer keeps its length in a tensor;
    the window still holds, since the model builds a sliding layer's mask from its config
    (masking_utils' sliding-window mask over the whole cache, or the window argument of flash
    attention), not from the cache's layer type. The cost is memory: a sliding layer holds
    `max_len` tokens instead of its window's.
    """
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    cache = StaticCache(config=config, max_cache_len=max_len)
    cache.layers = [slot_layer()(max_cache_len=max_len) if type(layer) is StaticLayer or
                    (isinstance(layer, StaticLayer) and layer.is_sliding) else layer for layer in cache.layers]
    return cache


@contextmanager
def folded_gqa():
    """While decoding, one token's grouped-query attention reads each key/value head once.

    transformers' SDPA path repeats every key/value head for its query heads (`repeat_kv`) whenever
    there is a mask, which a static cache always has: for Qwen2-7B's 28 query and 4 key/value heads,
    each decode step copies the whole cache 7 times over, which is most of a 64-row batch step (42 ms
    on an H200 for a 1024-token cache). For a single query token the query heads of one group can
    stand where query positions stand instead: (batch, kv heads, group, dim) against the cache as it
    is, the mask broadcast over the group. The same attention, without the copies. Everything else
    (prefill, sinks, soft-capping, a mask per head) goes to the function it replaces."""
    from transformers.modeling_utils import AttentionInterface

    from ipylora.engine.speed import VARLEN

    mapping = AttentionInterface._global_mapping
    originals = {name: mapping[name] for name in ("sdpa", VARLEN) if name in mapping}
    installed = {name: _folding(function) for name, function in originals.items()}
    mapping.update(installed)
    try:
        yield
    finally:
        for name, function in originals.items():
            if mapping.get(name) is installed[name]:
                mapping[name] = function


@functools.cache
def _folding(original: Callable) -> Callable:
    """`original` (a transformers attention function) with one-token grouped-query attention folded;
    one wrapper per function, so that a compiled step's guards see the same object every decode."""
    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
        import torch

        batch, heads, length, dim = query.shape
        groups = key.shape[1]
        if length != 1 or groups == heads or heads % groups or attention_mask is None or attention_mask.ndim != 4 \
                or attention_mask.shape[1] != 1 or kwargs.get("s_aux") is not None or kwargs.get("softcap") \
                or key.shape[-1] != value.shape[-1] or (module.training and dropout):
            return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        folded = query.reshape(batch, groups, heads // groups, dim)
        mask = attention_mask[:, :, :, : key.shape[-2]]
        out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
        return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None

    return attention


@contextmanager
def _sliced_falcon_splits(model):
    """Falcon's multi-query attention splits keys and values off its fused projection with list
    indices (`qkv[..., [-2], :]`): each call copies a small index tensor from the host, which a
    capture refuses ("Cannot copy between CPU and CUDA tensors during CUDA graph capture"). While
    the step is captured, its attention layers split by slices instead: the same values, as views."""
    patched = [m for m in model.modules() if type(m).__name__ in ("FalconAttention", "FalconFlashAttention2")
               and (getattr(m, "multi_query", False) or getattr(m, "new_decoder_architecture", False))]
    for module in patched:
        module._split_heads = types.MethodType(_split_by_slices, module)
    try:
        yield
    finally:
        for module in patched:
            module.__dict__.pop("_split_heads", None)


def _split_by_slices(self, fused_qkv):
    """transformers' FalconAttention._split_heads (multi-query and new-architecture layouts), by slices."""
    import torch

    batch, length, _ = fused_qkv.shape
    if self.new_decoder_architecture:
        qkv = fused_qkv.view(batch, length, -1, self.num_heads // self.num_kv_heads + 2, self.head_dim)
        query, key, value = qkv[:, :, :, :-2], qkv[:, :, :, -2:-1], qkv[:, :, :, -1:]
        key, value = torch.broadcast_to(key, query.shape), torch.broadcast_to(value, query.shape)
        return tuple(x.flatten(2, 3) for x in (query, key, value))
    qkv = fused_qkv.view(batch, length, self.num_heads + 2, self.head_dim)
    return qkv[..., :-2, :], qkv[..., -2:-1, :], qkv[..., -1:, :]


def _end_failed_capture(device) -> None:
    """Leave no capture state behind a capture that failed part-way. torch marks the CUDA generator as
    capturing when a capture begins and unmarks it only when one ends cleanly; left marked, every
    random op afterwards (dropout in the next training run) fails with "Offset increment outside
    graph capture encountered unexpectedly". A small capture that succeeds ends that mode."""
    import torch

    torch.cuda.synchronize(device)
    scratch = torch.zeros(1, device=device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        scratch.add_(1)


def state_key(model) -> tuple:
    """What a captured step depends on besides the weights' storage: each LoRA layer's forward
    (the lean one is rebuilt when its adapter or weights change), its active adapters and whether
    they are merged or disabled."""
    key = []
    for module in model.modules():
        if hasattr(module, "lora_A"):
            key.append((id(module), module.__dict__.get("forward"), getattr(module, "merged", False),
                        getattr(module, "disable_adapters", False), tuple(getattr(module, "active_adapters", ()))))
    return tuple(key)


def step_graph(model, need: int, compiled: bool, capture: bool = True, batch: int = 1) -> StepGraph:
    """The model's StepGraph for `batch` rows (chat's, batch 1, and one batched one for evals are kept
    apart), new when none fits `need` tokens or the compile choice changed. A batched one of more rows
    serves fewer (the rest are padding rows): 100 prompts decode as 64 + 36 through one captured step."""
    base = base_of(model)
    slot = _SLOT if batch == 1 else _BATCH_SLOT
    current = base.__dict__.get(slot)
    if current and current.max_len >= need and current.options == (compiled, capture) and \
            (current.batch == batch or (slot == _BATCH_SLOT and current.batch > batch)):
        return current
    _free(base, slot)
    step = CACHE_STEP if batch == 1 else BATCH_CACHE_STEP
    max_len = -(-need // step) * step
    base.__dict__[slot] = StepGraph(base, max_len, compiled=compiled, capture=capture, batch=batch)
    return base.__dict__[slot]


def release(model, chat: bool = True) -> None:
    """Free the model's captured steps, their caches and the merged copies (or repacked nf4 codes)
    they decode on (training needs the memory; weights changed); without `chat`, only the batched step."""
    base = base_of(model)
    if chat:
        base.__dict__.pop(_COPIES, None)
        drop_kernels(model)
    for slot in (_SLOT, _BATCH_SLOT) if chat else (_BATCH_SLOT,):
        _free(base, slot)


def held_copies(model, budget: Callable[[], int]) -> list:
    """[(layer, forward)] over the adapter merged into copies of the weights (decode.merged_forwards,
    within `budget()` bytes), for the adapter state the model is in now (lean_lora entered): made
    once and kept with the model for chat's step and the batched one alike (their captures read them),
    made again when that state changes, freed by `release`. Put them in place with decode.forwards."""
    import torch

    from ipylora.engine.decode import merged_forwards

    base = base_of(model)
    key = state_key(model)  # the lean forwards: rebuilt when an adapter's weights change
    held = base.__dict__.get(_COPIES)
    if held is None or held[0] != key:
        base.__dict__.pop(_COPIES, None)  # the old copies go before new ones are made
        try:
            patches, used = merged_forwards(model, budget())
        except torch.cuda.OutOfMemoryError:
            patches, used = [], 0
        held = base.__dict__[_COPIES] = (key, patches, used)
    return held[1]


def copies_bytes(model) -> int:
    """Bytes of the merged copies `held_copies` keeps for `model` now (0: none)."""
    held = base_of(model).__dict__.get(_COPIES)
    return held[2] if held else 0


def _free(base, slot: str) -> None:
    import torch

    current = base.__dict__.pop(slot, None)
    if current is not None:
        current._graph = current._logits = current.cache = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def decode(model, ids: list[int], max_new_tokens: int, next_token, stops: Collection[int],
           on_token: Callable[[int], None] | None = None, should_stop: Callable[[], bool] = lambda: False,
           compiled: bool = False, capture: bool = True) -> list[int]:
    """New token ids after prompt `ids` (greedy or sampled by `next_token`), up to `max_new_tokens`,
    ending after a token of `stops` (EOS, end of turn) or when `should_stop()` turns true; `on_token` sees each as it comes.
    Call it in inference mode, with the adapter state (and lean_lora) the answer should use."""
    with folded_gqa():
        return _decode(model, ids, max_new_tokens, next_token, stops, on_token, should_stop, compiled, capture)


def _decode(model, ids, max_new_tokens, next_token, stops, on_token, should_stop, compiled, capture) -> list[int]:
    import torch

    graph = step_graph(model, len(ids) + max_new_tokens, compiled, capture)
    graph.ready(state_key(model))
    so_far = torch.tensor([ids], device=graph.device) if next_token.needs_ids else None
    logits = graph.prefill(ids)
    reader = _TokenReader(graph.device)
    new: list[int] = []
    while True:
        token = next_token(so_far, logits)
        reader.queue(token)
        if len(new) + 1 < max_new_tokens:
            # The next step is queued before this token reaches the host, so that the GPU computes
            # while the host streams the token and checks for a stop; after a stop it is not read.
            if so_far is not None:
                so_far = torch.cat([so_far, token.view(1, 1)], dim=1)
            logits = graph.step(token, len(ids) + len(new))
        value = reader.read()  # the one host sync per token: the streamer and the stop check need it
        new.append(value)
        if on_token is not None:
            on_token(value)
        if value in stops or len(new) >= max_new_tokens or should_stop():
            return new


class _TokenReader:
    """A token's value on the host without waiting for the GPU work queued after it: copied into
    pinned memory behind an event (on CUDA), where .item() would wait for the whole stream."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        if self.cuda:
            self.host = torch.empty(1, dtype=torch.long, pin_memory=True)
            self.event = torch.cuda.Event()
        self.token = None

    def queue(self, token) -> None:
        if self.cuda:
            self.host.copy_(token.view(-1)[:1], non_blocking=True)
            self.event.record()
        self.token = token

    def read(self) -> int:
        if not self.cuda:
            return int(self.token)
        self.event.synchronize()
        return int(self.host[0])


def decode_batch(model, prompts: list[list[int]], pad: int, max_new_tokens: int, next_token,
                 stops: Collection[int], compiled: bool = False, capture: bool = True) -> list[list[int]]:
    """New token ids after each of `prompts` (at most BATCH_ROWS), decoded together through one captured
    step of BATCH_ROWS rows (or of len(prompts), if fewer); each row ends after a token of `stops`,
    or at `max_new_tokens`, and has the tokens generate() gives that row in a left-padded batch.
    Call it in inference mode, with the adapter state (and lean_lora) the answers should use."""
    with folded_gqa():
        return _decode_batch(model, prompts, pad, max_new_tokens, next_token, stops, compiled, capture)


def _decode_batch(model, prompts, pad, max_new_tokens, next_token, stops, compiled, capture) -> list[list[int]]:
    import torch

    width = max(len(ids) for ids in prompts)
    graph = step_graph(model, width + max_new_tokens, compiled, capture, batch=min(BATCH_ROWS, len(prompts)))
    graph.ready(state_key(model))
    rows = len(prompts)
    if rows > graph.batch:
        raise ValueError(f"decode_batch takes at most {graph.batch} prompts at a time, not {rows}")
    logits, width = graph.prefill_batch(prompts, pad)
    so_far = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompts] + [[pad] * width] * (graph.batch - rows),
                          device=graph.device) if next_token.needs_ids else None
    stop = torch.tensor(list(stops), device=graph.device)
    done = torch.zeros(graph.batch, dtype=torch.bool, device=graph.device)
    done[rows:] = True
    new = []
    for count in range(1, max_new_tokens + 1):
        token = torch.where(done, pad, next_token(so_far, logits))
        new.append(token)
        done |= torch.isin(token, stop)
        # A look at the host every few steps, not every step, so that the host queues steps ahead.
        if count == max_new_tokens or (count % 8 == 0 and bool(done.all())):
            break
        if so_far is not None:
            so_far = torch.cat([so_far, token.view(-1, 1)], dim=1)
        logits = graph.step(token, width + count - 1)
    answers = []
    for row in torch.stack(new, dim=1)[:rows].tolist():
        cut = next((i + 1 for i, value in enumerate(row) if value in stops), len(row))
        answers.append(row[:cut])
    return answers
