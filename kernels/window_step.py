"""One Triton launch for a step's 16-bit ring bookkeeping (``vllm_aquakv.window.ExactTokens.begin_step``, its torch
twin): which rows keep their ring entries, the rows' new lengths and last blocks, and each new token's ring entry
(row, column) with its tag.  The torch twin launches ~50 small kernels at the first layer of every step (77 aten
ops on CPU for a 4-request decode step), which a FULL CUDA graph replays one after another.

One program per ring row (``max_rows`` of them) plus one for the scratch row: a request's program clears its row's
tags unless the request continues (the twin's rule), stores its length and last block, then, after a barrier, tags
its own tokens' entries, so the clear always precedes the tags of the same row.  Rows past the step's requests are
cleared; the scratch row's program clears that row and places the padding tokens past the last request.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import _ring_column

BLOCK_T = 512  # tokens per loop step of a request's program


@triton.jit(do_not_specialize=["num_reqs", "num_tokens"])  # values that change every step: one compiled variant
def _begin_step_kernel(block_table_ptr, seq_lens_ptr, qsl_ptr, slot_ptr, tags_ptr, length_ptr, last_block_ptr,
                       rows_ptr, cols_ptr, tokens_ptr, num_reqs, num_tokens, max_rows, stride_bt, max_blocks,
                       SINKS: tl.constexpr, WINDOW: tl.constexpr, WIDTH_P2: tl.constexpr, PAGE_BLOCK: tl.constexpr,
                       BLOCK_T: tl.constexpr):
    r = tl.program_id(0)
    width = SINKS + WINDOW
    c = tl.arange(0, WIDTH_P2)
    c_mask = c < width
    if r < num_reqs:
        q0 = tl.load(qsl_ptr + r)
        q1 = tl.load(qsl_ptr + r + 1)
        lens = tl.load(seq_lens_ptr + r).to(tl.int64)
        context = lens - (q1 - q0)
        prev = tl.load(length_ptr + r)
        idx = tl.minimum(tl.maximum(prev - 1, 0) // PAGE_BLOCK, max_blocks - 1)
        held = tl.load(block_table_ptr + r * stride_bt + idx).to(tl.int64)
        # unless the request continues in this row, another request (or none) held it: its entries are not ours
        moved = (context != prev) | (prev <= 0) | (held != tl.load(last_block_ptr + r))
        tags = tl.load(tags_ptr + r * width + c, mask=c_mask, other=-1)
        tl.store(tags_ptr + r * width + c, tl.where(moved, -1, tags), mask=c_mask)
        tl.store(length_ptr + r, lens)
        last = tl.load(block_table_ptr + r * stride_bt + tl.maximum(lens - 1, 0) // PAGE_BLOCK).to(tl.int64)
        tl.store(last_block_ptr + r, last)
        tl.debug_barrier()  # the row's clear before its new tags
        for t0 in range(q0, q1, BLOCK_T):
            tok = t0 + tl.arange(0, BLOCK_T)
            t_mask = tok < q1
            pos = context + (tok - q0)  # the token's key position
            in_ring = pos < SINKS
            if WINDOW > 0:
                in_ring = in_ring | (pos >= lens - WINDOW)
            in_ring = in_ring & (pos >= 0)
            col = _ring_column(pos, SINKS, WINDOW)
            row = tl.where(in_ring, r, max_rows).to(tl.int64)
            col = tl.where(in_ring, col, 0).to(tl.int64)
            tl.store(rows_ptr + tok, row, mask=t_mask)
            tl.store(cols_ptr + tok, col, mask=t_mask)
            tl.store(tokens_ptr + tok, tok.to(tl.int64), mask=t_mask)
            slot = tl.load(slot_ptr + tok, mask=t_mask, other=-1).to(tl.int64)
            tl.store(tags_ptr + row * width + col, tl.where(in_ring, slot, -1), mask=t_mask)
    else:  # rows without a request this step (and the scratch row): cleared
        tl.store(tags_ptr + r * width + c, tl.full([WIDTH_P2], -1, tl.int64), mask=c_mask)
        if r < max_rows:
            tl.store(length_ptr + r, 0)
            tl.store(last_block_ptr + r, -1)
        else:  # tokens past the last request (CUDA-graph padding): the scratch entry
            tail = tl.load(qsl_ptr + num_reqs)
            for t0 in range(tail, num_tokens, BLOCK_T):
                tok = t0 + tl.arange(0, BLOCK_T)
                t_mask = tok < num_tokens
                tl.store(rows_ptr + tok, tl.zeros([BLOCK_T], tl.int64) + max_rows, mask=t_mask)
                tl.store(cols_ptr + tok, tl.zeros([BLOCK_T], tl.int64), mask=t_mask)
                tl.store(tokens_ptr + tok, tok.to(tl.int64), mask=t_mask)


def begin_step_fused(ring, block_table: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                     num_tokens: int, slot_mapping: torch.Tensor, block_size: int):
    """``ExactTokens.begin_step`` in one launch (same arguments as device tensors, same ``WindowStep``, same ring
    state afterwards); ``ring`` is the ``ExactTokens`` whose tags, lengths and last blocks it updates (allocated, the
    step's request count checked by ``begin_step``)."""
    from vllm_aquakv.window import WindowStep

    device = slot_mapping.device
    num_reqs = query_start_loc.shape[0] - 1
    rows, cols, tokens = (torch.empty(num_tokens, dtype=torch.int64, device=device) for _ in range(3))
    _begin_step_kernel[(ring.max_rows + 1,)](
        block_table, seq_lens, query_start_loc, slot_mapping, ring.tags, ring.length, ring.last_block,
        rows, cols, tokens, num_reqs, num_tokens, ring.max_rows, block_table.stride(0), block_table.shape[1],
        SINKS=ring.sinks, WINDOW=ring.window, WIDTH_P2=triton.next_power_of_2(ring.width), PAGE_BLOCK=block_size,
        BLOCK_T=BLOCK_T)
    return WindowStep(rows, cols, tokens)
