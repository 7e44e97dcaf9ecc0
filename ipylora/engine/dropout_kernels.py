"""Triton kernels for LoRA's A product with its dropout inside (dropout.FusedDropoutLinear), in a
module of their own so that importing Triton waits for their first use.

The mask is not stored: element (m, k) of an (M, K) input is kept where the low 16 bits of
fmix32((m * K + k) ^ fmix32(seed)) are at least `threshold` (MurmurHash3's finalizer, a few integer
operations, against Philox's ten rounds in PyTorch's dropout), and every kernel computes it again
for the elements it reads. Kept elements are scaled by 65536 / (65536 - threshold), so that the
expectation is the input's.
"""

import triton
import triton.language as tl


@triton.jit
def _fmix32(h):
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _keep(seed_ptr, rows, columns, K, threshold):
    """Whether each element (rows[:, None], columns[None, :]) survives the dropout."""
    seed = _fmix32(tl.load(seed_ptr).to(tl.uint32))
    index = (rows[:, None] * K + columns[None, :]).to(tl.uint32)
    return (_fmix32(index ^ seed) & 0xFFFF) >= threshold


@triton.jit
def dropout_a_forward(x_ptr, a_ptr, t_ptr, seed_ptr, M, K, R, threshold, scale,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                      PRECISION: tl.constexpr):
    """t[M, R] = (dropout(x) [M, K]) @ A^T, A [R, K]: BLOCK_M rows of x a program, K in chunks."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        columns = start + tl.arange(0, BLOCK_K)
        inside = (rows[:, None] < M) & (columns[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * K + columns[None, :], mask=inside, other=0.0)
        keep = _keep(seed_ptr, rows, columns, K, threshold)
        x = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(a_ptr.dtype.element_ty)
        a = tl.load(a_ptr + ranks[None, :] * K + columns[:, None], mask=(ranks[None, :] < R) & (columns[:, None] < K),
                    other=0.0)  # (BLOCK_K, BLOCK_R): A transposed
        acc += tl.dot(x, a, input_precision=PRECISION)
    tl.store(t_ptr + rows[:, None] * R + ranks[None, :], acc.to(t_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (ranks[None, :] < R))


@triton.jit
def dropout_a_grad_input(g_ptr, a_ptr, gx_ptr, seed_ptr, M, K, R, threshold, scale,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                         PRECISION: tl.constexpr):
    """grad x[M, K] = dropout'(g [M, R] @ A [R, K]): the same mask and scale as the forward pass."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    columns = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, BLOCK_R)
    g = tl.load(g_ptr + rows[:, None] * R + ranks[None, :], mask=(rows[:, None] < M) & (ranks[None, :] < R), other=0.0)
    a = tl.load(a_ptr + ranks[:, None] * K + columns[None, :], mask=(ranks[:, None] < R) & (columns[None, :] < K),
                other=0.0)
    product = tl.dot(g.to(a.dtype), a, input_precision=PRECISION)
    keep = _keep(seed_ptr, rows, columns, K, threshold)
    out = tl.where(keep, product * scale, 0.0)
    tl.store(gx_ptr + rows[:, None] * K + columns[None, :], out.to(gx_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (columns[None, :] < K))


@triton.jit
def dropout_a_grad_weight(g_ptr, x_ptr, ga_ptr, seed_ptr, M, K, R, threshold, scale, rows_per_split,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                         PRECISION: tl.constexpr):
    """One split's share of grad A[R, K] = g^T [R, M] @ dropout(x) [M, K], over its `rows_per_split`
    rows of M, written to ga[split] (fp32; the splits are summed after)."""
    columns = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(1)
    ranks = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    first = split * rows_per_split
    for start in range(first, first + rows_per_split, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        inside = rows < tl.minimum(M, first + rows_per_split)
        x = tl.load(x_ptr + rows[:, None] * K + columns[None, :], mask=inside[:, None] & (columns[None, :] < K),
                    other=0.0)
        keep = _keep(seed_ptr, rows, columns, K, threshold)
        x = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(g_ptr.dtype.element_ty)
        g = tl.load(g_ptr + rows[None, :] * R + ranks[:, None], mask=inside[None, :] & (ranks[:, None] < R),
                    other=0.0)  # (BLOCK_R, BLOCK_M): g transposed
        acc += tl.dot(g, x, input_precision=PRECISION)
    tl.store(ga_ptr + split * R * K + ranks[:, None] * K + columns[None, :], acc,
             mask=(ranks[:, None] < R) & (columns[None, :] < K))
