"""Triton paged attention over aquakv slots that never decodes a key: the fused-kernel mode (``key_rope="post"``).

With post-RoPE keys k_t = b_k + A^T y_t (A = diag(signs) H / sqrt(h) the codec's rotation, y_t = grid[code_t] *
scale_t / sqrt(h) the token's dequantized Hadamard-domain residual), a score is

    q . k_t = q . b_k + (q A) . grid[code_t] * scale_t / sqrt(h)

so each program rotates its queries once (exact +-1 products of diag(s) H on tensor cores, in the query's dtype) and
every cached key costs a table lookup and a dot product on tensor cores: no inverse Hadamard and no RoPE per cached token.  Values are summed in the
Hadamard domain too (sum_t p_t scale_t grid[code_t]) and rotated once per query; a per-head value predictor from the
same layer's keys, v_t = b_v + k_t W + A^T y^v_t, is linear in k_t, so it is applied once per query to the
softmax-weighted key sum.  With a key channel scale D (``AquaKVConfig.key_channel_scale``) the codes hold D (k_t - b_k):
k_t = b_k + (A^T y_t) / D, so each program rotates q / D instead of q (q . b_k keeps q), and the key sum is divided by
D before the value predictor reads it: still nothing per cached token.

Uniform 2-bit codes (grid u1n4: grid[c] = g0 + step c) need no table in decode launches: code c is taken as the
float16 subnormal c 2^-24, which the tensor cores multiply exactly, and g0 / step are applied per query
(``_uniform_lane``, ``_uniform_terms``).  Other grids, and 64-row launches of uniform codes (``launch_lanes``), decode a
code byte by one or two gathers from a lane table of at most 256 entries (``lane_table``): a nibble or byte of codes
indexes fp16 grid coordinates packed in one integer.  With ``AttentionPlan.qk_int8`` (opt-in, decode launches, head_dim >= 128) uniform key
codes skip that: scores run on int8 tensor cores against queries rounded to int8 per row, each code taken as it lies in
its byte (``_int8_scores``).  (Experimental, off by default: 2-bit scalar codes decoded by
PTX byte permutes from two registers, 1.5 instructions per value, ``_register_lanes``.)  The coordinates of byte b
land in *lanes*:
lane i of a token holds the values at head positions L*b + i (L lanes), a [tokens, code bytes] tile.  A score is
then the sum of L tensor-core dots of query lane i with key lane i, so no tile is ever joined or reshaped; the
query and the rotation are permuted to lane order once per layer (``lane_order``).

One program handles BLOCK_Q query tokens of one sequence x the G query heads of one KV head (rows = BLOCK_M), and
one segment of that sequence's causal key range (split-K for long decodes).  With 16-bit sinks/window
(``WindowInputs``), decode steps read those keys from the ring in a pass of their own (``RING_FIRST``): from 16
requests a launch of its own that writes one more split-K partial (``RING_ONLY``), so that the codes launch keeps the
register cap of a launch without the window, else in RING_PROGRAMS programs of the codes launch after its segments,
each writing a partial of a slice of the ring; wider launches read the ring inside the codes loop, per tile.  One-token
programs never read the codes of the step's own token (it is in the window): a decode step's cache write may run
beside them (``cache_write.write_beside``).  It writes unnormalized partials (running max, denominator,
Hadamard-domain value and key sums, in lane order); ``_combine_kernel`` merges the segments and applies the per-query
epilogue.  Its torch twin is ``vllm_aquakv.serving.TorchServingPath.attend``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vllm_aquakv.codec import fwht
from vllm_aquakv.kernels import cuda_decode
from vllm_aquakv.window import WindowStep

LOG2E = 1.4426950408889634
# the query rotation's dot inputs: 16-bit queries as they are (+-1 products are exact), float32 as tf32x3; the
# interpreter takes float32 (its 16-bit dots are wrong in Triton 3.9)
_QUERY_DOT_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _half(bits):
    """The low 16 bits of an integer tensor as float16."""
    return bits.to(tl.int16).to(tl.float16, bitcast=True)


# 2-bit scalar codes -> fp16 levels in registers: PRMT picks bytes 2c, 2c + 1 of the 8-byte table of the 4 fp16
# levels (lo = levels 0, 1; hi = levels 2, 3).  For x = (4 code bytes >> 2 j) & 0x03030303 (code j of byte k in bits
# 8 k..8 k + 1), x * 0x22 + 0x10101010 puts the selector nibbles 2 c_k, 2 c_k + 1 at nibbles 2 k, 2 k + 1; PRMT reads
# the low 4 nibbles, so bytes 2 and 3 take the selector shifted right by 16: 6 instructions per 4 values.  With
# pack=4, $2 holds 4 code bytes (byte k = element k), $3 and $7 the first copies of lo and hi, and the output is 2
# registers of 2 halves (element 0 in the low half).  Alone (a kernel that decodes and dots one tile) it matches
# torch on the H100; inside _fused_attention_kernel, Triton 3.6 builds a kernel that reads shared memory out of
# bounds (compute-sanitizer: a 512-byte ldmatrix-sized read in _accumulate_lanes) or returns wrong sums, with one
# 4-output asm or four 1-output ones (2026-11-25, tests/test_kernels.py::test_register_decode_on_gpu).  So
# lane_table() uses it only when asked (index_bits=2); the interpreter takes the integer-select twin, which is right.
_PRMT_LANE = [tl.constexpr(f"""{{
.reg .b32 x, s;
shr.b32 x, $2, {2 * j};
and.b32 x, x, 0x03030303;
mad.lo.u32 s, x, 0x22, 0x10101010;
prmt.b32 $0, $3, $7, s;
shr.b32 s, s, 16;
prmt.b32 $1, $3, $7, s;
}}""") for j in range(4)]
_PRMT_LANE0, _PRMT_LANE1, _PRMT_LANE2, _PRMT_LANE3 = _PRMT_LANE


@triton.jit
def _register_lane(byte, lo, hi, ASM: tl.constexpr):
    return tl.inline_asm_elementwise(ASM, "=r,=r,r,r,r,r,r,r,r,r,r", [byte, lo, hi], dtype=tl.float16, is_pure=True,
                                     pack=4)


@triton.jit
def _register_lanes(byte, table_ptr, USE_ASM: tl.constexpr):
    """Four fp16 lanes [T, B] of 2-bit scalar codes byte [T, B] (uint8; code i of a byte in bits 2 i, 2 i + 1) through
    the 4 levels in table_ptr[0:2] (int32: 2 fp16 each); PTX byte permutes on CUDA, integer selects elsewhere."""
    lo = tl.load(table_ptr)
    hi = tl.load(table_ptr + 1)
    if USE_ASM:
        x0 = _register_lane(byte, lo, hi, _PRMT_LANE0)
        x1 = _register_lane(byte, lo, hi, _PRMT_LANE1)
        x2 = _register_lane(byte, lo, hi, _PRMT_LANE2)
        x3 = _register_lane(byte, lo, hi, _PRMT_LANE3)
    else:
        byte = byte.to(tl.int32)
        c0, c1, c2, c3 = byte & 3, (byte >> 2) & 3, (byte >> 4) & 3, (byte >> 6) & 3
        x0 = _half(tl.where(c0 >= 2, hi, lo) >> ((c0 & 1) * 16))
        x1 = _half(tl.where(c1 >= 2, hi, lo) >> ((c1 & 1) * 16))
        x2 = _half(tl.where(c2 >= 2, hi, lo) >> ((c2 & 1) * 16))
        x3 = _half(tl.where(c3 >= 2, hi, lo) >> ((c3 & 1) * 16))
    return x0, x1, x2, x3


@triton.jit
def _uniform_lane(byte, LANE: tl.constexpr, INDEX_BITS: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Lane LANE of uniform 2-bit codes byte [T, B] (code i of a byte in bits 2 i, 2 i + 1) as float16 numbers that
    are c 4^LANE units exactly: the code's bits masked in place, not shifted down (each byte is widened once for all
    four lanes, then a lane costs one mask per pair of values; the query lanes and ``_to_grid_units`` undo 4^LANE).
    INDEX_BITS 0 takes them as a float16 subnormal (unit 2^-24), which the tensor cores multiply exactly; 1 ORs them
    into the exponent of 1024 and subtracts 1024 (unit 1, one more half2 add)."""
    c = (byte & (3 << (2 * LANE))).to(tl.int16)
    if INDEX_BITS == 0:
        x = c.to(tl.float16, bitcast=True)
    else:
        x = (c | 0x6400).to(tl.float16, bitcast=True) - tl.full([1, 1], 1024.0, tl.float16)
    return x.to(DOT_DTYPE)


@triton.jit
def _uniform_terms(table_ptr, INDEX_BITS: tl.constexpr):
    """(multiplier, offset) that turn a uniform lane-0 dot back into grid units: grid[c] = g0 + step * c, and lane i
    holds c 4^i * 2^-24 (INDEX_BITS 0) or c 4^i (1), so sum w grid[c] = dot * step * unit^-1 / 4^i + g0 * sum w (lane
    i's multiplier is this one / 4^i: ``_to_grid_units``; scores scale the query lanes instead)."""
    g0 = tl.load(table_ptr)
    step = tl.load(table_ptr + 1)
    if INDEX_BITS == 0:
        step = step * 16777216.0
    return step, g0


@triton.jit
def _to_grid_units(a0, a1, a2, a3, mul, g0, w):
    """Four lane sums of uniform codes (lane i: sum_t w_t c_t 4^i unit, [M, B] each) -> sums of grid coordinates,
    sum_t w_t (g0 + step c_t): times ``mul`` / 4^i plus g0 times the weights' sum w [M] (``_uniform_terms``)."""
    return (a0 * mul + g0 * w[:, None], a1 * (mul * 0.25) + g0 * w[:, None], a2 * (mul * 0.0625) + g0 * w[:, None],
            a3 * (mul * 0.015625) + g0 * w[:, None])


@triton.jit
def _round_int8(x):
    """float32 x in [-127.5, 127.5] -> nearest int8 (halves away from zero)."""
    return tl.where(x >= 0, x + 0.5, x - 0.5).to(tl.int8)


# code i of 4 code bytes at once: one 32-bit shift and mask (LLVM shifts int8 vectors byte by byte)
_CODE_LANE = [tl.constexpr(f"{{ .reg .b32 t; shr.b32 t, $1, {2 * i}; and.b32 $0, t, 0x03030303; }}")
              for i in range(4)]
_CODE_LANE0, _CODE_LANE1, _CODE_LANE2, _CODE_LANE3 = _CODE_LANE


@triton.jit
def _code_lane(byte, LANE: tl.constexpr, USE_ASM: tl.constexpr):
    """Code LANE of uint8 code bytes (bits 2 LANE, 2 LANE + 1) as int8 0..3, same shape."""
    if USE_ASM:
        if LANE == 0:
            x = (byte & 3).to(tl.int8)
        elif LANE == 1:
            x = tl.inline_asm_elementwise(_CODE_LANE1, "=r,r", [byte], dtype=tl.int8, is_pure=True, pack=4)
        elif LANE == 2:
            x = tl.inline_asm_elementwise(_CODE_LANE2, "=r,r", [byte], dtype=tl.int8, is_pure=True, pack=4)
        else:
            x = tl.inline_asm_elementwise(_CODE_LANE3, "=r,r", [byte], dtype=tl.int8, is_pure=True, pack=4)
    else:
        x = ((byte >> (2 * LANE)) & 3).to(tl.int8)
    return x


@triton.jit
def _int8_scores(cache_ptr, base, t_mask, q0, q1, q2, q3, K_CODE_BYTES: tl.constexpr, USE_ASM: tl.constexpr):
    """Integer scores [M, T] (int32) of int8 query lanes q_i [M, B] against uniform 2-bit key codes at ``base`` [T]:
    lane i of code byte b is (b >> 2 i) & 3, an int8 operand as it lies in the byte, so the int8 tensor cores
    take the code bytes without widening them to 16 bits."""
    b = tl.arange(0, K_CODE_BYTES)
    byte = tl.load(cache_ptr + base[:, None] + b[None, :], mask=t_mask[:, None], other=0)  # [T, B] uint8
    s = tl.dot(q0, tl.trans(_code_lane(byte, 0, USE_ASM)), out_dtype=tl.int32)
    s = tl.dot(q1, tl.trans(_code_lane(byte, 1, USE_ASM)), s, out_dtype=tl.int32)
    s = tl.dot(q2, tl.trans(_code_lane(byte, 2, USE_ASM)), s, out_dtype=tl.int32)
    return tl.dot(q3, tl.trans(_code_lane(byte, 3, USE_ASM)), s, out_dtype=tl.int32)


@triton.jit
def _softmax_step(m_i, l_i, s):
    """One online-softmax step over base-2 scores s [M, T]: (new running max, rescale factor of the earlier sums,
    probabilities p [M, T], new denominator)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _load_lanes(cache_ptr, base, t_mask, table_ptr, CODE_OFFSET: tl.constexpr, CODE_BYTES: tl.constexpr,
                INDEX_BITS: tl.constexpr, ENTRY_VALUES: tl.constexpr, DOT_DTYPE: tl.constexpr,
                USE_ASM: tl.constexpr):
    """One stream's grid coordinates for the tokens at ``base`` [T] as lanes, each [T, CODE_BYTES] in DOT_DTYPE: lane i
    holds the values at head positions LANES * b + i for code byte b (LANES = ENTRY_VALUES * 8 / INDEX_BITS, or 4 for
    the register decode INDEX_BITS == 2; lanes 2, 3 repeat 0, 1 when LANES == 2)."""
    b = tl.arange(0, CODE_BYTES)
    byte = tl.load(cache_ptr + (base + CODE_OFFSET)[:, None] + b[None, :], mask=t_mask[:, None], other=0)
    if INDEX_BITS <= 1:  # uniform 2-bit codes: code c as an exact float16, no table (``_uniform_terms``)
        return (_uniform_lane(byte, 0, INDEX_BITS, DOT_DTYPE), _uniform_lane(byte, 1, INDEX_BITS, DOT_DTYPE),
                _uniform_lane(byte, 2, INDEX_BITS, DOT_DTYPE), _uniform_lane(byte, 3, INDEX_BITS, DOT_DTYPE))
    if INDEX_BITS == 2:  # 2-bit scalar codes, decoded in registers
        x0, x1, x2, x3 = _register_lanes(byte, table_ptr, USE_ASM)
        return x0.to(DOT_DTYPE), x1.to(DOT_DTYPE), x2.to(DOT_DTYPE), x3.to(DOT_DTYPE)
    byte = byte.to(tl.int32)  # [T, B]
    if INDEX_BITS == 8:  # a byte is one code: 2 or 4 coordinates
        entry = tl.load(table_ptr + byte)
        x0, x1 = _half(entry), _half(entry >> 16)
        if ENTRY_VALUES == 4:
            x2, x3 = _half(entry >> 32), _half(entry >> 48)
        else:
            x2, x3 = x0, x1
    else:  # each nibble indexes 1 or 2 coordinates
        lo = tl.load(table_ptr + (byte & 15))
        hi = tl.load(table_ptr + (byte >> 4))
        if ENTRY_VALUES == 2:
            x0, x1, x2, x3 = _half(lo), _half(lo >> 16), _half(hi), _half(hi >> 16)
        else:
            x0, x1 = _half(lo), _half(hi)
            x2, x3 = x0, x1
    return x0.to(DOT_DTYPE), x1.to(DOT_DTYPE), x2.to(DOT_DTYPE), x3.to(DOT_DTYPE)


@triton.jit
def times_lane(x, mat_ptr, LANE: tl.constexpr, HEAD_DIM: tl.constexpr, WIDTH: tl.constexpr, PRECISION: tl.constexpr):
    """Lane LANE of x M: x [N, h] @ mat[:, LANE * W:(LANE + 1) * W] -> [N, W] float32 (mat [h, h] row-major with
    columns in lane order, cast to x's dtype)."""
    rows = tl.arange(0, HEAD_DIM)
    w = tl.arange(0, WIDTH)
    a = tl.load(mat_ptr + rows[:, None] * HEAD_DIM + LANE * WIDTH + w[None, :]).to(x.dtype)  # [h, W]
    return tl.dot(x, a, input_precision=PRECISION)


@triton.jit
def _store_lane(ptr, rows, row_mask, x, ROW_LEN: tl.constexpr, LANE: tl.constexpr, WIDTH: tl.constexpr):
    w = tl.arange(0, WIDTH)
    tl.store(ptr + rows[:, None] * ROW_LEN + LANE * WIDTH + w[None, :], x, mask=row_mask[:, None])


@triton.jit
def _store_lanes(ptr, rows, row_mask, a0, a1, a2, a3, ROW_LEN: tl.constexpr, LANES: tl.constexpr,
                 WIDTH: tl.constexpr):
    """Store LANES lane accumulators ([M, WIDTH] each) as lane-ordered rows ``ptr[rows, :ROW_LEN]``."""
    _store_lane(ptr, rows, row_mask, a0, ROW_LEN, 0, WIDTH)
    _store_lane(ptr, rows, row_mask, a1, ROW_LEN, 1, WIDTH)
    if LANES == 4:
        _store_lane(ptr, rows, row_mask, a2, ROW_LEN, 2, WIDTH)
        _store_lane(ptr, rows, row_mask, a3, ROW_LEN, 3, WIDTH)


@triton.jit
def _accumulate_lanes(weights, x0, x1, x2, x3, a0, a1, a2, a3, alpha, LANES: tl.constexpr):
    """Online-softmax update of LANES lane sums: a_i <- a_i * alpha + weights [M, T] @ x_i [T, W]."""
    a0 = tl.dot(weights, x0, a0 * alpha[:, None])
    a1 = tl.dot(weights, x1, a1 * alpha[:, None])
    if LANES == 4:
        a2 = tl.dot(weights, x2, a2 * alpha[:, None])
        a3 = tl.dot(weights, x3, a3 * alpha[:, None])
    return a0, a1, a2, a3


@triton.jit
def _ring_column(t, SINKS: tl.constexpr, WINDOW: tl.constexpr):
    """The ring column of key positions t (``vllm_aquakv.window.ExactTokens.column``)."""
    if WINDOW > 0:
        col = tl.where(t < SINKS, t, SINKS + t % WINDOW)
    else:
        col = tl.minimum(t, SINKS - 1)
    return col


@triton.jit
def _exact_rows(t, t_mask, blk, seq, col, in_chunk, q_pos, visible, tags_ptr, PAGE_BLOCK: tl.constexpr,
                SINKS: tl.constexpr, WINDOW: tl.constexpr):
    """Which (query row, key) pairs of a tile read 16-bit K/V [M, T] (``vllm_aquakv.window``'s semantics): this
    step's own keys, and older ones whose ring entry was written from the slot they live in."""
    tag = tl.load(tags_ptr + seq * (SINKS + WINDOW) + col, mask=t_mask & ~in_chunk, other=-1)
    avail = t_mask & (in_chunk | (tag == blk * PAGE_BLOCK + t % PAGE_BLOCK))
    return avail[None, :] & visible & ((t[None, :] < SINKS) | (q_pos[:, None] - t[None, :] < WINDOW))


@triton.jit
def _exact_tile(ring_ptr, step_ptr, t, seq, kv_head, context, q_start, col, in_chunk, t_mask, stride_n, stride_h,
                NUM_KV_HEADS: tl.constexpr, RING_WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    """16-bit K or V [T, h] of a tile's keys: this step's own tokens from the step input (stride_n, stride_h), older
    ones from the ring [rows, RING_WIDTH, H, h]; zeros where neither applies."""
    j = tl.arange(0, HEAD_DIM)
    own = (t_mask & in_chunk)[:, None]
    x = tl.load(step_ptr + (q_start + t - context).to(tl.int64)[:, None] * stride_n + kv_head * stride_h + j[None, :],
                mask=own, other=0.0)
    ring = ((seq * RING_WIDTH + col) * NUM_KV_HEADS + kv_head).to(tl.int64) * HEAD_DIM
    r = tl.load(ring_ptr + ring[:, None] + j[None, :], mask=(t_mask & ~in_chunk)[:, None], other=0.0)
    return tl.where(own, x, r)


@triton.jit
def _exact_scores(q, kx, Q_DTYPE: tl.constexpr, Q_PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr):
    """q [M, h] . 16-bit keys kx [T, h] -> [M, T] float32."""
    if HEAD_DIM >= 128:
        s_x = tl.dot(q, tl.trans(kx.to(Q_DTYPE)), input_precision=Q_PRECISION)
    else:  # the same product transposed: Triton 3.6 asserts in applyLinearLayout on [M, 64] x [64, T] with M < 64
        # (offline_compile.py --window --smollm2)
        s_x = tl.trans(tl.dot(kx.to(Q_DTYPE), tl.trans(q), input_precision=Q_PRECISION))
    return s_x


@triton.jit(do_not_specialize=["num_segments", "num_tokens", "stride_bt"])  # values that change every step
def _fused_attention_kernel(
    q_ptr, sign_k_ptr, k_bias_ptr, k_dinv_ptr, cache_ptr, block_table_ptr, seq_lens_ptr, q_start_ptr, qblock_seq_ptr,
    qblock_first_ptr, k_table_ptr, v_table_ptr,
    m_ptr, l_ptr, acc_v_ptr, acc_k_ptr, acc_x_ptr, ring_k_ptr, ring_v_ptr, tags_ptr, key_ptr, value_ptr,
    num_segments, num_tokens, logit_scale,
    stride_qn, stride_qh, stride_block, stride_head, stride_token, stride_bt, stride_kn, stride_kh, stride_vn,
    stride_vh,
    G: tl.constexpr, NUM_KV_HEADS: tl.constexpr, SINKS: tl.constexpr, WINDOW: tl.constexpr, HAS_WINDOW: tl.constexpr,
    RING_FIRST: tl.constexpr, RING_ONLY: tl.constexpr, RING_PROGRAMS: tl.constexpr,
    RING_CHUNK: tl.constexpr, RING_TILE: tl.constexpr,
    NUM_Q_HEADS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr, PAGE_BLOCK: tl.constexpr, SLOT_ALIGN: tl.constexpr,
    K_CODE_BYTES: tl.constexpr, K_INDEX_BITS: tl.constexpr, K_ENTRY_VALUES: tl.constexpr, K_LANES: tl.constexpr,
    V_CODE_OFFSET: tl.constexpr, V_CODE_BYTES: tl.constexpr, V_INDEX_BITS: tl.constexpr,
    V_ENTRY_VALUES: tl.constexpr, V_LANES: tl.constexpr, K_SCALE_OFFSET: tl.constexpr, V_SCALE_OFFSET: tl.constexpr,
    HAS_K_BIAS: tl.constexpr, V_FROM_K: tl.constexpr, DOT_DTYPE: tl.constexpr, Q_DTYPE: tl.constexpr,
    Q_PRECISION: tl.constexpr, USE_ASM: tl.constexpr, QK_INT8: tl.constexpr = False, HAS_K_SCALE: tl.constexpr = False,
):
    qblock = tl.program_id(0)
    kv_head = tl.program_id(1)
    # RING_ONLY (decode launches with the window): the sinks/window pass alone, as the extra partial num_segments
    segment = num_segments if RING_ONLY else tl.program_id(2)
    seq = tl.load(qblock_seq_ptr + qblock)
    first = tl.load(qblock_first_ptr + qblock)  # first query token of the block, relative to the sequence's
    q_start = tl.load(q_start_ptr + seq)
    q_len = tl.load(q_start_ptr + seq + 1) - q_start
    context = tl.load(seq_lens_ptr + seq) - q_len  # position of the sequence's first query token

    rows = tl.arange(0, BLOCK_M)
    tok = first + rows // G  # query token of each row, relative to q_start
    q_head = kv_head * G + rows % G
    row_mask = (rows < BLOCK_Q * G) & (tok < q_len)
    q_pos = context + tok
    j = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (q_start + tok).to(tl.int64)[:, None] * stride_qn + q_head[:, None] * stride_qh + j[None, :],
                mask=row_mask[:, None], other=0.0).to(Q_DTYPE)  # [M, h] post-RoPE queries
    # q A in key-lane order (A = diag(s) H / sqrt(h)), scaled so that a dot with grid coordinates times the fp16 scale
    # (y = z * scale / sqrt(h)) gives base-2 logits: q (diag(s) H)[:, lane] * logit_scale / h, K_LANES x [M, B_k]
    q_scale = logit_scale / HEAD_DIM
    q_codes = q  # what meets the codes: with a key channel scale D the codes hold D (k - b_k), so q / D (D holds
    if HAS_K_SCALE:  # powers of two: a 16-bit q / D is exact; a rounding here cost 0.55-0.69% of outputs on the H100)
        q_codes = (q.to(tl.float32) * tl.load(k_dinv_ptr + kv_head * HEAD_DIM + j)[None, :]).to(Q_DTYPE)
    q0 = times_lane(q_codes, sign_k_ptr, 0, HEAD_DIM, K_CODE_BYTES, Q_PRECISION) * q_scale
    q1 = times_lane(q_codes, sign_k_ptr, 1, HEAD_DIM, K_CODE_BYTES, Q_PRECISION) * q_scale
    if K_LANES == 4:
        q2 = times_lane(q_codes, sign_k_ptr, 2, HEAD_DIM, K_CODE_BYTES, Q_PRECISION) * q_scale
        q3 = times_lane(q_codes, sign_k_ptr, 3, HEAD_DIM, K_CODE_BYTES, Q_PRECISION) * q_scale
    if QK_INT8:  # uniform key codes on int8 tensor cores: the query lanes as int8 in units of q_unit [M] per row
        k_mul, k_g0 = _uniform_terms(k_table_ptr, 1)
        q_amax = tl.maximum(tl.maximum(tl.max(tl.abs(q0), axis=1), tl.max(tl.abs(q1), axis=1)),
                            tl.maximum(tl.max(tl.abs(q2), axis=1), tl.max(tl.abs(q3), axis=1)))
        q_unit = tl.maximum(q_amax, 1.0e-30) / 127.0
        q0, q1 = _round_int8(q0 / q_unit[:, None]), _round_int8(q1 / q_unit[:, None])
        q2, q3 = _round_int8(q2 / q_unit[:, None]), _round_int8(q3 / q_unit[:, None])
        q_sum = (tl.sum(q0.to(tl.int32), axis=1) + tl.sum(q1.to(tl.int32), axis=1) + tl.sum(q2.to(tl.int32), axis=1)
                 + tl.sum(q3.to(tl.int32), axis=1)).to(tl.float32) * q_unit * k_g0  # the rounded queries' sum
        k_mul = k_mul * q_unit  # [M]: an integer score times this is a float one
    else:
        if K_INDEX_BITS <= 1:  # uniform key codes: scores need the query lanes' sum, and lane i holds c 4^i units
            k_mul, k_g0 = _uniform_terms(k_table_ptr, K_INDEX_BITS)
            q_sum = (tl.sum(q0, axis=1) + tl.sum(q1, axis=1) + tl.sum(q2, axis=1) + tl.sum(q3, axis=1)) * k_g0
            q1, q2, q3 = q1 * 0.25, q2 * 0.0625, q3 * 0.015625
        q0, q1 = q0.to(DOT_DTYPE), q1.to(DOT_DTYPE)
        if K_LANES == 4:
            q2, q3 = q2.to(DOT_DTYPE), q3.to(DOT_DTYPE)
    if V_INDEX_BITS <= 1:
        v_mul, v_g0 = _uniform_terms(v_table_ptr, V_INDEX_BITS)
    if HAS_K_BIAS:  # q . b_k in base-2 logits [M]
        q_bias = tl.sum(q.to(tl.float32) * tl.load(k_bias_ptr + kv_head * HEAD_DIM + j)[None, :], axis=1) * logit_scale

    # this segment's share of the causal key range [0, last query position + 1).  With a window, one-token programs
    # (RING_FIRST) read the step's own tokens inside the query's window from the 16-bit inputs, never from their
    # codes: the codes range ends before them, so a decode step's cache write may store those codes while this
    # launch runs (``AquaKVImpl.do_kv_cache_update``)
    kv_end = context + tl.minimum(first + BLOCK_Q, q_len)
    if RING_FIRST and WINDOW > 0:
        kv_end = tl.maximum(context, context + first - WINDOW + 1)
    num_tiles = tl.cdiv(kv_end, TILE)
    per_segment = tl.cdiv(num_tiles, num_segments)
    tile_lo = segment * per_segment
    tile_hi = tl.minimum(tile_lo + per_segment, num_tiles)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    v0 = tl.zeros([BLOCK_M, V_CODE_BYTES], tl.float32)  # Hadamard-domain value sums, one per value lane
    v1 = tl.zeros([BLOCK_M, V_CODE_BYTES], tl.float32)
    v2 = tl.zeros([BLOCK_M, V_CODE_BYTES], tl.float32)
    v3 = tl.zeros([BLOCK_M, V_CODE_BYTES], tl.float32)
    k0 = tl.zeros([BLOCK_M, K_CODE_BYTES], tl.float32)  # key sums (V_FROM_K), one per key lane
    k1 = tl.zeros([BLOCK_M, K_CODE_BYTES], tl.float32)
    k2 = tl.zeros([BLOCK_M, K_CODE_BYTES], tl.float32)
    k3 = tl.zeros([BLOCK_M, K_CODE_BYTES], tl.float32)
    acc_x = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)  # softmax-weighted 16-bit values (HAS_WINDOW), head order
    w_v = tl.zeros([BLOCK_M], tl.float32)  # sums of the value and key lanes' weights (uniform codes)
    w_k = tl.zeros([BLOCK_M], tl.float32)
    win_lo = context + first - WINDOW + 1  # the lowest key position any row of the block reads in 16 bits
    # decode launches (RING_FIRST): the sinks/window keys in a pass of their own, in a launch of their own
    # (RING_ONLY) or in RING_PROGRAMS programs of the codes launch after its segments, each a slice of RING_CHUNK
    # entries (``AttentionPlan.ring_rows``)
    if RING_ONLY or RING_PROGRAMS > 0:
        if segment >= num_segments:
            ring_lo = (segment - num_segments) * RING_CHUNK  # this program's ring entries [ring_lo, ring_hi)
            ring_hi = tl.minimum(ring_lo + RING_CHUNK, SINKS + WINDOW)
            q_last = context + first  # the block's one query position
            win_start = tl.maximum(q_last - WINDOW + 1, SINKS)
            for r0 in range(ring_lo, ring_hi, RING_TILE):
                r = r0 + tl.arange(0, RING_TILE)  # ring entries: the sinks, then the window's positions in order
                t = tl.where(r < SINKS, r, win_start + r - SINKS)
                t_mask = (r < ring_hi) & (t <= q_last)
                blk = tl.load(block_table_ptr + seq * stride_bt + t // PAGE_BLOCK, mask=t_mask, other=0).to(tl.int64)
                col = _ring_column(t, SINKS, WINDOW)
                in_chunk = t >= context
                visible = (t[None, :] <= q_pos[:, None]) & t_mask[None, :]
                exact = _exact_rows(t, t_mask, blk, seq, col, in_chunk, q_pos, visible, tags_ptr, PAGE_BLOCK, SINKS,
                                    WINDOW)
                kx = _exact_tile(ring_k_ptr, key_ptr, t, seq, kv_head, context, q_start, col, in_chunk, t_mask,
                                 stride_kn, stride_kh, NUM_KV_HEADS, SINKS + WINDOW, HEAD_DIM)
                s = tl.where(exact, _exact_scores(q, kx, Q_DTYPE, Q_PRECISION, HEAD_DIM) * logit_scale,
                             float("-inf"))
                m_i, alpha, p, l_i = _softmax_step(m_i, l_i, s)
                vx = _exact_tile(ring_v_ptr, value_ptr, t, seq, kv_head, context, q_start, col, in_chunk, t_mask,
                                 stride_vn, stride_vh, NUM_KV_HEADS, SINKS + WINDOW, HEAD_DIM)
                acc_x = tl.dot(p.to(Q_DTYPE), vx.to(Q_DTYPE), acc_x * alpha[:, None], input_precision=Q_PRECISION)

    if segment >= num_segments:  # no codes in ring programs (RING_ONLY, RING_PROGRAMS)
        tile_hi = tile_lo
    for tile in range(tile_lo, tile_hi):
        t = tile * TILE + tl.arange(0, TILE)  # key positions [T]
        t_mask = t < kv_end
        blk = tl.load(block_table_ptr + seq * stride_bt + t // PAGE_BLOCK, mask=t_mask, other=0).to(tl.int64)
        base = blk * stride_block + kv_head * stride_head + (t % PAGE_BLOCK) * stride_token
        base = tl.multiple_of(base, SLOT_ALIGN)  # lets the code loads use whole words
        scale_k = tl.load((cache_ptr + base + K_SCALE_OFFSET).to(tl.pointer_type(tl.float16)), mask=t_mask,
                          other=0.0).to(tl.float32)
        scale_v = tl.load((cache_ptr + base + V_SCALE_OFFSET).to(tl.pointer_type(tl.float16)), mask=t_mask,
                          other=0.0).to(tl.float32)
        if QK_INT8:
            s = _int8_scores(cache_ptr, base, t_mask, q0, q1, q2, q3, K_CODE_BYTES, USE_ASM).to(tl.float32)
            s = s * k_mul[:, None] + q_sum[:, None]
        else:
            x0, x1, x2, x3 = _load_lanes(cache_ptr, base, t_mask, k_table_ptr, 0, K_CODE_BYTES, K_INDEX_BITS,
                                         K_ENTRY_VALUES, DOT_DTYPE, USE_ASM)
            s = tl.dot(q0, tl.trans(x0))
            s = tl.dot(q1, tl.trans(x1), s)
            if K_LANES == 4:
                s = tl.dot(q2, tl.trans(x2), s)
                s = tl.dot(q3, tl.trans(x3), s)
            if K_INDEX_BITS <= 1:
                s = s * k_mul + q_sum[:, None]
        s = s * scale_k[None, :]  # [M, T], base-2 logits
        if HAS_K_BIAS:
            s += q_bias[:, None]
        visible = (t[None, :] <= q_pos[:, None]) & t_mask[None, :]
        s = tl.where(visible, s, float("-inf"))
        if HAS_WINDOW:  # sinks and recent keys: scores from their 16-bit copies
            exact = tl.zeros([BLOCK_M, TILE], tl.int1)
            col = _ring_column(t, SINKS, WINDOW)
            in_chunk = t >= context
            ring_tile = (tile * TILE < SINKS) | ((tile + 1) * TILE > win_lo)
            if ring_tile:
                exact = _exact_rows(t, t_mask, blk, seq, col, in_chunk, q_pos, visible, tags_ptr, PAGE_BLOCK, SINKS,
                                    WINDOW)
                if RING_FIRST:  # read by the ring launch
                    s = tl.where(exact, float("-inf"), s)
                else:
                    kx = _exact_tile(ring_k_ptr, key_ptr, t, seq, kv_head, context, q_start, col, in_chunk, t_mask,
                                     stride_kn, stride_kh, NUM_KV_HEADS, SINKS + WINDOW, HEAD_DIM)
                    s = tl.where(exact, _exact_scores(q, kx, Q_DTYPE, Q_PRECISION, HEAD_DIM) * logit_scale, s)
        m_i, alpha, p, l_i = _softmax_step(m_i, l_i, s)
        if HAS_WINDOW and not RING_FIRST:  # their probabilities weight 16-bit values; the codes get the rest
            acc_x = acc_x * alpha[:, None]
            if ring_tile:
                vx = _exact_tile(ring_v_ptr, value_ptr, t, seq, kv_head, context, q_start, col, in_chunk, t_mask,
                                 stride_vn, stride_vh, NUM_KV_HEADS, SINKS + WINDOW, HEAD_DIM)
                acc_x = tl.dot(tl.where(exact, p, 0.0).to(Q_DTYPE), vx.to(Q_DTYPE), acc_x,
                               input_precision=Q_PRECISION)
                p = tl.where(exact, 0.0, p)
        if V_FROM_K:
            wk = (p * scale_k[None, :]).to(DOT_DTYPE)
            if K_INDEX_BITS <= 1:
                w_k = w_k * alpha + tl.sum(wk.to(tl.float32), axis=1)
            k0, k1, k2, k3 = _accumulate_lanes(wk, x0, x1, x2, x3, k0, k1, k2, k3, alpha, K_LANES)
        y0, y1, y2, y3 = _load_lanes(cache_ptr, base, t_mask, v_table_ptr, V_CODE_OFFSET, V_CODE_BYTES, V_INDEX_BITS,
                                     V_ENTRY_VALUES, DOT_DTYPE, USE_ASM)
        wv = (p * scale_v[None, :]).to(DOT_DTYPE)
        if V_INDEX_BITS <= 1:
            w_v = w_v * alpha + tl.sum(wv.to(tl.float32), axis=1)
        v0, v1, v2, v3 = _accumulate_lanes(wv, y0, y1, y2, y3, v0, v1, v2, v3, alpha, V_LANES)

    if V_INDEX_BITS <= 1:  # lanes of c * unit -> grid coordinates (``_uniform_terms``)
        v0, v1, v2, v3 = _to_grid_units(v0, v1, v2, v3, v_mul, v_g0, w_v)
    if V_FROM_K and K_INDEX_BITS <= 1:
        k0, k1, k2, k3 = _to_grid_units(k0, k1, k2, k3, k_mul, k_g0, w_k)
    # partials [segments, tokens, q heads, (h in lane order)]
    idx = (segment * num_tokens + q_start + tok) * NUM_Q_HEADS + q_head
    tl.store(m_ptr + idx, m_i, mask=row_mask)
    tl.store(l_ptr + idx, l_i, mask=row_mask)
    _store_lanes(acc_v_ptr, idx, row_mask, v0, v1, v2, v3, HEAD_DIM, V_LANES, V_CODE_BYTES)
    if HAS_WINDOW and (RING_ONLY or RING_PROGRAMS > 0 or not RING_FIRST):  # (RING_PROGRAMS: only the ring
        # programs' are read)
        tl.store(acc_x_ptr + idx[:, None] * HEAD_DIM + j[None, :], acc_x, mask=row_mask[:, None])
    if V_FROM_K:
        _store_lanes(acc_k_ptr, idx, row_mask, k0, k1, k2, k3, HEAD_DIM, K_LANES, K_CODE_BYTES)


@triton.jit
def _load_partial(m_ptr, l_ptr, acc_v_ptr, acc_k_ptr, acc_x_ptr, s, num_segments, seg, idx, j, row_mask,
                  HEAD_DIM: tl.constexpr, V_FROM_K: tl.constexpr, HAS_WINDOW: tl.constexpr, RING_ROWS: tl.constexpr):
    """Split-K partial ``s`` of the combine's rows: (max, denominator) [R] and (value, key, 16-bit value sums) [R, h];
    a partial past the last reads as empty (max -1e30, zero sums)."""
    s_row = s + tl.zeros_like(idx)  # [R] (a tensor, as masks must be)
    mask = row_mask & (s_row < num_segments)
    m_s = tl.load(m_ptr + s * seg + idx, mask=mask, other=-1.0e30)
    l_s = tl.load(l_ptr + s * seg + idx, mask=mask, other=0.0)
    rows = (s * seg + idx)[:, None] * HEAD_DIM + j[None, :]
    v_s = tl.load(acc_v_ptr + rows, mask=mask[:, None], other=0.0)
    k_s = v_s
    if V_FROM_K:
        k_s = tl.load(acc_k_ptr + rows, mask=mask[:, None], other=0.0)
    x_s = v_s
    if HAS_WINDOW:  # (RING_ROWS > 0: only the last RING_ROWS partials, the ring programs', have 16-bit sums)
        x_mask = mask
        if RING_ROWS > 0:
            x_mask = mask & (s_row >= num_segments - RING_ROWS)
        x_s = tl.load(acc_x_ptr + rows, mask=x_mask[:, None], other=0.0)
    return m_s, l_s, v_s, k_s, x_s


@triton.jit
def _add_partial(denom, y_v, y_k, y_x, m_s, l_s, v_s, k_s, x_s, m_max, V_FROM_K: tl.constexpr,
                 HAS_WINDOW: tl.constexpr):
    """The combine's running sums plus one partial (``_load_partial``), weighted for the running maximum m_max."""
    w = tl.exp2(m_s - m_max)
    denom += w * l_s
    y_v += w[:, None] * v_s
    if V_FROM_K:
        y_k += w[:, None] * k_s
    if HAS_WINDOW:
        y_x += w[:, None] * x_s
    return denom, y_v, y_k, y_x


@triton.jit(do_not_specialize=["num_segments", "num_tokens"])  # values that change every step
def _combine_kernel(
    m_ptr, l_ptr, acc_v_ptr, acc_k_ptr, acc_x_ptr, sign_v_ptr, sign_k_ptr, v_bias_ptr, k_bias_ptr, v_weight_ptr,
    k_dinv_ptr, out_ptr, num_segments, num_tokens, stride_out_n, stride_out_h,
    G: tl.constexpr, NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr,
    HAS_V_BIAS: tl.constexpr, HAS_K_BIAS: tl.constexpr, V_FROM_K: tl.constexpr, HAS_WINDOW: tl.constexpr,
    RING_ROWS: tl.constexpr, STEP: tl.constexpr, DOT_DTYPE: tl.constexpr, HAS_K_SCALE: tl.constexpr = False,
):
    """Merge the split-K partials of ROWS // G tokens x the G query heads of one KV head and apply the epilogue:
    softmax normalization, rotation back from the Hadamard domain (y A^T), the value mean and the per-head value
    predictor ((b_k + y_k A^T) W), written in the output's dtype.  Several tokens per program share the loads of
    the [h, h] matrices (prefill steps have thousands of tokens).  One walk over the partials with a running
    maximum (faster than a first pass for the maximum: benchmarks/results/decode_attention_h200_combine.md, and
    than reading the maxima as one tile: decode_attention_h200_ring_programs.md), STEP (1, 2 or 4) partials per
    iteration: their loads are independent, so a decode step's ~19 partials take ~5 dependent memory round trips."""
    kv_head = tl.program_id(1)
    r = tl.arange(0, ROWS)
    tok = tl.program_id(0) * (ROWS // G) + r // G
    q_head = kv_head * G + r % G
    row_mask = (r < (ROWS // G) * G) & (tok < num_tokens)
    j = tl.arange(0, HEAD_DIM)
    idx = tok * NUM_Q_HEADS + q_head  # [R] rows of the [N * Hq] partials
    seg = num_tokens * NUM_Q_HEADS
    m_max = tl.full([ROWS], -1.0e30, tl.float32)
    denom = tl.zeros([ROWS], tl.float32)
    y_v = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    y_k = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    y_x = tl.zeros([ROWS, HEAD_DIM], tl.float32)  # 16-bit sinks/window values, head order
    for s in range(0, num_segments, STEP):
        m0, l0, v0, k0, x0 = _load_partial(m_ptr, l_ptr, acc_v_ptr, acc_k_ptr, acc_x_ptr, s, num_segments, seg, idx,
                                           j, row_mask, HEAD_DIM, V_FROM_K, HAS_WINDOW, RING_ROWS)
        m_new = tl.maximum(m_max, m0)
        if STEP > 1:
            m1, l1, v1, k1, x1 = _load_partial(m_ptr, l_ptr, acc_v_ptr, acc_k_ptr, acc_x_ptr, s + 1, num_segments,
                                               seg, idx, j, row_mask, HEAD_DIM, V_FROM_K, HAS_WINDOW, RING_ROWS)
            m_new = tl.maximum(m_new, m1)
        if STEP > 2:
            m2, l2, v2, k2, x2 = _load_partial(m_ptr, l_ptr, acc_v_ptr, acc_k_ptr, acc_x_ptr, s + 2, num_segments,
                                               seg, idx, j, row_mask, HEAD_DIM, V_FROM_K, HAS_WINDOW, RING_ROWS)
            m3, l3, v3, k3, x3 = _load_partial(m_ptr, l_ptr, acc_v_ptr, acc_k_ptr, acc_x_ptr, s + 3, num_segments,
                                               seg, idx, j, row_mask, HEAD_DIM, V_FROM_K, HAS_WINDOW, RING_ROWS)
            m_new = tl.maximum(m_new, tl.maximum(m2, m3))
        alpha = tl.exp2(m_max - m_new)  # the sums so far are rescaled when the maximum grows
        m_max = m_new
        denom *= alpha
        y_v *= alpha[:, None]
        if V_FROM_K:
            y_k *= alpha[:, None]
        if HAS_WINDOW:
            y_x *= alpha[:, None]
        denom, y_v, y_k, y_x = _add_partial(denom, y_v, y_k, y_x, m0, l0, v0, k0, x0, m_new, V_FROM_K, HAS_WINDOW)
        if STEP > 1:
            denom, y_v, y_k, y_x = _add_partial(denom, y_v, y_k, y_x, m1, l1, v1, k1, x1, m_new, V_FROM_K,
                                                HAS_WINDOW)
        if STEP > 2:
            denom, y_v, y_k, y_x = _add_partial(denom, y_v, y_k, y_x, m2, l2, v2, k2, x2, m_new, V_FROM_K,
                                                HAS_WINDOW)
            denom, y_v, y_k, y_x = _add_partial(denom, y_v, y_k, y_x, m3, l3, v3, k3, x3, m_new, V_FROM_K,
                                                HAS_WINDOW)
    inv = 1.0 / (tl.where(row_mask, denom, 1.0) * tl.sqrt(HEAD_DIM * 1.0))  # y = z * scale / sqrt(h)
    # A^T = S^T / sqrt(h) with S = diag(signs) H: the +-1 matrix in 16 bits (exact), 1 / sqrt(h) after the dot
    rsqrt_h = 1.0 / tl.sqrt(HEAD_DIM * 1.0)
    s_t = tl.load(sign_v_ptr + j[None, :] * HEAD_DIM + j[:, None]).to(DOT_DTYPE)  # [h (lane order), h] = S^T
    out = tl.dot((y_v * inv[:, None]).to(DOT_DTYPE), s_t) * rsqrt_h  # [R, h]
    if HAS_WINDOW:  # (their share of the probability is not in y_v, and a window needs no value bias/predictor)
        out += y_x * (inv * tl.sqrt(HEAD_DIM * 1.0))[:, None]
    if HAS_V_BIAS:
        out += tl.load(v_bias_ptr + kv_head * HEAD_DIM + j)[None, :]
    if V_FROM_K:
        s_t = tl.load(sign_k_ptr + j[None, :] * HEAD_DIM + j[:, None]).to(DOT_DTYPE)
        k_mean = tl.dot((y_k * inv[:, None]).to(DOT_DTYPE), s_t) * rsqrt_h  # softmax-weighted keys [R, h]
        if HAS_K_SCALE:  # (the codes hold D (k - b_k))
            k_mean *= tl.load(k_dinv_ptr + kv_head * HEAD_DIM + j)[None, :]
        if HAS_K_BIAS:
            k_mean += tl.load(k_bias_ptr + kv_head * HEAD_DIM + j)[None, :]
        w_head = tl.load(v_weight_ptr + kv_head * HEAD_DIM * HEAD_DIM + j[:, None] * HEAD_DIM + j[None, :])
        out += tl.dot(k_mean.to(DOT_DTYPE), w_head.to(DOT_DTYPE))
    tl.store(out_ptr + tok.to(tl.int64)[:, None] * stride_out_n + q_head[:, None] * stride_out_h + j[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


@dataclass
class LaneTable:
    """How the kernel decodes one stream's code bytes (see ``lane_table``)."""

    table: torch.Tensor  # [2**index_bits] int16/int32/int64: entry_values fp16 coordinates per entry; [2] int32 (the
    # 4 fp16 levels) for index_bits 2; [2] float32 (g0, step) for index_bits 0 and 1
    index_bits: int  # 4 (each nibble is looked up), 8 (each byte), 2 (4-level scalar codes decoded in registers), or
    # 0 / 1: uniform 4-level codes decoded arithmetically (``_uniform_lane``), no table
    entry_values: int  # coordinates per entry: 1, 2 or 4
    lanes: int  # entry_values * 8 / index_bits: 2 or 4
    code_bytes: int  # per (token, KV head); also the width of one lane
    grid: torch.Tensor  # [points, d] float32 (the cache write searches it)
    code_bits: int
    tables: LaneTable | None = None  # uniform codes: the same codes through nibble tables (``launch_lanes``)


def launch_lanes(lanes: LaneTable, block_m: int) -> LaneTable:
    """The decode a launch of ``block_m`` query rows uses: uniform codes decode arithmetically only in decode-shaped
    launches (at most 16 rows); wider ones (prefill rows, and the reconstruction) read the same codes through nibble
    tables.
    On the H200 with Triton 3.6, the arithmetic decode inside a 64-row launch (where Triton takes Hopper's wgmma)
    makes a kernel that accesses memory out of bounds (2026-12-02, tests/test_kernels.py); decode steps are where
    the arithmetic decode pays."""
    return lanes.tables if lanes.tables is not None and block_m > 16 else lanes


def lane_table(grid: torch.Tensor, code_bits: int, head_dim: int, index_bits: int | None = None) -> LaneTable | str:
    """The lookup table that turns a nibble or byte of ``code_bits``-bit codes of ``grid`` [points, d] into fp16
    coordinates (first coordinate in the low 16 bits), or why the kernel has none for this grid.  ``index_bits``:
    4 (nibbles) or 8 (bytes; 4-bit codes then take one lookup of 4 coordinates per byte instead of two of 2);
    default 8 for 8-bit codes, else 4.  2 (d1n4 only) decodes in registers, no table lookups: experimental, wrong
    on the H100 with Triton 3.6 (see ``_PRMT_LANE``).  Exactly uniform 4-level grids (``u1n4``) take no table:
    index_bits 0 (the default for them) decodes a code as a float16 subnormal, 1 through the 1024 exponent trick."""
    d = grid.shape[1]
    levels = grid.float().reshape(-1)
    step = (levels[1] - levels[0]).item() if levels.numel() == 4 else 0.0
    uniform = (code_bits == 2 and d == 1 and step > 0
               and torch.equal(levels, levels[0] + step * torch.arange(4, device=grid.device))
               and torch.equal(levels.half().float(), levels))
    if uniform and (index_bits or 0) <= 1:  # exactly uniform levels: arithmetic decode (``_uniform_lane``)
        terms = torch.tensor([levels[0].item(), step], dtype=torch.float32, device=grid.device)
        return LaneTable(terms, index_bits or 0, 1, 4, head_dim // 4, grid.float().contiguous(), code_bits,
                         lane_table(grid, code_bits, head_dim, 4))
    if code_bits == 2 and d == 1 and index_bits == 2:  # 4 scalar levels decoded in registers (experimental)
        levels = grid.float().reshape(4).half().contiguous()
        return LaneTable(levels.view(torch.int32).contiguous(), 2, 1, 4, head_dim // 4, grid.float().contiguous(),
                         code_bits)
    index_bits = index_bits or (8 if code_bits == 8 else 4)
    per_index = index_bits // code_bits if code_bits in (2, 4, 8) else 0  # codes per looked-up nibble or byte
    entry_values = per_index * d
    if entry_values not in (1, 2, 4) or entry_values * 8 // index_bits not in (2, 4):
        return (f"the fused kernel decodes 2- and 4-bit-per-value grids (d1n4, d2n16, d1n16, d2n256, d4n256), not "
                f"{grid.shape[0]} points of dimension {d}")
    index = torch.arange(2 ** index_bits, device=grid.device)
    codes = (index[:, None] >> (code_bits * torch.arange(per_index, device=grid.device))) & (2 ** code_bits - 1)
    values = grid.float()[codes].reshape(-1, entry_values).half().contiguous()  # [entries, values], LSB code first
    table = values.view({1: torch.int16, 2: torch.int32, 4: torch.int64}[entry_values]).reshape(-1).contiguous()
    return LaneTable(table, index_bits, entry_values, entry_values * 8 // index_bits,
                     head_dim * code_bits // (8 * d), grid.float().contiguous(), code_bits)


def lane_order(head_dim: int, lanes: int) -> torch.Tensor:
    """Head positions in lane order: lane-ordered column i * W + b is position lanes * b + i (W = head_dim / lanes)."""
    j = torch.arange(head_dim)
    width = head_dim // lanes
    return lanes * (j % width) + j // width


@dataclass
class FusedLayer:
    """One layer's constants for the fused kernel, on the serving device."""

    rot_k: torch.Tensor  # [h, h] float32: A = diag(signs) H / sqrt(h) with columns in key-lane order
    rot_v: torch.Tensor  # the same in value-lane order; decode is y_lanes @ rot^T
    sign_k: torch.Tensor  # [h, h] float16: rot_k * sqrt(h), entries exactly +-1 (query rotation in any dtype)
    sign_v: torch.Tensor  # [h, h] float16: rot_v * sqrt(h) (the combine's rotation back)
    k_lanes: LaneTable
    v_lanes: LaneTable
    k_bias: torch.Tensor | None  # [H, h] post-RoPE key mean, or None
    v_bias: torch.Tensor | None  # [H, h]
    v_weight: torch.Tensor | None  # [H, h, h]: v = k W[head] + ... (per-head predictor from the same layer's keys)
    v_code_offset: int  # byte offsets in the slot (``serving.SlotLayout``)
    k_scale_offset: int
    v_scale_offset: int
    write_v_bias: torch.Tensor | None = None  # cache write: b_v + b_k W [H, h] (``value_prediction_terms``)
    write_v_from_k: torch.Tensor | None = None  # cache write: A^T W [H, h, h], rows in key-lane order
    write_k_shift: torch.Tensor | None = None  # cache write (``exact_inputs``): b_k A [H, h] in key-lane order
    write_v_shift: torch.Tensor | None = None  # the constant value prediction (without write_v_from_k) times A
    k_scale: torch.Tensor | None = None  # [H, h] key channel scale D (the codes hold D (k - b_k)), or None
    k_dinv: torch.Tensor | None = None  # [H, h] 1 / D
    write_sign_k: torch.Tensor | None = None  # cache write (``exact_inputs``) with D: diag(D[head]) sign_k [H, h, h]
    # float16 (D holds powers of two, so the entries +-D_i are exact 16-bit numbers)


def value_prediction_terms(rot_k, k_bias, v_bias, v_weight, k_dinv=None) -> tuple[torch.Tensor | None,
                                                                                     torch.Tensor | None]:
    """For the cache write: the value prediction b_v + (b_k + (y_k A^T) / D) W as (c [H, h] = b_v + b_k W, or None
    without any; M [H, h, h] = A^T diag(1 / D) W with rows in key-lane order, so that the prediction is c + y_k M;
    ``k_dinv`` [H, h] = 1 / D, the key channel scale's inverse, or None for D = 1)."""
    c = v_bias
    if v_weight is None:
        return c, None
    if k_bias is not None:
        kw = torch.einsum("hi,hio->ho", k_bias, v_weight)
        c = kw if c is None else c + kw
    if k_dinv is not None:
        v_weight = v_weight * k_dinv[:, :, None]
    return c, torch.einsum("ij,hio->hjo", rot_k, v_weight).contiguous()


def stream_decoder(codec) -> tuple[LaneTable, torch.Tensor] | str:
    """How the kernels decode one stream's codes: its lane table and rotation back rot [h, h] (diag(signs) H / sqrt(h),
    columns in the stream's lane order; decode is y_lanes @ rot^T), or why they cannot."""
    if codec.group_size != codec.head_dim or not codec.rotate:
        return "the Triton kernels need one scale per (token, KV head) and the Hadamard rotation"
    t = lane_table(codec.grid, codec.code_bits, codec.head_dim)
    if isinstance(t, str):
        return t
    if codec.signs.device.type == "cuda" and t.code_bytes < 16:
        return f"head_dim {codec.head_dim} at these bits gives lanes of {t.code_bytes} < 16 values (tensor cores)"
    h = codec.head_dim
    rot = codec.signs.float()[:, None] * fwht(torch.eye(h, device=codec.signs.device)) / math.sqrt(h)
    return t, rot[:, lane_order(h, t.lanes).to(rot.device)].contiguous()


def fused_layer_or_reason(cache, layout, layer: int) -> FusedLayer | str:
    """The fused kernel's constants for ``layer`` of an AquaKVCache (on its device), or why the layer cannot use it."""
    cfg = cache.config
    if cfg.key_rope != "post":
        return "the artifact quantizes keys before RoPE (calibrate with --key-rope post for the fused kernel)"
    kc, vc = cache.codecs["k", layer], cache.codecs["v", layer]
    if kc is None or vc is None:
        return f"layer {layer} is stored in 16 bits"
    if not torch.equal(kc.signs, vc.signs):
        return "keys and values use different Hadamard signs"
    decoders = [stream_decoder(c) for c in (kc, vc)]
    for d in decoders:
        if isinstance(d, str):
            return f"layer {layer}: {d}"
    kp, vp = cache.predictors.get(("k", layer)), cache.predictors.get(("v", layer))
    if kp is not None and kp.sources:
        return f"layer {layer}'s key predictor reads {kp.sources}"
    v_weight = None
    if vp is not None and vp.sources:
        if vp.sources != (("k", layer),) or vp.weight is None or vp.weight.ndim != 3:
            return f"layer {layer}'s value predictor ({vp.structure} from {vp.sources}) is not per-head from K_l"
        v_weight = vp.weight.float().contiguous()  # [H, h, h]
    h = kc.head_dim
    (k_lanes, rot_k), (v_lanes, rot_v) = decoders
    bias = lambda p: None if p is None or p.bias is None else p.bias.float().contiguous()  # noqa: E731
    k_bias, v_bias = bias(kp), bias(vp)
    sign_k, sign_v = ((r * math.sqrt(h)).round().half().contiguous() for r in (rot_k, rot_v))
    k_scale = None if kc.channel_scale is None else kc.channel_scale.float().contiguous()
    k_dinv = None if k_scale is None else (1.0 / k_scale).contiguous()
    write_sign_k = None
    if k_scale is not None:  # (powers of two: ``HiggsCodec.set_channel_scale`` takes no other)
        write_sign_k = (k_scale[:, :, None] * sign_k.float()[None]).half().contiguous()  # [H, h, h]
    write_v_bias, write_v_from_k = value_prediction_terms(rot_k, k_bias, v_bias, v_weight, k_dinv)
    rotated = lambda b, rot: None if b is None else (b @ rot).contiguous()  # noqa: E731  [H, h] lane order
    k_shift = k_bias if k_bias is None or k_scale is None else k_bias * k_scale  # the write's shift: (b_k D) A
    return FusedLayer(rot_k, rot_v, sign_k, sign_v, k_lanes, v_lanes, k_bias, v_bias, v_weight, layout.code_offsets[1],
                      *layout.scale_offsets, write_v_bias, write_v_from_k, rotated(k_shift, rot_k),
                      None if write_v_from_k is not None else rotated(write_v_bias, rot_v), k_scale, k_dinv,
                      write_sign_k)


def fused_layers_or_reason(cache, layouts) -> dict[int, FusedLayer] | str:
    """Every layer's fused-kernel constants, or why not all layers can take the kernel.  All or nothing: a
    torch-path layer may read another layer's reconstruction (e.g. values from V_{l-1}), which fused layers do
    not produce."""
    fused = {}
    for layer, layout in enumerate(layouts):
        f = fused_layer_or_reason(cache, layout, layer)
        if isinstance(f, str):
            return f"layer {layer}: {f}"
        fused[layer] = f
    return fused


# decode steps with the 16-bit window and fewer requests read the ring in RING_PROGRAMS programs of the codes launch,
# whose split-K aims at WINDOW_DECODE_PROGRAMS programs (2 per H200 SM since the 4-row decode programs: 132, one per
# SM, was faster with 16 rows; decode_attention_h200_window_programs.md: 44 instead of 63 us at 2 requests / 32k, 27
# instead of 33 at 4 / 8k, each segment at least MIN_SEGMENT_TILES key tiles); from RING_LAUNCH_MIN_REQUESTS
# requests in a launch of its own, which keeps the codes launch's register cap (benchmarks/results/
# decode_attention_h200_ring_programs.md, CUDA graphs, 8k contexts, us per layer: 23.7 / 28.2 / 42.1 / 67.0 at 1 / 2
# / 4 / 8 requests against 37.2 / 39.2 / 47.8 / 72.3 with the ring's own launch; FA3 bf16: 16.2 / 28.1 / 42.5 / 72.5;
# that run's combine was ~1 us slower than the one-pass one used: decode_attention_h200_combine.md)
RING_LAUNCH_MIN_REQUESTS = 16
RING_PROGRAMS = 2
WINDOW_DECODE_PROGRAMS = 264
# decode steps on the CUDA codes loop (``AttentionPlan.cuda_decode``) whose (request, KV head) programs already reach
# WINDOW_DECODE_PROGRAMS: split-K aims at CUDA_LOOP_PROGRAMS programs (33-65 requests of 8 KV heads take 3-4 segments,
# 66-131 take 2); from RING_LAUNCH_MIN_REQUESTS requests short of that at CUDA_LOOP_FEW_PROGRAMS (16 requests: 5
# segments, 32: 3); fewer programs: the ring's own launch runs beside the codes launch on a side stream
# (``ring_beside``), at any request count.  H100, CUDA graphs, ms with the window, this rule / the one before (528 / 264
# programs), in two runs each (benchmarks/results/decode_attention_h100_cuda_segments.md; the rule before served and
# this one as variants: its _variants (32-128 requests) and _16_48 twins; the row timed first in a group came out 1-5%
# slower in both runs, and each run timed the other rule first): 32 requests / 32k 0.288, 0.287 instead of 0.341, 0.340;
# 48 / 32k 0.405, 0.408 instead of 0.429, 0.430; 96 / 32k 0.779, 0.776 instead of 0.836, 0.841; 128 / 32k 1.018, 1.025
# instead of 1.036, 1.072; 16 / 32k 0.149, 0.148 instead of 0.154, 0.153; 8k: 32 requests 0.093, 0.092 instead of 0.104,
# others within 3% either way.  Without the window 32 requests came out 4-5% slower (0.269 / 0.081 instead of 0.260 /
# 0.078 ms at 32k / 8k)
CUDA_LOOP_PROGRAMS = 1056
CUDA_LOOP_FEW_PROGRAMS = 528
# split-K segments hold at least this many key tiles: shorter ones cost more in the combine than they save (1 request /
# 8k with the window: 22 us in 33 segments of 2 tiles, 18 in 17 of 4; decode_attention_h200_window_programs.md)
MIN_SEGMENT_TILES = 4
RING_TILE = 32  # ring entries per step of a ring pass
# query rows per decode program: the G query heads of one KV head padded to a power of two, at least this many.  Triton
# pads dots below 16 rows on the tensor cores, while the scores' softmax runs on the rows the tensor holds: at 16 rows
# GQA 3:1 spends 13 of 16 on padding (offline SASS of the key-tile loop: 900 -> 707 instructions per warp with int8
# scores, 1,039 -> 791 without; benchmarks/gpu/offline_compile.py --rows)
DECODE_MIN_ROWS = 4
COMBINE_STEP = 4  # split-K partials per iteration of a decode step's combine (``_combine_kernel``)


def ring_chunk(entries: int, programs: int) -> int:
    """Ring entries per ring program: ``entries`` (sinks + window) split over ``programs`` (at least 1), rounded up
    to whole RING_TILE steps."""
    return triton.cdiv(triton.cdiv(entries, max(programs, 1)), RING_TILE) * RING_TILE


@dataclass
class AttentionPlan:
    """How one step's queries are cut into programs (shared by every layer of the step)."""

    q_seq: torch.Tensor  # [num_qblocks] int32: sequence of each query block
    q_first: torch.Tensor  # [num_qblocks] int32: its first query token, relative to the sequence's first
    block_q: int  # query tokens per program
    block_m: int  # rows per program (block_q x query heads per KV head, padded to a power of two)
    segments: int  # split-K segments per (query block, KV head)
    tile: int  # key tokens per inner-loop step
    num_warps: int = 4
    maxnreg: int | None = None  # register cap per thread; None: ``fused_attention`` picks (as num_stages)
    num_stages: int | None = None  # software pipelining; None: ``fused_attention`` picks the fastest measured
    # decode with the window: the ring in a launch of its own (``ring_rows``; ``launch_choice``: on CUDA from
    # RING_LAUNCH_MIN_REQUESTS requests, and with ``ring_beside``), else in ``ring_programs`` programs of the codes
    # launch after its segments
    ring_launch: bool = True
    ring_programs: int = RING_PROGRAMS
    # the ring's own launch on a side stream (``side_stream(device, "ring")``), beside the codes launch and joined
    # before the combine: its reads overlap the codes launch's instead of following them
    ring_beside: bool = False
    combine_step: int | None = None  # partials per iteration of the combine (1, 2 or 4); None: COMBINE_STEP for
    # decode-sized steps, 1 for prefill (whose plans have few segments and twice the combine rows)
    # uniform key codes in decode launches: scores on int8 tensor cores, queries rounded to int8 per row in the
    # Hadamard domain (``_int8_scores``); None: off
    qk_int8: bool | None = None
    # decode launches of uniform 2-bit codes on CUDA: the codes segments on the hand-written CUDA loop
    # (``cuda_decode``; the Triton kernel where ``cuda_decode.decode_refusal`` says why not); False: always Triton.
    # H100: 1.2-1.7x faster from 16 requests (benchmarks/results/decode_attention_h100_cuda_staged.md).  On for direct
    # calls; the backend sets it from ``aquakv_cuda_decode`` (default: on for sm_90 GPUs, where the server compiled
    # the loop at startup; benchmarks/results/throughput_h100_8192_512_cuda_decode.md)
    cuda_decode: bool = True
    # True: the CUDA loop as the step's one launch, the 16-bit ring's pass and the combine in it
    # (``cuda_decode.launch_decode_codes``); False: three launches (codes, the ring's own Triton launch,
    # ``_combine_kernel``), the ring then read by programs of the Triton codes launch below RING_LAUNCH_MIN_REQUESTS
    # requests
    cuda_fused: bool = False
    _partials: tuple | None = None  # split-K partial buffers, shared by the step's layers (``partials``)

    def partials(self, num_tokens: int, num_q_heads: int, head_dim: int, key_sums: bool, exact_sums: bool,
                 device) -> tuple[torch.Tensor, ...]:
        """(running max, denominator) [segments, N, Hq] and (value sums, key sums, 16-bit value sums)
        [segments, N, Hq, h] float32 scratch, allocated once per step: every layer of the step has the same shapes.
        Without ``key_sums`` (no value predictor from keys) or ``exact_sums`` (no 16-bit sinks/window) those are the
        value sums' buffer, which the kernel then does not touch.  Decode steps with ``exact_sums`` have one more
        segment per ring program (``ring_rows``)."""
        key = (num_tokens, num_q_heads, head_dim, key_sums, exact_sums, str(device))
        if self._partials is None or self._partials[0] != key:
            rows = self.segments + self.ring_rows(exact_sums)
            part = lambda *shape: torch.empty(rows, num_tokens, num_q_heads, *shape,  # noqa: E731
                                              dtype=torch.float32, device=device)
            m, l, acc_v = part(), part(), part(head_dim)
            self._partials = (key, (m, l, acc_v, part(head_dim) if key_sums else acc_v,
                                    part(head_dim) if exact_sums else acc_v))
        return self._partials[1]

    def ring_rows(self, window: bool) -> int:
        """How many split-K partials after the codes segments hold the 16-bit sinks/window pass of a decode step (one
        query token per program): 1 for a launch of its own (``ring_launch``: the codes launch then keeps no 16-bit
        sums and, without the ring pass, fits the same register cap as a launch without the window), else
        ``ring_programs`` for programs of the codes launch that each read a slice of the ring.  Prefill launches read
        the ring per tile (0)."""
        if not window or self.block_q != 1:
            return 0
        if not self.ring_launch and self.ring_programs < 1:
            raise ValueError(f"ring_programs must be >= 1 without the ring's own launch, got {self.ring_programs}")
        return 1 if self.ring_launch else self.ring_programs


def launch_choice(num_reqs: int, num_kv_heads: int, window: bool, cuda: bool, cuda_loop: bool,
                  beside: bool = True) -> tuple[int, bool, bool]:
    """``plan_attention``'s defaults for a step of ``num_reqs`` requests: (min_programs, ring_launch, ring_beside).
    ``cuda_loop``: a decode step on the CUDA codes loop (CUDA_LOOP_PROGRAMS); ``beside`` False: where the ring's
    launch would run beside the codes launch, it runs after it (``aquakv_ring_beside`` false)."""
    if not cuda:  # (the CPU interpreter runs programs one after another and copies the cache per launch)
        return 1, False, False
    few = num_reqs * num_kv_heads < WINDOW_DECODE_PROGRAMS  # (request, KV head) programs short of filling the GPU
    # the ring's own launch relieves GPU registers, which pays from RING_LAUNCH_MIN_REQUESTS decodes on; below, ring
    # programs in the codes launch; the CUDA loop's decodes that do not fill the GPU: the ring's launch beside theirs
    own_launch = cuda_loop and window and few
    ring_launch = num_reqs >= RING_LAUNCH_MIN_REQUESTS or own_launch
    programs = (CUDA_LOOP_PROGRAMS if cuda_loop and not few
                else CUDA_LOOP_FEW_PROGRAMS if cuda_loop and num_reqs >= RING_LAUNCH_MIN_REQUESTS
                else WINDOW_DECODE_PROGRAMS if window and not ring_launch else 264)
    return programs, ring_launch, own_launch and beside


def plan_attention(query_start_loc: list[int], max_seq_len: int, num_q_heads: int, num_kv_heads: int, device,
                   tile: int | None = None, min_programs: int | None = None, num_warps: int = 4,
                   num_stages: int | None = None, maxnreg: int | None = None, window: bool = False,
                   int8_scores: bool = False, decode_rows: int = DECODE_MIN_ROWS,
                   min_segment_tiles: int = MIN_SEGMENT_TILES, cuda_loop: bool = True,
                   ring_beside: bool = True) -> AttentionPlan:
    """Cut each sequence's query tokens into blocks; split the key range of each block into enough segments that
    the launch has ~``min_programs`` programs (default: ``launch_choice``'s; 1, i.e. no split, in the CPU
    interpreter) when there are few
    sequences (long decodes), each segment at least ``min_segment_tiles`` key tiles of the ``max_seq_len`` range.
    Key tiles: 128 tokens for decode-only steps, 64 with prefill rows (the fastest in
    benchmarks/results/decode_attention_h100's sweep).  ``int8_scores``: decode steps score on int8 tensor cores
    (``AttentionPlan.qk_int8``).  Decode programs hold the G query heads of one KV head, padded to a power of two of
    at least ``decode_rows`` rows (``DECODE_MIN_ROWS``); prefill programs 64 rows.  ``cuda_loop``: decode steps will
    run the CUDA codes loop (``AttentionPlan.cuda_decode``), whose plans differ (CUDA_LOOP_PROGRAMS);
    ``ring_beside`` False keeps their ring's launch after the codes launch (``launch_choice``)."""
    cuda = torch.device(device).type == "cuda"
    num_reqs = len(query_start_loc) - 1
    max_q = max(b - a for a, b in zip(query_start_loc[:-1], query_start_loc[1:]))
    programs, ring_launch, ring_beside = launch_choice(num_reqs, num_kv_heads, window, cuda,
                                                       cuda and cuda_loop and max_q == 1, ring_beside)
    min_programs = min_programs or programs
    group = num_q_heads // num_kv_heads
    tile = tile or (128 if max_q == 1 else 64)
    block_m = max(decode_rows if max_q == 1 else 64, triton.next_power_of_2(group))
    block_q = 1 if max_q == 1 else block_m // group
    if max_q == 1:  # decode: one program row per request, made on the device (no host-to-device copy, so a CUDA
        # graph can capture it; requests without a token, as CUDA-graph padding, get programs that store nothing)
        q_seq = torch.arange(num_reqs, dtype=torch.int32, device=device)
        q_first = torch.zeros(num_reqs, dtype=torch.int32, device=device)
    else:
        seq, first = [], []
        for r, (a, b) in enumerate(zip(query_start_loc[:-1], query_start_loc[1:])):
            for f in range(0, b - a, block_q):
                seq.append(r)
                first.append(f)
        as_tensor = lambda x: torch.tensor(x, dtype=torch.int32).to(device, non_blocking=True)  # noqa: E731
        q_seq, q_first = as_tensor(seq), as_tensor(first)
    programs = q_seq.shape[0] * num_kv_heads
    segments = max(1, min(triton.cdiv(min_programs, programs), triton.cdiv(max_seq_len, tile * min_segment_tiles), 64))
    # (the CPU interpreter runs programs one after another: one ring program, not RING_PROGRAMS slices)
    return AttentionPlan(q_seq, q_first, block_q, block_m, segments, tile, num_warps, maxnreg, num_stages,
                         ring_launch=ring_launch, ring_programs=RING_PROGRAMS if cuda else 1,
                         ring_beside=ring_beside, qk_int8=int8_scores and max_q == 1, cuda_decode=cuda_loop)


@dataclass
class WindowInputs:
    """What the kernel needs for 16-bit sinks and recent window (``vllm_aquakv.window``) in one layer."""

    ring_k: torch.Tensor  # [rows, sinks + window, H, h] 16-bit post-RoPE keys
    ring_v: torch.Tensor  # the same for values
    tags: torch.Tensor  # [rows, sinks + window] int64 paged slot of each entry, -1 empty
    key: torch.Tensor  # [N, H, h] this step's keys (post-RoPE) and values, any strides with a contiguous last dim
    value: torch.Tensor
    sinks: int
    window: int


def fused_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, plan: AttentionPlan, layer: FusedLayer, scale: float,
                    out: torch.Tensor | None = None, window: WindowInputs | None = None) -> torch.Tensor:
    """Causal attention of query [N, Hq, h] (post-RoPE, any float dtype) over the paged aquakv cache
    kv_cache [num_blocks, H, page_block, slot] (uint8) -> out [N, Hq, h] (any float dtype and strides with a
    contiguous last dim; float32 if not given).  block_table [R, max_blocks], seq_lens [R] (context incl. this step's
    tokens) and query_start_loc [R + 1] are int32 on the device.  With ``window``, key j of query i is read from
    16 bits when j < sinks or i - j < window and a copy is there (ring row = the request's batch row).  Two launches:
    the attention kernel writes split-K partials, ``_combine_kernel`` merges them into ``out``."""
    if window is not None and (layer.v_bias is not None or layer.v_weight is not None):
        raise ValueError("16-bit sinks/window in the fused kernel need an artifact without a value predictor")
    n, num_q_heads, h = query.shape
    _, heads, page_block, _ = kv_cache.shape
    group = num_q_heads // heads
    segments = plan.segments
    rows = _combine_rows(n, group)  # the combine's launch
    step = plan.combine_step or (COMBINE_STEP if rows <= 16 else 1)
    if step not in (1, 2, 4):  # (the kernel unrolls exactly these)
        raise ValueError(f"combine_step must be 1, 2 or 4, got {step}")
    m, l, acc_v, acc_k, acc_x = plan.partials(n, num_q_heads, h, layer.v_weight is not None, window is not None,
                                              query.device)
    interpret = query.device.type != "cuda"  # the interpreter takes float32 dots: the torch twin's arithmetic
    kl, vl = launch_lanes(layer.k_lanes, plan.block_m), launch_lanes(layer.v_lanes, plan.block_m)
    # launch settings: the plan's, else the fastest measured (benchmarks/results/decode_attention_h200: uniform codes
    # in decode launches 2 stages and <= 128 registers without the window, whose 16-bit pass needs more)
    uniform = kl.index_bits <= 1
    w = window
    ring_rows = plan.ring_rows(window is not None)
    ring_launch = ring_rows > 0 and plan.ring_launch
    ring_programs = 0 if ring_launch else ring_rows
    stages = plan.num_stages or (2 if uniform else 1)
    maxnreg = plan.maxnreg or (128 if uniform and (window is None or ring_launch) else None)
    slot_align = math.gcd(kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), 16)
    qk_int8 = bool(plan.qk_int8)
    if qk_int8 and not (uniform and int8_scores_refusal(layer) is None):
        raise ValueError(f"qk_int8: {int8_scores_refusal(layer) or 'decode launches only (one query token each)'}")
    dummy = layer.rot_k  # any float32 tensor, for pointers the kernel does not read
    q_dtype = tl.float32 if interpret else _QUERY_DOT_DTYPES.get(query.dtype, tl.float32)
    launch = lambda z, ring_only, **options: _fused_attention_kernel[(plan.q_seq.shape[0], heads, z)](  # noqa: E731
        query, layer.sign_k, dummy if layer.k_bias is None else layer.k_bias,
        dummy if layer.k_dinv is None else layer.k_dinv, kv_cache, block_table, seq_lens,
        query_start_loc, plan.q_seq, plan.q_first, kl.table, vl.table,
        m, l, acc_v, acc_k, acc_x, *(dummy,) * 3 if w is None else (w.ring_k, w.ring_v, w.tags),
        *(query, query) if w is None else (w.key, w.value),
        segments, n, scale * LOG2E,
        query.stride(0), query.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        block_table.stride(0), *(0, 0, 0, 0) if w is None else (w.key.stride(0), w.key.stride(1),
                                                                w.value.stride(0), w.value.stride(1)),
        G=group, NUM_KV_HEADS=heads, SINKS=0 if w is None else w.sinks, WINDOW=0 if w is None else w.window,
        HAS_WINDOW=w is not None, RING_FIRST=w is not None and plan.block_q == 1, RING_ONLY=ring_only,
        RING_PROGRAMS=ring_programs, RING_CHUNK=0 if w is None else ring_chunk(w.sinks + w.window, ring_programs),
        RING_TILE=RING_TILE,
        NUM_Q_HEADS=num_q_heads, BLOCK_Q=plan.block_q, BLOCK_M=plan.block_m, TILE=plan.tile, HEAD_DIM=h,
        PAGE_BLOCK=page_block, SLOT_ALIGN=slot_align,
        K_CODE_BYTES=kl.code_bytes, K_INDEX_BITS=kl.index_bits, K_ENTRY_VALUES=kl.entry_values, K_LANES=kl.lanes,
        V_CODE_OFFSET=layer.v_code_offset, V_CODE_BYTES=vl.code_bytes, V_INDEX_BITS=vl.index_bits,
        V_ENTRY_VALUES=vl.entry_values, V_LANES=vl.lanes, K_SCALE_OFFSET=layer.k_scale_offset,
        V_SCALE_OFFSET=layer.v_scale_offset, HAS_K_BIAS=layer.k_bias is not None,
        V_FROM_K=layer.v_weight is not None, DOT_DTYPE=tl.float32 if interpret else tl.float16,
        Q_DTYPE=q_dtype, Q_PRECISION="tf32x3" if q_dtype == tl.float32 else "tf32", USE_ASM=not interpret,
        QK_INT8=qk_int8, HAS_K_SCALE=layer.k_dinv is not None, num_warps=plan.num_warps, num_stages=stages,
        **options,
    )
    cuda_loop = cuda_decode.decode_refusal(query, kv_cache, plan, layer, window, out) is None
    ring_stream = None  # (the one-launch CUDA loop, ``cuda_fused``, reads the ring in its own blocks)
    if ring_launch and plan.ring_beside and not interpret and not (cuda_loop and plan.cuda_fused):
        ring_stream = side_stream(query.device, "ring")  # the sinks/window pass beside the codes launch
        ring_stream.wait_stream(torch.cuda.current_stream(query.device))
        with torch.cuda.stream(ring_stream):
            launch(1, True)
    if cuda_loop:
        if out is None:
            out = torch.empty(n, num_q_heads, h, dtype=torch.float32, device=query.device)
        cuda_decode.launch_decode_codes(query, kv_cache, block_table, seq_lens, query_start_loc, plan, layer,
                                        scale * LOG2E, m, l, acc_v, window, acc_x, out)
        if plan.cuda_fused:  # (the ring's pass, as partial number ``segments``, and the combine were in it)
            return out
    else:
        launch(segments + ring_programs, False, **({"maxnreg": maxnreg} if maxnreg and not interpret else {}))
    if ring_stream is not None:  # (joined: the combine reads its partial)
        torch.cuda.current_stream(query.device).wait_stream(ring_stream)
    elif ring_launch:  # the sinks/window pass as partial number ``segments`` (``AttentionPlan.ring_rows``)
        launch(1, True)
    if out is None:
        out = torch.empty(n, num_q_heads, h, dtype=torch.float32, device=query.device)
    _combine_kernel[(triton.cdiv(n, rows // group), heads)](
        m, l, acc_v, acc_k, acc_x, layer.sign_v, layer.sign_k, dummy if layer.v_bias is None else layer.v_bias,
        dummy if layer.k_bias is None else layer.k_bias, dummy if layer.v_weight is None else layer.v_weight,
        dummy if layer.k_dinv is None else layer.k_dinv, out, segments + ring_rows, n, out.stride(0), out.stride(1),
        G=group, NUM_Q_HEADS=num_q_heads, HEAD_DIM=h, ROWS=rows,
        HAS_V_BIAS=layer.v_bias is not None, HAS_K_BIAS=layer.k_bias is not None,
        V_FROM_K=layer.v_weight is not None, HAS_WINDOW=w is not None, RING_ROWS=ring_rows, STEP=step,
        DOT_DTYPE=tl.float32 if interpret else tl.float16, HAS_K_SCALE=layer.k_dinv is not None, num_warps=8,
    )
    return out


_SIDE_STREAMS: dict[tuple[torch.device, str], torch.cuda.Stream] = {}


def side_stream(device: torch.device, role: str) -> torch.cuda.Stream:
    """One extra CUDA stream of ``device`` per ``role``: "write" for decode steps' cache writes beside their layer's
    attention (``cache_write.write_beside``), "ring" for the 16-bit sinks/window pass beside the codes launch
    (``AttentionPlan.ring_beside``)."""
    key = (torch.device(device), role)
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=key[0])
    return _SIDE_STREAMS[key]


def int8_scores_refusal(layer: FusedLayer) -> str | None:
    """Why a fused layer cannot take decode scores on int8 tensor cores (``AttentionPlan.qk_int8``), or None."""
    k = layer.k_lanes
    if k.index_bits > 1 or k.lanes != 4:
        return "int8 scores need uniform 2-bit key codes (u1n4, the speed preset's grid)"
    if k.code_bytes < 32:
        return f"int8 scores need head_dim >= 128 (int8 tensor-core dots take 32 code bytes; this has {k.code_bytes})"
    if layer.v_weight is not None:
        return "int8 scores do not combine with a value predictor from keys (it needs the keys as 16-bit lanes)"
    return None


def compiled_variants() -> int | None:
    """How many compiled variants the fused kernels hold in this process (None if this Triton does not say): the
    same number before and after serving means no request waited for Triton's JIT."""
    from .cache_write import _cache_write_kernel
    from .reconstruct import _window_merge_kernel

    try:
        return sum(len(c[0]) for k in (_fused_attention_kernel, _combine_kernel, _cache_write_kernel,
                                       _window_merge_kernel)
                   for c in k.device_caches.values())
    except (AttributeError, TypeError, IndexError):
        return None


def _combine_rows(num_tokens: int, group: int) -> int:
    """Rows (tokens x query heads of one KV head) per combine program: 16 for decode-sized steps, 32 for prefill
    (more tokens share each program's loads of the [h, h] epilogue matrices)."""
    return max(16 if num_tokens * group < 256 else 32, triton.next_power_of_2(group))


def warm_up(fused: dict[int, FusedLayer], slot_bytes: list[int], num_q_heads: int, num_kv_heads: int,
            page_block: int, dtype: torch.dtype, window: tuple[int, int] | None = None,
            int8_scores: bool = False) -> int:
    """Compile the attention kernel (as decode and as prefill launches) and the cache write for every distinct layer
    configuration, so that no request waits for Triton's JIT (seconds per variant).  Returns the number of layer
    variants."""
    from .cache_write import PREFILL_TOKENS, launch_settings, write_fused

    seen = set()
    for layer, f in fused.items():
        lanes = [(t.index_bits, t.entry_values, t.code_bytes, t.code_bits, tuple(t.grid.shape))
                 for t in (f.k_lanes, f.v_lanes)]
        key = (slot_bytes[layer], *lanes, f.v_code_offset, f.k_scale_offset, f.v_scale_offset, f.k_bias is None,
               f.v_bias is None, f.v_weight is None, f.k_scale is None)  # every compile-time setting of both kernels
        if key in seen:
            continue
        seen.add(key)
        h, device = f.rot_k.shape[0], f.rot_k.device
        context = 257  # tokens: enough prefill rows for the wide combine launch (``_combine_rows``)
        blocks = triton.cdiv(context, page_block)
        cache = torch.zeros(blocks, num_kv_heads, page_block, slot_bytes[layer], dtype=torch.uint8, device=device)
        block_table = torch.arange(blocks, dtype=torch.int32, device=device)[None]
        kv = torch.randn(context, num_kv_heads, h, device=device).to(dtype)
        # the cache write's decode and prefill launches (``launch_settings``), alone and storing the ring entries
        launches = {tuple(launch_settings(n, dtype, f.write_v_from_k is not None).items()) for n in (1, PREFILL_TOKENS)}
        slots = torch.arange(context, device=device)
        rings = [None]
        if window is not None:
            ring, zero = torch.zeros(2, sum(window), num_kv_heads, h, dtype=dtype, device=device), 0 * slots
            rings.append((ring, ring, WindowStep(zero, zero, slots)))  # every token into ring entry (0, 0)
        for launch in launches:
            for ring_args in rings:
                write_fused(f, cache, slots, kv, kv, ring=ring_args, **dict(launch))
        for new_tokens in (1, 2, context):  # decode, short and long prefill launches
            qsl = [0, new_tokens]
            seq_lens = torch.tensor([context], dtype=torch.int32, device=device)
            plan = plan_attention(qsl, context, num_q_heads, num_kv_heads, device, window=window is not None,
                                  int8_scores=int8_scores)
            query = torch.randn(new_tokens, num_q_heads, h, device=device).to(dtype)
            win = None
            if window is not None:  # (sinks, window): an empty ring, this step's keys/values as vLLM hands them
                ring = torch.zeros(2, sum(window), num_kv_heads, h, dtype=dtype, device=device)
                tags = torch.full((2, sum(window)), -1, dtype=torch.int64, device=device)
                win = WindowInputs(ring, ring, tags, kv[:new_tokens], kv[:new_tokens], *window)
            fused_attention(query, cache, block_table, seq_lens, torch.tensor(qsl, dtype=torch.int32, device=device),
                            plan, f, 1.0, out=torch.empty_like(query), window=win)  # output: the model dtype
    return len(seen)
