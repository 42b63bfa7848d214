"""Triton paged attention over aquakv slots that never decodes a key: the fused-kernel mode (``key_rope="post"``).

With post-RoPE keys k_t = b_k + A^T y_t (A = diag(signs) H / sqrt(h) the codec's rotation, y_t = grid[code_t] *
scale_t / sqrt(h) the token's dequantized Hadamard-domain residual), a score is

    q . k_t = q . b_k + (q A) . grid[code_t] * scale_t / sqrt(h)

so the query is rotated once per step (``rotate_queries``, one matmul per layer) and every cached key costs a grid
lookup and a dot product on tensor cores: no inverse Hadamard and no RoPE per cached token.  Values are summed in the Hadamard domain too
(sum_t p_t scale_t grid[code_t]) and rotated once per query; a per-head value predictor from the same layer's keys,
v_t = b_v + k_t W + A^T y^v_t, is linear in k_t, so it is applied once per query to the softmax-weighted key sum.

One program handles BLOCK_Q query tokens of one sequence x the G query heads of one KV head (rows = BLOCK_M), and
one segment of that sequence's causal key range (split-K for long decodes).  It writes unnormalized partials
(running max, denominator, Hadamard-domain value and key sums); ``combine`` merges the segments and applies the
per-query epilogue in torch.  Its torch twin is ``vllm_aquakv.serving.TorchServingPath.attend``.

Speed today (H100, benchmarks/results/decode_attention_h100.md): 0.44-0.51x vLLM's bf16 TRITON_ATTN at batch 64,
5-6% of its own HBM floor: bound by code unpacking, grid gathers and layout conversions, not by bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .dequant import sylvester_hadamard

LOG2E = 1.4426950408889634


@triton.jit
def _coordinate_pair(pair):
    """Two float32 grid coordinates packed in one int64 (first in the low half)."""
    lo = pair.to(tl.int32).to(tl.float32, bitcast=True)
    hi = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return lo, hi


@triton.jit
def _load_codes(cache_ptr, base, t_mask, grid_ptr, PART_OFFSET: tl.constexpr, CODE_BYTES: tl.constexpr,
                HEAD_DIM: tl.constexpr, GRID_DIM: tl.constexpr, CODE_BITS: tl.constexpr, TILE: tl.constexpr):
    """Grid coordinates z [T, h] and fp16 scales [T] (float32) of one stream for the tokens at ``base`` [T].

    Codes are read a unit at a time (1 byte, or 3 bytes for 3- and 6-bit codes) and split with shifts; the grid is
    read as pairs of coordinates packed in one integer (``packed_grid``), so a 2-D point costs one gather."""
    UNIT_BYTES: tl.constexpr = 3 if (CODE_BITS == 3 or CODE_BITS == 6) else 1
    UNIT_CODES: tl.constexpr = 8 * UNIT_BYTES // CODE_BITS
    NUM_UNITS: tl.constexpr = CODE_BYTES // UNIT_BYTES
    NUM_CODES: tl.constexpr = HEAD_DIM // GRID_DIM
    u = tl.arange(0, NUM_UNITS)
    row = cache_ptr + base[:, None] + PART_OFFSET  # [T, 1] pointers to the stream's first code byte
    if UNIT_BYTES == 1:
        word = tl.load(row + u[None, :], mask=t_mask[:, None], other=0).to(tl.int32)  # [T, U]
    else:
        b = tl.arange(0, 4)
        three = tl.load(row[:, :, None] + (u * 3)[None, :, None] + b[None, None, :],
                        mask=t_mask[:, None, None] & (b < 3)[None, None, :], other=0).to(tl.int32)  # [T, U, 4]
        word = tl.sum(three << (8 * b)[None, None, :], axis=2)  # [T, U]: 24 bits, little-endian
    k = tl.arange(0, UNIT_CODES)
    code = (word[:, :, None] >> (CODE_BITS * k)[None, None, :]) & ((1 << CODE_BITS) - 1)  # [T, U, codes per unit]
    code = tl.reshape(code, [TILE, NUM_CODES])
    if GRID_DIM == 1:
        z = tl.load(grid_ptr + code)
    elif GRID_DIM == 2:
        lo, hi = _coordinate_pair(tl.load(grid_ptr + code))
        z = tl.reshape(tl.join(lo, hi), [TILE, HEAD_DIM])
    else:  # GRID_DIM == 4
        z0, z1 = _coordinate_pair(tl.load(grid_ptr + 2 * code))
        z2, z3 = _coordinate_pair(tl.load(grid_ptr + 2 * code + 1))
        z = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [TILE, HEAD_DIM])
    s_ptr = cache_ptr + base + PART_OFFSET + CODE_BYTES
    s_lo = tl.load(s_ptr, mask=t_mask, other=0).to(tl.int16)
    s_hi = tl.load(s_ptr + 1, mask=t_mask, other=0).to(tl.int16)
    scale = ((s_hi << 8) | s_lo).to(tl.float16, bitcast=True).to(tl.float32)
    return z, scale


@triton.jit
def _fused_attention_kernel(
    q_ptr, q_bias_ptr, cache_ptr, block_table_ptr, seq_lens_ptr, q_start_ptr, qblock_seq_ptr, qblock_first_ptr,
    k_grid_ptr, v_grid_ptr,
    m_ptr, l_ptr, acc_v_ptr, acc_k_ptr,
    num_segments, num_tokens,
    stride_block, stride_head, stride_token, stride_bt,
    G: tl.constexpr, NUM_Q_HEADS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr, PAGE_BLOCK: tl.constexpr,
    K_CODE_BYTES: tl.constexpr, K_GRID_DIM: tl.constexpr, K_CODE_BITS: tl.constexpr,
    V_OFFSET: tl.constexpr, V_CODE_BYTES: tl.constexpr, V_GRID_DIM: tl.constexpr, V_CODE_BITS: tl.constexpr,
    HAS_K_BIAS: tl.constexpr, V_FROM_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    qblock = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)
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
    q_rows = (q_start + tok) * NUM_Q_HEADS + q_head  # [M] rows of the [N * Hq] rotated queries
    q_rot = tl.load(q_ptr + q_rows[:, None] * HEAD_DIM + j[None, :], mask=row_mask[:, None], other=0.0)
    q_rot = q_rot.to(DOT_DTYPE)  # [M, h]: q A scaled to base-2 logits per unit residual norm (``rotate_queries``)
    if HAS_K_BIAS:
        q_bias = tl.load(q_bias_ptr + q_rows, mask=row_mask, other=0.0)  # [M]: q . b_k in base-2 logits

    # this segment's share of the causal key range [0, last query position + 1)
    kv_end = context + tl.minimum(first + BLOCK_Q, q_len)
    num_tiles = tl.cdiv(kv_end, TILE)
    per_segment = tl.cdiv(num_tiles, num_segments)
    tile_lo = segment * per_segment
    tile_hi = tl.minimum(tile_lo + per_segment, num_tiles)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_v = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc_k = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for tile in range(tile_lo, tile_hi):
        t = tile * TILE + tl.arange(0, TILE)  # key positions [T]
        t_mask = t < kv_end
        blk = tl.load(block_table_ptr + seq * stride_bt + t // PAGE_BLOCK, mask=t_mask, other=0).to(tl.int64)
        base = blk * stride_block + kv_head * stride_head + (t % PAGE_BLOCK) * stride_token
        z_k, scale_k = _load_codes(cache_ptr, base, t_mask, k_grid_ptr, 0, K_CODE_BYTES, HEAD_DIM, K_GRID_DIM,
                                   K_CODE_BITS, TILE)
        s = tl.dot(q_rot, tl.trans(z_k.to(DOT_DTYPE))) * scale_k[None, :]  # [M, T], base-2 logits
        if HAS_K_BIAS:
            s += q_bias[:, None]
        visible = (t[None, :] <= q_pos[:, None]) & t_mask[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
        z_v, scale_v = _load_codes(cache_ptr, base, t_mask, v_grid_ptr, V_OFFSET, V_CODE_BYTES, HEAD_DIM,
                                   V_GRID_DIM, V_CODE_BITS, TILE)
        acc_v = acc_v * alpha[:, None] + tl.dot((p * scale_v[None, :]).to(DOT_DTYPE), z_v.to(DOT_DTYPE))
        if V_FROM_K:
            acc_k = acc_k * alpha[:, None] + tl.dot((p * scale_k[None, :]).to(DOT_DTYPE), z_k.to(DOT_DTYPE))

    # partials [segments, tokens, q heads, (h)]
    idx = (segment * num_tokens + q_start + tok) * NUM_Q_HEADS + q_head
    tl.store(m_ptr + idx, m_i, mask=row_mask)
    tl.store(l_ptr + idx, l_i, mask=row_mask)
    tl.store(acc_v_ptr + idx[:, None] * HEAD_DIM + j[None, :], acc_v, mask=row_mask[:, None])
    if V_FROM_K:
        tl.store(acc_k_ptr + idx[:, None] * HEAD_DIM + j[None, :], acc_k, mask=row_mask[:, None])


@dataclass
class FusedLayer:
    """One layer's constants for the fused kernel, on the serving device."""

    rot: torch.Tensor  # [h, h] float32: A = diag(signs) H / sqrt(h); decode is y @ A^T
    k_grid: torch.Tensor  # ``packed_grid``
    v_grid: torch.Tensor
    k_bias: torch.Tensor | None  # [H, h] post-RoPE key mean, or None
    v_bias: torch.Tensor | None  # [H, h]
    v_weight: torch.Tensor | None  # [H, h, h]: v = k W[head] + ... (per-head predictor from the same layer's keys)
    k_code_bytes: int
    k_grid_dim: int
    k_code_bits: int
    v_offset: int
    v_code_bytes: int
    v_grid_dim: int
    v_code_bits: int


def packed_grid(grid: torch.Tensor) -> torch.Tensor:
    """Grid [points, d] as the kernel gathers it: [points] float32 for d = 1, else coordinate pairs packed in one
    int64 each (float32 halves, first coordinate in the low half, little-endian): [points, d / 2].  (bfloat16 pairs
    in an int32 crash Triton 3.6's TritonGPUOptimizeDotOperands pass on the H100.)"""
    grid = grid.float().contiguous()
    return grid.reshape(-1) if grid.shape[1] == 1 else grid.view(torch.int64).contiguous()


def fused_layer_or_reason(cache, layout, layer: int) -> FusedLayer | str:
    """The fused kernel's constants for ``layer`` of an AquaKVCache (on its device), or why the layer cannot use it."""
    cfg = cache.config
    if cfg.key_rope != "post":
        return "the artifact quantizes keys before RoPE (calibrate with --key-rope post for the fused kernel)"
    kc, vc = cache.codecs["k", layer], cache.codecs["v", layer]
    if kc is None or vc is None:
        return f"layer {layer} is stored in 16 bits"
    for c in (kc, vc):
        if c.group_size != c.head_dim or not c.rotate or c.code_bits not in (1, 2, 3, 4, 6, 8) or c.grid_dim > 4:
            return ("the fused kernel needs one scale per (token, KV head), the Hadamard rotation, 1/2/3/4/6/8-bit "
                    "codes and grids of dimension <= 4")
    if not torch.equal(kc.signs, vc.signs):
        return "keys and values use different Hadamard signs"
    kp, vp = cache.predictors.get(("k", layer)), cache.predictors.get(("v", layer))
    if kp is not None and kp.sources:
        return f"layer {layer}'s key predictor reads {kp.sources}"
    v_weight = None
    if vp is not None and vp.sources:
        if vp.sources != (("k", layer),) or vp.weight is None or vp.weight.ndim != 3:
            return f"layer {layer}'s value predictor ({vp.structure} from {vp.sources}) is not per-head from K_l"
        v_weight = vp.weight.float().contiguous()  # [H, h, h]
    h = kc.head_dim
    device = kc.signs.device
    rot = (kc.signs.float()[:, None] * sylvester_hadamard(h, str(device))) / math.sqrt(h)
    (k_code, k_scale), (v_code, _) = layout.parts
    bias = lambda p: None if p is None or p.bias is None else p.bias.float().contiguous()  # noqa: E731
    return FusedLayer(rot.contiguous(), packed_grid(kc.grid), packed_grid(vc.grid), bias(kp),
                      bias(vp), v_weight, k_code, kc.grid_dim, kc.code_bits, k_code + k_scale, v_code, vc.grid_dim,
                      vc.code_bits)


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
    num_stages: int = 1  # software pipelining off: 4x faster on the H100 (benchmarks/results/decode_attention_h100)
    dot_fp32: bool = False  # float32 tensor-core inputs on CUDA (tf32, or IEEE with TRITON_F32_DEFAULT=ieee)


def plan_attention(query_start_loc: list[int], max_seq_len: int, num_q_heads: int, num_kv_heads: int, device,
                   tile: int = 64, min_programs: int | None = None, num_warps: int = 4,
                   num_stages: int = 1, dot_fp32: bool = False) -> AttentionPlan:
    """Cut each sequence's query tokens into blocks; split the key range of each block into enough segments that
    the launch has ~``min_programs`` programs (default: 2 per H100 SM on CUDA; 1, i.e. no split, in the CPU
    interpreter) when there are few sequences (long decodes)."""
    if min_programs is None:
        min_programs = 264 if torch.device(device).type == "cuda" else 1
    group = num_q_heads // num_kv_heads
    max_q = max(b - a for a, b in zip(query_start_loc[:-1], query_start_loc[1:]))
    block_m = max(16, triton.next_power_of_2(group)) if max_q == 1 else max(64, triton.next_power_of_2(group))
    block_q = 1 if max_q == 1 else block_m // group
    seq, first = [], []
    for r, (a, b) in enumerate(zip(query_start_loc[:-1], query_start_loc[1:])):
        for f in range(0, b - a, block_q):
            seq.append(r)
            first.append(f)
    programs = len(seq) * num_kv_heads
    segments = max(1, min(triton.cdiv(min_programs, programs), triton.cdiv(max_seq_len, tile), 64))
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int32).to(device, non_blocking=True)  # noqa: E731
    return AttentionPlan(as_tensor(seq), as_tensor(first), block_q, block_m, segments, tile, num_warps, num_stages,
                         dot_fp32)


def fused_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, plan: AttentionPlan, layer: FusedLayer,
                    scale: float) -> torch.Tensor:
    """Causal attention of query [N, Hq, h] (post-RoPE, any float dtype) over the paged aquakv cache
    kv_cache [num_blocks, H, page_block, slot] (uint8) -> [N, Hq, h] float32.  block_table [R, max_blocks],
    seq_lens [R] (context incl. this step's tokens) and query_start_loc [R + 1] are int32 on the device."""
    n, num_q_heads, h = query.shape
    _, heads, page_block, _ = kv_cache.shape
    group = num_q_heads // heads
    segments = plan.segments
    part = lambda *shape: torch.empty(segments, n, num_q_heads, *shape, dtype=torch.float32,  # noqa: E731
                                      device=query.device)
    m, l, acc_v = part(), part(), part(h)
    acc_k = part(h) if layer.v_weight is not None else acc_v
    interpret = query.device.type != "cuda"
    q_rot, q_bias = rotate_queries(query, layer, scale, group)
    _fused_attention_kernel[(plan.q_seq.shape[0], heads, segments)](
        q_rot, q_bias if q_bias is not None else q_rot, kv_cache, block_table, seq_lens, query_start_loc, plan.q_seq,
        plan.q_first, layer.k_grid, layer.v_grid,
        m, l, acc_v, acc_k,
        segments, n,
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), block_table.stride(0),
        G=group, NUM_Q_HEADS=num_q_heads, BLOCK_Q=plan.block_q, BLOCK_M=plan.block_m, TILE=plan.tile, HEAD_DIM=h,
        PAGE_BLOCK=page_block, K_CODE_BYTES=layer.k_code_bytes, K_GRID_DIM=layer.k_grid_dim,
        K_CODE_BITS=layer.k_code_bits, V_OFFSET=layer.v_offset, V_CODE_BYTES=layer.v_code_bytes,
        V_GRID_DIM=layer.v_grid_dim, V_CODE_BITS=layer.v_code_bits, HAS_K_BIAS=layer.k_bias is not None,
        V_FROM_K=layer.v_weight is not None, DOT_DTYPE=tl.float32 if interpret or plan.dot_fp32 else tl.bfloat16,
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    return combine(m, l, acc_v, acc_k if layer.v_weight is not None else None, layer, group)


def _per_query_head(x: torch.Tensor, group: int) -> torch.Tensor:
    """View [N, Hq, ...] as [N, H, G, ...] (query heads of one KV head together), so per-KV-head constants broadcast
    without being copied per query head."""
    return x.view(x.shape[0], x.shape[1] // group, group, *x.shape[2:])


def rotate_queries(query: torch.Tensor, layer: FusedLayer, scale: float,
                   group: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Queries [N, Hq, h] -> (q A scaled so that (q A) . grid[codes] * fp16 scale gives base-2 logits, contiguous
    float32 [N, Hq, h]; q . b_k in base-2 logits [N, Hq] or None without a key mean).  One matmul per layer and
    step instead of one per program."""
    h = query.shape[-1]
    q = query.float()
    q_rot = (q @ layer.rot) * (scale * LOG2E / math.sqrt(h))
    q_bias = None
    if layer.k_bias is not None:
        q_bias = (_per_query_head(q, group) * layer.k_bias[:, None]).sum(-1).flatten(1) * (scale * LOG2E)
    return q_rot.contiguous(), q_bias


def combine(m: torch.Tensor, l: torch.Tensor, acc_v: torch.Tensor, acc_k: torch.Tensor | None, layer: FusedLayer,
            group: int) -> torch.Tensor:
    """Merge split-K partials (m, l [S, N, Hq]; acc [S, N, Hq, h]) and apply the per-query epilogue -> [N, Hq, h]."""
    h = acc_v.shape[-1]
    weight = torch.exp2(m - m.amax(0, keepdim=True))  # [S, N, Hq]
    denom = (weight * l).sum(0)[..., None] * math.sqrt(h)  # [N, Hq, 1]; y = z * scale / sqrt(h)
    y_v = (weight[..., None] * acc_v).sum(0) / denom  # softmax-weighted Hadamard-domain value residual
    out = _per_query_head(y_v @ layer.rot.T, group)  # back from the Hadamard domain: [N, H, G, h]
    if layer.v_bias is not None:
        out += layer.v_bias[:, None]
    if acc_k is not None:
        k_mean = (weight[..., None] * acc_k).sum(0) / denom @ layer.rot.T  # softmax-weighted keys [N, Hq, h]
        k_mean = _per_query_head(k_mean, group)
        if layer.k_bias is not None:
            k_mean += layer.k_bias[:, None]
        out += torch.einsum("nkgi,kio->nkgo", k_mean, layer.v_weight)  # per-head value predictor
    return out.flatten(1, 2)
