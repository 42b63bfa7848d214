"""Prefill through FlashAttention: reconstruct the prefill requests' K/V from their aquakv codes into 16-bit rows,
then run vLLM's own varlen FlashAttention over them.

The fused kernel (``attention.py``) decodes every cached key once per block of query rows; a 4k-token prompt then
decodes each key ~200 times and runs small tensor-core tiles, ~3x slower than FA3 at bf16.  Here each key is
decoded once per layer and step (``_reconstruct_kernel``: codes -> lanes -> one rotation back from the Hadamard
domain, plus the key mean, value mean and per-head value predictor), and the attention itself is FA3's.  The
arithmetic is the fused kernel's: every key and value the queries read comes from its codes (no 16-bit
shortcut for the step's own tokens), so the result equals the torch path's within bf16 rounding of K/V.
Its torch twin is ``vllm_aquakv.serving.TorchServingPath.read_context``.

With 16-bit sinks/window (``WindowInputs``) query p reads key t from its 16-bit copy when t < sinks or
p - t < window (and the copy is there: ``vllm_aquakv.window``), else from its codes.  FlashAttention takes that as two
calls over the same rows, merged by their log-sum-exps (``merge_partials``):

- codes part: the first len - window keys of each request (``seqused_k``); bottom-right causal alignment then gives
  query p the keys t <= p - window, exactly those not in its window.  The rows' sinks hold their 16-bit copies
  first.
- window part: the rows of positions [context - window + 1, len) then take their 16-bit copies too (the ring's, and
  the step's own keys/values), and a sliding-window call (``window_left = window - 1``) gives query p the keys
  (p - window, p].  Served on CUDA, one Triton launch does the window part and the merge (``window_attention_merge``,
  ``aquakv_fused_window_prefill``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vllm_aquakv.window import ring_column

from .attention import LOG2E, FusedLayer, LaneTable, WindowInputs, _load_lanes, launch_lanes

BLOCK_T = 64  # tokens per program


@triton.jit
def _rotate_lane(x, rot_ptr, LANE: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Lane LANE's part of y A^T: x [T, W] @ rot[:, LANE * W:(LANE + 1) * W]^T -> [T, h] float32 (rot [h, h]
    row-major, columns in lane order)."""
    w = tl.arange(0, WIDTH)
    j = tl.arange(0, HEAD_DIM)
    a_t = tl.load(rot_ptr + j[None, :] * HEAD_DIM + LANE * WIDTH + w[:, None]).to(x.dtype)  # [W, h]
    return tl.dot(x, a_t)


@triton.jit
def _rotate_lanes(x0, x1, x2, x3, rot_ptr, LANES: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    """y A^T for lane-ordered coordinates split in LANES lanes [T, W] -> [T, h] float32, head order."""
    y = _rotate_lane(x0, rot_ptr, 0, WIDTH, HEAD_DIM) + _rotate_lane(x1, rot_ptr, 1, WIDTH, HEAD_DIM)
    if LANES == 4:
        y += _rotate_lane(x2, rot_ptr, 2, WIDTH, HEAD_DIM) + _rotate_lane(x3, rot_ptr, 3, WIDTH, HEAD_DIM)
    return y


@triton.jit
def _decode_stream(cache_ptr, base, t_mask, table_ptr, rot_ptr, CODE_OFFSET: tl.constexpr, CODE_BYTES: tl.constexpr,
                   INDEX_BITS: tl.constexpr, ENTRY_VALUES: tl.constexpr, LANES: tl.constexpr,
                   SCALE_OFFSET: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_DTYPE: tl.constexpr, USE_ASM: tl.constexpr):
    """One stream of the slots at ``base`` [T]: grid coordinates * fp16 scale / sqrt(h), rotated back from the
    Hadamard domain -> [T, h] float32 (``HiggsCodec.decode`` of one KV head)."""
    scale = tl.load((cache_ptr + base + SCALE_OFFSET).to(tl.pointer_type(tl.float16)), mask=t_mask, other=0.0)
    x0, x1, x2, x3 = _load_lanes(cache_ptr, base, t_mask, table_ptr, CODE_OFFSET, CODE_BYTES, INDEX_BITS, ENTRY_VALUES,
                                 DOT_DTYPE, USE_ASM)
    y = _rotate_lanes(x0, x1, x2, x3, rot_ptr, LANES, CODE_BYTES, HEAD_DIM)
    inv_sqrt_h = 1.0 / tl.sqrt(HEAD_DIM * 1.0)
    return y * (scale.to(tl.float32) * inv_sqrt_h)[:, None]


@triton.jit(do_not_specialize=["stride_bt"])
def _reconstruct_kernel(
    cache_ptr, block_table_ptr, seq_lens_ptr, rows_ptr, cu_k_ptr, k_table_ptr, v_table_ptr, rot_k_ptr, rot_v_ptr,
    k_bias_ptr, v_bias_ptr, v_weight_ptr, k_dinv_ptr, k_out_ptr, v_out_ptr,
    stride_block, stride_head, stride_token, stride_bt,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_BLOCK: tl.constexpr, SLOT_ALIGN: tl.constexpr,
    BLOCK: tl.constexpr,
    K_CODE_BYTES: tl.constexpr, K_INDEX_BITS: tl.constexpr, K_ENTRY_VALUES: tl.constexpr, K_LANES: tl.constexpr,
    V_CODE_OFFSET: tl.constexpr, V_CODE_BYTES: tl.constexpr, V_INDEX_BITS: tl.constexpr,
    V_ENTRY_VALUES: tl.constexpr, V_LANES: tl.constexpr, K_SCALE_OFFSET: tl.constexpr, V_SCALE_OFFSET: tl.constexpr,
    HAS_K_BIAS: tl.constexpr, HAS_V_BIAS: tl.constexpr, V_FROM_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
    USE_ASM: tl.constexpr, HAS_K_SCALE: tl.constexpr,
):
    """K and V [BLOCK, h] of positions block * BLOCK + [0, BLOCK) of request rows_ptr[r] and one KV head, from its
    paged slots, into rows cu_k[r] + position of the 16-bit outputs [sum of lengths, H, h]."""
    r = tl.program_id(0)
    head = tl.program_id(2)
    seq = tl.load(rows_ptr + r)
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # positions [T]
    t_mask = t < tl.load(seq_lens_ptr + seq)
    blk = tl.load(block_table_ptr + seq * stride_bt + t // PAGE_BLOCK, mask=t_mask, other=0).to(tl.int64)
    base = tl.multiple_of(blk * stride_block + head * stride_head + (t % PAGE_BLOCK) * stride_token, SLOT_ALIGN)
    j = tl.arange(0, HEAD_DIM)
    out_rows = ((tl.load(cu_k_ptr + r) + t) * NUM_KV_HEADS + head).to(tl.int64)[:, None] * HEAD_DIM + j[None, :]

    k = _decode_stream(cache_ptr, base, t_mask, k_table_ptr, rot_k_ptr, 0, K_CODE_BYTES, K_INDEX_BITS, K_ENTRY_VALUES,
                       K_LANES, K_SCALE_OFFSET, HEAD_DIM, DOT_DTYPE, USE_ASM)  # [T, h]
    if HAS_K_SCALE:  # the codes hold D (k - b_k)
        k *= tl.load(k_dinv_ptr + head * HEAD_DIM + j)[None, :]
    if HAS_K_BIAS:
        k += tl.load(k_bias_ptr + head * HEAD_DIM + j)[None, :]
    tl.store(k_out_ptr + out_rows, k.to(k_out_ptr.dtype.element_ty), mask=t_mask[:, None])

    v = _decode_stream(cache_ptr, base, t_mask, v_table_ptr, rot_v_ptr, V_CODE_OFFSET, V_CODE_BYTES, V_INDEX_BITS,
                       V_ENTRY_VALUES, V_LANES, V_SCALE_OFFSET, HEAD_DIM, DOT_DTYPE, USE_ASM)
    if HAS_V_BIAS:
        v += tl.load(v_bias_ptr + head * HEAD_DIM + j)[None, :]
    if V_FROM_K:  # v = b_v + k W[head] + A y_v
        w_head = tl.load(v_weight_ptr + head * HEAD_DIM * HEAD_DIM + j[:, None] * HEAD_DIM + j[None, :])
        v += tl.dot(k.to(DOT_DTYPE), w_head.to(DOT_DTYPE))
    tl.store(v_out_ptr + out_rows, v.to(v_out_ptr.dtype.element_ty), mask=t_mask[:, None])


def reconstruct(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, rows: torch.Tensor,
                cu_k: torch.Tensor, max_len: int, layer: FusedLayer, k_out: torch.Tensor,
                v_out: torch.Tensor) -> None:
    """Write the K and V of positions [0, seq_lens[rows[r]]) of each request rows[r] (int32 [R] on the device) from
    the paged cache kv_cache [num_blocks, H, page_block, slot] (uint8) into k_out / v_out [cu_k[-1], H, h] (any
    float dtype) at rows cu_k[r] + position.  block_table [requests, max_blocks], seq_lens [requests] and cu_k
    [R + 1] are int32 on the device; ``max_len`` >= every such length (sizes the launch)."""
    interpret = kv_cache.device.type != "cuda"
    _, heads, page_block, _ = kv_cache.shape
    h = k_out.shape[-1]
    kl, vl = launch_lanes(layer.k_lanes, BLOCK_T), launch_lanes(layer.v_lanes, BLOCK_T)  # BLOCK_T rows: tables
    dummy = layer.rot_k
    _reconstruct_kernel[(rows.shape[0], triton.cdiv(max_len, BLOCK_T), heads)](
        kv_cache, block_table, seq_lens, rows, cu_k, kl.table, vl.table, layer.rot_k, layer.rot_v,
        dummy if layer.k_bias is None else layer.k_bias, dummy if layer.v_bias is None else layer.v_bias,
        dummy if layer.v_weight is None else layer.v_weight, dummy if layer.k_dinv is None else layer.k_dinv,
        k_out, v_out,
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), block_table.stride(0),
        NUM_KV_HEADS=heads, HEAD_DIM=h, PAGE_BLOCK=page_block,
        SLOT_ALIGN=math.gcd(kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), 16), BLOCK=BLOCK_T,
        K_CODE_BYTES=kl.code_bytes, K_INDEX_BITS=kl.index_bits, K_ENTRY_VALUES=kl.entry_values, K_LANES=kl.lanes,
        V_CODE_OFFSET=layer.v_code_offset, V_CODE_BYTES=vl.code_bytes, V_INDEX_BITS=vl.index_bits,
        V_ENTRY_VALUES=vl.entry_values, V_LANES=vl.lanes, K_SCALE_OFFSET=layer.k_scale_offset,
        V_SCALE_OFFSET=layer.v_scale_offset, HAS_K_BIAS=layer.k_bias is not None,
        HAS_V_BIAS=layer.v_bias is not None, V_FROM_K=layer.v_weight is not None,
        DOT_DTYPE=tl.float32 if interpret else tl.float16, USE_ASM=not interpret,
        HAS_K_SCALE=layer.k_dinv is not None, num_warps=4,
    )


@triton.jit
def _residual_kernel(slots_ptr, table_ptr, rot_ptr, out_ptr, num_rows, SLOT_BYTES: tl.constexpr,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, SLOT_ALIGN: tl.constexpr, BLOCK: tl.constexpr,
                     CODE_OFFSET: tl.constexpr, CODE_BYTES: tl.constexpr, INDEX_BITS: tl.constexpr,
                     ENTRY_VALUES: tl.constexpr, LANES: tl.constexpr, SCALE_OFFSET: tl.constexpr,
                     DOT_DTYPE: tl.constexpr, USE_ASM: tl.constexpr):
    """One stream's decoded residual [BLOCK, h] float32 (grid point * scale, rotated back from the Hadamard domain:
    ``HiggsCodec.decode``) of rows program_id(0) * BLOCK + [0, BLOCK) and KV head program_id(1) of slots
    [num_rows, H, SLOT_BYTES] -> out [num_rows, H, h]."""
    head = tl.program_id(1)
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # rows [T]
    t_mask = t < num_rows
    base = tl.multiple_of((t.to(tl.int64) * NUM_KV_HEADS + head) * SLOT_BYTES, SLOT_ALIGN)
    y = _decode_stream(slots_ptr, base, t_mask, table_ptr, rot_ptr, CODE_OFFSET, CODE_BYTES, INDEX_BITS, ENTRY_VALUES,
                       LANES, SCALE_OFFSET, HEAD_DIM, DOT_DTYPE, USE_ASM)  # [T, h]
    j = tl.arange(0, HEAD_DIM)
    out_rows = (t.to(tl.int64) * NUM_KV_HEADS + head)[:, None] * HEAD_DIM + j[None, :]
    tl.store(out_ptr + out_rows, y, mask=t_mask[:, None])


def decode_residual(slots: torch.Tensor, decoder: tuple[LaneTable, torch.Tensor], code_offset: int,
                    scale_offset: int) -> torch.Tensor:
    """The Triton twin of ``HiggsCodec.decode`` for one stream of slots [T, H, slot] (uint8, contiguous; the stream's
    codes at byte ``code_offset``, its fp16 scale at ``scale_offset``; ``decoder`` from ``attention.stream_decoder``)
    -> residual [T, H, h] float32 (grid coordinates and rotation in fp16 on CUDA, as in the fused kernels)."""
    lanes, rot = decoder
    num_rows, heads, slot_bytes = slots.shape
    h = rot.shape[0]
    out = torch.empty(num_rows, heads, h, dtype=torch.float32, device=slots.device)
    if num_rows == 0:
        return out
    interpret = slots.device.type != "cuda"
    lanes = launch_lanes(lanes, BLOCK_T)
    _residual_kernel[(triton.cdiv(num_rows, BLOCK_T), heads)](
        slots, lanes.table, rot, out, num_rows, SLOT_BYTES=slot_bytes, NUM_KV_HEADS=heads, HEAD_DIM=h,
        SLOT_ALIGN=math.gcd(slot_bytes, 16), BLOCK=BLOCK_T, CODE_OFFSET=code_offset, CODE_BYTES=lanes.code_bytes,
        INDEX_BITS=lanes.index_bits, ENTRY_VALUES=lanes.entry_values, LANES=lanes.lanes, SCALE_OFFSET=scale_offset,
        DOT_DTYPE=tl.float32 if interpret else tl.float16, USE_ASM=not interpret, num_warps=4)
    return out


@dataclass
class ExactRows:
    """Where the 16-bit copies go among the reconstructed rows, for one phase (sinks, or the window's positions)."""

    ring_dst: torch.Tensor  # [E] int64: reconstructed row that a ring entry may replace
    ring_req: torch.Tensor  # [E] int64: its request (= ring row, vLLM's batch row)
    ring_pos: torch.Tensor  # [E] int64: its position
    # this step's tokens: (first reconstructed row, first index among the step's tokens - WindowInputs.key / value -,
    # count) per request; a request's tokens are consecutive in both, so each run is one slice copy
    step_runs: list[tuple[int, int, int]]
    _ring: tuple | None = None  # (ring columns [E], entry holds its position [E, 1, 1]): the same for every layer

    def put(self, k: torch.Tensor, v: torch.Tensor, window: WindowInputs, block_table: torch.Tensor,
            page: int) -> None:
        """Overwrite those rows of k/v [total_k, H, h] with their 16-bit copies: a ring entry where its tag is the
        slot its position lives in (pages of ``page`` tokens; else the reconstruction stays), this step's tokens
        always.  The tag check runs once per step (the step's first layer has written the tags by then)."""
        if self.ring_dst.numel():
            if self._ring is None:
                col = ring_column(self.ring_pos, window.sinks, window.window)
                slot = block_table[self.ring_req, self.ring_pos // page].long() * page + self.ring_pos % page
                self._ring = col, (window.tags[self.ring_req, col] == slot)[:, None, None]
            col, there = self._ring
            for rows, ring in ((k, window.ring_k), (v, window.ring_v)):
                rows[self.ring_dst] = torch.where(there, ring[self.ring_req, col].to(rows.dtype), rows[self.ring_dst])
        for dst, tok, count in self.step_runs:  # one slice copy per request, not an index scatter
            k[dst:dst + count] = window.key[tok:tok + count]
            v[dst:dst + count] = window.value[tok:tok + count]


@dataclass
class PrefillSplit:
    """A step cut into its leading decode requests (one query token each: the fused kernel) and the rest
    (reconstruction + FlashAttention).  vLLM orders decodes first for this backend (``reorder_batch_threshold``).
    The reconstructed rows of each request start at a page boundary (FlashAttention reads them as paged K/V, as
    vLLM's FLASH_ATTN backend does: it takes no per-sequence key counts with contiguous varlen keys)."""

    decode_reqs: int
    decode_tokens: int
    rows: torch.Tensor  # [P] int32: request index of each other request
    cu_q: torch.Tensor  # [P + 1] int32: their query offsets, relative to decode_tokens
    cu_k: torch.Tensor  # [P + 1] int32: first reconstructed row of each request's context (multiples of PAGE)
    pages: torch.Tensor  # [P, max pages] int32: the pages of PAGE rows that hold it (FlashAttention's block table)
    seq_k: torch.Tensor  # [P] int32: its keys (the context length)
    max_q: int
    max_k: int
    total_k: int
    # with 16-bit sinks/window: [P] int32 keys of the codes part (len - window, >= 0), and the rows of each phase
    codes_k: torch.Tensor | None = None
    sink_rows: ExactRows | None = None
    window_rows: ExactRows | None = None
    # [B, 2] int32 (split request, first query) of each window_block-query block (``window_attention_merge``)
    window_blocks: torch.Tensor | None = None
    window_block: int = 0  # queries per block of window_blocks (WINDOW_BLOCK_M unless split_prefills was told)
    _scratch: tuple | None = None  # (k, v) [total_k, H, h], shared by the step's layers

    def scratch(self, heads: int, head_dim: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The reconstructed K and V rows [total_k, H, h], allocated once per step (zeros: rows past a context's
        end, which FlashAttention loads with its last page and then masks, must hold finite numbers)."""
        if self._scratch is None:
            self._scratch = tuple(torch.zeros(self.total_k, heads, head_dim, dtype=dtype, device=device)
                                  for _ in range(2))
        return self._scratch


PAGE = 64  # reconstructed rows per FlashAttention page
# steps whose non-decode requests all have at most this many query tokens stay in the fused kernel (``split_prefills``)
FUSED_QUERY_TOKENS = 16


def prefills_need_flash(query_start_loc: list[int]) -> bool:
    """Whether some request of the step has more than FUSED_QUERY_TOKENS query tokens: only then does
    ``split_prefills`` send the step's prefills to reconstruction + FlashAttention (the backend asks first, so that
    a step the fused kernel takes whole reads no sequence lengths back from the device)."""
    return max((b - a for a, b in zip(query_start_loc[:-1], query_start_loc[1:])), default=0) > FUSED_QUERY_TOKENS


def split_prefills(query_start_loc: list[int], seq_lens: list[int], device, exact: tuple[int, int] | None = None,
                   window_block: int | None = None) -> PrefillSplit | None:
    """The step's split, or None when the fused kernel alone is faster: every request decodes one token, or the others
    have at most FUSED_QUERY_TOKENS tokens each (e.g. the last tokens of a prompt that vLLM's token budget cut, over
    its whole context: reconstruction + FlashAttention would rebuild that context and run ~20 host-side ops per
    layer for them, benchmarks/results/serve_profile_h200_8192_256_write.md).  ``exact`` = (sinks, window): where
    their 16-bit copies go (``ExactRows``), and the window's query blocks of ``window_block`` queries (default
    WINDOW_BLOCK_M; ``window_attention_merge``'s launch divides each into parts)."""
    if not prefills_need_flash(query_start_loc):
        return None
    q_lens = [b - a for a, b in zip(query_start_loc[:-1], query_start_loc[1:])]
    d = 0
    while q_lens[d] == 1:
        d += 1
    return _split_from(d, query_start_loc, seq_lens, device, exact, window_block)


def context_rows(query_start_loc: list[int], seq_lens: list[int], device,
                 exact: tuple[int, int] | None = None) -> PrefillSplit:
    """The rows of every request of the step (decodes too), for attention over K/V reconstructed in torch
    (``vllm_aquakv.serving.TorchServingPath.attend``: artifacts the fused kernels do not serve)."""
    return _split_from(0, query_start_loc, seq_lens, device, exact)


def _split_from(d: int, query_start_loc: list[int], seq_lens: list[int], device,
                exact: tuple[int, int] | None, window_block: int | None = None) -> PrefillSplit:
    """The PrefillSplit whose reconstructed requests are d.. of the step (``split_prefills``, ``context_rows``)."""
    q_lens = [b - a for a, b in zip(query_start_loc[:-1], query_start_loc[1:])]
    rest = range(d, len(q_lens))
    cu_q, cu_k = [0], [0]
    for r in rest:
        cu_q.append(cu_q[-1] + q_lens[r])
        cu_k.append(cu_k[-1] + -(-seq_lens[r] // PAGE) * PAGE)
    max_k = max(seq_lens[d:])
    max_pages = -(-max_k // PAGE)
    pages = []  # [P, max pages], flat: the pages of PAGE rows that hold each request's context, zero-padded
    for i in range(len(rest)):
        n = (cu_k[i + 1] - cu_k[i]) // PAGE
        pages += [*range(cu_k[i] // PAGE, cu_k[i] // PAGE + n), *[0] * (max_pages - n)]
    codes_k = [] if exact is None else [max(seq_lens[r] - exact[1], 0) for r in rest]
    window_block = window_block or WINDOW_BLOCK_M
    blocks = [] if exact is None else [x for i, r in enumerate(rest) for q0 in range(0, q_lens[r], window_block)
                                       for x in (i, q0)]
    # every int32 field in one host tensor and one copy (built from Python lists: no torch CPU op, whose thread pool
    # cost up to 6 ms per step inside vLLM's engine, serve_profile_h200_8192_256_split.md)
    rows, cu_q_dev, cu_k_dev, pages_dev, seq_k, codes_k_dev, blocks_dev = _on_device(
        [list(rest), cu_q, cu_k, pages, seq_lens[d:], codes_k, blocks], torch.int32, device)
    split = PrefillSplit(d, query_start_loc[d], rows, cu_q_dev, cu_k_dev, pages_dev.view(len(rest), max_pages), seq_k,
                         max(q_lens[d:]), max_k, cu_k[-1])
    if exact is not None:
        split.codes_k = codes_k_dev
        split.window_blocks, split.window_block = blocks_dev.view(-1, 2), window_block
        split.sink_rows, split.window_rows = _exact_rows(query_start_loc, seq_lens, q_lens, rest, cu_k, *exact, device)
    return split


def _exact_rows(query_start_loc: list[int], seq_lens: list[int], q_lens: list[int], rest: range, cu_k: list[int],
                sinks: int, window: int, device) -> tuple[ExactRows, ExactRows]:
    """The ExactRows of the sinks and of the window's positions for the split's requests (``split_prefills``): from the
    ring, positions before this step that some query of it reads in 16 bits (sinks; the window's last window - 1);
    from this step's tokens, one run per request and phase.  Positions are consecutive ranges, so this is arithmetic."""
    ring = {True: ([], [], []), False: ([], [], [])}  # is a sink -> reconstructed rows, requests, positions
    runs = {True: [], False: []}
    for i, r in enumerate(rest):
        context = seq_lens[r] - q_lens[r]
        ring_ranges = {True: range(min(sinks, context)),
                       False: range(min(max(sinks, context - window + 1), context), context) if window else range(0)}
        step_ranges = {True: range(context, min(sinks, seq_lens[r])),
                       False: range(max(context, sinks), seq_lens[r]) if window else range(0)}
        for is_sink in (True, False):
            dst, req, pos = ring[is_sink]
            dst += [cu_k[i] + t for t in ring_ranges[is_sink]]
            req += [r] * len(ring_ranges[is_sink])
            pos += ring_ranges[is_sink]
            chunk = step_ranges[is_sink]
            if len(chunk):
                runs[is_sink].append((cu_k[i] + chunk[0], query_start_loc[r] + chunk[0] - context, len(chunk)))
    tensors = _on_device([*ring[True], *ring[False]], torch.int64, device)
    return ExactRows(*tensors[:3], runs[True]), ExactRows(*tensors[3:], runs[False])


def _on_device(fields: list[list[int]], dtype: torch.dtype, device) -> list[torch.Tensor]:
    """Integer lists as 1-D tensors on ``device`` through one host tensor and one copy; each starts 16-byte aligned
    (Triton specializes kernels on their pointers' alignment: an unaligned one would compile a variant mid-serving).
    The host tensor is pinned (torch's caching host allocator, which keeps it until the copy ran): a copy from
    pageable memory may wait for the stream, i.e. for the GPU to finish the work queued before it (51-59 ms in two
    prefill steps of serve_profile_h200_8192_256_split.md)."""
    per_16 = 16 // torch.tensor([], dtype=dtype).element_size()
    flat, starts = [], []
    for f in fields:
        starts.append(len(flat))
        flat += f
        flat += [0] * (-len(flat) % per_16)
    host = torch.tensor(flat, dtype=dtype)
    on_device = (host.pin_memory() if torch.device(device).type == "cuda" else host).to(device, non_blocking=True)
    return [on_device[a:a + len(f)] for a, f in zip(starts, fields)]


LOG2E_C = tl.constexpr(LOG2E)  # (in kernels)
WINDOW_BLOCK_M = 32  # queries per block of ``PrefillSplit.window_blocks`` (host side; split_prefills' default)
# rows per program of ``_window_merge_kernel`` (its queries x the group's query heads, padded to a power of two)
WINDOW_MERGE_ROWS = 64
WINDOW_MERGE_LAUNCH = None  # (queries per program, keys per step, warps) for every group; None: window_merge_launch


def window_merge_launch(group: int) -> tuple[int, int, int]:
    """The served launch of ``_window_merge_kernel`` for ``group`` query heads per KV head: (queries per program, a
    part of a WINDOW_BLOCK_M-query block, filling WINDOW_MERGE_ROWS rows at the group padded to a power of two; 32 keys
    per step; 4 warps).  H100, group 3: 0.878 vs 0.916 ms per layer at 8k for FlashAttention + merge, larger programs
    slower (prefill_attention_h100_window_merge_launch.md); 16 queries for group 8 (128 rows) spill registers offline
    (benchmarks/window_merge_compile.py).  Not yet served: 21 queries at group 3 (63 of the 64 rows where 16 fill 48,
    on window blocks of 42, ``window_merge_block``) took 0.842 vs 0.881 ms at 8k in one H100 call
    (prefill_attention_h100_window_block_42.md), but its GPU correctness test has not run yet."""
    queries = WINDOW_MERGE_ROWS // triton.next_power_of_2(group)
    return max(1, min(WINDOW_BLOCK_M, queries)), 32, 4


def window_block_for(queries: int) -> int:
    """Queries per window block for a launch of ``queries`` queries per program: the fewest whole programs that reach
    WINDOW_BLOCK_M (42 for 21-query programs, WINDOW_BLOCK_M for powers of two)."""
    return queries * triton.cdiv(WINDOW_BLOCK_M, queries)


def window_merge_block(group: int) -> int:
    """Queries per window block (``split_prefills``' ``window_block``) for the launch ``window_attention_merge`` takes
    for ``group`` (WINDOW_MERGE_LAUNCH, else ``window_merge_launch``; ``window_block_for``)."""
    return window_block_for((WINDOW_MERGE_LAUNCH or window_merge_launch(group))[0])


def window_merge_meta(group: int, window: int, head_dim: int, launch: tuple[int, int, int], dot_dtype,
                      block: int = WINDOW_BLOCK_M) -> dict:
    """``_window_merge_kernel``'s constexprs and ``num_warps`` for ``launch`` (queries per program, dividing the
    split's ``block`` queries per window block; keys per step; warps): what ``window_attention_merge`` launches and
    benchmarks/window_merge_compile.py builds offline."""
    block_m, block_n, warps = launch
    if block % block_m:
        raise ValueError(f"queries per program must divide the split's {block} queries per window block, got "
                         f"{block_m}")
    return dict(G=group, WINDOW=window, SUB=block // block_m, BLOCK_M=block_m, BLOCK_N=block_n,
                ROWS=max(16, triton.next_power_of_2(block_m * group)), HEAD_DIM=head_dim, DOT_DTYPE=dot_dtype,
                num_warps=warps)


# (the LSE's strides follow the step's token count: specialized, a count divisible by 16 would compile another variant
# mid-serving, after warm_up_window_merge's)
@triton.jit(do_not_specialize=["stride_ln", "stride_lh"])
def _window_merge_kernel(q_ptr, k_ptr, v_ptr, oc_ptr, lc_ptr, out_ptr, blocks_ptr, cu_q_ptr, cu_k_ptr, seq_k_ptr,
                         qk_scale, stride_qn, stride_qh, stride_kn, stride_kh, stride_on, stride_oh, stride_ln,
                         stride_lh, stride_outn, stride_outh,
                         G: tl.constexpr, WINDOW: tl.constexpr, SUB: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """BLOCK_M queries (one of the SUB parts of a window block: program_id(0) = block * SUB + part) of one request x
    one KV head's G query heads (ROWS = BLOCK_M * G padded to a power of two): attention over the keys (p - WINDOW, p]
    of each query p from the 16-bit rows k, v [rows, H, h] (bottom-right causal alignment, as FlashAttention's window
    call), merged with the codes part's output oc and natural-log LSE lc [Hq, N] (non-finite: no keys there) into
    out."""
    blk = tl.program_id(0) // SUB
    kvh = tl.program_id(1)
    r = tl.load(blocks_ptr + 2 * blk)
    i0 = tl.load(blocks_ptr + 2 * blk + 1) + (tl.program_id(0) % SUB) * BLOCK_M
    q0 = tl.load(cu_q_ptr + r)
    q_len = tl.load(cu_q_ptr + r + 1) - q0
    k0 = tl.load(cu_k_ptr + r)
    k_len = tl.load(seq_k_ptr + r)
    m = tl.arange(0, ROWS)
    i = i0 + m // G  # query of each row, head kvh * G + m % G
    head = kvh * G + m % G
    ok = (m < BLOCK_M * G) & (i < q_len)
    p = k_len - q_len + i  # its key position
    d = tl.arange(0, HEAD_DIM)
    qv = tl.load(q_ptr + (q0 + i)[:, None] * stride_qn + head[:, None] * stride_qh + d[None, :], mask=ok[:, None],
                 other=0.0).to(DOT_DTYPE)  # [ROWS, h]
    lo = tl.maximum(k_len - q_len + i0 - WINDOW + 1, 0)  # the block's first and one-past-last key
    hi = k_len - q_len + tl.minimum(i0 + BLOCK_M, q_len)
    m_i = tl.full([ROWS], -1.0e30, tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    for t0 in range(lo, hi, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        rows = (k0 + t)[:, None] * stride_kn + kvh * stride_kh + d[None, :]
        kt = tl.load(k_ptr + rows, mask=(t < hi)[:, None], other=0.0).to(DOT_DTYPE)  # [BLOCK_N, h]
        vt = tl.load(v_ptr + rows, mask=(t < hi)[:, None], other=0.0).to(DOT_DTYPE)
        s = tl.dot(qv, tl.trans(kt)) * qk_scale  # [ROWS, BLOCK_N], log2 units
        seen = (t[None, :] <= p[:, None]) & (t[None, :] > p[:, None] - WINDOW) & (t[None, :] < hi)
        s = tl.where(seen, s, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        pr = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, 1)
        acc = acc * alpha[:, None] + tl.dot(pr.to(DOT_DTYPE), vt)
        m_i = m_new
    lse_w = m_i + tl.log2(l_i)  # every query sees its own key here: finite
    lse_c = tl.load(lc_ptr + head * stride_lh + (q0 + i) * stride_ln, mask=ok, other=float("-inf")) * LOG2E_C
    lse_c = tl.where((lse_c > -1.0e38) & (lse_c < 1.0e38), lse_c, float("-inf"))  # (NaN, +-inf: no codes keys)
    top = tl.maximum(lse_w, lse_c)
    w_w = tl.exp2(lse_w - top)
    w_c = tl.exp2(lse_c - top)
    o_c = tl.load(oc_ptr + (q0 + i)[:, None] * stride_on + head[:, None] * stride_oh + d[None, :],
                  mask=ok[:, None] & (w_c > 0)[:, None], other=0.0).to(tl.float32)
    o = (acc / l_i[:, None] * w_w[:, None] + o_c * w_c[:, None]) / (w_w + w_c)[:, None]
    tl.store(out_ptr + (q0 + i)[:, None] * stride_outn + head[:, None] * stride_outh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=ok[:, None])


def window_attention_merge(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, split: PrefillSplit, scale: float,
                           window: int, o_codes: torch.Tensor, lse_codes: torch.Tensor, out: torch.Tensor,
                           launch: tuple[int, int, int] | None = None) -> None:
    """``attend_rows``' window part and merge in one launch: out [N, Hq, h] = the split's queries q [N, Hq, h] over
    the keys (p - window, p] of the 16-bit rows k, v [total_k, H, h] merged with the codes part (o_codes [N, Hq, h],
    natural-log LSE [Hq, N]).  Its twin: FlashAttention's window call (``flash_twin``) + ``merge_partials``.
    ``launch`` (``window_merge_meta``): default WINDOW_MERGE_LAUNCH (read at each call), else
    ``window_merge_launch``'s for the group; its queries per program must divide the split's window blocks (made with
    ``window_merge_block``'s size for the same launch)."""
    heads, h = k.shape[1:]
    group = q.shape[1] // heads
    interpret = q.device.type != "cuda"
    if split.window_blocks is None:
        raise ValueError("the window's fused merge needs a split made with exact=(sinks, window) (split_prefills)")
    meta = window_merge_meta(group, window, h, launch or WINDOW_MERGE_LAUNCH or window_merge_launch(group),
                             tl.float32 if interpret else tl.bfloat16 if q.dtype == torch.bfloat16 else tl.float16,
                             split.window_block)
    if h & (h - 1) or h < 16:
        raise ValueError(f"the window's fused merge needs a power-of-two head_dim >= 16, got {h}")
    _window_merge_kernel[(split.window_blocks.shape[0] * meta["SUB"], heads)](
        q, k, v, o_codes, lse_codes, out, split.window_blocks, split.cu_q, split.cu_k, split.seq_k, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), o_codes.stride(0), o_codes.stride(1),
        lse_codes.stride(1), lse_codes.stride(0), out.stride(0), out.stride(1), **meta,
    )


def warm_up_window_merge(num_q_heads: int, num_kv_heads: int, head_dim: int, sinks: int, window: int,
                         dtype: torch.dtype, device) -> None:
    """Compile ``_window_merge_kernel`` for the served shape at startup on one small prompt (otherwise ~1-2.6 s of JIT
    in the first prefills with the window, H100: plugin_smoke_h100_fused_window.md)."""
    n = FUSED_QUERY_TOKENS + 1  # a prompt long enough for split_prefills
    split = split_prefills([0, n], [n], device, exact=(sinks, window),
                           window_block=window_merge_block(num_q_heads // num_kv_heads))
    q = torch.randn(n, num_q_heads, head_dim, dtype=dtype, device=device)
    k, v = split.scratch(num_kv_heads, head_dim, dtype, device)
    lse = torch.zeros(num_q_heads, n, dtype=torch.float32, device=device)
    window_attention_merge(q, k, v, split, head_dim ** -0.5, window, q.clone(), lse, torch.empty_like(q))


def merge_partials(out: torch.Tensor, o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor,
                   lse_b: torch.Tensor) -> None:
    """out [N, Hq, h] = attention over the union of two disjoint key sets from their partial outputs o [N, Hq, h]
    and natural-log LSEs [Hq, N] (a query with no keys in a part: LSE +-inf or NaN, output ignored)."""
    lse_a, lse_b = (torch.where(torch.isfinite(x), x, float("-inf")).t().unsqueeze(-1) for x in (lse_a, lse_b))
    top = torch.maximum(lse_a, lse_b)  # [N, Hq, 1]; finite: every query has a key in one part
    w_a, w_b = torch.exp(lse_a - top), torch.exp(lse_b - top)
    o_a = torch.where(w_a > 0, o_a.float(), 0.0)
    o_b = torch.where(w_b > 0, o_b.float(), 0.0)
    out.copy_((o_a * w_a + o_b * w_b) / (w_a + w_b))


def flash_twin(q, k, v, out, cu_q, max_q, seqused_k, max_k, scale, block_table, window_left=None, return_lse=False):
    """``compat.flash_attention``'s function in float32 torch (where vLLM has no FlashAttention: the CPU build):
    varlen attention over paged K/V [pages, page, H, h], causal with queries aligned to the end of their keys, a left
    window, the natural-log LSE [Hq, total_q] (+inf where a query has no keys, as FA2)."""
    cu_q, used = cu_q.tolist(), seqused_k.tolist()
    group = q.shape[1] // k.shape[2]
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"), device=q.device)
    for r in range(len(cu_q) - 1):
        n_k = used[r]
        qr = q[cu_q[r]:cu_q[r + 1]].float()
        kr, vr = (x[block_table[r].long()].flatten(0, 1)[:n_k].float().repeat_interleave(group, dim=1)
                  for x in (k, v))  # [n_k, Hq, h]
        s = torch.einsum("qhd,khd->hqk", qr, kr) * scale  # [Hq, Tq, Tk]
        last = torch.arange(qr.shape[0], device=q.device)[:, None] + n_k - qr.shape[0]  # each query's last key
        j = torch.arange(n_k, device=q.device)[None, :]
        hidden = (j > last) if window_left is None else (j > last) | (j < last - window_left)
        s = s.masked_fill(hidden, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)  # [Hq, Tq]
        seen = torch.isfinite(row_lse)
        # softmax itself, not exp(s - lse): the same float32 rounding as a plain attention (2-bit caches with every
        # token as codes amplify a last-bit difference: it flips codes of later layers, ~1% of held-out perplexity)
        p = torch.where(seen[..., None], s.softmax(dim=-1), 0.0)
        out[cu_q[r]:cu_q[r + 1]] = torch.einsum("hqk,khd->qhd", p, vr).to(out.dtype)
        lse[:, cu_q[r]:cu_q[r + 1]] = torch.where(seen, row_lse, float("inf"))
    return lse if return_lse else None


def prefill_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                      seq_lens: torch.Tensor, split: PrefillSplit, layer: FusedLayer, scale: float,
                      out: torch.Tensor, flash, window: WindowInputs | None = None, merge=None,
                      fused_window: bool = False) -> None:
    """Causal attention of the split's non-decode queries (query [N, Hq, h] rows decode_tokens..N) over their
    reconstructed contexts, written to the same rows of ``out`` [N, Hq, h]; ``flash`` is
    ``compat.flash_attention``'s function (or any with its signature: ``flash_twin``).  With ``window``
    (and a split made with its sinks/window), the 16-bit sinks and window are read as the module docstring says;
    ``merge``: ``compat.merge_attention_states``'s function (vLLM's CUDA kernel; default ``merge_partials``, torch:
    ~0.37 ms per layer at 4k tokens on the H200, most of the window's prefill cost)."""
    k, v = split.scratch(kv_cache.shape[1], query.shape[-1], query.dtype, query.device)
    reconstruct(kv_cache, block_table, seq_lens, split.rows, split.cu_k, split.max_k, layer, k, v)
    attend_rows(query, k, v, block_table, kv_cache.shape[2], split, scale, out, flash, window, merge, fused_window)


def attend_rows(query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_table: torch.Tensor, page_block: int,
                split: PrefillSplit, scale: float, out: torch.Tensor, flash, window: WindowInputs | None = None,
                merge=None, fused_window: bool = False) -> None:
    """The attention half of ``prefill_attention``: the split's queries (query rows decode_tokens..N) over its
    reconstructed K/V rows k, v [total_k, H, h] (``split.scratch``), written to the same rows of ``out``; the 16-bit
    sinks and window (``window``) put into those rows here (vLLM's pages hold ``page_block`` tokens)."""
    heads, h = k.shape[1:]
    d = split.decode_tokens
    q = query[d:]
    k_pages, v_pages = (x.view(-1, PAGE, heads, h) for x in (k, v))  # [pages, PAGE, H, h]

    def attend(o, keys, **kw):
        return flash(q, k_pages, v_pages, o, split.cu_q, split.max_q, keys, split.max_k, scale, split.pages, **kw)

    if window is None:
        attend(out[d:], split.seq_k)
        return
    if split.sink_rows is None:
        raise ValueError("attention with a window needs rows made with exact=(sinks, window) (split_prefills, "
                         "context_rows)")
    split.sink_rows.put(k, v, window, block_table, page_block)
    if window.window == 0:  # sinks only: every other key from its codes
        attend(out[d:], split.seq_k)
        return
    o_codes, o_window = torch.empty_like(q), (None if fused_window else torch.empty_like(q))
    lse_codes = attend(o_codes, split.codes_k, return_lse=True)
    split.window_rows.put(k, v, window, block_table, page_block)
    if fused_window:  # the window part and the merge in one launch
        window_attention_merge(q, k, v, split, scale, window.window, o_codes, lse_codes, out[d:])
        return
    lse_window = attend(o_window, split.seq_k, window_left=window.window - 1, return_lse=True)
    (merge or merge_partials)(out[d:], o_window, lse_window, o_codes, lse_codes)


def warm_up(fused: dict[int, FusedLayer], slot_bytes: list[int], num_kv_heads: int, page_block: int,
            dtype: torch.dtype) -> None:
    """Compile ``_reconstruct_kernel`` for every distinct layer configuration (seconds each), at startup."""
    seen = set()
    for layer, f in fused.items():
        key = (slot_bytes[layer], f.k_lanes.index_bits, f.k_lanes.entry_values, f.k_lanes.code_bytes,
               f.v_lanes.index_bits, f.v_lanes.entry_values, f.v_lanes.code_bytes, f.v_code_offset,
               f.k_scale_offset, f.v_scale_offset, f.k_bias is None, f.v_bias is None, f.v_weight is None)
        if key in seen:
            continue
        seen.add(key)
        device, h = f.rot_k.device, f.rot_k.shape[0]
        cache = torch.zeros(1, num_kv_heads, page_block, slot_bytes[layer], dtype=torch.uint8, device=device)
        one = torch.zeros(1, dtype=torch.int32, device=device)
        k = torch.empty(page_block, num_kv_heads, h, dtype=dtype, device=device)
        reconstruct(cache, one[None], one + page_block, one, torch.tensor([0, page_block], dtype=torch.int32,
                                                                          device=device), page_block, f, k, k.clone())
