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

bitsandbytes' nf4 layers get a kernel of their own over a copy of their codes repacked once
(`nf4_spec`): a Triton kernel reading bitsandbytes' codes and double-quantized scales as stored was
slower than bitsandbytes' own one-token kernel (session 12: 0.25-0.44 TB/s against 0.7-1.0). The
repacked copy holds each lane's codes as the tensor cores' mma fragments (`_mma_layout`), and the
kernel (gemv_kernels.nf4_mma_kernel) looks them up in a code-book table in shared memory, a load a
byte of two codes, then multiplies 16 rows at a time with mma.sync; one fp16 scale per 64 weights.
On an H100 (session 21): 5.2 against bitsandbytes' 10.1 us for a 4096 x 4096 layer, 11.4 against
22.1 for 11008 x 4096 (1.5-2.3 TB/s), and the 7B shape's 4-bit chat step with an r16 adapter 196 ->
240 tokens/s against session 20's fp32 kernel (`NF4_MMA = False`; it stays for layers of up to 1,024
rows, NF4_MMA_MAX_SMALL). Sibling layers of one input (q/k/v, gate/up) are stacked into one copy and
one launch (`nf4_stack`; H200, session 22: 245 -> 276 tokens/s with the adapter). The copy
takes the 4-bit weights' memory again (about 3.6 GB for a 7B model), and is made only where half the
free GPU memory holds it; graphdecode.release drops it with the captured step.

`spec(layer)` says whether a layer can run here (a plain nn.Linear of the compute dtype, or an nf4
Linear4bit, on CUDA with Triton installed) and holds what the kernel reads; `gemv(x, spec, t, b)`
runs it. The Triton interpreter (TRITON_INTERPRET=1) runs the same kernels on CPU tensors, which is
how the tests check them against PyTorch without a GPU.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Spec:
    """What the kernel reads for one linear layer: its (out, in) weight and bias; for an nf4 layer
    (`scales` set), `weight` is its codes repacked as nf4_spec says (int32 words) and `scales` their
    fp16 scales."""

    weight: Any
    out_features: int
    in_features: int
    bias: Any = None
    scales: Any = None
    work: Any = None  # nf4_mma_kernel's split sums and their counters (int32, zeros)


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
    """The kernel's view of `layer` (an nn.Linear of `dtype`, or bitsandbytes' nf4 Linear4bit: nf4_spec),
    or None when the kernel does not apply and the layer keeps its own forward (8-bit layers, Conv1D,
    other dtypes)."""
    import torch

    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or not available() or (weight.device.type != "cuda" and not interpreted()):
        return None
    if type(layer).__name__ == "Linear4bit":
        return nf4_spec(layer, dtype)
    if type(layer) is not torch.nn.Linear:
        return None
    bias = layer.bias
    if weight.dtype != dtype or not weight.is_contiguous() or (bias is not None and bias.dtype != dtype):
        return None
    return Spec(weight.detach(), layer.out_features, layer.in_features, None if bias is None else bias.detach())


# Attribute of a bitsandbytes Linear4bit holding (key, Spec or None): its repacked codes, made once.
_NF4 = "_ipylora_nf4"
# The repacked nf4 kernel for 4-bit layers; False keeps bitsandbytes' (benchmarks compare the two).
# `python3 bench/decode_kernels.py --nf4 --grid`, `python3 bench/chat_latency.py --precision 4bit
# --modes graph --graph-models base,lean --liger --nf4 off,on` compare them.
NF4 = True
# The nf4 kernel on the tensor cores (nf4_mma_kernel); False: the fp32 one (nf4_gemv_kernel).
NF4_MMA = True
# Layers of at most this many rows keep the fp32 kernel: Qwen2-7B's 512-row k/v projections took 4.1
# us on the tensor cores at every tiling tried (32 tiles of 16 rows leave most of the GPU idle, and each
# program fills its own table) against the fp32 kernel's 3.0 (H100, session 21; 1,024 rows unmeasured).
NF4_MMA_MAX_SMALL = 1024
# nf4_mma_kernel launched as a programmatic dependent launch: its table fill and the first codes' trip
# to L2 overlap the kernel before it (the launch waits for that kernel before reading its input).
# Off: on an H100 (session 21, `bench/chat_latency.py --nf4 nopdl,on`) it gave +2% on a 4-bit base but
# -2% with an r16 adapter and -3% with --compile.
PDL = False
# The most programs nf4_mma_kernel splits a tile's groups over (the size of Spec.work: 260 bytes a tile,
# about 22 MB for a 7B model's layers; the split never won, see config).
MAX_SPLIT = 4


def nf4_spec(layer, dtype) -> Spec | None:
    """The nf4 kernel's view of bitsandbytes' `layer`: its codes repacked and its scales decoded, once
    per weight (kept on the layer until `forget`). None where the kernel does not apply (fp4 codes,
    another code book, blocks of under 64 weights or across rows, 4-bit weights stored in a float
    dtype, a bias of another dtype) or where the copy would take more than half the free GPU memory.

    Each row is padded to a multiple of 512 weights and stored as 32-bit words of 8 codes, ordered so
    that a program's words meet consecutive pairs of inputs (gemv_kernels.nf4_gemv_kernel); scales
    are one per 64 weights (bitsandbytes' blocks of 64 or more, repeated), dequantized from its
    double quantization, in fp16 (absmax values up to 65,504; larger ones keep bitsandbytes' kernel)."""
    import torch

    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    bias = getattr(layer, "bias", None)
    if not NF4 or state is None or weight.dtype != torch.uint8 or dtype not in (torch.bfloat16, torch.float16) \
            or (bias is not None and bias.dtype != dtype):
        return None
    key = (weight.data_ptr(), weight._version, dtype, NF4_MMA, NF4_MMA_MAX_SMALL)
    held = layer.__dict__.get(_NF4)
    if held is not None and held[0] == key:
        return held[1]
    layer.__dict__.pop(_NF4, None)  # the old copy goes before a new one is made
    found = _repack_nf4(weight, state, bias)
    layer.__dict__[_NF4] = (key, found)
    return found


def _repack_nf4(weight, state, bias) -> Spec | None:
    import torch

    decoded = _nf4_codes(weight, state, _copy_bytes(*state.shape))
    if decoded is None:
        return None
    codes, scales = decoded
    out_features, in_features = codes.shape
    bias = None if bias is None else bias.detach()
    with torch.no_grad():
        if NF4_MMA and out_features > NF4_MMA_MAX_SMALL:
            codes, scales = _mma_layout(codes, scales)
            return Spec(codes, out_features, in_features, bias, scales=scales, work=_work(codes))
        padded = -(-in_features // 512) * 512
        scales = torch.nn.functional.pad(scales, (0, (padded - in_features) // 64)).to(torch.float16).contiguous()
        codes = torch.nn.functional.pad(codes, (0, padded - in_features))  # code 0 meets a zero input and scale
        # weight 128 g + 2 (16 m + v) + p -> group g, word v, code 2m + p; byte m of a word holds codes 2m, 2m + 1
        codes = codes.reshape(out_features, padded // 128, 4, 16, 2).permute(0, 1, 3, 2, 4)  # (row, g, v, m, p)
        packed = (codes[..., 0] | (codes[..., 1] << 4)).contiguous().view(torch.int32).reshape(out_features, -1)
    return Spec(packed, out_features, in_features, bias, scales=scales)


def _nf4_codes(weight, state, nbytes: int):
    """bitsandbytes' nf4 `weight` as (out, in) codes (uint8, one a weight) and (out, in / 64) fp32 scales,
    or None where the kernels do not take it (see nf4_spec) or its copy of `nbytes` would take more than
    half the free GPU memory."""
    import torch

    from ipylora.engine import gemv_kernels

    out_features, in_features = state.shape
    block = state.blocksize
    if getattr(weight, "quant_type", "nf4") != "nf4" or block % 64 or in_features % block or state.code.numel() != 16:
        return None
    if not torch.allclose(state.code.float().cpu(), torch.tensor(gemv_kernels.NF4), atol=1e-6):
        return None
    if weight.is_cuda:
        from ipylora.engine.speed import _free_bytes

        if nbytes > _free_bytes() // 2:
            return None
    with torch.no_grad():
        if state.nested:
            import bitsandbytes as bnb

            absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        else:
            absmax = state.absmax
        absmax = absmax.float().reshape(out_features, in_features // block)
        if not bool(absmax.abs().max() <= 65504):
            return None
        packed = weight.data.reshape(out_features, in_features // 2)  # byte i: weight 2i (high bits), 2i + 1
        codes = torch.stack((packed >> 4, packed & 15), dim=-1).reshape(out_features, in_features)
        return codes, absmax.repeat_interleave(block // 64, dim=1)


def _copy_bytes(out_features: int, in_features: int) -> int:
    """The bytes of a repacked copy: half a byte a weight (rows padded to 512), an fp16 scale a 64."""
    padded = -(-in_features // 512) * 512
    return out_features * padded // 2 + out_features * padded // 64 * 2


def _work(codes):
    """nf4_mma_kernel's split sums and counters for `codes` (zeros)."""
    import torch

    return torch.zeros(codes.shape[0] * (1 + 16 * MAX_SPLIT), dtype=torch.int32, device=codes.device)


# Attribute of the first of stacked bitsandbytes layers holding (key, (Spec, row spans) or None): nf4_stack's copy.
_NF4_STACK = "_ipylora_nf4_stack"
# Sibling 4-bit layers that read one input (q/k/v, gate/up) as one stacked weight in the captured step:
# one kernel for all of them (nf4_stack). False: a kernel a layer (the benchmarks compare the two).
NF4_STACK = True


def nf4_stack(layers, dtype) -> tuple[Spec, list] | None:
    """One repacked copy of bitsandbytes' nf4 `layers` (siblings of one input width: q/k/v, gate/up)
    stacked row-wise for nf4_mma_kernel, and each layer's rows (slices) of its output; or None where
    one of them is not taken (nf4_spec), the stack is of few rows (the fp32 kernel's, NF4_MMA_MAX_SMALL)
    or NF4_STACK is off. Each layer's rows start at a tile of 16 (padding rows are zeros), so a tile is
    one layer's (the adapter's terms: T_INDEX). Kept on the first layer until `forget`; the layers'
    own copies (nf4_spec) are not made.

    One launch for q/k/v instead of three, and the bigger grid is read faster: on an H100 the kernel
    read a 4096 x 4096 layer at 1.67 TB/s and an 11008 x 4096 one at 2.05 (session 21), and Qwen2's
    512-row k/v projections, stacked under q, leave the fp32 kernel's fixed cost."""
    import torch

    if not (NF4 and NF4_MMA and NF4_STACK) or len(layers) < 2 or dtype not in (torch.bfloat16, torch.float16):
        return None
    states = [getattr(layer.weight, "quant_state", None) for layer in layers]
    biases = [getattr(layer, "bias", None) for layer in layers]
    if any(type(layer).__name__ != "Linear4bit" or state is None or layer.weight.dtype != torch.uint8
           for layer, state in zip(layers, states)) or len({state.shape[1] for state in states}) != 1 \
            or any(bias is not None and bias.dtype != dtype for bias in biases):
        return None
    rows = [-(-state.shape[0] // 16) * 16 for state in states]
    if sum(rows) <= NF4_MMA_MAX_SMALL:
        return None
    key = tuple((layer.weight.data_ptr(), layer.weight._version) for layer in layers) + (dtype, NF4_MMA_MAX_SMALL)
    held = layers[0].__dict__.get(_NF4_STACK)
    if held is not None and held[0] == key:
        return held[1]
    layers[0].__dict__.pop(_NF4_STACK, None)
    found = _stack_nf4(layers, states, biases, rows, dtype)
    layers[0].__dict__[_NF4_STACK] = (key, found)
    return found


def stack_terms(spec: Spec, spans: list, bs: list):
    """The stacked layers' adapter terms as nf4_mma_kernel reads them: their (out, r) B's (scale folded
    in) in their rows of one (spec.out_features, r) B, zeros on the padding rows, and `t_index`, where
    each tile of 16 rows finds its layer's r values in `t` (layer i's at i r, as the A products stack)."""
    import torch

    rank = bs[0].shape[1]
    b = bs[0].new_zeros((spec.out_features, rank))
    index = []
    for member, (span, layer_b) in enumerate(zip(spans, bs)):
        b[span] = layer_b
        index += [member * rank] * -(-(span.stop - span.start) // 16)
    return b, torch.tensor(index, dtype=torch.int32, device=b.device)


def _stack_nf4(layers, states, biases, rows, dtype):
    import torch

    in_features = states[0].shape[1]
    total = sum(rows)
    decoded = []
    for layer, state in zip(layers, states):
        found = _nf4_codes(layer.weight, state, _copy_bytes(total, in_features))
        if found is None:
            return None
        decoded.append(found)
    spans, start = [], 0
    with torch.no_grad():
        codes = decoded[0][0].new_full((total, in_features), 7)  # code 7 is 0.0: padding rows give zeros
        scales = decoded[0][1].new_zeros((total, in_features // 64))
        bias = None if all(b is None for b in biases) else torch.zeros(total, dtype=dtype, device=codes.device)
        for (layer_codes, layer_scales), b, padded in zip(decoded, biases, rows):
            span = slice(start, start + layer_codes.shape[0])
            codes[span], scales[span] = layer_codes, layer_scales
            if b is not None:
                bias[span] = b.detach()
            spans.append(span)
            start += padded
        del decoded
        codes, scales = _mma_layout(codes, scales)
    return Spec(codes, total, in_features, bias, scales=scales, work=_work(codes)), spans


def _mma_layout(codes, scales):
    """nf4_mma_kernel's layout of (out, in) codes and their (out, in / 64) scales: rows padded to 16
    (code 7 is 0.0, scale 0); codes as (tiles of 16 rows, groups of 64 weights, 32 lanes x 4 words)
    int32, where code 4 p + 2 h + e of lane 4 r + c's word s is the weight of row r + 8 h at column
    16 c + 4 s + 2 p + e of the group (the mma's A fragment: registers of two weights, rows r, r + 8);
    scales as (tiles, groups, 8 x 2) fp16, rows r and r + 8 side by side."""
    import torch

    out_features, in_features = codes.shape
    tiles, groups = -(-out_features // 16), in_features // 64
    codes = torch.nn.functional.pad(codes, (0, 0, 0, tiles * 16 - out_features), value=7)
    scales = torch.nn.functional.pad(scales, (0, 0, 0, tiles * 16 - out_features))
    # (tile, h, r, group, c, s, p, e) -> (tile, group, r, c, s, p, h, e)
    codes = codes.reshape(tiles, 2, 8, groups, 4, 4, 2, 2).permute(0, 3, 2, 4, 5, 6, 1, 7).reshape(-1, 2)
    words = (codes[:, 0] | (codes[:, 1] << 4)).to(torch.uint8).contiguous().view(torch.int32)
    scales = scales.reshape(tiles, 2, 8, groups).permute(0, 3, 2, 1).to(torch.float16).contiguous()
    return words.reshape(tiles, groups, 128), scales.reshape(tiles, groups, 16)


def config(spec: Spec) -> tuple[int, int, int]:
    """(output rows a program computes, weights along a row it reads a loop, warps); for nf4 layers
    the second is groups of 128 weights a loop."""
    if spec.scales is not None and spec.weight.dim() == 3:  # (warps, groups a warp a loop, programs a tile)
        if interpreted():
            return 4, 1, 2
        # From bench/decode_kernels.py --nf4 --grid (H100, session 21): 4 warps of 4 groups a loop for
        # the 7B shapes' layers (1.3-2.1 TB/s), more warps for long rows (Llama's 11008: 8 x 2; Qwen2's
        # 18944: 16 x 1, 17.3 against 20.2 us). Splitting a tile over programs never won: each program
        # fills its own shared table (32 KB).
        groups = spec.weight.shape[1]
        return (16, 1, 1) if groups >= 256 else (8, 2, 1) if groups >= 128 else (4, 4, 1)
    if spec.scales is not None:
        if interpreted():
            return 16, 4, 4
        # From bench/decode_kernels.py --nf4 --grid (H100, session 20): one row a program, in one warp,
        # 1024 weights a loop for the 7B shapes' layers (1.09-1.26 TB/s of nf4 against bitsandbytes'
        # 1.0-1.05); four warps for Qwen2-7B's 512-row k/v projections (2.97 against 6.04 us).
        return (1, 8, 1) if spec.out_features > 1024 else (1, 8, 4)
    if interpreted():  # the interpreter runs one program after another: as few as it can
        return 16, 256, 4
    # From bench/decode_kernels.py --grid (H200): 4 rows of 1024 with 2 warps was the fastest for
    # the 7B shapes' layers, 2 rows of 2048 with 8 warps for Qwen2-7B's 512-row k/v projections.
    return (4, 1024, 2) if spec.out_features >= 2048 else (2, 2048, 8)


def gemv(x, spec: Spec, t=None, b=None, tuning: tuple[int, int, int] | None = None, t_index=None):
    """y = x W^T (+ bias) (+ t b^T) for one token `x` (any shape of in_features elements); `t`: the
    adapter's r values A x, `b`: its (out, r) B, scale folded in; `tuning`: config()'s choice overridden;
    `t_index` (nf4_stack's layers, each with its adapter): where in `t` each tile of 16 rows finds its r
    values (int32, one a tile).
    Inside torch.compile (graphdecode.StepGraph._compiling) the kernel is the custom op `register_op`
    made, which inductor calls as it is."""
    import torch

    if torch.compiler.is_compiling():
        return _OP(x, spec.weight, spec.bias, t, b, spec.scales, spec.work, t_index, spec.out_features)
    if spec.scales is not None:
        return _launch_nf4(x, spec.weight, spec.scales, spec.bias, t, b, spec.work, spec.out_features,
                           tuning or config(spec), t_index)
    return _launch(x, spec.weight, spec.bias, t, b, tuning or config(spec))


def _launch_nf4(x, codes, scales, bias, t, b, work, out_features: int, tuning: tuple[int, int, int], t_index=None):
    import torch
    import triton

    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the nf4 kernel takes bf16 or fp16 inputs, not {x.dtype}")
    if codes.dim() == 3:
        return _launch_nf4_mma(x, codes, scales, bias, t, b, work, out_features, tuning, t_index)
    if t_index is not None:
        raise ValueError("stacked layers' adapter terms (t_index) need the tensor-core kernel's layout")
    out_features, in_features = codes.shape[0], x.shape[-1]
    out = torch.empty((*x.shape[:-1], out_features), dtype=x.dtype, device=x.device)
    rank = 0 if t is None else b.shape[1]
    rows, groups, warps = tuning
    if x.data_ptr() % 4:  # the kernel reads the inputs as 32-bit pairs
        x = x.clone()
    unused = out
    table = _nf4_table(x.device) if interpreted() else unused  # the registers' table, in memory
    from ipylora.engine import gemv_kernels

    gemv_kernels.nf4_gemv_kernel[(triton.cdiv(out_features, rows),)](
        x.reshape(-1), codes, scales, out, bias if bias is not None else unused, t if t is not None else unused,
        b if b is not None else unused, table, out_features, in_features, codes.shape[1], scales.shape[1],
        *gemv_kernels.NF4_PLANES,
        HAS_BIAS=bias is not None, RANK=rank, RANK_P=triton.next_power_of_2(max(rank, 1)), BLOCK_N=rows,
        GROUPS=groups, BF16=x.dtype == torch.bfloat16, ASM=not interpreted(), num_warps=warps)
    return out


def _launch_nf4_mma(x, codes, scales, bias, t, b, work, out_features: int, tuning: tuple[int, int, int],
                    t_index=None):
    import torch
    import triton

    from ipylora.engine import gemv_kernels

    out = torch.empty((*x.shape[:-1], out_features), dtype=x.dtype, device=x.device)
    rank = 0 if t is None else b.shape[1]
    warps, unroll, split = tuning
    if not 1 <= split <= MAX_SPLIT:
        raise ValueError(f"the nf4 kernel splits a tile's groups over 1 to {MAX_SPLIT} programs, not {split}")
    if x.data_ptr() % 8:  # the kernel reads the inputs as 64-bit words
        x = x.clone()
    bf16 = x.dtype == torch.bfloat16
    unused = out
    table = _nf4_table(x.device, bf16) if interpreted() else unused  # the shared table's values, in memory
    gemv_kernels.nf4_mma_kernel[(codes.shape[0], split)](
        x.reshape(-1), codes, scales, out, bias if bias is not None else unused, t if t is not None else unused,
        b if b is not None else unused, table, work, t_index if t_index is not None else work, out_features,
        codes.shape[1], codes.shape[0], *_pair_planes(bf16), HAS_BIAS=bias is not None, RANK=rank,
        RANK_P=triton.next_power_of_2(max(rank, 1)), T_INDEX=t_index is not None and rank > 0, WARPS=warps,
        UNROLL=unroll, SPLIT=split,
        EVEN=codes.shape[1] % (split * warps * unroll) == 0, BF16=bf16, ASM=not interpreted(),
        PDL=_pdl(), num_warps=warps, **({"launch_pdl": True} if _pdl() else {}))
    return out


def _pdl() -> bool:
    """Whether the nf4 kernel is launched as a programmatic dependent launch (PDL)."""
    return PDL and not interpreted() and _pdl_supported()


@functools.cache
def _pdl_supported() -> bool:
    """Triton launches kernels with PDL (its `launch_pdl` option) and the GPU has it (Hopper or later)."""
    import torch

    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except Exception:  # another backend
        return False
    return "launch_pdl" in CUDAOptions.__dataclass_fields__ and torch.cuda.get_device_capability()[0] >= 9


@functools.cache
def _pair_planes(bf16: bool) -> tuple[int, ...]:
    from ipylora.engine import gemv_kernels

    return tuple(gemv_kernels.pair_planes(bf16))


@functools.cache
def _nf4_table(device, bf16: bool | None = None):
    import torch

    from ipylora.engine import gemv_kernels

    if bf16 is None:
        return torch.tensor(gemv_kernels.table_values(), dtype=torch.float32, device=device).view(torch.int32)
    values = torch.tensor(gemv_kernels.NF4).to(torch.bfloat16 if bf16 else torch.float16).float()
    return values.to(device)


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

    def kernel(x, weight, bias, t, b, scales, work, t_index, out_features):
        spec = Spec(weight, out_features, x.shape[-1], bias, scales, work)
        if scales is not None:
            return _launch_nf4(x, weight, scales, bias, t, b, work, out_features, config(spec), t_index)
        return _launch(x, weight, bias, t, b, config(spec))

    # `work` is written by the kernel, but only between its programs: zeros before and after a call.
    op = torch.library.custom_op("ipylora::gemv", kernel, mutates_args=(),
                                 schema="(Tensor x, Tensor weight, Tensor? bias, Tensor? t, Tensor? b, Tensor? scales,"
                                        " Tensor? work, Tensor? t_index, int out_features) -> Tensor")

    @op.register_fake
    def _(x, weight, bias, t, b, scales, work, t_index, out_features):
        return x.new_empty((*x.shape[:-1], out_features))

    _OP = op


def forget(model) -> None:
    """Drop the repacked nf4 copies nf4_spec keeps on `model`'s layers (training wants the memory)."""
    for module in model.modules():
        module.__dict__.pop(_NF4, None)
        module.__dict__.pop(_NF4_STACK, None)


@functools.cache
def _kernel():
    from ipylora.engine import gemv_kernels  # imports Triton (decorating while TRITON_INTERPRET is read)

    return gemv_kernels.gemv_kernel
