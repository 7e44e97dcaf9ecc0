"""One token's linear layers in the captured decode step: Triton matrix-vector kernels, with the
layer's LoRA term added in the same kernel.

A decode step of batch 1 reads every weight once and does two flops per weight, so it runs at the
speed its weights stream from memory. The libraries fall short of that on an H200
(bench/chat_latency.py --profile, 7B shape, bench/RESULTS.md, session 12):

- bitsandbytes' 4-bit kernel (`gemm_4bit_simt`) takes 3.71 ms of a 4.87 ms step for its 3.4 GB of
  nf4 weights and statistics: 0.9 TB/s of the 4.3 the GPU copies at;
- cuBLAS reads the bf16 weights at 3.6 TB/s for the MLP's, but at 2.6 TB/s for the 4096 x 4096
  attention projections, through split-K kernels and a reduction kernel after each;
- and with an unmerged adapter each layer adds a kernel for B (A x), run after the layer's own.

Here one kernel computes y = W x (+ bias) (+ scale B t), where t = A x is the r values the adapter's
A gives (decode.py computes it once for the siblings that share the input). W is the layer's
full-precision weight, or bitsandbytes' nf4 layout read as it is stored: two 4-bit codes a byte
(the first element in the high nibble), a code book of 16 values, and a scale (absmax) for each
block of 64 weights of the flattened weight, itself 8-bit quantized in blocks of 256 ("double
quantization": a code book, a scale per block and an offset). The kernel sums each block's products
with the codes, then scales the sum once: the weights are never written out dequantized.

`spec(layer)` says whether a layer can run here (a plain Linear of the compute dtype, or a
bitsandbytes Linear4bit holding nf4 codes in uint8 storage, rows a whole number of blocks, on CUDA
with Triton installed) and holds what the kernel reads; `gemv(x, spec, t, b)` runs it. The Triton
interpreter (TRITON_INTERPRET=1) runs the same kernels on CPU tensors, which is how the tests check
them against PyTorch without a GPU.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Spec:
    """What the kernel reads for one linear layer. For nf4: `weight` is the packed codes (N x K / 2
    bytes), `absmax` the per-block scales (uint8 when `nested`, with `code2`, `absmax2`, `offset`
    decoding them; fp32 otherwise) and `code` the 16 values, in fp32 on the layer's device."""

    nf4: bool
    weight: Any
    out_features: int
    in_features: int
    bias: Any = None
    absmax: Any = None
    code: Any = None
    nested: bool = False
    code2: Any = None
    absmax2: Any = None
    offset: float = 0.0
    block: int = 64
    block2: int = 256


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (set before Triton is first imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def available() -> bool:
    """Triton can be imported: it comes with torch's CUDA builds; the CPU tests install it for its interpreter."""
    try:
        import triton  # noqa: F401
    except Exception:  # not installed, or installed without a working backend
        return False
    return True


def spec(layer, dtype) -> Spec | None:
    """The kernel's view of `layer` (an nn.Linear of `dtype`, or bitsandbytes' nf4 Linear4bit), or None
    when the kernel does not apply and the layer keeps its own forward."""
    import torch

    weight = getattr(layer, "weight", None)
    if weight is None or not available() or (weight.device.type != "cuda" and not interpreted()):
        return None
    bias = getattr(layer, "bias", None)
    if bias is not None and bias.dtype != dtype:
        return None
    if type(layer) is torch.nn.Linear:
        if weight.dtype != dtype or not weight.is_contiguous():
            return None
        return Spec(False, weight.detach(), layer.out_features, layer.in_features, bias)
    state = getattr(weight, "quant_state", None)
    if type(layer).__name__ != "Linear4bit" or state is None or weight.dtype != torch.uint8:
        return None  # 8-bit layers, 4-bit weights stored in a float dtype (FSDP's quant_storage)
    out_features, in_features = state.shape
    if getattr(weight, "quant_type", "nf4") != "nf4" or in_features % state.blocksize or in_features % 2 \
            or state.blocksize % 2:
        return None
    with torch.no_grad():
        code = state.code.to(weight.device, torch.float32)
        if state.nested:
            nested = state.state2
            return Spec(True, weight.detach(), out_features, in_features, bias, absmax=state.absmax, code=code,
                        nested=True, code2=nested.code.to(weight.device, torch.float32),
                        absmax2=nested.absmax.to(torch.float32), offset=float(state.offset),
                        block=state.blocksize, block2=nested.blocksize)
        return Spec(True, weight.detach(), out_features, in_features, bias, absmax=state.absmax.to(torch.float32),
                    code=code, block=state.blocksize)


def config(spec: Spec) -> tuple[int, int, int]:
    """(output rows a program computes, weights along a row it reads a loop, warps): enough
    programs to fill the GPU's 132 SMs twice over, and a chunk of weights a loop that keeps the
    accumulators in registers."""
    rows = 1
    while rows < 16 and (spec.out_features // (rows * 2) >= 264 or interpreted()):
        rows *= 2  # the interpreter runs one program after another: as few as it can
    return rows, (512 if spec.nf4 else 4096 // rows), 4


def gemv(x, spec: Spec, t=None, b=None, tuning: tuple[int, int, int] | None = None):
    """y = x W^T (+ bias) (+ t b^T) for one token `x` (any shape of in_features elements); `t`: the
    adapter's r values A x, `b`: its (out, r) B, scale folded in; `tuning`: config()'s choice overridden."""
    import torch
    import triton

    kernel = _kernel()
    out = torch.empty((*x.shape[:-1], spec.out_features), dtype=x.dtype, device=x.device)
    rank = 0 if t is None else b.shape[1]
    rows, chunk, warps = tuning or config(spec)
    dummy = out  # unused pointer arguments (masked off by the constexpr flags)
    kernel[(triton.cdiv(spec.out_features, rows),)](
        x.reshape(-1), spec.weight, out, spec.bias if spec.bias is not None else dummy,
        t if t is not None else dummy, b if b is not None else dummy,
        spec.absmax if spec.nf4 else dummy, spec.code if spec.nf4 else dummy,
        spec.code2 if spec.nested else dummy, spec.absmax2 if spec.nested else dummy, spec.offset,
        spec.out_features, spec.in_features,
        NF4=spec.nf4, NESTED=spec.nested, HAS_BIAS=spec.bias is not None, RANK=rank,
        RANK_P=triton.next_power_of_2(max(rank, 1)), BLOCK_N=rows, BLOCK_K=max(chunk, spec.block),
        QBLOCK=spec.block, QBLOCK2=spec.block2, num_warps=warps)
    return out


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gemv_kernel(x_ptr, w_ptr, y_ptr, bias_ptr, t_ptr, b_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr,
                    offset, N, K, NF4: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
                    RANK: tl.constexpr, RANK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        if NF4:
            # (rows, blocks of this chunk, byte in block): each byte holds elements 2j and 2j + 1.
            GROUPS: tl.constexpr = BLOCK_K // QBLOCK
            HALF: tl.constexpr = QBLOCK // 2
            groups = tl.arange(0, GROUPS)
            pairs = tl.arange(0, HALF)
            blocks_per_row = K // QBLOCK
            acc = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)
            for start in range(0, blocks_per_row, GROUPS):
                group = start + groups
                group_ok = group < blocks_per_row
                where = row_ok[:, None, None] & group_ok[None, :, None]
                at = rows[:, None, None] * (K // 2) + group[None, :, None] * HALF + pairs[None, None, :]
                packed = tl.load(w_ptr + at, mask=where, other=0).to(tl.int32)
                high = tl.load(code_ptr + (packed >> 4))
                low = tl.load(code_ptr + (packed & 15))
                column = group[None, :, None] * QBLOCK + 2 * pairs[None, None, :]
                x_even = tl.load(x_ptr + column, mask=group_ok[None, :, None], other=0.0).to(tl.float32)
                x_odd = tl.load(x_ptr + column + 1, mask=group_ok[None, :, None], other=0.0).to(tl.float32)
                sums = tl.sum(high * x_even + low * x_odd, axis=2)
                block = rows[:, None] * blocks_per_row + group[None, :]
                block_ok = row_ok[:, None] & group_ok[None, :]
                if NESTED:
                    quantized = tl.load(absmax_ptr + block, mask=block_ok, other=0).to(tl.int32)
                    scale = tl.load(code2_ptr + quantized) * tl.load(absmax2_ptr + block // QBLOCK2, mask=block_ok,
                                                                     other=0.0) + offset
                else:
                    scale = tl.load(absmax_ptr + block, mask=block_ok, other=0.0)
                acc += sums * scale
            total = tl.sum(acc, axis=1)
        else:
            columns = tl.arange(0, BLOCK_K)
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for start in range(0, K, BLOCK_K):
                column = start + columns
                column_ok = column < K
                w = tl.load(w_ptr + rows[:, None] * K + column[None, :], mask=row_ok[:, None] & column_ok[None, :],
                            other=0.0)
                xv = tl.load(x_ptr + column, mask=column_ok, other=0.0)
                acc += w.to(tl.float32) * xv.to(tl.float32)[None, :]
            total = tl.sum(acc, axis=1)
        if HAS_BIAS:
            total += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        if RANK > 0:
            ranks = tl.arange(0, RANK_P)
            rank_ok = ranks < RANK
            t = tl.load(t_ptr + ranks, mask=rank_ok, other=0.0).to(tl.float32)
            bw = tl.load(b_ptr + rows[:, None] * RANK + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :],
                         other=0.0).to(tl.float32)
            total += tl.sum(bw * t[None, :], axis=1)
        tl.store(y_ptr + rows, total.to(y_ptr.dtype.element_ty), mask=row_ok)

    return gemv_kernel
