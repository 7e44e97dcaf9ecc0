"""Decoder layers compiled for training: torch.compile per layer, shapes dynamic, one graph for all.

On an H200 the 1.5B shape's GPU sat idle half of each training step (bench/train_throughput.py
--groups profile, session 15): ~5,700 kernel launches a step, each with ~86 us of host time
(Python, autograd, PEFT's and transformers' per-module code) against 248 ms of kernels in a
491 ms step. Compiling a decoder layer turns its forward into one call of generated code and its
backward into one autograd node, and inductor fuses the elementwise work between the GEMMs
(norms, rotary, SwiGLU, residual adds, LoRA's dropout) into a few Triton kernels.

What keeps the compile short: every decoder layer runs the same code, so one
compilation serves them all (torch.compile guards on the modules' structure, not on which
parameters they hold). Two graphs come out in practice, the first layer's (its input, the frozen
embedding's output, needs no gradient) and the others'. `dynamic=True` from the start: packed
batches change their token count every step, and a compilation that specialised on the first
shape would compile again at the second. Within a kernel the compiled code is kept, so later runs
on the resident model (sweep trials, a second `%lora_train`) start without compiling.

On a GPU the compiled layers can also be replayed as CUDA graphs (`GRAPHS`, off: see there; torch.compile's
"reduce-overhead" mode, inductor's CUDA graph trees, which record the forward and backward of each
layer): compiling alone left ~4,800 launches a step, mostly the GEMMs (session 16), and a graph
replay launches a layer's kernels at once. A graph is recorded per shape, so packed rows are
padded (`pad_to_buckets`) to a multiple of about a sixteenth of a step's tokens, with a fixed
number of sequence boundaries and one longest length for the attention kernel: a run records about
ten graphs. The padding is one extra sequence whose outputs are cut off before the LM head, so the
loss, the gradients and the tokens counted are the unpadded ones.

Not for 4-bit bases (bitsandbytes' kernels are opaque to the compiler) or Liger's kernels (their
Triton functions do not trace; inductor generates the same fusions). `restore(model)` gives the
layers their eager forward back, as the engine does after training: chat and generation then run
the model they always ran.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

FLAG = "_ipylora_compiled"  # on a compiled layer: PLAIN or GRAPHED
PLAIN, GRAPHED = "compiled", "graphed"
# Off: on the 1.5B shape (H100, bench/RESULTS.md session 16) two runs measured -5% and +6% against
# the eager layers, and the first steps compiled for 17-35 s. Launches fell only from ~5,700 to
# ~4,800 a step, because the GEMMs (about 60 a layer) remain. `%lora_train --compile` asks for it.
DEFAULT = False
# Compiled layers replayed as CUDA graphs on a GPU, packed rows padded to a few token counts
# (pad_to_buckets): the host's ~5,000 launches a step would become a few graph replays a layer.
# Off: one H100 run of the 1.5B shape (bench/RESULTS.md, session 17) learned what eager learns, but
# its step was only ~10% shorter (0.28 s against 0.31), after 96 s of compiling and 6-7 s for each
# new bucket. `python3 bench/train_throughput.py --groups graphs` forces it on (`layer_graphs`).
GRAPHS = False


def decoder_layers(model) -> list:
    """The model's repeated blocks: the largest ModuleList of one class with num_hidden_layers entries."""
    from ipylora.engine.models import base_of

    base = base_of(model)
    count = getattr(getattr(base, "config", None), "num_hidden_layers", None)
    best: list = []
    for module in base.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > len(best) \
                and (count is None or len(module) == count) and len({type(m) for m in module}) == 1:
            best = list(module)
    return best


def compile_layers(model, graphs: bool = False) -> int:
    """Compile each decoder layer's call (dynamic shapes); returns how many layers are compiled.

    `graphs`: each compiled layer's forward and backward also replayed as CUDA graphs (torch.compile's
    "reduce-overhead" mode, inductor's CUDA graph trees), one recording per token count; with
    `pad_to_buckets` the token counts a run sees are few."""
    mode = GRAPHED if graphs else PLAIN
    layers = decoder_layers(model)
    for layer in layers:
        if getattr(layer, FLAG, None) != mode:
            layer._compiled_call_impl = None
            layer.compile(dynamic=True, **({"mode": "reduce-overhead"} if graphs else {}))
            setattr(layer, FLAG, mode)
    return len(layers)


def graphed(model) -> bool:
    return any(getattr(layer, FLAG, None) == GRAPHED for layer in decoder_layers(model))


def compiled(model) -> bool:
    return any(getattr(layer, FLAG, False) for layer in decoder_layers(model))


def restore(model) -> None:
    """The layers' eager forward again (the compiled code stays cached for the next compile_layers),
    and no padding to buckets."""
    for layer in decoder_layers(model):
        if getattr(layer, FLAG, False):
            layer._compiled_call_impl = None
            delattr(layer, FLAG)
    stack = _layer_stack(model)
    for handle in getattr(stack, BUCKETS, None) or ():
        handle.remove()
    if stack is not None and hasattr(stack, BUCKETS):
        delattr(stack, BUCKETS)


@contextmanager
def eager(model):
    """The layers' eager forward inside the block (samples generated mid-run), compiled again after."""
    layers = [layer for layer in decoder_layers(model) if getattr(layer, FLAG, False)]
    kept = [layer._compiled_call_impl for layer in layers]
    for layer in layers:
        layer._compiled_call_impl = None
    try:
        yield
    finally:
        for layer, impl in zip(layers, kept):
            layer._compiled_call_impl = impl


BUCKETS = "_ipylora_buckets"  # on the layers' parent module: pad_to_buckets' hook handles


def _layer_stack(model):
    """The module that runs the decoder layers (Qwen2Model for Qwen2ForCausalLM): the layers' parent."""
    layers = decoder_layers(model)
    if not layers:
        return None
    from ipylora.engine.models import base_of

    for module in base_of(model).modules():
        if any(child is layers[0] for child in getattr(module, "layers", ()) or ()):
            return module
    return None


def pad_to_buckets(model, bucket: int, sequences: int, longest: int) -> bool:
    """Packed training rows padded so that CUDA-graphed layers see few shapes: the token count up to a
    multiple of `bucket` (the padding more sequences of at most `bucket` tokens, sliced off the layers' output before the LM
    head, so no loss, gradient or token count sees it), the boundaries (`cu_seq_lens_*`) to
    `sequences` + 1 entries (empty sequences at the end) and the longest sequence (`max_length_*`,
    the attention kernel's grid) to max(`longest`, `bucket`), numbers a graph is recorded for.
    Only training forwards with TRL's padding-free boundaries are padded. False if the model's
    layer stack was not found."""
    from ipylora.engine.models import base_of

    stack = _layer_stack(model)
    if stack is None:
        return False
    for handle in getattr(stack, BUCKETS, None) or ():
        handle.remove()
    bucket, longest = int(bucket), max(int(longest), int(bucket))
    # A token count equal to one of the model's sizes (head_dim, say) gets specialised by the compiler
    # (a constant, not a symbol) and the next count compiles again (CPU, session 17): such counts
    # take one more bucket.
    sizes = {value for value in base_of(model).config.to_dict().values() if isinstance(value, int)} \
        if hasattr(base_of(model), "config") else set()
    unpadded: list[int] = []

    def pad(module, args, kwargs):
        unpadded.clear()
        ids, positions, cu = kwargs.get("input_ids"), kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q")
        if not (module.training and torch.is_grad_enabled()) or args or ids is None or positions is None \
                or cu is None or ids.dim() != 2 or ids.shape[0] != 1 or kwargs.get("cache_position") is not None \
                or kwargs.get("inputs_embeds") is not None:
            return None
        torch.compiler.cudagraph_mark_step_begin()  # a new step: the previous step's graph outputs are done with
        tokens = ids.shape[1]
        width = -(-tokens // bucket) * bucket
        while width in sizes:
            width += bucket
        # The padding as sequences of at most `bucket` tokens, so that the longest stays `longest`.
        pieces = [min(bucket, width - start) for start in range(tokens, width, bucket)]
        if pieces:
            kwargs["input_ids"] = torch.cat([ids, ids.new_zeros((1, width - tokens))], dim=1)
            kwargs["position_ids"] = torch.cat([positions, *(torch.arange(n, device=positions.device)[None]
                                                             for n in pieces)], dim=1)
        ends = [min(start + bucket, width) for start in range(tokens, width, bucket)]
        count = cu.numel() - 1 + len(pieces)
        ends += [width] * (max(sequences, count) - count)
        kwargs["cu_seq_lens_q"] = kwargs["cu_seq_lens_k"] = \
            torch.cat([cu, torch.tensor(ends, dtype=cu.dtype).to(cu.device, non_blocking=True)]) if ends else cu
        most = max(longest, int(kwargs.get("max_length_q") or 0))
        kwargs["max_length_q"] = kwargs["max_length_k"] = most
        unpadded.append(tokens)
        return args, kwargs

    def unpad(module, args, kwargs, output):
        if not unpadded:
            return None
        tokens = unpadded.pop()
        output.last_hidden_state = output.last_hidden_state[:, :tokens]
        return output

    setattr(stack, BUCKETS, (stack.register_forward_pre_hook(pad, with_kwargs=True),
                             stack.register_forward_hook(unpad, with_kwargs=True)))
    return True


def bucket_for(step_tokens: int) -> int:
    """Token-count bucket for a run of `step_tokens` a micro-step: about a sixteenth of it (in steps
    of 128), so that padding adds ~3% on average and a run records ~10 graphs."""
    return max(128, -(-int(step_tokens) // 16 // 128) * 128)
