"""One token's linear layers in the captured decode step: a Triton matrix-vector kernel, with the
layer's LoRA term added in the same kernel.

A decode step of batch 1 reads every weight once and does two flops per weight, so it runs at the
speed its weights stream from memory. cuBLAS falls short of that for one token on an H200
(bench/decode_kernels.py, bench/RESULTS.md, session 12): it runs most of the 7B shape's layers as
split-K kernels with a reduction kernel after each, and with an unmerged adapter each layer adds a
kernel for B (A x) after its own. Here one kernel
computes y = W x (+ bias) (+ scale B t), where t = A x is the r values of the adapter's A
(decode.py computes it once for the siblings that share the input): 9.3 -> 6.0 us for a 4096 x 4096
layer, 27.2 -> 22.4 us for 4096 x 11008, and the adapter's term costs 0.3-0.6 us more.

bitsandbytes' 4-bit layers keep bitsandbytes' kernel: a Triton kernel reading its nf4 codes and
double-quantized scales as stored reached 0.25-0.44 TB/s against bitsandbytes' 0.7-1.0 (its code
book read from memory, or picked by selects on the bits: both slower), so it is not used.

`spec(layer)` says whether a layer can run here (a plain nn.Linear of the compute dtype, on CUDA
with Triton installed) and holds what the kernel reads; `gemv(x, spec, t, b)` runs it. The Triton
interpreter (TRITON_INTERPRET=1) runs the same kernel on CPU tensors, which is how the tests check
it against PyTorch without a GPU.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Spec:
    """What the kernel reads for one linear layer: its (out, in) weight and bias."""

    weight: Any
    out_features: int
    in_features: int
    bias: Any = None


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
    """The kernel's view of `layer` (an nn.Linear of `dtype`), or None when the kernel does not
    apply and the layer keeps its own forward (quantized layers, Conv1D, other dtypes)."""
    import torch

    weight = getattr(layer, "weight", None)
    if type(layer) is not torch.nn.Linear or not available() or (weight.device.type != "cuda" and not interpreted()):
        return None
    bias = layer.bias
    if weight.dtype != dtype or not weight.is_contiguous() or (bias is not None and bias.dtype != dtype):
        return None
    return Spec(weight.detach(), layer.out_features, layer.in_features, None if bias is None else bias.detach())


def config(spec: Spec) -> tuple[int, int, int]:
    """(output rows a program computes, weights along a row it reads a loop, warps)."""
    if interpreted():  # the interpreter runs one program after another: as few as it can
        return 16, 256, 4
    # From bench/decode_kernels.py --grid (H200): 4 rows of 1024 with 2 warps was the fastest for
    # the 7B shapes' layers, 2 rows of 2048 with 8 warps for Qwen2-7B's 512-row k/v projections.
    return (4, 1024, 2) if spec.out_features >= 2048 else (2, 2048, 8)


def gemv(x, spec: Spec, t=None, b=None, tuning: tuple[int, int, int] | None = None):
    """y = x W^T (+ bias) (+ t b^T) for one token `x` (any shape of in_features elements); `t`: the
    adapter's r values A x, `b`: its (out, r) B, scale folded in; `tuning`: config()'s choice overridden.
    Inside torch.compile (graphdecode.StepGraph._compiling) the kernel is the custom op `register_op`
    made, which inductor calls as it is."""
    import torch

    if torch.compiler.is_compiling():
        return _OP(x, spec.weight, spec.bias, t, b)
    return _launch(x, spec.weight, spec.bias, t, b, tuning or config(spec))


def _launch(x, weight, bias, t, b, tuning: tuple[int, int, int]):
    import torch
    import triton

    out_features, in_features = weight.shape
    out = torch.empty((*x.shape[:-1], out_features), dtype=x.dtype, device=x.device)
    rank = 0 if t is None else b.shape[1]
    rows, chunk, warps = tuning
    unused = out  # pointer arguments the constexpr flags leave unread
    _kernel()[(triton.cdiv(out_features, rows),)](
        x.reshape(-1), weight, out, bias if bias is not None else unused,
        t if t is not None else unused, b if b is not None else unused, out_features, in_features,
        HAS_BIAS=bias is not None, RANK=rank, RANK_P=triton.next_power_of_2(max(rank, 1)),
        BLOCK_N=rows, BLOCK_K=chunk, num_warps=warps)
    return out


# The kernel as an operator torch.compile calls without tracing it (register_op).
_OP = None


def register_op() -> None:
    """Make `ipylora::gemv`, the kernel as a custom operator, before a torch.compile traces a step
    that runs it (dynamo cannot trace a Triton launch made through functools' cache and the config)."""
    global _OP
    if _OP is not None or not available():
        return
    import torch

    def kernel(x, weight, bias, t, b):
        spec = Spec(weight, weight.shape[0], weight.shape[1], bias)
        return _launch(x, weight, bias, t, b, config(spec))

    op = torch.library.custom_op("ipylora::gemv", kernel, mutates_args=(),
                                 schema="(Tensor x, Tensor weight, Tensor? bias, Tensor? t, Tensor? b) -> Tensor")

    @op.register_fake
    def _(x, weight, bias, t, b):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    _OP = op


@functools.cache
def _kernel():
    from ipylora.engine import gemv_kernels  # imports Triton (decorating while TRITON_INTERPRET is read)

    return gemv_kernels.gemv_kernel
