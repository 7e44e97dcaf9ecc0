"""The Triton kernels of gemv.py (bf16/fp16 layers, and nf4 layers repacked by gemv.nf4_spec), in a
module of their own so that importing Triton waits for the first captured decode step."""

import triton
import triton.language as tl


@triton.jit
def _store(total, rows, row_ok, y_ptr, bias_ptr, t_ptr, b_ptr, HAS_BIAS: tl.constexpr, RANK: tl.constexpr,
           RANK_P: tl.constexpr):
    """y[rows] = total (+ bias) (+ B t), rounded once to y's dtype."""
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
    _store(total, rows, row_ok, y_ptr, bias_ptr, t_ptr, b_ptr, HAS_BIAS, RANK, RANK_P)


# bitsandbytes' nf4 code book (bitsandbytes.functional.get_4bit_type("nf4")); gemv.nf4_spec checks a
# layer's against it.
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0)


def _pattern_value(h: int) -> float:
    """The fp32 whose bits are (h << 16 | h): what the lookup below builds from a code's two bytes."""
    import struct

    return struct.unpack("<f", struct.pack("<I", h << 16 | h))[0]


def _halves(values) -> list[int]:
    """Per code value v, the 16 bits h whose _pattern_value is nearest v: the lookup builds each
    weight as that pattern from two bytes (the low half repeats the high one, so no instruction
    clears it). At most 0.27% from v for nf4, as bf16's rounding is (0.31%)."""
    import struct

    halves = []
    for v in values:
        top = struct.unpack("<I", struct.pack("<f", v))[0] >> 16
        halves.append(min(range(max(0, top - 2), min(0xFFFF, top + 2) + 1), key=lambda h: abs(_pattern_value(h) - v)))
    return halves


def table_values(values=NF4) -> list[float]:
    """The fp32 weights the lookup gives for codes 0-15 (the interpreter's path reads them from memory)."""
    return [_pattern_value(h) for h in _halves(values)]


def table_planes(values=NF4) -> list[int]:
    """The lookup's table as 8 signed 32-bit words: the 16 entries' low bytes, then their high bytes."""
    halves = _halves(values)
    planes = [h & 0xFF for h in halves] + [h >> 8 for h in halves]
    words = [planes[i] | planes[i + 1] << 8 | planes[i + 2] << 16 | planes[i + 3] << 24 for i in range(0, 32, 4)]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


def _lookup_asm() -> str:
    """PTX turning one 32-bit word of 8 codes (code k in bits 4k..4k+3, $8) into their weights' fp32
    bits ($0-$7), as Triton's inline_asm_elementwise calls it. The 16 entries' low and high bytes are
    two 16-byte tables held in registers ($9-$16: table_planes, passed as the kernel's arguments);
    prmt picks 4 bytes at a time by 3-bit selectors (one prmt per half of a table), a third prmt takes
    each byte from the half its code's top bit names, and a last prmt per weight puts its two bytes in
    place: about 27 instructions for 8 weights, where a table in memory costs a load a code (the
    session-12 kernel, 0.3 TB/s)."""
    lines = [".reg .b32 s, m, a, b, lo, hi, q;"]
    for half, source in ((0, "$8"), (1, "q")):
        if half:
            lines.append("shr.b32 q, $8, 16;")  # codes 4-7: prmt reads 16 bits of selectors
        lines += [f"and.b32 s, {source}, 0x7777;",  # each code's low 3 bits (the selectors' sign bits clear)
                  f"shr.b32 m, {source}, 1;", "and.b32 m, m, 0x4444;", "or.b32 m, m, 0x3210;",  # byte i or i + 4
                  "prmt.b32 a, $9, $10, s;", "prmt.b32 b, $11, $12, s;", "prmt.b32 lo, a, b, m;",
                  "prmt.b32 a, $13, $14, s;", "prmt.b32 b, $15, $16, s;", "prmt.b32 hi, a, b, m;"]
        for i in range(4):
            selector = (i + 4) << 12 | i << 8 | (i + 4) << 4 | i  # bytes lo_i, hi_i, lo_i, hi_i
            lines.append(f"prmt.b32 ${4 * half + i}, lo, hi, {selector:#06x};")
    return "{\n" + "\n".join(lines) + "\n}"


NF4_LOOKUP: tl.constexpr = tl.constexpr(_lookup_asm())
NF4_PLANES = table_planes()


@triton.jit
def _code(table_ptr, q, k: tl.constexpr):
    """Code k of each word of `q`, as its weight's fp32 bits read from the table in memory."""
    return tl.load(table_ptr + ((q >> (4 * k)) & 15))


@triton.jit
def _pair_term(acc, w_even, w_odd, pairs, scale, BF16: tl.constexpr):
    """acc + scale (w_even x_even + w_odd x_odd), the weights given as their fp32 bits, for the inputs'
    pairs read as 32-bit words (x_even the low half; a bf16's fp32 is its bits shifted up, an fp16 is
    converted)."""
    w_even = w_even.to(tl.float32, bitcast=True)
    w_odd = w_odd.to(tl.float32, bitcast=True)
    if BF16:
        x_even = (pairs << 16).to(tl.float32, bitcast=True)
        x_odd = (pairs & -65536).to(tl.float32, bitcast=True)
    else:
        x_even = (pairs & 65535).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        x_odd = ((pairs >> 16) & 65535).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return acc + (w_even * x_even + w_odd * x_odd) * scale[:, :, None]


@triton.jit
def nf4_gemv_kernel(x_ptr, q_ptr, s_ptr, y_ptr, bias_ptr, t_ptr, b_ptr, table_ptr, N, K, ROW_WORDS, BLOCKS,
                    l0, l1, l2, l3, h0, h1, h2, h3,
                    HAS_BIAS: tl.constexpr, RANK: tl.constexpr, RANK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                    GROUPS: tl.constexpr, BF16: tl.constexpr, ASM: tl.constexpr):
    """BLOCK_N rows of y = W x (+ bias) (+ B t) for a 4-bit layer repacked by gemv.nf4_spec (l0-h3:
    NF4_PLANES, the lookup's table), with
    bf16 or fp16 inputs `x` (K even): q is (N, ROW_WORDS) int32, 16 words per 128 weights of a row; code
    2m + p (bits 8m + 4p..) of word v of group g is weight 128 g + 2 (16 m + v) + p, so that codes
    2m and 2m + 1 of a group's 16 words meet 16 consecutive pairs of inputs, and codes 0-3 one scale,
    4-7 the next (s: (N, BLOCKS) fp16, one per 64 weights). GROUPS groups a loop, accumulated in fp32."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    groups = tl.arange(0, GROUPS)
    lanes = tl.arange(0, 16)
    acc = tl.zeros((BLOCK_N, GROUPS, 16), dtype=tl.float32)
    x_pairs = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    PAIRS = K // 2
    for start in range(0, ROW_WORDS // 16, GROUPS):
        group = start + groups
        group_ok = group < ROW_WORDS // 16
        q = tl.load(q_ptr + rows[:, None, None] * ROW_WORDS + group[None, :, None] * 16 + lanes[None, None, :],
                    mask=row_ok[:, None, None] & group_ok[None, :, None], other=0)
        # The input pair of codes 0 and 1, for every row: a load of q's shape takes q's layout, where
        # one broadcast over the rows would be moved between layouts through shared memory (a
        # barrier a load; the rows' reads of one pair then come from L1).
        pair = rows[:, None, None] * 0 + group[None, :, None] * 64 + lanes[None, None, :]
        scale_at = s_ptr + rows[:, None] * BLOCKS + 2 * group[None, :]
        scale_ok = row_ok[:, None] & group_ok[None, :]
        s_first = tl.load(scale_at, mask=scale_ok, other=0.0).to(tl.float32)
        s_second = tl.load(scale_at + 1, mask=scale_ok, other=0.0).to(tl.float32)
        x0 = tl.load(x_pairs + pair, mask=pair < PAIRS, other=0)
        x1 = tl.load(x_pairs + pair + 16, mask=pair + 16 < PAIRS, other=0)
        x2 = tl.load(x_pairs + pair + 32, mask=pair + 32 < PAIRS, other=0)
        x3 = tl.load(x_pairs + pair + 48, mask=pair + 48 < PAIRS, other=0)
        if ASM:
            w = tl.inline_asm_elementwise(NF4_LOOKUP, "=r,=r,=r,=r,=r,=r,=r,=r," + "r," * 8 + "r",
                                          [q, l0, l1, l2, l3, h0, h1, h2, h3], dtype=(tl.int32,) * 8,
                                          is_pure=True, pack=1)
            acc = _pair_term(acc, w[0], w[1], x0, s_first, BF16)
            acc = _pair_term(acc, w[2], w[3], x1, s_first, BF16)
            acc = _pair_term(acc, w[4], w[5], x2, s_second, BF16)
            acc = _pair_term(acc, w[6], w[7], x3, s_second, BF16)
        else:  # the interpreter: the same weights' bits, from the table in memory
            acc = _pair_term(acc, _code(table_ptr, q, 0), _code(table_ptr, q, 1), x0, s_first, BF16)
            acc = _pair_term(acc, _code(table_ptr, q, 2), _code(table_ptr, q, 3), x1, s_first, BF16)
            acc = _pair_term(acc, _code(table_ptr, q, 4), _code(table_ptr, q, 5), x2, s_second, BF16)
            acc = _pair_term(acc, _code(table_ptr, q, 6), _code(table_ptr, q, 7), x3, s_second, BF16)
    total = tl.sum(tl.sum(acc, axis=2), axis=1)
    _store(total, rows, row_ok, y_ptr, bias_ptr, t_ptr, b_ptr, HAS_BIAS, RANK, RANK_P)
