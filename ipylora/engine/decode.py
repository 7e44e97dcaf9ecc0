"""LoRA at generation time without PEFT's per-call bookkeeping.

PEFT's LoRA layer does a lot for every call: argument checks, a loop over active adapters, a
dropout module, a cast of the input to the adapter's fp32 dtype, two Linear modules, a scaling
multiply, an add and a cast back. In training that is noise; while decoding one token at a time
it is most of the time: on an H200, a 7B model with r16 adapters on every linear layer decoded at
0.40x the speed of the merged model, CPU-bound (bench/chat_latency.py, bench/RESULTS.md).

`lean_lora(model)` swaps, for the duration of a generation, the forward of every LoRA layer that
has exactly one plain active adapter for

    y = base(x);  y += scale * (x @ A^T) @ B^T      (one mm and one in-place addmm)

with A and B held in the model's compute dtype. Merged layers, disabled adapters, DoRA and other
variants, LoRA biases and several active adapters keep PEFT's own forward. Dropout is skipped:
generation runs in eval mode, where it is the identity.

Under torch.compile (static-cache decoding with CUDA graphs) one token's LoRA is written as two
reductions instead of two matrix products, so that inductor fuses the second one, and the add,
into the kernel that consumes the layer's output; a 1 x 4096 by 4096 x 16 product is otherwise
its own under-occupied GEMM launch. The forward functions and the cast weights are cached per
layer and reused while the adapter's weights are unchanged, so a compiled graph stays valid
across generations (a new function object would make torch.compile recompile).

While graphdecode captures a decode step as a CUDA graph (`capturing()`), only GPU time counts, and
there one token's LoRA is cheaper as small compiled kernels than as cuBLAS calls (H200, in a graph:
mm + addmm 8.6-9.8 us a layer, the compiled pair 3.3-5.2 us); and layers that read the same input
(q/k/v, gate/up: siblings with the same parent and input width) share one A product, which costs
the same 5.5 us for 48 rows as for 16.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import types
import weakref

from ipylora.engine import gemv

# Attribute of each LoRA layer holding (key, forward); the key changes with the adapter, its
# weights (their in-place version counter) or the dtype.
_CACHED = "_ipylora_lean"
# Attribute of each LoRA layer holding (group, rows, members' forwards): its share of a stacked A
# product, valid while the members' forwards are the ones it was built from.
_GROUP = "_ipylora_group"
# Attribute of a linear layer holding (key, gemv.Spec or None) for the captured step's kernel.
_GEMV = "_ipylora_gemv"
# Layers that read one input in every family that has them, by their attribute names: their merged
# copies are stacked (merged_forwards).
STACKED = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})
_capture = threading.local()
# The same flag where a torch.compile trace of the captured step reads it (decode_layers.py): dynamo
# cannot read the thread-local, and guards on this attribute (a change compiles again).
_traced = types.SimpleNamespace(kernels=False)
_groups: weakref.WeakSet = weakref.WeakSet()


@contextlib.contextmanager
def capturing(kernels: bool = True):
    """A decode step is being captured: with `kernels`, single-token LoRA runs as the small compiled
    kernels meant for CUDA graphs (without, as the usual mm + addmm)."""
    _capture.kernels = _traced.kernels = kernels
    try:
        yield
    finally:
        _capture.kernels = _traced.kernels = False
        for group in list(_groups):
            group.forget()  # the captured activations belong to the graph


def _one_token_kernels(x) -> bool:
    """Whether one token `x` runs the captured step's kernels: inside `capturing(kernels=True)`, in
    eager code or in a torch.compile trace of the step."""
    import torch

    if x.numel() != x.shape[-1]:
        return False
    return _traced.kernels if torch.compiler.is_compiling() else getattr(_capture, "kernels", False)


def _project(x, a):
    return (x.reshape(1, -1).to(a.dtype) * a).sum(-1)


def _expand(y, t, b):
    return y + (b * t).sum(-1).to(y.dtype)


@functools.cache
def _compiled_kernels():
    import torch

    return (torch.compile(_project, dynamic=False, fullgraph=True),
            torch.compile(_expand, dynamic=False, fullgraph=True))


def _capture_kernels():
    """(project, expand): x -> A x for a group's stacked A, and y + (scale B) t, each compiled once per
    shape; inside a torch.compile trace of the step (decode_layers.py), the plain functions it traces."""
    import torch

    return (_project, _expand) if torch.compiler.is_compiling() else _compiled_kernels()


class _Group:
    """Sibling layers' A matrices stacked, and the product with the last input they were given. Where
    the siblings are one input's 4-bit layers (q/k/v, gate/up: `stackable`) their bases are stacked
    too (gemv.nf4_stack), and one kernel computes all their outputs, each with its adapter's term."""

    def __init__(self, stacked, forwards, stackable: bool):
        self.a = stacked
        self.forwards = forwards
        self.stackable = stackable
        self.stack = None  # (spec, spans, stacked B, t_index), False where not stacked; None: not tried yet
        self.last = self.out = None
        _groups.add(self)

    def forget(self):
        self.last = self.out = None

    def project(self, x):
        if self.last is None or self.last[0] is not x:  # siblings are called with the same tensor
            self.last = (x, _capture_kernels()[0](x, self.a))
        return self.last[1]

    def stacks(self, dtype) -> bool:
        """Make the stacked kernel's view of the bases, once (eagerly: kernel_linears, before a capture);
        whether there is one."""
        if self.stack is None:
            self.stack = self._stack(dtype) or False
        return self.stack is not False

    def stacked(self, x, index: int):
        """Member `index`'s rows of the stacked kernel's output for `x` (one token)."""
        spec, spans, b, t_index = self.stack
        if self.out is None or self.out[0] is not x:
            self.out = (x, gemv.gemv(x, spec, self.project(x), b, t_index=t_index))
        return self.out[1][..., spans[index]]

    def _stack(self, dtype):
        import torch

        forwards = self.forwards
        if not self.stackable or len({forward.lora_a.shape[0] for forward in forwards}) != 1:
            return None
        found = gemv.nf4_stack([forward.base for forward in forwards], dtype)
        if found is None:
            return None
        spec, spans = found
        b, t_index = gemv.stack_terms(spec, spans, [forward.scaled_b for forward in forwards])
        if b.is_cuda:  # held by the group: a captured graph reads them in place
            torch._dynamo.mark_static_address(b)
            torch._dynamo.mark_static_address(t_index)
        return spec, spans, b, t_index


def _plain_adapter(module) -> str | None:
    """The one plain LoRA adapter this layer applies, or None when PEFT's forward must run."""
    import torch

    if getattr(module, "merged", False) or getattr(module, "disable_adapters", True):
        return None
    if not hasattr(module, "base_layer") or not hasattr(module, "lora_A"):
        return None
    active = [name for name in module.active_adapters if name in module.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(module, "lora_variant", {}) or getattr(module, "lora_bias", {}).get(name, False):
        return None
    if not isinstance(module.lora_A[name], torch.nn.Linear) or not isinstance(module.lora_B[name], torch.nn.Linear):
        return None  # embedding / conv LoRA layers
    if type(module).__name__ == "ParamWrapper":
        # LoRA on a bare parameter (PEFT's all-linear adapts MoE experts and routers this way): the
        # base is not a linear map of x (a router returns a tuple, experts take routing arguments).
        return None
    return name


def _lean_forward(module, name: str, dtype):
    import torch

    base = module.base_layer
    scale = float(module.scaling[name])
    with torch.no_grad():
        a = module.lora_A[name].weight.detach().to(dtype).contiguous()  # (r, in)
        b = module.lora_B[name].weight.detach().to(dtype).contiguous()  # (out, r)
    if a.is_cuda:
        # The copies live as long as the cache entry: CUDA graphs may read them in place.
        torch._dynamo.mark_static_address(a)
        torch._dynamo.mark_static_address(b)
    a_t, b_t = a.t(), b.t()
    scaled_b = (b * scale).contiguous()
    kernel = []  # the base's gemv.Spec (None: stacked with its siblings', or none), made by prepare()

    def prepare():
        """The kernels' views of the base, made once, eagerly: by kernel_linears before a capture (a
        torch.compile trace of the step finds them made), else at the first captured call."""
        if not kernel:
            group = module.__dict__[_GROUP][0]
            kernel.append(None if group.stacks(dtype) else gemv.spec(base, dtype))

    def forward(x, *args, **kwargs):
        if _one_token_kernels(x):
            group, rows, _, index = module.__dict__[_GROUP]
            prepare()
            if x.dtype == dtype and group.stack:  # the siblings' bases and adapters in one kernel
                return group.stacked(x, index)
            if x.dtype == dtype and kernel[0] is not None:  # base and adapter in one kernel
                return gemv.gemv(x, kernel[0], group.project(x)[rows], scaled_b)
            return _capture_kernels()[1](base(x, *args, **kwargs), group.project(x)[rows], scaled_b)
        y = base(x, *args, **kwargs)
        if torch.compiler.is_compiling() and x.numel() == x.shape[-1]:
            t = (x.reshape(1, -1).to(dtype) * a).sum(-1)  # (r,)
            return y + (scale * (b * t).sum(-1)).to(y.dtype)  # (out,), broadcast over y's leading 1s
        if x.dtype == dtype and y.dtype == dtype and y.is_contiguous():
            y.view(-1, y.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]) @ a_t, b_t, alpha=scale)
            return y
        # Another input or output dtype (an 8-bit base returns fp16, say): the same sum, cast back.
        delta = (x.reshape(-1, x.shape[-1]).to(dtype) @ a_t) @ b_t
        return y + (scale * delta).to(y.dtype).view(y.shape)

    forward.lora_a, forward.scaled_b, forward.base = a, scaled_b, base
    forward.kernel, forward.prepare = kernel, prepare  # drop_kernels empties it
    return forward


def _key(module, name: str, dtype) -> tuple:
    weights = (module.lora_A[name].weight, module.lora_B[name].weight)
    return (name, dtype, float(module.scaling[name])) + tuple((w.data_ptr(), w._version) for w in weights)


def _compute_dtype(model):
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and embeddings.weight.is_floating_point():
        return embeddings.weight.dtype
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


@contextlib.contextmanager
def lean_lora(model):
    """Within the block (generation, no gradients), plain LoRA layers run the two-kernel forward."""
    patched = []
    try:
        dtype = _compute_dtype(model)
        for module in model.modules():
            name = _plain_adapter(module)
            if name is None:
                continue
            key = _key(module, name, dtype)
            cached = module.__dict__.get(_CACHED)
            if cached is None or cached[0] != key:
                cached = module.__dict__[_CACHED] = (key, _lean_forward(module, name, dtype))
            module.forward = cached[1]
            patched.append(module)
        _group_siblings(model, patched)
        yield len(patched)
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)


@contextlib.contextmanager
def merged_lora(model, budget: int):
    """Within the block, plain LoRA layers over a full-precision linear layer run one matrix product
    with W + scale B A, merged into a copy made for the block, while the copies fit in `budget` bytes
    (largest layers first); the others keep the forward they have (lean_lora's, entered first).

    For batched decoding (evals, --compare): a 64-row step of the 7B shape with an r16 adapter on
    every linear layer spent 2 ms of its 10.6 on the adapter's 14 small products a layer (H200,
    bench/batch_decode.py --profile), where the merged weight reads the same bytes as the base's.
    The base weights are not touched (merging into them and back would round them); the copies go
    when the block ends, so a step captured inside it must be released with it. Yields the bytes merged."""
    patches, used = merged_forwards(model, budget)
    with forwards(patches):
        yield used


def merged_forwards(model, budget: int) -> tuple[list, int]:
    """[(layer, forward over its merged copy W + scale B A)] for merged_lora's layers (largest first,
    while the copies fit in `budget` bytes), and the bytes they take. Keep the list to keep the copies;
    `forwards(list)` puts them in place.

    A bitsandbytes 4-bit base is dequantized into its copy (the compute dtype's W, as its own forward
    computes with it): the copy is 4x the 4-bit weight, and one token reads it through gemv's kernel
    faster than bitsandbytes' kernel reads the nf4 codes (7B shape, H200, session 12: 204 against 196
    tokens/s for the base models with Liger)."""
    import torch

    dtype = _compute_dtype(model)
    width = torch.empty((), dtype=dtype).element_size()
    layers = []
    for module in model.modules():
        name = _plain_adapter(module)
        base = getattr(module, "base_layer", None)
        if name is None or getattr(module, "fan_in_fan_out", False) or _dense(base, dtype) is None:
            continue  # 8-bit bases, Conv1D, other dtypes
        layers.append((base.out_features * base.in_features * width, module, name))
    layers.sort(key=lambda item: -item[0])
    chosen, used = [], 0
    for size, module, name in layers:
        if used + size <= budget:
            chosen.append((module, name))
            used += size
    # q/k/v and gate/up of one block, merged together, get one stacked copy, each its rows of it:
    # one token runs one kernel for all of them (_Stack). By name: siblings of the same input width
    # may read different inputs (o_proj reads the attention's output), which would read the stack twice.
    names = {id(module): name for name, module in model.named_modules()}
    stacks: dict = {}
    for module, name in chosen:
        parent, _, attribute = names[id(module)].rpartition(".")
        kind = next((i for i, group in enumerate(STACKED) if attribute in group), None)
        key = (parent, kind, module.base_layer.in_features) if kind is not None else id(module)
        stacks.setdefault(key, []).append((module, name))
    patches = []
    with torch.no_grad():
        for members in stacks.values():
            bases = [module.base_layer for module, _ in members]
            # The members' copies are written into their rows of one tensor (no copy made twice).
            weight = torch.empty((sum(base.out_features for base in bases), bases[0].in_features), dtype=dtype,
                                 device=bases[0].weight.device)
            bias = None if all(base.bias is None for base in bases) else weight.new_zeros(weight.shape[0])
            spans, start = [], 0
            for (module, name), base in zip(members, bases):
                rows = slice(start, start + base.out_features)
                a = module.lora_A[name].weight.detach().to(dtype)
                b = module.lora_B[name].weight.detach().to(dtype)
                # One rounding, at the end: addmm accumulates W + scale B A in fp32.
                torch.addmm(_dense(base, dtype)(), b, a, alpha=float(module.scaling[name]), out=weight[rows])
                if base.bias is not None:
                    bias[rows] = base.bias.detach().to(dtype)
                spans.append(rows)
                start = rows.stop
            if len(members) == 1:
                patches.append((members[0][0], _copy_forward(weight, bias)))
                continue
            stack = _Stack(weight, bias)
            patches.extend((module, stack.forward(rows)) for (module, _), rows in zip(members, spans))
    return patches, used


def _dense(base, dtype):
    """A function giving `base`'s weight as a dense (out, in) `dtype` matrix (a plain linear layer's own,
    or a bitsandbytes 4-bit one dequantized), or None for layers that have none."""
    import torch

    if type(base) is torch.nn.Linear and base.weight.dtype == dtype:
        return base.weight.detach
    state = getattr(getattr(base, "weight", None), "quant_state", None)
    if type(base).__name__ == "Linear4bit" and state is not None:
        import bitsandbytes as bnb

        return lambda: bnb.functional.dequantize_4bit(base.weight.data, state).to(dtype)
    return None


class _Stack:
    """Sibling layers stacked into one weight: their merged copies (W + scale B A, `weight` and `bias`),
    or their 4-bit bases (`full`: gemv's kernel over gemv.nf4_stack's copy). In a captured decode step,
    the first sibling's call runs one kernel over all of them and the others take their rows of that
    output (they are called with the same input tensor); elsewhere each runs F.linear over its rows of
    the copy (a view: no second copy), or its own forward."""

    def __init__(self, weight=None, bias=None, full=None, dtype=None):
        self.weight, self.bias, self.dtype = weight, bias, dtype  # dtype: the inputs `full` takes (None: any)
        self.full = full or _copy_forward(weight, bias)
        self.last = None
        _groups.add(self)  # capturing() forgets the captured output when the capture ends

    def forget(self):
        self.last = None

    def forward(self, rows: slice, own=None):
        import torch

        if own is None:
            weight = self.weight[rows]
            bias = None if self.bias is None else self.bias[rows]
            own = functools.partial(torch.nn.functional.linear, weight=weight, bias=bias)

        def forward(x, *args, **kwargs):
            if _one_token_kernels(x) and not args and not kwargs and self.dtype in (None, x.dtype):
                if self.last is None or self.last[0] is not x:
                    self.last = (x, self.full(x))
                return self.last[1][..., rows]
            return own(x, *args, **kwargs)

        return forward


def _copy_forward(weight, bias):
    """A merged copy's forward: F.linear, or gemv's kernel for one token in a captured decode step
    (the kernel the base layers get there: cuBLAS is slower for one row)."""
    import torch

    spec = None
    if gemv.available() and (weight.is_cuda or gemv.interpreted()):
        spec = gemv.Spec(weight.contiguous(), weight.shape[0], weight.shape[1], bias)

    def forward(x, *args, **kwargs):
        if spec is not None and _one_token_kernels(x) and x.dtype == weight.dtype:
            return gemv.gemv(x, spec)
        return torch.nn.functional.linear(x, weight, bias)

    return forward


@contextlib.contextmanager
def forwards(patches):
    """Within the block, each layer of `patches` [(layer, forward)] runs that forward; after it, the one it had."""
    previous = [(module, module.__dict__.get("forward")) for module, _ in patches]
    for module, forward in patches:
        module.forward = forward
    try:
        yield
    finally:
        for module, before in previous:
            if before is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = before


@contextlib.contextmanager
def kernel_linears(model):
    """Within the block (a decode step being captured), one token through a linear layer that no
    adapter wraps (the base model's, or a base layer reached some other way) runs gemv's kernel;
    LoRA layers under lean_lora run it with their adapter's term. The LM head keeps cuBLAS's kernel,
    which reads it at the GPU's bandwidth already (0.07 ms for 32000 x 4096, bench/RESULTS.md)."""
    import torch

    dtype = _compute_dtype(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    patched = []
    try:
        stacked = set()  # lean LoRA layers' bases that their stacks read: no copy of their own
        for module in model.modules():
            prepare = getattr(module.__dict__.get("forward"), "prepare", None)
            if hasattr(module, "lora_A") and prepare is not None:
                prepare()  # a lean LoRA forward's kernels, made before a torch.compile trace
                if module.__dict__[_GROUP][0].stack:
                    stacked.add(id(module.base_layer))
        for module, forward in _nf4_stacks(model, head, dtype):
            module.forward = forward
            patched.append(module)
        for module in model.modules():
            if module is head or hasattr(module, "lora_A") or "forward" in module.__dict__ or id(module) in stacked:
                continue
            weight = getattr(module, "weight", None)
            key = (weight.data_ptr(), weight._version, dtype) if isinstance(weight, torch.Tensor) else None
            held = module.__dict__.get(_GEMV)
            if held is None or held[0] != key:
                # Kept on the layer: a captured graph goes on reading what the spec holds.
                held = module.__dict__[_GEMV] = (key, gemv.spec(module, dtype))
            spec = held[1]
            if spec is not None:
                module.forward = _kernel_forward(module, spec, dtype)
                patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)


def _nf4_stacks(model, head, dtype) -> list:
    """[(layer, forward)] for the 4-bit layers no adapter wraps that gemv.nf4_stack stacks with their
    siblings (q/k/v, gate/up of one block, by name): one kernel for each stack in the captured step."""
    names = {id(module): name for name, module in model.named_modules()}
    stacks: dict = {}
    for module in model.modules():
        if type(module).__name__ != "Linear4bit" or module is head or "forward" in module.__dict__:
            continue  # LoRA layers' bases are called by their lean forwards (_Group stacks those)
        parent, _, attribute = names[id(module)].rpartition(".")
        kind = next((i for i, group in enumerate(STACKED) if attribute in group), None)
        if kind is not None:  # (a LoRA layer's base is its "base_layer")
            stacks.setdefault((parent, kind, module.in_features), []).append(module)
    patches = []
    for members in stacks.values():
        found = gemv.nf4_stack(members, dtype)
        if found is None:
            continue
        spec, spans = found
        stack = _Stack(full=functools.partial(gemv.gemv, spec=spec), dtype=dtype)
        for module, rows in zip(members, spans):
            patches.append((module, stack.forward(rows, own=functools.partial(type(module).forward, module))))
    return patches


def _kernel_forward(module, spec, dtype):
    import torch

    original = type(module).forward

    def forward(x, *args, **kwargs):
        # Inside torch.compile, only in a step captured with kernels (decode_layers.py).
        if x.numel() == x.shape[-1] and x.dtype == dtype and not args and not kwargs \
                and (not torch.compiler.is_compiling() or _traced.kernels):
            return gemv.gemv(x, spec)
        return original(module, x, *args, **kwargs)

    return forward


def _group_siblings(model, patched: list) -> None:
    """Give each patched layer its rows of a stacked A shared with its siblings (same parent, same
    input width). Kept while the members' forwards are: a captured graph reads the stacked A."""
    import torch

    chosen = {id(module) for module in patched}
    siblings: dict = {}
    for name, module in model.named_modules():
        if id(module) in chosen:
            parent, _, attribute = name.rpartition(".")
            # q/k/v and gate/up by name (o_proj reads another input of q's width); others by width
            kind = next((i for i, group in enumerate(STACKED) if attribute in group), None)
            siblings.setdefault((parent, module.forward.lora_a.shape[1], kind), []).append(module)
    for (_, _, kind), members in siblings.items():
        forwards = tuple(m.forward for m in members)
        held = members[0].__dict__.get(_GROUP)
        if held is not None and held[2] == forwards:
            continue
        group = _Group(torch.cat([f.lora_a for f in forwards]), forwards, stackable=kind is not None)
        start = 0
        for index, (module, forward) in enumerate(zip(members, forwards)):
            rows = forward.lora_a.shape[0]
            module.__dict__[_GROUP] = (group, slice(start, start + rows), forwards, index)
            start += rows


def drop_kernels(model) -> None:
    """Forget the gemv specs the captured steps' layers hold (kernel_linears', the lean forwards')
    and the repacked nf4 codes behind them: they take the 4-bit weights' memory again, which
    training wants. The next capture makes them again."""
    for module in model.modules():
        module.__dict__.pop(_GEMV, None)
        cached = module.__dict__.get(_CACHED)
        if cached is not None:
            cached[1].kernel.clear()
        held = module.__dict__.get(_GROUP)
        if held is not None:
            held[0].stack = None
    gemv.forget(model)


def forget(model, layers=None) -> None:
    """Drop the cached cast weights of `model`'s layers (an adapter was deleted or unloaded); `layers`:
    its LoRA layers, where the caller has them (they are where the weights are cached)."""
    for module in model.modules() if layers is None else layers:
        module.__dict__.pop(_CACHED, None)
        module.__dict__.pop(_GROUP, None)
