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

Not for 4-bit bases (bitsandbytes' kernels are opaque to the compiler) or Liger's kernels (their
Triton functions do not trace; inductor generates the same fusions). `restore(model)` gives the
layers their eager forward back, as the engine does after training: chat and generation then run
the model they always ran.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

FLAG = "_ipylora_compiled"
# Off: on the 1.5B shape (H100, bench/RESULTS.md session 16) two runs measured -5% and +6% against
# the eager layers, and the first steps compiled for 17-35 s. Launches fell only from ~5,700 to
# ~4,800 a step, because the GEMMs (about 60 a layer) remain. `%lora_train --compile` asks for it.
DEFAULT = False


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


def compile_layers(model) -> int:
    """Compile each decoder layer's call (dynamic shapes); returns how many layers are compiled."""
    layers = decoder_layers(model)
    for layer in layers:
        if not getattr(layer, FLAG, False):
            layer.compile(dynamic=True)
            setattr(layer, FLAG, True)
    return len(layers)


def compiled(model) -> bool:
    return any(getattr(layer, FLAG, False) for layer in decoder_layers(model))


def restore(model) -> None:
    """The layers' eager forward again (the compiled code stays cached for the next compile_layers)."""
    for layer in decoder_layers(model):
        if getattr(layer, FLAG, False):
            layer._compiled_call_impl = None
            delattr(layer, FLAG)


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
