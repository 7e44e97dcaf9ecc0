"""The Triton kernel of gemv.py, in a module of its own so that importing Triton waits for the first
captured decode step."""

import triton
import triton.language as tl


@triton.jit
def gemv_kernel(x_ptr, w_ptr, y_ptr, bias_ptr, t_ptr, b_ptr, N, K, HAS_BIAS: tl.constexpr, RANK: tl.constexpr,
                RANK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """BLOCK_N rows of y = W x (+ bias) (+ B t): each program reads its rows BLOCK_K weights at a time,
    accumulating in fp32, and sums once at the end."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    columns = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        column = start + columns
        column_ok = column < K
        w = tl.load(w_ptr + rows[:, None] * K + column[None, :], mask=row_ok[:, None] & column_ok[None, :], other=0.0)
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
