"""LoRA dropout whose mask is drawn again in the backward pass instead of being kept.

PEFT computes `lora_B(lora_A(dropout(x)))`: each adapted layer keeps its own dropped copy of its
input (and the mask) until the backward pass, since A's gradient needs it. q, k and v read the same
input, gate and up too, so with dropout the saved activations of a layer more than double: on an
H200 the 7B shape trained 11% slower at the default dropout of 0.05 than at 0, with 25 GiB more
(bench/RESULTS.md, session 6).

Here the dropout moves into A's product (`DropoutLinear`, what `lora_A` becomes), which keeps only
the input it was given (the one tensor q, k and v share) and the random generator's state before
the mask was drawn; the backward pass draws the same mask from that state (one extra pass over the
input per layer). The masks are drawn from the default generator of the input's device, the one
`torch.utils.checkpoint` puts back before recomputing, so a checkpointed layer draws the same mask
in its recomputation. PEFT's dropout module becomes `DeferredDropout` (an identity that keeps its
`p`, so that the adapter's configuration reads as before).

That extra pass costs time (11% on the 7B shape, against PEFT's kept copies), so the engine takes
this form only where the memory it saves changes the batch plan (`speed._plan_dropout`).

Only plain LoRA layers (no DoRA or other variant, which call the dropout themselves) are changed;
`sync(model)` puts every layer in the state its dropout asks for, and can run again after an
adapter's dropout was changed (sweeps) or removed.
"""

from __future__ import annotations

import torch


class DeferredDropout(torch.nn.Dropout):
    """PEFT's `lora_dropout` module whose drop is done by the paired `DropoutLinear`."""

    def forward(self, x):
        return x


# How DropoutLinear draws its mask again: "torch" (torch.native_dropout from the saved generator
# state), "fused" (dropout_kernels: the mask computed inside A's product and its gradients, never
# stored; CUDA, or Triton's interpreter) or "auto": fused for inputs at least FUSED_MIN_WIDTH wide,
# torch for narrower ones. Per layer on an H100 (bench/dropout_kernels.py, 16k tokens, r16; session
# 14 in bench/RESULTS.md) the fused kernel beats drawing again on the 7B shape's 18,944-wide input
# of down_proj (1.91 ms against 3.15) and loses on its 3,584-wide ones (0.87 against 0.79).
KERNEL = "auto"
FUSED_MIN_WIDTH = 8192


def uses_fused(width: int) -> bool:
    """Whether a deferred dropout over inputs `width` wide runs the fused kernel (where it can run)."""
    return KERNEL == "fused" or (KERNEL == "auto" and width >= FUSED_MIN_WIDTH)


class DropoutLinear(torch.nn.Linear):
    """`lora_A` applying dropout `dropout_p` to its input in training, the mask drawn again for the backward pass."""

    dropout_p = 0.0

    def forward(self, x):
        if not self.training or self.dropout_p == 0.0:
            return super().forward(x)
        return dropped_linear(x, self.weight, self.dropout_p)


def dropped_linear(x, weight, p: float):
    """`linear(dropout(x, p), weight)` with the mask drawn again in the backward pass (p 0: a plain
    linear). lora_forward.py calls it with the stacked A of siblings that read one input."""
    if p == 0.0:
        return torch.nn.functional.linear(x, weight)
    if uses_fused(x.shape[-1]) and fused_available(x):
        return FusedDropoutLinear.apply(x, weight, p)
    return DropoutThenLinear.apply(x, weight, p)


def fused_available(x) -> bool:
    """FusedDropoutLinear can run on `x`: Triton on CUDA, or its interpreter (TRITON_INTERPRET=1) on CPU."""
    from ipylora.engine import gemv

    return gemv.available() and (x.is_cuda or gemv.interpreted())


class FusedDropoutLinear(torch.autograd.Function):
    """`linear(dropout(x, p), weight)` with the mask made inside the kernels that read x
    (dropout_kernels): nothing is saved but x, A and a seed, and no pass over x is added to those
    of A's product and its two gradients. The seed is drawn from the default generator of x's
    device, which torch.utils.checkpoint puts back before recomputing, so a recomputed layer
    draws the same mask. p is rounded to a multiple of 1/65536 (the mask compares 16 bits).

    Computed in the autocast dtype where autocast is on, else in the weight's dtype, as
    DropoutThenLinear is."""

    BLOCK_M, BLOCK_K = 64, 64

    @staticmethod
    def forward(ctx, x, weight, p: float):
        import triton

        device = x.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else weight.dtype
        threshold = min(65535, round(p * 65536))
        scale = 65536.0 / (65536 - threshold)
        seed = torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)
        rows, rank = x.numel() // x.shape[-1], weight.shape[0]
        flat = x.reshape(rows, x.shape[-1]).contiguous()
        a = weight.detach().to(dtype).contiguous()
        t = torch.empty((rows, rank), dtype=dtype, device=device)
        block_r = max(16, triton.next_power_of_2(rank))
        kernels = _kernels()
        kernels.dropout_a_forward[(triton.cdiv(rows, FusedDropoutLinear.BLOCK_M),)](
            flat, a, t, seed, rows, flat.shape[1], rank, threshold, scale, BLOCK_M=FusedDropoutLinear.BLOCK_M,
            BLOCK_K=FusedDropoutLinear.BLOCK_K, BLOCK_R=block_r, PRECISION=_precision(dtype))
        ctx.save_for_backward(x, weight, seed)
        ctx.dtype, ctx.threshold, ctx.scale = dtype, threshold, scale
        return t.view(*x.shape[:-1], rank)

    @staticmethod
    def backward(ctx, grad_out):
        import triton

        x, weight, seed = ctx.saved_tensors
        dtype, block_m, block_k = ctx.dtype, FusedDropoutLinear.BLOCK_M, FusedDropoutLinear.BLOCK_K
        rows, width, rank = x.numel() // x.shape[-1], x.shape[-1], weight.shape[0]
        g = grad_out.reshape(rows, rank).to(dtype).contiguous()
        a = weight.detach().to(dtype).contiguous()
        block_r = max(16, triton.next_power_of_2(rank))
        common = dict(BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, PRECISION=_precision(dtype))
        kernels = _kernels()
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty((rows, width), dtype=dtype, device=x.device)
            kernels.dropout_a_grad_input[(triton.cdiv(rows, block_m), triton.cdiv(width, block_k))](
                g, a, grad_x, seed, rows, width, rank, ctx.threshold, ctx.scale, **common)
            grad_x = grad_x.to(x.dtype).view(x.shape)
        if ctx.needs_input_grad[1]:
            flat = x.reshape(rows, width).contiguous()
            # Enough programs to fill the GPU: the rows are cut into splits, each summing its share.
            splits = max(1, min(triton.cdiv(rows, 4 * block_m), 512 // triton.cdiv(width, block_k) or 1))
            per_split = triton.cdiv(triton.cdiv(rows, splits), block_m) * block_m
            splits = triton.cdiv(rows, per_split)
            partial = torch.empty((splits, rank, width), dtype=torch.float32, device=x.device)
            kernels.dropout_a_grad_weight[(triton.cdiv(width, block_k), splits)](
                g, flat, partial, seed, rows, width, rank, ctx.threshold, ctx.scale, per_split, **common)
            grad_weight = partial.sum(0).to(weight.dtype)
        return grad_x, grad_weight, None


def _precision(dtype) -> str:
    # fp32 inputs: IEEE products (PyTorch's matmul does not use TF32 unless asked); 16-bit: the tensor cores'.
    return "ieee" if dtype == torch.float32 else "tf32"


def _kernels():
    from ipylora.engine import dropout_kernels  # imports Triton (decorating while TRITON_INTERPRET is read)

    return dropout_kernels


def _rng_state(device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(state, device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class DropoutThenLinear(torch.autograd.Function):
    """`linear(dropout(x, p), weight)`, saving x (not the dropped copy) and the generator's state.

    The dropout is PyTorch's fused one (`torch.native_dropout`: one kernel writes the dropped input
    and the mask), run again in the backward pass from the saved state. A first version drew the mask
    with `bernoulli_` and applied it with two multiplies, a pass each: on the H200's 7B shape that
    trained 13% slower than PEFT's dropout (bench/RESULTS.md, session 11).

    Computed in the autocast dtype where autocast is on, else in the weight's dtype, as `F.linear`
    under autocast (and PEFT's cast of the input to the adapter's dtype otherwise) would."""

    @staticmethod
    def forward(ctx, x, weight, p: float):
        device = x.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else weight.dtype
        state = _rng_state(device)
        with torch.autocast(device.type, enabled=False):
            dropped, _ = torch.native_dropout(x.to(dtype), p, True)
            out = torch.nn.functional.linear(dropped, weight.to(dtype))
        ctx.save_for_backward(x, weight)
        ctx.state, ctx.p, ctx.dtype = state, p, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        device, dtype = x.device, ctx.dtype
        current = _rng_state(device)
        _set_rng_state(ctx.state, device)
        try:
            dropped, keep = torch.native_dropout(x.to(dtype), ctx.p, True)
        finally:
            _set_rng_state(current, device)
        grad_out = grad_out.to(dtype)
        with torch.autocast(device.type, enabled=False):
            grad_x = grad_weight = None
            if ctx.needs_input_grad[0]:
                grad_x = torch.ops.aten.native_dropout_backward(grad_out @ weight.to(dtype), keep, 1.0 / (1.0 - ctx.p))
                grad_x = grad_x.to(x.dtype)
            if ctx.needs_input_grad[1]:
                grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).t() @ dropped.reshape(-1, dropped.shape[-1])
                grad_weight = grad_weight.to(weight.dtype)
        return grad_x, grad_weight, None


def restore(layer, name: str) -> None:
    """PEFT's own form for adapter `name` of `layer` (its dropout is about to be replaced)."""
    a, dropout = layer.lora_A[name], layer.lora_dropout[name]
    if type(a) is DropoutLinear:
        a.__class__ = torch.nn.Linear
        a.__dict__.pop("dropout_p", None)
    if type(dropout) is DeferredDropout:
        dropout.__class__ = torch.nn.Dropout


def deferred(model) -> bool:
    """Whether any LoRA layer of `model` draws its dropout again in the backward pass."""
    return any(type(m) is DropoutLinear for m in model.modules())


def sync(model, enabled: bool = True) -> tuple[int, int]:
    """Give every plain LoRA layer of `model` with dropout the deferred form (`DropoutLinear` for
    lora_A, `DeferredDropout` for lora_dropout), and take it back from layers whose dropout is now 0
    or that have a variant (from all of them without `enabled`). Returns (adapter layers deferred,
    adapter layers with a dropout left as PEFT does it)."""
    deferred = kept = 0
    for module in model.modules():
        if not (hasattr(module, "lora_A") and hasattr(module, "lora_dropout")):
            continue
        for name, a in module.lora_A.items():
            dropout = module.lora_dropout[name] if name in module.lora_dropout else None
            p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0
            plain = type(a) in (torch.nn.Linear, DropoutLinear) and type(dropout) in (torch.nn.Dropout, DeferredDropout) \
                and name not in getattr(module, "lora_variant", {})
            if enabled and p > 0.0 and plain:
                a.__class__, dropout.__class__ = DropoutLinear, DeferredDropout
                a.dropout_p = p
                deferred += 1
                continue
            restore(module, name)
            kept += p > 0.0
    return deferred, kept
