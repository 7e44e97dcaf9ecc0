"""The decode step's decoder layers compiled one layer at a time (`%lora_chat --compile`, batched decoding).

Compiling the whole decode step (torch.compile of the model's forward, fullgraph) traces and lowers
every layer of the model: 1-2.5 minutes for a 7B model before the first answer. The layers of a
model are the same code on weights of the same shapes, so here one compiled function serves them
all: each decoder layer's forward, for the one-token step only, runs `_layer_forward` compiled.
What would stop dynamo from reusing one compilation is what differs between layers:

- the cache: a decoder layer is handed the whole cache and indexes its layers by `layer_idx` (an
  int, which dynamo would compile as a constant: one compilation a layer). Each layer is handed its
  own cache layer instead (`_LayerCache`), which ignores the index, and ints on modules are left
  symbolic (`allow_unspec_int_on_nn_module`);
- the length counter, which one cache layer keeps (graphdecode.slot_layer's `counts`): the layer's
  cache writes its slot without it (`_LayerCache`), and the counter counts outside the compiled
  function.

Two things of the eager step are kept apart from inductor:

- one token's linear layers run gemv.py's Triton kernel (faster than cuBLAS for one row) as the
  custom operator `ipylora::gemv` (`gemv.register_op`), which dynamo does not trace into;
- Liger's kernels, where a training run or chat put them on the resident model, are set aside:
  their Triton calls are opaque to inductor, which fuses the same norms, rotary and SwiGLU itself.
  Inside the compiled step the modules' own forwards and the family's own rotary function stand
  in (`_unfused`).

The step is then captured as a CUDA graph as before (graphdecode.StepGraph), so dynamo's guards and
the layers' Python run only while capturing. Another cache size or batch compiles once more (dynamo
then marks those sizes dynamic), as does another adapter rank; inductor keeps what it compiled on
disk across kernels (its FX graph cache), so a later kernel finds it there.
"""

from __future__ import annotations

import sys
import types
from contextlib import contextmanager


class _LayerCache:
    """One static cache layer (graphdecode.slot_layer's), handed to a decoder layer as its whole cache:
    the step's key and value written at its slot, without the length counter (counted outside)."""

    def __init__(self, layer):
        self.layer = layer

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        return self.layer.write(key_states, value_states)


def _layer_forward(layer, hidden_states, kwargs):
    return type(layer).forward(layer, hidden_states, **kwargs)


@contextmanager
def compiled_layers(model, cache):
    """While inside, each decoder layer of `model` runs its one-token step compiled on its layer of
    `cache` (a static cache of one layer a decoder layer); longer inputs (a prefill) run eagerly."""
    import torch

    from ipylora.engine.compiled_layers import decoder_layers

    layers = decoder_layers(model)
    if not layers or len(layers) != len(cache.layers):
        yield False
        return
    # One graph a layer or none: a layer that breaks it (the expert loops of Qwen3-MoE and Mixtral as
    # transformers runs them on CPU: 50 breaks and 51 graphs for 8 tokens) fails here, and the step
    # is captured uncompiled with a warning (graphdecode.StepGraph.ready). dynamo keeps its
    # compilations with the function's code.
    compiled = torch.compile(_layer_forward, fullgraph=True)
    patched = []
    for index, layer in enumerate(layers):
        if "forward" in layer.__dict__:  # someone else's forward on the instance: left as it is, eager
            continue
        attention = next((getattr(layer, name) for name in ("self_attn", "attention", "attn") if hasattr(layer, name)), None)
        own = cache.layers[getattr(attention, "layer_idx", index)]

        def forward(self, hidden_states, *args, _own=own, _shim=_LayerCache(own), **kwargs):
            # Eager: a prefill, layers called with positional arguments (GPT-2), a cache layer that
            # writes by its own counter or is not yet allocated (the first step after it is made).
            if args or hidden_states.shape[1] != 1 or getattr(_own, "slot", None) is None or not _own.is_initialized:
                return type(self).forward(self, hidden_states, *args, **kwargs)
            kwargs["cache" if "cache" in kwargs else "past_key_values"] = _shim
            output = compiled(self, hidden_states, kwargs)
            if _own.counts:  # outside the compiled function: every layer is the same code to dynamo
                _own.cumulative_length.add_(1)
            return output

        layer.forward = types.MethodType(forward, layer)
        patched.append(layer)
    try:
        # Another adapter (another rank: CPU, 1 -> 2 compilations), batch or cache size compiles again:
        # past its default of 8 a function, dynamo would run the layers eagerly without a word.
        with _unfused(layers), torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True, recompile_limit=64):
            yield True
    finally:
        for layer in patched:
            layer.__dict__.pop("forward", None)


@contextmanager
def _unfused(layers):
    """Liger's instance forwards off the layers' modules, and the family's own rotary function in place
    of the CUDA dispatch `speed.instance_only` left in its modeling module, for the block."""
    popped = []
    for layer in layers:
        for module in layer.modules():
            bound = module.__dict__.get("forward")
            if bound is not None and getattr(getattr(bound, "__func__", bound), "__module__", "").startswith("liger_kernel"):
                popped.append((module, module.__dict__.pop("forward")))
    family = sys.modules.get(type(layers[0]).__module__) if layers else None
    swapped = {name: value for name, value in vars(family).items()
               if callable(value) and hasattr(value, "cuda") and hasattr(value, "elsewhere")} if family else {}
    for name, value in swapped.items():
        setattr(family, name, value.elsewhere)
    try:
        yield
    finally:
        for name, value in swapped.items():
            setattr(family, name, value)
        for module, bound in popped:
            module.__dict__["forward"] = bound
