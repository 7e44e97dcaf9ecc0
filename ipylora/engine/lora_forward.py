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

Siblings that read one input (q/k/v, gate/up of one block: `decode.STACKED`) share their A
product: the first one called computes `dropout(x) @ [A_q; A_k; A_v]^T` once, and each takes its
columns (`_Siblings`). One dropout pass over x instead of three, one kept copy of it instead of
three (and one mask), one GEMM reading x in each direction instead of three, and the adds of their
input gradients fewer by as many. The siblings then share one dropout mask, as PEFT's single LoRA
layer on a fused q/k/v projection (Phi-3's qkv_proj, GPT-NeoX's query_key_value) and loralib's
MergedLinear do: each adapter still sees its input dropped with probability p. `STACK = False`
gives each layer its own product and mask (PEFT's draws on unfused layers).
"""

from __future__ import annotations

import torch

from ipylora.engine import lora_fused
from ipylora.engine.decode import STACKED, _plain_adapter
from ipylora.engine.dropout import DropoutLinear, dropped_linear, fused_available, uses_fused

ENABLED = True
STACK = True
_LEAN: dict[type, type] = {}  # PEFT's layer class -> its subclass with the forward below
_SIBLINGS = "_ipylora_siblings"  # attribute of each member layer: (its _Siblings, its index there)
_ALONE = "_ipylora_alone"  # (its own _Siblings of one, 0): where STACK is off


class _Siblings:
    """LoRA layers of one block that read one input: the first one called with an input computes
    the A products of all of them (one stacked GEMM, one dropout mask), and each takes its columns.
    Nothing is held once the last of them took its part. Where the members turn out not to be
    called with one input (twice in a row), each computes its own from then on."""

    def __init__(self, layers):
        self.layers = layers
        self.misses = 0
        self.broken = False
        self._forget()

    def _forget(self):
        self.x = self.parts = self.name = None
        self.version = -1
        self.taken: set[int] = set()

    def take(self, index: int, x, name: str):
        """Member `index`'s share of the computation for `x` under adapter `name` (the member's one
        plain adapter): ("out", its 2-D output) where lora_fused computed all members' outputs,
        ("h", its A product of the dropped x) where the A products were stacked, or None where it
        must compute its own."""
        if self.broken or (len(self.layers) == 1 and not lora_fused.ENABLED) or torch.compiler.is_compiling():
            return None  # (a layer alone has nothing to share without lora_fused)
        if self.parts is None or self.x is not x or self.version != x._version or index in self.taken:
            if self.taken:  # a sibling took a part of another input (or an interrupted forward)
                self.misses += 1
                self.broken = self.misses >= 2
                self._forget()
                if self.broken:
                    return None
            parts = self._compute(x, name)
            if parts is None:
                return None
            self.x, self.version, self.parts, self.name = x, x._version, parts, name
        elif name != self.name:  # this member's adapter is not the one its siblings computed for
            return None
        self.taken.add(index)
        part = self.parts[index]
        if len(self.taken) == len(self.layers):
            self.misses = 0
            self._forget()
        return part

    def _compute(self, x, name: str):
        """Every member's share for `x`, computed for adapter `name`: the caller checked that it is its
        own plain adapter, each other member checks the same when it takes its share (`take`)."""
        layers = self.layers
        try:
            a = [layer.lora_A[name] for layer in layers]
            drops = [layer.lora_dropout[name] for layer in layers]
        except KeyError:
            return None
        first, drop = a[0], drops[0]
        kind = _dropout_kind(first, drop)
        if any(_dropout_kind(m, d) != kind for m, d in zip(a[1:], drops[1:])):
            return None
        deferred = isinstance(first, DropoutLinear)  # dropout.py's deferred dropout: the mask drawn again in backward
        p = (first.dropout_p if first.training else 0.0) if deferred else \
            (float(drop.p) if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0)
        weight = torch.cat([m.weight for m in a]) if len(a) > 1 else first.weight  # (sum of the ranks, in)
        bases = [layer.base_layer for layer in layers]
        kernel = deferred and p > 0.0 and uses_fused(x.shape[-1]) and fused_available(x)
        casts = first.weight.dtype != x.dtype and getattr(layers[0], "cast_input_dtype_enabled", True)
        if not kernel and not casts and lora_fused.fusable(bases, x):
            outs = lora_fused.lora_linears(x, bases, weight, [layer.lora_B[name].weight for layer in layers],
                                           [layer.scaling[name] for layer in layers], p, deferred)
            return [("out", y) for y in outs]
        if len(layers) == 1:
            return None
        x = drop(layers[0]._cast_input_dtype(x, first.weight.dtype))
        h = dropped_linear(x, weight, p) if deferred else torch.nn.functional.linear(x, weight)
        return [("h", part) for part in h.split([m.weight.shape[0] for m in a], dim=-1)]


def _dropout_kind(a, dropout) -> tuple:
    """What must be equal for siblings' A products to be one GEMM under one dropout mask."""
    return (type(a), a.weight.dtype, a.training, getattr(a, "dropout_p", 0.0), type(dropout),
            getattr(dropout, "p", 0.0), dropout.training)


def _forward(self, x, *args, **kwargs):
    name = _plain_adapter(self) if ENABLED and not args and not kwargs else None
    if name is None:
        return self._peft_forward(x, *args, **kwargs)
    siblings = self.__dict__.get(_SIBLINGS if STACK else _ALONE)
    share = siblings[0].take(siblings[1], x, name) if siblings is not None else None
    if share is not None and share[0] == "out":  # lora_fused: the whole layer's output
        return share[1].view(*x.shape[:-1], share[1].shape[-1])
    a, b = self.lora_A[name], self.lora_B[name]
    if share is not None:
        h = share[1]
    else:
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
    _link_siblings(model)
    return done


def _link_siblings(model) -> None:
    """One `_Siblings` for each block's lean layers that read one input, by their names (layers of the
    same width may read different inputs: o_proj reads the attention's output)."""
    groups: dict = {}
    for name, module in model.named_modules():
        if getattr(type(module), "_ipylora_lean", False):
            module.__dict__.pop(_SIBLINGS, None)
            module.__dict__[_ALONE] = (_Siblings((module,)), 0)
            parent, _, attribute = name.rpartition(".")
            kind = next((i for i, members in enumerate(STACKED) if attribute in members), None)
            key = (parent, kind, module.in_features) if kind is not None else id(module)
            groups.setdefault(key, []).append(module)
    for members in groups.values():  # a layer without siblings is a group of one (lora_fused still applies)
        group = _Siblings(tuple(members)) if len(members) > 1 else members[0].__dict__[_ALONE][0]
        for index, module in enumerate(members):
            module.__dict__[_SIBLINGS] = (group, index)


def restore(model) -> None:
    """PEFT's own classes back on every layer `sync` changed."""
    for module in model.modules():
        if getattr(type(module), "_ipylora_lean", False):
            module.__class__ = type(module).__mro__[1]
            module.__dict__.pop(_SIBLINGS, None)
            module.__dict__.pop(_ALONE, None)
