"""The Triton kernels of gemv.py (bf16/fp16 layers, and nf4 layers repacked by gemv.nf4_spec), in a
module of their own so that importing Triton waits for the first captured decode step."""

import triton
import triton.language as tl


@triton.jit
def _extra_loads(rows, row_ok, bias_ptr, b_ptr, HAS_BIAS: tl.constexpr, RANK: tl.constexpr, RANK_P: tl.constexpr):
    """The layer's own part of what _extra adds: (bias at `rows`, B's rows; zeros where absent)."""
    bias = tl.zeros(rows.shape, dtype=bias_ptr.dtype.element_ty)
    bw = tl.zeros((rows.shape[0], RANK_P), dtype=b_ptr.dtype.element_ty)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows, mask=row_ok, other=0.0)
    if RANK > 0:
        ranks = tl.arange(0, RANK_P)
        bw = tl.load(b_ptr + rows[:, None] * RANK + ranks[None, :], mask=row_ok[:, None] & (ranks < RANK)[None, :],
                     other=0.0)
    return bias, bw


@triton.jit
def _rank_values(t_ptr, RANK: tl.constexpr, RANK_P: tl.constexpr):
    """The adapter's t = A x (zeros without one): an input, computed by the kernel before this one."""
    ranks = tl.arange(0, RANK_P)
    if RANK > 0:
        return tl.load(t_ptr + ranks, mask=ranks < RANK, other=0.0)
    return tl.zeros((RANK_P,), dtype=t_ptr.dtype.element_ty)


@triton.jit
def _extra(total, bias, t, bw, HAS_BIAS: tl.constexpr, RANK: tl.constexpr):
    """total (+ bias) (+ B t), in fp32, from _extra_loads' values."""
    if HAS_BIAS:
        total += bias.to(tl.float32)
    if RANK > 0:
        total += tl.sum(bw.to(tl.float32) * t.to(tl.float32)[None, :], axis=1)
    return total


@triton.jit
def _store(total, rows, row_ok, y_ptr, bias_ptr, t_ptr, b_ptr, HAS_BIAS: tl.constexpr, RANK: tl.constexpr,
           RANK_P: tl.constexpr):
    """y[rows] = total (+ bias) (+ B t), rounded once to y's dtype."""
    bias, bw = _extra_loads(rows, row_ok, bias_ptr, b_ptr, HAS_BIAS, RANK, RANK_P)
    total = _extra(total, bias, _rank_values(t_ptr, RANK, RANK_P), bw, HAS_BIAS, RANK)
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


def _pairs_asm(word: str, out: list[str], planes: list[str]) -> list[str]:
    """PTX turning the 32-bit word `word` of 8 codes (code k in bits 4k..4k+3) into 4 registers of two
    16-bit weights each (`out`; register p holds codes 2p and 2p + 1, the first in its low half), the
    entries' low and high bytes read from the 8 registers `planes` (pair_planes)."""
    lines = []
    for half in (0, 1):
        source = word
        if half:
            lines.append(f"shr.b32 q, {word}, 16;")  # codes 4-7: prmt reads 16 bits of selectors
            source = "q"
        lines += [f"and.b32 s, {source}, 0x7777;",  # each code's low 3 bits (the selectors' sign bits clear)
                  f"shr.b32 m, {source}, 1;", "and.b32 m, m, 0x4444;", "or.b32 m, m, 0x3210;",  # byte i or i + 4
                  f"prmt.b32 a, {planes[0]}, {planes[1]}, s;", f"prmt.b32 b, {planes[2]}, {planes[3]}, s;",
                  "prmt.b32 lo, a, b, m;",
                  f"prmt.b32 a, {planes[4]}, {planes[5]}, s;", f"prmt.b32 b, {planes[6]}, {planes[7]}, s;",
                  "prmt.b32 hi, a, b, m;",
                  f"prmt.b32 {out[2 * half]}, lo, hi, 0x5140;",  # bytes lo_0, hi_0, lo_1, hi_1
                  f"prmt.b32 {out[2 * half + 1]}, lo, hi, 0x7362;"]  # lo_2, hi_2, lo_3, hi_3
    return lines


def _mma_table_asm(bf16: bool) -> str:
    """PTX for one scale group of a warp's 16 rows (nf4_mma_kernel): this lane's 4 words ($2, $3: two
    64-bit pairs of them) looked up in the shared table (each byte, two codes, picks the register of
    their two 16-bit weights from copy `lane` of 32, one a memory bank, so a warp's 32 reads take one
    pass; $11: 4 lane, $12: the table's address) and multiplied with the inputs' pairs ($4-$7) by 4
    tensor-core mma steps (m16n8k16, fp32 sums), then its two rows' sums scaled ($8: the two fp16
    scales) onto the running sums ($9, $10 -> $0, $1)."""
    kind = "bf16" if bf16 else "f16"
    lines = [".reg .b32 t, w<4>, x<8>, v<16>;", ".reg .b16 sg, sh;", ".reg .f32 c<4>, fg, fh, z;",
             "mov.b64 {w0, w1}, $2;", "mov.b64 {w2, w3}, $3;"]
    lines += [f"mov.b64 {{x{2 * i}, x{2 * i + 1}}}, ${4 + i};" for i in range(4)]
    lines.append("mov.f32 z, 0f00000000;")
    for step in range(4):
        for p in range(4):  # byte p of the word, times the table's 128 bytes an entry
            lines.append(f"shl.b32 t, w{step}, 7;" if p == 0 else f"shr.b32 t, w{step}, {8 * p - 7};")
            lines += ["and.b32 t, t, 0x7F80;", "or.b32 t, t, $11;", "add.u32 t, t, $12;",
                      f"ld.shared.b32 v{4 * step + p}, [t];"]
        a = ", ".join(f"v{4 * step + i}" for i in range(4))
        c = "z, z, z, z" if step == 0 else "c0, c1, c2, c3"
        lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32 {{c0, c1, c2, c3}}, {{{a}}}, "
                     f"{{x{2 * step}, x{2 * step + 1}}}, {{{c}}};")
    lines += ["mov.b32 {sg, sh}, $8;", "cvt.f32.f16 fg, sg;", "cvt.f32.f16 fh, sh;",
              "fma.rn.f32 $0, c0, fg, $9;", "fma.rn.f32 $1, c2, fh, $10;"]
    return "{\n" + "\n".join(lines) + "\n}"


# The table in shared memory: 256 entries (a byte of two codes) x 32 copies x 4 bytes, declared in the
# one asm that gives its address (every asm is a scope of its own, so the others are handed it).
TABLE_BASE: tl.constexpr = tl.constexpr("{\n.shared .align 16 .b8 ipylora_nf4_table[32768];\n"
                                        "mov.u32 $0, ipylora_nf4_table;\n}")


def _fill_asm() -> str:
    """PTX storing entry $2 (its two codes' weights, by _pairs_asm from the planes $3-$10) into 4 copies
    at shared address $1 ($0: unused)."""
    lines = [".reg .b32 q, s, m, a, b, lo, hi, v<4>;"]
    lines += _pairs_asm("$2", ["v0", "v1", "v2", "v3"], [f"${3 + i}" for i in range(8)])
    lines += ["st.shared.v4.b32 [$1], {v0, v0, v0, v0};", "mov.u32 $0, 0;"]
    return "{\n" + "\n".join(lines) + "\n}"


NF4_TABLE_BF16: tl.constexpr = tl.constexpr(_mma_table_asm(True))
NF4_TABLE_FP16: tl.constexpr = tl.constexpr(_mma_table_asm(False))
NF4_FILL: tl.constexpr = tl.constexpr(_fill_asm())


def pair_planes(bf16: bool, values=NF4) -> list[int]:
    """The table of nf4_mma_kernel's lookup: the code book's values as bf16 (or fp16), their 16 low
    bytes then their 16 high bytes, as 8 signed 32-bit words."""
    import torch

    halves = torch.tensor(values, dtype=torch.bfloat16 if bf16 else torch.float16).view(torch.int16).tolist()
    halves = [h & 0xFFFF for h in halves]
    planes = [h & 0xFF for h in halves] + [h >> 8 for h in halves]
    words = [planes[i] | planes[i + 1] << 8 | planes[i + 2] << 16 | planes[i + 3] << 24 for i in range(0, 32, 4)]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


@triton.jit
def _half_value(bits, BF16: tl.constexpr):
    """The float of 16-bit patterns held in the low halves of int32 `bits`."""
    if BF16:
        return (bits << 16).to(tl.float32, bitcast=True)
    return (bits & 65535).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _word_sums(table_ptr, word, x_pairs, BF16: tl.constexpr):
    """The interpreter's view of one word of nf4_mma_kernel: (row g, row g + 8) sums of its codes times
    the step's two input pairs (x_pairs, 64-bit), the code book read from memory."""
    x_first = (x_pairs & 0xFFFFFFFF).to(tl.int32)
    x_second = (x_pairs >> 32).to(tl.int32)
    xs = (_half_value(x_first, BF16), _half_value(x_first >> 16, BF16), _half_value(x_second, BF16),
          _half_value(x_second >> 16, BF16))
    first = _entry(table_ptr, word, 0) * xs[0] + _entry(table_ptr, word, 1) * xs[1] \
        + _entry(table_ptr, word, 4) * xs[2] + _entry(table_ptr, word, 5) * xs[3]
    second = _entry(table_ptr, word, 2) * xs[0] + _entry(table_ptr, word, 3) * xs[1] \
        + _entry(table_ptr, word, 6) * xs[2] + _entry(table_ptr, word, 7) * xs[3]
    return first, second


@triton.jit
def _entry(table_ptr, word, k: tl.constexpr):
    """Code k of each word, as the float the table in memory holds for it."""
    return tl.load(table_ptr + ((word >> (4 * k)) & 15))


@triton.jit
def _store_tile(first, second, rows, N, y_ptr, bias_first, bias_second, t, b_first, b_second,
                HAS_BIAS: tl.constexpr, RANK: tl.constexpr):
    """y at a tile's rows r and r + 8 (`rows`: its first 8): the sums (+ bias) (+ B t), rounded once."""
    tl.store(y_ptr + rows, _extra(first, bias_first, t, b_first, HAS_BIAS, RANK).to(y_ptr.dtype.element_ty),
             mask=rows < N)
    tl.store(y_ptr + rows + 8, _extra(second, bias_second, t, b_second, HAS_BIAS, RANK).to(y_ptr.dtype.element_ty),
             mask=rows + 8 < N)


@triton.jit
def nf4_mma_kernel(x_ptr, q_ptr, s_ptr, y_ptr, bias_ptr, t_ptr, b_ptr, table_ptr, work_ptr, index_ptr, N, GROUPS,
                   TILES, l0, l1, l2, l3, h0, h1, h2, h3,
                   HAS_BIAS: tl.constexpr, RANK: tl.constexpr, RANK_P: tl.constexpr, T_INDEX: tl.constexpr,
                   WARPS: tl.constexpr,
                   UNROLL: tl.constexpr, SPLIT: tl.constexpr, EVEN: tl.constexpr, BF16: tl.constexpr,
                   ASM: tl.constexpr, PDL: tl.constexpr):
    """16 rows of y = W x (+ bias) (+ B t) for a 4-bit layer repacked by gemv.nf4_spec's mma layout, on
    the tensor cores: each program's WARPS warps split the row tile's GROUPS scale groups (64 weights
    of 16 rows, 512 bytes of codes), UNROLL groups a warp a loop. In a group, lane l = 4 r + c holds 4
    words (one mma step each: q, int64 pairs of words) for rows r and r + 8 and the group's inputs
    16 c .. 16 c + 15 (x, as int64 pairs of input pairs), and the two rows' scales (s, an fp16 pair).
    Every tensor here is one element a thread (shape [32 WARPS], Triton's default layout), so element
    i is lane i % 32 of warp i // 32, which is what the mma's register fragments ask of the lanes.

    SPLIT > 1 splits the groups over that many programs a tile as well (for layers of few rows, which
    would leave most of the GPU idle; on an H100 it never won, as each program fills its own table):
    each writes its rows' sums to `work` (int32 counters, one a
    tile, then SPLIT x (16 TILES) fp32 sums) and counts itself in; the last of a tile adds the sums,
    stores y and sets the counter back to 0 for the next call.

    T_INDEX: sibling layers stacked into one (gemv.nf4_stack: q/k/v, gate/up), each with its adapter;
    `t` holds their t's one after another, and `index` (int32, one a tile) where a tile's layer's start."""
    tile = tl.program_id(0)
    part = tl.program_id(1)
    share = tl.cdiv(GROUPS, SPLIT)
    thread = tl.arange(0, 32 * WARPS)
    warp = thread // 32
    lane = thread % 32
    q_words = q_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
    x_words = x_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
    scales = s_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    rows = tile * 16 + tl.arange(0, 8)
    if PDL:  # the next kernel may start its own preamble (it waits for this one before reading y)
        tl.inline_asm_elementwise("griddepcontrol.launch_dependents;\nmov.u32 $0, 0;", "=r,r", [thread],
                                  dtype=tl.int32, is_pure=False, pack=1)
    # The bias and B's loads first (their sums last): their latency passes under the table's fill and the
    # loop.
    bias_first, b_first = _extra_loads(rows, rows < N, bias_ptr, b_ptr, HAS_BIAS, RANK, RANK_P)
    bias_second, b_second = _extra_loads(rows + 8, rows + 8 < N, bias_ptr, b_ptr, HAS_BIAS, RANK, RANK_P)
    first = tl.zeros((32 * WARPS,), dtype=tl.float32)
    second = tl.zeros((32 * WARPS,), dtype=tl.float32)
    if ASM:  # fill the shared table: 2048 stores of 4 copies, spread over the threads
        base = tl.inline_asm_elementwise(TABLE_BASE, "=r,r", [thread], dtype=tl.int32, is_pure=False, pack=1)
        for k in tl.static_range(2048 // (32 * WARPS)):
            slot = thread + k * 32 * WARPS
            tl.inline_asm_elementwise(NF4_FILL, "=r,r,r" + ",r" * 8,
                                      [base + (slot // 8) * 128 + (slot % 8) * 16, slot // 8,
                                       l0, l1, l2, l3, h0, h1, h2, h3], dtype=tl.int32, is_pure=False, pack=1)
        tl.debug_barrier()
    end = tl.minimum(part * share + share, GROUPS)
    if PDL:  # the codes of the first loop on their way to L2, then wait for the kernel that wrote x and t
        for u in tl.static_range(UNROLL):
            group = part * share + u * WARPS + warp
            at = tl.where(group < end, (tile * GROUPS + group) * 32 + lane, 0)
            tl.inline_asm_elementwise("prefetch.global.L2 [$1];\nmov.u32 $0, 0;", "=r,l", [q_words + 2 * at],
                                      dtype=tl.int32, is_pure=False, pack=1)
        tl.inline_asm_elementwise("griddepcontrol.wait;\nmov.u32 $0, 0;", "=r,r", [thread], dtype=tl.int32,
                                  is_pure=False, pack=1)
    t_at = t_ptr
    if T_INDEX:
        t_at = t_ptr + tl.load(index_ptr + tile)
    t = _rank_values(t_at, RANK, RANK_P)
    for start in range(part * share, end, WARPS * UNROLL):
        for u in tl.static_range(UNROLL):
            group = start + u * WARPS + warp
            ok = None if EVEN else group < end  # EVEN: every warp's groups are whole loops
            zero = None if EVEN else 0
            at = (tile * GROUPS + group) * 32 + lane
            qa = tl.load(q_words + 2 * at, mask=ok, other=zero)
            qb = tl.load(q_words + 2 * at + 1, mask=ok, other=zero)
            x_at = x_words + group * 16 + (lane % 4) * 4
            x0 = tl.load(x_at, mask=ok, other=zero)
            x1 = tl.load(x_at + 1, mask=ok, other=zero)
            x2 = tl.load(x_at + 2, mask=ok, other=zero)
            x3 = tl.load(x_at + 3, mask=ok, other=zero)
            s = tl.load(scales + (tile * GROUPS + group) * 8 + lane // 4, mask=ok, other=zero)
            if ASM:
                first, second = tl.inline_asm_elementwise(
                    NF4_TABLE_BF16 if BF16 else NF4_TABLE_FP16, "=f,=f,l,l,l,l,l,l,r,f,f,r,r",
                    [qa, qb, x0, x1, x2, x3, s, first, second, lane * 4, base], dtype=(tl.float32, tl.float32),
                    is_pure=True, pack=1)  # reads the table only after the fill's barrier (its inputs load after)
            else:  # the interpreter: this lane's share of the sums (the mma adds the four lanes of a row)
                f0, s0 = _word_sums(table_ptr, (qa & 0xFFFFFFFF).to(tl.int32), x0, BF16)
                f1, s1 = _word_sums(table_ptr, (qa >> 32).to(tl.int32), x1, BF16)
                f2, s2 = _word_sums(table_ptr, (qb & 0xFFFFFFFF).to(tl.int32), x2, BF16)
                f3, s3 = _word_sums(table_ptr, (qb >> 32).to(tl.int32), x3, BF16)
                first += (f0 + f1 + f2 + f3) * _half_value(s, False)
                second += (s0 + s1 + s2 + s3) * _half_value(s >> 16, False)
    # Sum the warps; every lane of a row holds its sum from the mma (the interpreter's lanes hold parts)
    first = tl.sum(tl.reshape(first, (WARPS, 8, 4)), axis=0)
    second = tl.sum(tl.reshape(second, (WARPS, 8, 4)), axis=0)
    if ASM:
        lead = tl.arange(0, 4)[None, :] == 0
        first = tl.sum(tl.where(lead, first, 0.0), axis=1)
        second = tl.sum(tl.where(lead, second, 0.0), axis=1)
    else:
        first = tl.sum(first, axis=1)
        second = tl.sum(second, axis=1)
    if SPLIT > 1:
        sums = (work_ptr + TILES).to(tl.pointer_type(tl.float32), bitcast=True) + rows
        tl.store(sums + part * 16 * TILES, first)
        tl.store(sums + part * 16 * TILES + 8, second)
        tl.debug_barrier()  # every thread's sums stored before the count says so
        if tl.atomic_add(work_ptr + tile, 1, sem="acq_rel", scope="gpu") == SPLIT - 1:
            tl.debug_barrier()
            first = tl.zeros((8,), dtype=tl.float32)
            second = tl.zeros((8,), dtype=tl.float32)
            for other in tl.static_range(SPLIT):  # past L1, which may hold an earlier call's sums
                first += tl.load(sums + other * 16 * TILES, cache_modifier=".cg")
                second += tl.load(sums + other * 16 * TILES + 8, cache_modifier=".cg")
            tl.atomic_xchg(work_ptr + tile, 0)
            _store_tile(first, second, rows, N, y_ptr, bias_first, bias_second, t, b_first, b_second, HAS_BIAS, RANK)
    else:
        _store_tile(first, second, rows, N, y_ptr, bias_first, bias_second, t, b_first, b_second, HAS_BIAS, RANK)
