"""LoRA layers that read one input, trained as one autograd node (`LoraLinears`).

lora_forward.py already adds B's product into the base output by its GEMM and stacks the A
products of siblings (q/k/v, gate/up). What autograd still does per layer, on an H100 profile of
the 1.5B shape (bench/RESULTS.md, session 23): the input gradient of each layer is two tensors
added by a pass of their own (base and LoRA branch), siblings' input gradients are added again,
the dropout's backward is one more pass before the add, and each of the ~10 autograd nodes a layer
costs host time, the 1.5B shape's bottleneck. Here one Function computes, for the bases W_i, the
stacked A (R x in) and the B_i with their scalings s_i:

    forward:   xd = dropout(x);  h = xd A^T;  y_i = x W_i^T + b_i;  y_i += s_i h_i B_i^T   (addmm, beta 1)
    backward:  dh_i = s_i dy_i B_i;  dB_i = s_i dy_i^T h_i;  dA = dh^T xd
               dx = dy_0 W_0;  dx += dy_i W_i (addmm);  dx += dh A (addmm)  or, with dropout,
               dx += mask * (dh A) / (1 - p) (one addcmul)

so every add of an input gradient lands in a GEMM's epilogue but the dropout's one. The mask is
kept (as PEFT keeps its dropped copy) or, `deferred`, drawn again in backward from the saved
generator state (dropout.py's reasoning: nothing kept but x). Computed in the autocast dtype where
autocast is on, else in x's dtype, rounding as the unfused layers do (each GEMM rounds once); every
operand is cast to it first, so autocast (left on: entering a context costs host time) casts nothing.

Plain bf16/fp16/fp32 `torch.nn.Linear` bases and bitsandbytes' 4-bit ones (computed by its
`matmul_4bit`, dequantized for the input gradient as its own backward does), frozen and without
hooks, take it (`fusable`); dropout.py's fused dropout kernel and anything else keep the unfused path.
"""

from __future__ import annotations

import torch

from ipylora.engine.dropout import _rng_state, _set_rng_state

# Off by default until measured on a GPU. What it trades (session 23, bench/RESULTS.md): by the count
# of passes it saves about 2.5% of a 7B bf16 step's kernel time (the input-gradient adds and the
# dropout's backward pass folded into GEMM epilogues and one addcmul), but a Python autograd Function
# costs host time: on this machine's CPU, one q/k/v group's forward and backward at tiny sizes
# (where host time is all there is) took ~420 us against ~330 us for lora_forward's stacked path,
# which would cost the host-bound 1.5B shape about 3%. `bench/train_throughput.py --groups stack`
# runs both.
ENABLED = False


def _compute_dtype(x):
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _kind(base) -> str | None:
    if type(base) is torch.nn.Linear:
        return "linear"
    if type(base).__name__ == "Linear4bit" and hasattr(base.weight, "quant_state"):  # bitsandbytes
        return "nf4"
    return None


def fusable(bases, x) -> bool:
    """Whether `LoraLinears` can compute these base layers' outputs for input `x`."""
    if not ENABLED or torch.compiler.is_compiling():
        return False
    dtype = _compute_dtype(x)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    hooks = torch.nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return False
    for base in bases:
        kind = _kind(base)
        if kind is None or base.weight.requires_grad or base._forward_hooks or base._forward_pre_hooks:
            return False
        if base.bias is not None and (base.bias.requires_grad or base.bias.dtype != dtype):
            return False
        if kind == "linear" and base.weight.dtype != dtype:
            return False
        if kind == "nf4":
            if not getattr(base, "compute_type_is_set", True):
                # What bitsandbytes' forward does on its first call, done here so that a checkpointed
                # layer's recomputation takes the same path as its first forward.
                base.set_compute_type(x)
                base.compute_type_is_set = True
            state = base.weight.quant_state
            # bitsandbytes casts the input to its compute dtype and repacks weights for CPU
            # inference: where either would differ, its own forward runs.
            if state is None or getattr(state, "packing_format_for_cpu", False) or base.compute_dtype != dtype:
                return False
    return True


def lora_linears(x, bases, a, bs, scales, p: float, deferred: bool):
    """Every base's output plus its adapter's term, for the stacked A `a` (sum of ranks x in) and
    each member's B (out_i x r_i) and scaling; dropout `p` on the adapters' input (`deferred`: the
    mask drawn again in backward). The outputs are 2-D (tokens x out_i)."""
    return LoraLinears.apply(x, a, p, deferred, tuple(float(s) for s in scales), tuple(bases), *bs)


def _base_output(base, flat):
    if _kind(base) == "nf4":
        import bitsandbytes as bnb

        return bnb.matmul_4bit(flat, base.weight, bias=base.bias, quant_state=base.weight.quant_state)
    return torch.addmm(base.bias, flat, base.weight.t()) if base.bias is not None else flat @ base.weight.t()


def _base_weight(base, dtype):
    """The (out, in) weight the input gradient is multiplied by: 4-bit ones dequantized, as
    bitsandbytes' own backward does (one weight at a time, freed after its GEMM)."""
    if _kind(base) == "nf4":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(base.weight, base.weight.quant_state).to(dtype)
    return base.weight


class LoraLinears(torch.autograd.Function):
    """The base layers are held by the node, not saved as tensors: they stay resident (frozen), and
    saved-tensor hooks (activation offloading) should move activations, not weights."""

    @staticmethod
    def forward(ctx, x, a, p, deferred, scales, bases, *bs):
        dtype = _compute_dtype(x)
        device = x.device
        ranks = [b.shape[1] for b in bs]
        flat = x.reshape(-1, x.shape[-1])
        flat = flat.to(dtype)
        a_c = a.detach().to(dtype)
        state, mask = None, None
        if p > 0.0:
            if deferred:
                state = _rng_state(device)
            dropped, mask = torch.native_dropout(flat, p, True)
        else:
            dropped = flat
        h = dropped @ a_c.t()  # (tokens, sum of ranks)
        outs, scaled, start = [], [], 0
        for b, base, scale, rank in zip(bs, bases, scales, ranks):
            b_c = b.detach().to(dtype)
            y = _base_output(base, flat)
            outs.append(y.addmm_(h[:, start:start + rank], b_c.t(), alpha=scale))  # (tokens, out): 2-D
            scaled.append(b_c * scale if scale != 1.0 else b_c)  # dh = dy (s B): the scaling on r columns
            start += rank
        if deferred or p == 0.0:
            ctx.save_for_backward(flat, h, a_c, *scaled)
        else:
            ctx.save_for_backward(flat, h, a_c, *scaled, dropped, mask)
        ctx.bases, ctx.p, ctx.deferred, ctx.state, ctx.scales, ctx.ranks = bases, p, deferred, state, scales, ranks
        ctx.x_shape, ctx.x_dtype, ctx.a_dtype = x.shape, x.dtype, a.dtype  # the outputs are 2-D: callers view them
        ctx.b_dtypes = [b.dtype for b in bs]
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        bases, p = ctx.bases, ctx.p
        n = len(bases)
        saved = ctx.saved_tensors
        flat, h, a_c = saved[:3]
        scaled = saved[3:3 + n]
        device = flat.device
        dropped = mask = None
        if p > 0.0:
            if ctx.deferred:
                current = _rng_state(device)
                _set_rng_state(ctx.state, device)
                try:
                    dropped, mask = torch.native_dropout(flat, p, True)
                finally:
                    _set_rng_state(current, device)
            else:
                dropped, mask = saved[3 + n:]
        else:
            dropped = flat
        tokens = flat.shape[0]
        grad_x = grad_a = None
        grad_bs = [None] * n
        dys = [None if g is None else g.to(flat.dtype) for g in grads]
        dh_parts, start = [], 0
        for i, (dy, scaled_b, scale, rank) in enumerate(zip(dys, scaled, ctx.scales, ctx.ranks)):
            if dy is None:
                dh_parts.append(h.new_zeros(tokens, rank))
            else:
                dh_parts.append(dy @ scaled_b)
                if ctx.needs_input_grad[6 + i]:
                    grad_b = dy.t() @ h[:, start:start + rank]
                    grad_bs[i] = (grad_b.mul_(scale) if scale != 1.0 else grad_b).to(ctx.b_dtypes[i])
            start += rank
        dh = dh_parts[0] if n == 1 else torch.cat(dh_parts, dim=1)
        if ctx.needs_input_grad[1]:
            grad_a = (dh.t() @ dropped).to(ctx.a_dtype)
        if ctx.needs_input_grad[0]:
            for dy, base in zip(dys, bases):
                if dy is None:
                    continue
                weight = _base_weight(base, flat.dtype)
                grad_x = dy @ weight if grad_x is None else grad_x.addmm_(dy, weight)
            if p > 0.0:
                lora = dh @ a_c
                if grad_x is None:
                    grad_x = torch.ops.aten.native_dropout_backward(lora, mask, 1.0 / (1.0 - p))
                else:
                    grad_x.addcmul_(lora, mask, value=1.0 / (1.0 - p))
            elif grad_x is None:
                grad_x = dh @ a_c
            else:
                grad_x.addmm_(dh, a_c)
            grad_x = grad_x.to(ctx.x_dtype).view(ctx.x_shape)
        return (grad_x, grad_a, None, None, None, None, *grad_bs)
