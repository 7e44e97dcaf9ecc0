"""The LoRA layer's forward in training: B's product added into the base layer's output by its GEMM.

PEFT computes `result + lora_B(lora_A(dropout(x))) * scaling`: after B's product, a pass over the
layer's output to scale it and one to add it (its 4-bit layer first clones the base output, a
third), and in the backward pass one more to scale the gradient, plus per-call Python (argument
checks, a loop over the adapters, casts). On an H200 (bench/train_throughput.py --groups profile,
session 15) those passes were 12-18% of the GPU kernel time of a step, and the 1.5B shape's GPU sat idle
for half of each step waiting on the host (~5,700 launches a step).

`sync(model)` gives every PEFT LoRA linear layer (plain or bitsandbytes 4-bit) a forward that,
for one plain active adapter, runs

    y = base(x);  y.addmm_(A(dropout(x)), B^T, alpha=scaling)

one GEMM that reads the output it adds to (beta 1): no pass for the scaling or the add, nothing
cloned, and in the backward pass the scaling lands on the rank-r tensors (h's and B's gradients).
The sum is rounded once, in the GEMM's epilogue, where PEFT rounds the product and then the sum.
Whatever else (merged or disabled adapters, several active ones, DoRA and other variants, LoRA
biases, extra arguments) goes to PEFT's own forward. lora_A and the dropout are called as modules,
so the deferred dropout (dropout.py) composes with it. `ENABLED = False` gives PEFT's forward back
everywhere (the benchmark's before).
"""

from __future__ import annotations

import torch

from ipylora.engine.decode import _plain_adapter

ENABLED = True
_LEAN: dict[type, type] = {}  # PEFT's layer class -> its subclass with the forward below


def _forward(self, x, *args, **kwargs):
    name = _plain_adapter(self) if ENABLED and not args and not kwargs else None
    if name is None:
        return self._peft_forward(x, *args, **kwargs)
    a, b = self.lora_A[name], self.lora_B[name]
    h = a(self.lora_dropout[name](self._cast_input_dtype(x, a.weight.dtype)))
    width = x.shape[-1]
    y = self.base_layer(x.reshape(-1, width))  # 2-D, so that the in-place add is not on a view
    h = h.reshape(-1, h.shape[-1]).to(y.dtype)
    weight = b.weight.to(y.dtype).t()
    scale = self.scaling[name]
    if y._base is None and y.is_contiguous():
        # The base's backward needs its input and weight, not its output: adding into it is safe.
        y = y.addmm_(h, weight, alpha=scale)
    else:
        y = torch.addmm(y, h, weight, alpha=scale)
    return y.view(*x.shape[:-1], y.shape[-1])


def _lean_class(cls: type) -> type:
    if cls not in _LEAN:
        _LEAN[cls] = type(cls.__name__, (cls,), {"forward": _forward, "_peft_forward": cls.forward,
                                                 "__module__": cls.__module__, "_ipylora_lean": True})
    return _LEAN[cls]


def _classes() -> tuple[type, ...]:
    """PEFT's LoRA linear layer classes whose forward `_forward` reproduces for a plain adapter."""
    from peft.tuners.lora.layer import Linear

    classes = [Linear]
    try:
        from peft.tuners.lora.bnb import Linear4bit

        classes.append(Linear4bit)
    except ImportError:  # bitsandbytes not installed
        pass
    return tuple(classes)


def sync(model) -> int:
    """Give `model`'s PEFT LoRA linear layers the lean training forward; returns how many have it."""
    classes = _classes()
    done = 0
    for module in model.modules():
        cls = type(module)
        if getattr(cls, "_ipylora_lean", False):
            done += 1
        elif cls in classes:
            module.__class__ = _lean_class(cls)
            done += 1
    return done


def restore(model) -> None:
    """PEFT's own classes back on every layer `sync` changed."""
    for module in model.modules():
        if getattr(type(module), "_ipylora_lean", False):
            module.__class__ = type(module).__mro__[1]
