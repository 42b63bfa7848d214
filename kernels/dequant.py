"""Triton kernel: reconstruct HIGGS residuals straight from aquakv's paged slots (the read half of attention).

For one request and one stream (K or V) of one layer: gather the slots of tokens 0..seq_len-1 through the block
table, unpack the codes (LSB-first bit string, ``vllm_aquakv.codec``), look up the grid, apply the fp16 scale and
the inverse randomized Hadamard rotation (a [T, h] x [h, h] product on tensor cores).  Output: residuals
[seq_len, H, h] float32, the same numbers as ``SlotLayout.unpack`` + ``HiggsCodec.decode`` (its torch twin).
Supports one scale per (token, KV head) (group_size == head_dim) and 1-, 2- or 4-D grids with codes of <= 8 bits.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _dequant_paged_kernel(
    cache_ptr, block_table_ptr, grid_ptr, signs_ptr, hadamard_ptr, out_ptr,
    seq_len, stride_block, stride_head, stride_token, stride_out_t, stride_out_h,
    PART_OFFSET: tl.constexpr, CODE_BYTES: tl.constexpr, HEAD_DIM: tl.constexpr, GRID_DIM: tl.constexpr,
    CODE_BITS: tl.constexpr, PAGE_BLOCK: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_t = tl.program_id(0)
    head = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # token positions [T]
    t_mask = t < seq_len
    blk = tl.load(block_table_ptr + t // PAGE_BLOCK, mask=t_mask, other=0).to(tl.int64)
    base = blk * stride_block + head * stride_head + (t % PAGE_BLOCK) * stride_token + PART_OFFSET  # [T]
    j = tl.arange(0, HEAD_DIM)  # value index within the head
    bit = (j // GRID_DIM) * CODE_BITS  # first bit of the value's code
    byte = bit // 8
    shift = bit % 8
    lo = tl.load(cache_ptr + base[:, None] + byte[None, :], mask=t_mask[:, None], other=0).to(tl.int32)
    hi_mask = t_mask[:, None] & (byte + 1 < CODE_BYTES)[None, :]
    hi = tl.load(cache_ptr + base[:, None] + byte[None, :] + 1, mask=hi_mask, other=0).to(tl.int32)
    code = ((lo | (hi << 8)) >> shift[None, :]) & ((1 << CODE_BITS) - 1)  # [T, h]
    z = tl.load(grid_ptr + code * GRID_DIM + (j % GRID_DIM)[None, :])  # [T, h] grid coordinates
    s_lo = tl.load(cache_ptr + base + CODE_BYTES, mask=t_mask, other=0).to(tl.int16)
    s_hi = tl.load(cache_ptr + base + CODE_BYTES + 1, mask=t_mask, other=0).to(tl.int16)
    scale = ((s_hi << 8) | s_lo).to(tl.float16, bitcast=True).to(tl.float32)  # [T]
    y = z * (scale / tl.sqrt(HEAD_DIM * 1.0))[:, None]
    hadamard = tl.load(hadamard_ptr + j[:, None] * HEAD_DIM + j[None, :])  # [h, h], symmetric, +-1
    signs = tl.load(signs_ptr + j)
    x = tl.dot(y, hadamard, input_precision="ieee") * (signs / tl.sqrt(HEAD_DIM * 1.0))[None, :]
    tl.store(out_ptr + t[:, None] * stride_out_t + head * stride_out_h + j[None, :], x, mask=t_mask[:, None])


@functools.lru_cache(maxsize=None)
def sylvester_hadamard(n: int, device: str) -> torch.Tensor:
    """The unnormalized Sylvester Hadamard matrix [n, n] (float32) on ``device``, the matrix form of ``codec.fwht``
    (built once per size and device)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h.to(device)


def dequant_paged(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int, codec, part_offset: int,
                  block_t: int = 32) -> torch.Tensor:
    """Residuals [seq_len, H, h] float32 of one stream from paged slots kv_cache [num_blocks, H, page_block, slot]
    (uint8; any strides), block_table [max_blocks] of one request; ``part_offset``: the stream's first byte in a slot.
    """
    if codec.group_size != codec.head_dim:
        raise ValueError(f"the dequant kernel supports group_size == head_dim, not {codec.group_size}")
    if not codec.rotate or codec.code_bits > 8:
        raise ValueError("the dequant kernel needs the Hadamard rotation and codes of <= 8 bits")
    _, heads, page_block, _ = kv_cache.shape
    h = codec.head_dim
    out = torch.empty(seq_len, heads, h, dtype=torch.float32, device=kv_cache.device)
    hadamard = sylvester_hadamard(h, str(kv_cache.device))
    grid = codec.grid.to(kv_cache.device).contiguous()
    signs = codec.signs.to(kv_cache.device).contiguous()
    launch = (triton.cdiv(seq_len, block_t), heads)
    _dequant_paged_kernel[launch](
        kv_cache, block_table, grid, signs, hadamard, out,
        seq_len, kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), out.stride(0), out.stride(1),
        PART_OFFSET=part_offset, CODE_BYTES=codec.code_bytes // heads, HEAD_DIM=h, GRID_DIM=codec.grid_dim,
        CODE_BITS=codec.code_bits, PAGE_BLOCK=page_block, BLOCK_T=block_t,
    )
    return out
