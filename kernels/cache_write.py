"""Triton cache write for the fused-kernel mode: one launch per layer and step encodes the step's new keys and values
straight into their paged slots.

Per (token, KV head), the same rule as ``AquaKVCache.encode_stream`` with the codec's HIGGS encoding:

    residual r = x - prediction            keys: the post-RoPE key mean; values: b_v + k_hat W[head] (or b_v)
    y = (r D) A  (A = diag(signs) H / sqrt(h), taken in lane order, see kernels/attention.py; D the keys' channel
                  scale where the artifact has one, else 1)
    scale = fp16(||y||),  z = y sqrt(h) / scale,  code = nearest grid point of each grid_dim coordinates of z
    packed LSB-first into the code bytes, scale into the slot's fp16 scale (``serving.SlotLayout``)

where k_hat = b_k + decode(key codes) is the reconstructed key the value predictor reads; the kernel takes the value
prediction as b_v + b_k W + y_k (A^T W), with the decoded key residual y_k in lanes (``value_prediction_terms``,
computed once per layer).  Rotations and predictor
products are IEEE float32 dots, so the codes equal the torch twin's (``TorchServingPath.write``) except where float
rounding order decides between two nearly equidistant grid points.

With 16-bit sinks/window (``vllm_aquakv.window.ExactTokens``), the same launch also stores each sink and window
token's key and value as they came into its ring entry (row, column of ``WindowStep``), the twin of
``ExactTokens.write``.  Tokens outside the ring, whose ``WindowStep`` entry is the scratch row (one address for all
of them, never read), are not stored: a prefill's thousands of stores to one address queue on it.

One program encodes BLOCK_N tokens of one KV head.  Lane i of a token holds the head positions L*b + i of code byte b
(L lanes): the codes of byte b are then computed from the lanes directly, with no reshape.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_aquakv import codec

from .attention import FusedLayer, side_stream, times_lane

FP16_MAX = tl.constexpr(codec.FP16_MAX)  # largest float16, as the codec clamps scales
PRECISION = tl.constexpr("tf32x3")  # three tf32 tensor-core products: float32 accuracy


@triton.jit
def _pick(x0, x1, x2, x3, I: tl.constexpr):
    """The I-th of four tensors (I a compile-time constant)."""
    if I == 0:
        return x0
    elif I == 1:
        return x1
    elif I == 2:
        return x2
    else:
        return x3


@triton.jit
def _lane_times(y, m_ptr, LANE: tl.constexpr, HEAD_DIM: tl.constexpr, WIDTH: tl.constexpr):
    """y [N, W] @ M[LANE * W:(LANE + 1) * W, :] -> [N, h] (M [h, h] row-major, rows in lane order)."""
    cols = tl.arange(0, HEAD_DIM)
    w = tl.arange(0, WIDTH)
    m = tl.load(m_ptr + (LANE * WIDTH + w[:, None]) * HEAD_DIM + cols[None, :])  # [W, h]
    return tl.dot(y, m, input_precision=PRECISION)


@triton.jit
def _nearest(z0, z1, z2, z3, grid_ptr, D: tl.constexpr, POINTS: tl.constexpr):
    """Index (int32) of the grid point nearest to the D-dimensional points (z0[, z1, z2, z3]) of the lanes:
    argmax 2 z.c - |c|^2 as ``grids.nearest`` computes it; ties keep the lowest index."""
    best = tl.full(z0.shape, float("-inf"), tl.float32)
    index = tl.zeros(z0.shape, tl.int32)
    for p in range(POINTS):
        c0 = tl.load(grid_ptr + p * D)
        dot = z0 * c0
        norm = c0 * c0
        if D >= 2:
            c1 = tl.load(grid_ptr + p * D + 1)
            dot += z1 * c1
            norm += c1 * c1
        if D == 4:
            c2 = tl.load(grid_ptr + p * D + 2)
            c3 = tl.load(grid_ptr + p * D + 3)
            dot += z2 * c2 + z3 * c3
            norm += c2 * c2 + c3 * c3
        score = 2.0 * dot - norm
        better = score > best
        best = tl.where(better, score, best)
        index = tl.where(better, p, index)
    return index


@triton.jit
def _rotate(r, rot_ptr, HEAD_DIM: tl.constexpr, LANES: tl.constexpr, WIDTH: tl.constexpr):
    """Residuals r [N, h] (float32) in the Hadamard domain, y = r A, as LANES lanes [N, W] (IEEE float32 dots; lanes
    2, 3 repeat 0, 1 when LANES == 2)."""
    y0 = times_lane(r, rot_ptr, 0, HEAD_DIM, WIDTH, PRECISION)
    y1 = times_lane(r, rot_ptr, 1, HEAD_DIM, WIDTH, PRECISION)
    if LANES == 4:
        y2 = times_lane(r, rot_ptr, 2, HEAD_DIM, WIDTH, PRECISION)
        y3 = times_lane(r, rot_ptr, 3, HEAD_DIM, WIDTH, PRECISION)
    else:
        y2, y3 = y0, y1
    return y0, y1, y2, y3


@triton.jit
def _shifted_lane(x, sign_ptr, shift_ptr, LANE: tl.constexpr, HEAD_DIM: tl.constexpr, WIDTH: tl.constexpr,
                  HAS_SHIFT: tl.constexpr):
    y = times_lane(x, sign_ptr, LANE, HEAD_DIM, WIDTH, "ieee") * (1.0 / tl.sqrt(HEAD_DIM * 1.0))
    if HAS_SHIFT:
        y -= tl.load(shift_ptr + LANE * WIDTH + tl.arange(0, WIDTH))[None, :]
    return y


@triton.jit
def _rotate_exact(x, sign_ptr, shift_ptr, HEAD_DIM: tl.constexpr, LANES: tl.constexpr, WIDTH: tl.constexpr,
                  HAS_SHIFT: tl.constexpr):
    """The same lanes for residuals x - b with x [N, h] in 16 bits (or float32 in the interpreter) and a constant
    prediction b: y = x S / sqrt(h) - b A with S = diag(signs) H in x's dtype (+-1: exact products, float32 sums, one
    tensor-core product instead of tf32x3's three) and the shift b A [h] in lane order
    (``FusedLayer.write_k_shift``)."""
    y0 = _shifted_lane(x, sign_ptr, shift_ptr, 0, HEAD_DIM, WIDTH, HAS_SHIFT)
    y1 = _shifted_lane(x, sign_ptr, shift_ptr, 1, HEAD_DIM, WIDTH, HAS_SHIFT)
    if LANES == 4:
        y2 = _shifted_lane(x, sign_ptr, shift_ptr, 2, HEAD_DIM, WIDTH, HAS_SHIFT)
        y3 = _shifted_lane(x, sign_ptr, shift_ptr, 3, HEAD_DIM, WIDTH, HAS_SHIFT)
    else:
        y2, y3 = y0, y1
    return y0, y1, y2, y3


@triton.jit
def _encode(y0, y1, y2, y3, grid_ptr, LANES: tl.constexpr, HEAD_DIM: tl.constexpr, CODE_BITS: tl.constexpr,
            D: tl.constexpr, POINTS: tl.constexpr):
    """HIGGS-encode Hadamard-domain residual lanes y0..y3 [N, W] (float32; with LANES == 2, y2, y3 repeat y0, y1):
    code bytes [N, W] (int32), the fp16-rounded scale [N] (float32), and the decoded residual as lanes
    (y_hat = grid[code] * scale / sqrt(h))."""
    sq = tl.sum(y0 * y0, axis=1) + tl.sum(y1 * y1, axis=1)
    if LANES == 4:
        sq += tl.sum(y2 * y2, axis=1) + tl.sum(y3 * y3, axis=1)
    scale = tl.minimum(tl.sqrt(sq), FP16_MAX).to(tl.float16).to(tl.float32)  # [N]
    inv = tl.where(scale > 0, tl.sqrt(HEAD_DIM * 1.0) / tl.where(scale > 0, scale, 1.0), 0.0)[:, None]
    z0, z1, z2, z3 = y0 * inv, y1 * inv, y2 * inv, y3 * inv
    back = (scale / tl.sqrt(HEAD_DIM * 1.0))[:, None]
    byte = tl.zeros(y0.shape, tl.int32)
    h0, h1, h2, h3 = y0 * 0.0, y1 * 0.0, y2 * 0.0, y3 * 0.0  # decoded lanes
    for c in tl.static_range(8 // CODE_BITS):  # the codes of one byte, lowest bits first
        code = _nearest(_pick(z0, z1, z2, z3, c * D), _pick(z0, z1, z2, z3, c * D + 1 if D > 1 else 0),
                        _pick(z0, z1, z2, z3, c * D + 2 if D > 2 else 0),
                        _pick(z0, z1, z2, z3, c * D + 3 if D > 2 else 0), grid_ptr, D, POINTS)
        byte |= code << (c * CODE_BITS)
        for k in tl.static_range(D):  # lane c * D + k holds coordinate k of this code
            value = tl.load(grid_ptr + code * D + k) * back
            if c * D + k == 0:
                h0 = value
            elif c * D + k == 1:
                h1 = value
            elif c * D + k == 2:
                h2 = value
            else:
                h3 = value
    if LANES == 2:
        h2, h3 = h0, h1
    return byte, scale, h0, h1, h2, h3


@triton.jit
def _store_stream(cache_ptr, base, valid, byte, scale, CODE_OFFSET: tl.constexpr, SCALE_OFFSET: tl.constexpr,
                  WIDTH: tl.constexpr):
    w = tl.arange(0, WIDTH)
    tl.store(cache_ptr + base[:, None] + CODE_OFFSET + w[None, :], byte.to(tl.uint8), mask=valid[:, None])
    tl.store((cache_ptr + base + SCALE_OFFSET).to(tl.pointer_type(tl.float16)), scale.to(tl.float16), mask=valid)


@triton.jit
def _write_stream(x_ptr, stride_t, stride_h, ring_ptr, bias_ptr, rot_ptr, sign_ptr, shift_ptr, grid_ptr, m_ptr,
                  channel_scale_ptr, cache_ptr, n, head, loaded, valid, in_ring, ring, base, k0, k1, k2, k3,
                  HEAD_DIM: tl.constexpr, LANES: tl.constexpr, CODE_BYTES: tl.constexpr, CODE_BITS: tl.constexpr,
                  D: tl.constexpr, POINTS: tl.constexpr, CODE_OFFSET: tl.constexpr, SCALE_OFFSET: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_RING: tl.constexpr, FROM_K: tl.constexpr, K_LANES: tl.constexpr,
                  K_CODE_BYTES: tl.constexpr, EXACT: tl.constexpr, X_DOT: tl.constexpr, HAS_SCALE: tl.constexpr):
    """Encode one stream (keys or values) of BLOCK_N tokens of one head into their slots (and their 16-bit copies
    into the ring); returns the decoded Hadamard-domain residual lanes (the value predictor's input).  FROM_K: also
    subtract the value prediction from the decoded key lanes k0..k3 (``_lane_times`` with M = A^T W).  HAS_SCALE:
    the residual times the channel scale D [H, h] before the rotation (keys with ``key_channel_scale``).  EXACT
    (without FROM_K): rotate the 16-bit inputs in dtype X_DOT and subtract the rotated prediction
    (``_rotate_exact``); with HAS_SCALE, sign_ptr holds diag(D) S per head [H, h, h] (16-bit exact: D is bfloat16)
    and shift_ptr (b D) A."""
    j = tl.arange(0, HEAD_DIM)
    x = tl.load(x_ptr + n[:, None] * stride_t + head * stride_h + j[None, :], mask=loaded[:, None], other=0.0)
    if HAS_RING:
        tl.store(ring_ptr + ring, x.to(ring_ptr.dtype.element_ty), mask=in_ring[:, None])
    if EXACT and not FROM_K:
        if HAS_SCALE:  # this head's diag(D) S
            sign_ptr += head * HEAD_DIM * HEAD_DIM
        y0, y1, y2, y3 = _rotate_exact(x.to(X_DOT), sign_ptr, shift_ptr + head * HEAD_DIM, HEAD_DIM, LANES,
                                       CODE_BYTES, HAS_BIAS)
    else:
        r = x.to(tl.float32)  # [N, h] (rows are encoded independently; stores keep the valid ones)
        if HAS_BIAS:  # keys: the key mean; values: b_v + b_k W
            r -= tl.load(bias_ptr + head * HEAD_DIM + j)[None, :]
        if FROM_K:  # values: + (decoded key residual, Hadamard domain) A^T W, as lanes times M = A^T W
            m_ptr += head * HEAD_DIM * HEAD_DIM
            r -= _lane_times(k0, m_ptr, 0, HEAD_DIM, K_CODE_BYTES)
            r -= _lane_times(k1, m_ptr, 1, HEAD_DIM, K_CODE_BYTES)
            if K_LANES == 4:
                r -= _lane_times(k2, m_ptr, 2, HEAD_DIM, K_CODE_BYTES)
                r -= _lane_times(k3, m_ptr, 3, HEAD_DIM, K_CODE_BYTES)
        if HAS_SCALE:
            r *= tl.load(channel_scale_ptr + head * HEAD_DIM + j)[None, :]
        y0, y1, y2, y3 = _rotate(r, rot_ptr, HEAD_DIM, LANES, CODE_BYTES)
    byte, scale, h0, h1, h2, h3 = _encode(y0, y1, y2, y3, grid_ptr, LANES, HEAD_DIM, CODE_BITS, D, POINTS)
    _store_stream(cache_ptr, base, valid, byte, scale, CODE_OFFSET, SCALE_OFFSET, CODE_BYTES)
    return h0, h1, h2, h3


@triton.jit(do_not_specialize=["num_tokens", "ring_scratch"])  # (the scratch row: warm-up's differs from serving's)
def _cache_write_kernel(
    key_ptr, value_ptr, slot_ptr, cache_ptr, rot_k_ptr, rot_v_ptr, sign_k_ptr, sign_v_ptr, k_shift_ptr, v_shift_ptr,
    k_bias_ptr, v_bias_ptr, v_from_k_ptr, k_channel_scale_ptr, k_grid_ptr, v_grid_ptr, ring_k_ptr, ring_v_ptr,
    ring_row_ptr, ring_col_ptr,
    num_tokens, ring_scratch, stride_kt, stride_kh, stride_vt, stride_vh, stride_block, stride_head, stride_token,
    HEAD_DIM: tl.constexpr, PAGE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    K_LANES: tl.constexpr, K_CODE_BYTES: tl.constexpr, K_CODE_BITS: tl.constexpr, K_D: tl.constexpr,
    K_POINTS: tl.constexpr, V_LANES: tl.constexpr, V_CODE_BYTES: tl.constexpr, V_CODE_BITS: tl.constexpr,
    V_D: tl.constexpr, V_POINTS: tl.constexpr, V_CODE_OFFSET: tl.constexpr, K_SCALE_OFFSET: tl.constexpr,
    V_SCALE_OFFSET: tl.constexpr, HAS_K_BIAS: tl.constexpr, HAS_V_BIAS: tl.constexpr, V_FROM_K: tl.constexpr,
    HAS_RING: tl.constexpr, RING_WIDTH: tl.constexpr, NUM_KV_HEADS: tl.constexpr, SPLIT_STREAMS: tl.constexpr,
    EXACT: tl.constexpr, X_DOT: tl.constexpr, HAS_K_SCALE: tl.constexpr,
):
    head = tl.program_id(1)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.load(slot_ptr + n, mask=n < num_tokens, other=-1).to(tl.int64)
    valid = (n < num_tokens) & (slot >= 0)  # padded tokens have slot -1
    base = (slot // PAGE_BLOCK) * stride_block + head * stride_head + (slot % PAGE_BLOCK) * stride_token
    j = tl.arange(0, HEAD_DIM)

    loaded = valid  # the tokens whose K/V are read: those encoded, and with the ring those it stores
    in_ring = valid  # (not read without the ring)
    ring = n
    if HAS_RING:  # 16-bit copies of the step's sink and window tokens; not those whose entry is the scratch row
        # (``WindowStep``: one address for every other token of a prefill, whose stores would queue on it)
        ring_row = tl.load(ring_row_ptr + n, mask=n < num_tokens, other=ring_scratch)
        ring_col = tl.load(ring_col_ptr + n, mask=n < num_tokens, other=0)
        in_ring = (n < num_tokens) & (ring_row != ring_scratch)
        loaded = valid | in_ring
        ring = ((ring_row * RING_WIDTH + ring_col) * NUM_KV_HEADS + head).to(tl.int64)[:, None] * HEAD_DIM + j[None, :]
    # SPLIT_STREAMS: keys in programs (., ., 0), values in (., ., 1), two short chains instead of one long; else one
    # program per (tokens, head) does both, as the value predictor reads the decoded keys (V_FROM_K)
    z = tl.program_id(2)
    k0 = tl.zeros([BLOCK_N, K_CODE_BYTES], tl.float32)
    k1, k2, k3 = k0, k0, k0
    if z == 0:
        k0, k1, k2, k3 = _write_stream(key_ptr, stride_kt, stride_kh, ring_k_ptr, k_bias_ptr, rot_k_ptr, sign_k_ptr,
                                       k_shift_ptr, k_grid_ptr, v_from_k_ptr, k_channel_scale_ptr, cache_ptr, n, head,
                                       loaded, valid, in_ring, ring, base, k0, k1, k2, k3, HEAD_DIM, K_LANES,
                                       K_CODE_BYTES, K_CODE_BITS, K_D, K_POINTS, 0, K_SCALE_OFFSET, HAS_K_BIAS,
                                       HAS_RING, False, K_LANES, K_CODE_BYTES, EXACT, X_DOT, HAS_K_SCALE)
    if z == (1 if SPLIT_STREAMS else 0):
        _write_stream(value_ptr, stride_vt, stride_vh, ring_v_ptr, v_bias_ptr, rot_v_ptr, sign_v_ptr, v_shift_ptr,
                      v_grid_ptr, v_from_k_ptr, k_channel_scale_ptr, cache_ptr, n, head, loaded, valid, in_ring, ring,
                      base, k0, k1, k2, k3, HEAD_DIM, V_LANES, V_CODE_BYTES, V_CODE_BITS, V_D, V_POINTS,
                      V_CODE_OFFSET, V_SCALE_OFFSET, HAS_V_BIAS, HAS_RING, V_FROM_K, K_LANES, K_CODE_BYTES, EXACT,
                      X_DOT, False)


PREFILL_TOKENS = 1024  # steps of this many new tokens or more take the prefill launch (``launch_settings``)


def launch_settings(num_tokens: int, dtype: torch.dtype, v_from_k: bool) -> dict:
    """write_fused's launch for a step of ``num_tokens`` new tokens in ``dtype``, as timed on the H200
    (benchmarks/results/cache_write_h200_prefill.md, one layer of Llama-3.2-3B, speed preset): 16-bit inputs take the
    16-bit rotation (``exact_inputs``; in the decode launch 3.7 instead of 6.1 us for one token, 89 instead of 194 us
    for 8192); decode-sized steps keys and values in programs of their own, 16 tokens and 4 warps each; prefill-sized
    steps (>= ``PREFILL_TOKENS``) both streams in one program of 64 tokens and 8 warps (55.6 us at 8192 tokens),
    unless the value predictor reads the decoded keys (its float32 path: the decode launch, one program)."""
    exact = dtype in (torch.bfloat16, torch.float16)
    if exact and not v_from_k and num_tokens >= PREFILL_TOKENS:
        return {"block_n": 64, "split_streams": False, "num_warps": 8, "exact_inputs": True}
    return {"block_n": 16, "split_streams": not v_from_k, "num_warps": 4, "exact_inputs": exact}


def write_fused(layer: FusedLayer, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, block_n: int | None = None, ring: tuple | None = None,
                split_streams: bool | None = None, num_warps: int | None = None,
                exact_inputs: bool | None = None) -> None:
    """Encode key (post-RoPE) and value [>= N, H, h] of the N = len(slot_mapping) new tokens into their slots of
    kv_cache [num_blocks, H, page_block, slot] (uint8); slot -1 skips a token.  ``ring``: (ring_k, ring_v
    [rows + 1, width, H, h] contiguous, the step's ``WindowStep``): also store every token's key and value into its
    ring entry (``ExactTokens.write``).  The launch (None: ``launch_settings``): ``block_n`` tokens and ``num_warps``
    warps per program; ``split_streams``: keys and values in programs of their own (twice the programs), which they
    cannot be where the value predictor reads the decoded keys; ``exact_inputs``: 16-bit K/V are rotated by the +-1
    sign matrix on 16-bit tensor cores and the rotated prediction subtracted, one product instead of tf32x3's three
    (streams whose prediction reads the decoded keys keep the float32 path)."""
    n = slot_mapping.shape[0]
    settings = launch_settings(n, key.dtype, layer.write_v_from_k is not None)
    block_n = settings["block_n"] if block_n is None else block_n
    num_warps = settings["num_warps"] if num_warps is None else num_warps
    exact_inputs = settings["exact_inputs"] if exact_inputs is None else exact_inputs
    split_streams = settings["split_streams"] if split_streams is None else split_streams
    _, heads, page_block, _ = kv_cache.shape
    h = key.shape[-1]
    kl, vl = layer.k_lanes, layer.v_lanes
    dummy = layer.rot_k  # any float32 tensor, for pointers the kernel does not read
    v_bias, v_from_k = layer.write_v_bias, layer.write_v_from_k
    if ring is not None:
        ring_k, ring_v, step = ring
        if not (ring_k.is_contiguous() and ring_v.is_contiguous() and ring_k.shape[2:] == (heads, h)):
            raise ValueError(f"ring buffers must be contiguous [rows + 1, width, {heads}, {h}], got "
                             f"{tuple(ring_k.shape)}")
        ring_args = (ring_k, ring_v, step.rows, step.cols)
    else:
        ring_args = (key, value, slot_mapping, slot_mapping)  # not read
    interpret = key.device.type != "cuda"
    if exact_inputs and key.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"exact_inputs rotates 16-bit keys/values, got {key.dtype}")
    # the 16-bit rotation's dot inputs: the keys' dtype (the interpreter's 16-bit dots are wrong: float32 there)
    x_dot = tl.float32 if interpret else {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(key.dtype)
    shifts = [dummy if s is None else s for s in (layer.write_k_shift, layer.write_v_shift)]
    if split_streams and v_from_k is not None:
        raise ValueError("split_streams: this layer's value predictor reads the decoded keys (one program must do both)")
    _cache_write_kernel[(triton.cdiv(n, block_n), heads, 2 if split_streams else 1)](
        key, value, slot_mapping, kv_cache, layer.rot_k, layer.rot_v,
        layer.sign_k if layer.write_sign_k is None else layer.write_sign_k, layer.sign_v, *shifts,
        layer.k_bias if layer.k_bias is not None else dummy, v_bias if v_bias is not None else dummy,
        v_from_k if v_from_k is not None else dummy, dummy if layer.k_scale is None else layer.k_scale, kl.grid,
        vl.grid, *ring_args,
        n, 0 if ring is None else ring[0].shape[0] - 1, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        HEAD_DIM=h, PAGE_BLOCK=page_block, BLOCK_N=block_n,
        K_LANES=kl.lanes, K_CODE_BYTES=kl.code_bytes, K_CODE_BITS=kl.code_bits, K_D=kl.grid.shape[1],
        K_POINTS=kl.grid.shape[0], V_LANES=vl.lanes, V_CODE_BYTES=vl.code_bytes, V_CODE_BITS=vl.code_bits,
        V_D=vl.grid.shape[1], V_POINTS=vl.grid.shape[0], V_CODE_OFFSET=layer.v_code_offset,
        K_SCALE_OFFSET=layer.k_scale_offset, V_SCALE_OFFSET=layer.v_scale_offset,
        HAS_K_BIAS=layer.k_bias is not None, HAS_V_BIAS=v_bias is not None, V_FROM_K=v_from_k is not None,
        HAS_RING=ring is not None, RING_WIDTH=1 if ring is None else ring[0].shape[1], NUM_KV_HEADS=heads,
        SPLIT_STREAMS=split_streams, EXACT=exact_inputs, X_DOT=x_dot or tl.float32,
        HAS_K_SCALE=layer.k_scale is not None, num_warps=num_warps,
    )


def write_beside(layer: FusedLayer, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, ring: tuple) -> torch.cuda.Stream:
    """``write_fused`` of a decode step with the 16-bit window on ``side_stream(device, "write")``, after the work
    queued so far on the current stream; returns the stream, which the caller joins (``current_stream().wait_stream``)
    after the layer's attention launches.  Safe only where that attention reads none of what the write stores: a
    decode step's own token comes from its 16-bit inputs (kernels/attention.py, RING_FIRST), older tokens from earlier
    steps' writes.  Captured in a CUDA graph, the fork and join become graph edges."""
    stream = side_stream(key.device, "write")
    stream.wait_stream(torch.cuda.current_stream(key.device))
    with torch.cuda.stream(stream):
        write_fused(layer, kv_cache, slot_mapping, key, value, ring=ring)
    return stream
