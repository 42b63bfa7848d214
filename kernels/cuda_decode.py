"""The codes loop of decode steps as a hand-written CUDA kernel (``decode_codes.cu``), compiled at run time by NVRTC.

For the speed preset's uniform 2-bit codes (u1n4) the Triton kernel's key-tile loop is bound by instruction issue
(offline SASS: 791 warp instructions per 128 tokens and warp, ~3 per cached value, 27-39% of its HBM floor on the
H100).  ``decode_codes.cu`` does the same work on mma.sync with the codes masked in place as float16 subnormals: one
LOP3 per pair of key values, one PRMT per 8 value codes, the P^T fragments by warp shuffles, and a rescale of the
running sums only when a running max grows.  It writes the split-K partials of ``_fused_attention_kernel``'s codes
segments (decode launches, RING_FIRST), so ``_combine_kernel`` and the 16-bit ring's own launch are reused unchanged.
Its torch twin is the same as the Triton kernel's, ``vllm_aquakv.serving.TorchServingPath.attend``.

``decode_refusal`` says why a launch cannot take it (the Triton kernel then runs the codes, as before this kernel);
``AttentionPlan.cuda_decode`` turns it off.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("decode_codes.cu")
WARPS = 4
MAX_GROUP = 8  # query heads per KV head: the scores' mma is 8 heads wide
# 16-token steps per loop iteration of a warp: the slots of the next iteration are loaded before this one's math, so
# this many steps of each warp are in flight (2: 128 registers, 1: 115; offline sm_90 compile, no spills)
SUB_STEPS = 1
# STAGES > 1: each 16-token step's slots (contiguous bytes) are staged in shared memory by 16-byte cp.async, STAGES - 1
# steps ahead of the math, instead of scattered 4-byte loads into registers (0)
STAGES = 4


@dataclass(frozen=True)
class DecodeConfig:
    """Compile-time settings of one ``decode_codes.cu`` module (its #defines)."""

    group: int
    num_q_heads: int
    page_block: int
    sinks: int
    window: int
    has_window: bool
    has_k_bias: bool
    has_k_scale: bool
    q_bf16: bool
    v_code_offset: int
    k_scale_offset: int
    stride_token: int
    sub_steps: int = SUB_STEPS
    stages: int = STAGES

    def defines(self) -> str:
        values = dict(G=self.group, NUM_Q_HEADS=self.num_q_heads, PAGE_BLOCK=self.page_block, SINKS=self.sinks,
                      WINDOW=self.window, HAS_WINDOW=int(self.has_window), HAS_K_BIAS=int(self.has_k_bias),
                      HAS_K_SCALE=int(self.has_k_scale), Q_BF16=int(self.q_bf16), V_CODE_OFFSET=self.v_code_offset,
                      K_SCALE_OFFSET=self.k_scale_offset, STRIDE_TOKEN=self.stride_token,
                      SUB_STEPS=self.sub_steps, STAGES=self.stages,
                      MIN_BLOCKS=5 if self.stages else 4)  # (registers: 96 / 115 without spills, offline sm_90)
        return "".join(f"#define {k} {v}\n" for k, v in values.items())


def layer_refusal(layer, group: int, page_block: int, q_dtype: torch.dtype) -> str | None:
    """Why a fused layer's decode steps cannot take the CUDA codes loop (shape and codes only), or None."""
    k, v = layer.k_lanes, layer.v_lanes
    if k.index_bits != 0 or v.index_bits != 0 or k.lanes != 4 or v.lanes != 4:
        return "the CUDA decode loop reads uniform 2-bit codes (grid u1n4, the speed preset)"
    if k.code_bytes != 32 or v.code_bytes != 32:
        return f"the CUDA decode loop takes head_dim 128 (this layer has {k.code_bytes * 4})"
    if layer.v_weight is not None:
        return "the CUDA decode loop has no value predictor from keys"
    if group > MAX_GROUP:
        return f"the CUDA decode loop takes at most {MAX_GROUP} query heads per KV head, not {group}"
    if page_block % 16:
        return f"the CUDA decode loop takes page blocks of a multiple of 16 tokens, not {page_block}"
    if layer.k_scale_offset % 4 or layer.v_scale_offset != layer.k_scale_offset + 2 or layer.v_code_offset % 4:
        return "the CUDA decode loop reads both fp16 scales of a slot as one aligned word"
    if q_dtype not in (torch.bfloat16, torch.float16):
        return f"the CUDA decode loop takes bfloat16 or float16 queries, not {q_dtype}"
    return None


def decode_refusal(query: torch.Tensor, kv_cache: torch.Tensor, plan, layer, window) -> str | None:
    """Why this launch's codes segments cannot run on the CUDA decode loop (None: they can)."""
    if query.device.type != "cuda" or torch.version.cuda is None:
        return "not a CUDA device"
    if not plan.cuda_decode:
        return "turned off (AttentionPlan.cuda_decode)"
    if plan.block_q != 1 or plan.block_m > 16:
        return "decode launches only (one query token per request)"
    if plan.qk_int8:
        return "int8 scores run in the Triton kernel"
    if window is not None and not plan.ring_launch:
        return "the 16-bit ring is read by programs of the Triton codes launch (fewer requests than its own launch)"
    if kv_cache.stride(-1) != 1 or any(s % 4 for s in kv_cache.stride()[:3]) or kv_cache.data_ptr() % 4:
        return "the cache's slots are not 4-byte aligned"
    if STAGES > 0 and (kv_cache.stride(0) % 16 or kv_cache.stride(1) % 16 or kv_cache.data_ptr() % 16):
        return "the cache's page blocks are not 16-byte aligned (cp.async staging)"
    if kv_cache.stride(0) >= 2 ** 31:
        return "the cache's block stride does not fit 32 bits"
    if query.stride(-1) != 1:
        return "the query's last dimension is not contiguous"
    _, heads, page_block, _ = kv_cache.shape
    return layer_refusal(layer, query.shape[1] // heads, page_block, query.dtype)


def decode_config(layer, num_q_heads: int, num_kv_heads: int, page_block: int, stride_token: int,
                  q_dtype: torch.dtype, window: tuple[int, int] | None) -> DecodeConfig:
    """The module a layer's decode launches use (``window``: (sinks, window) of the 16-bit ring, or None)."""
    sinks, win = window or (0, 0)
    return DecodeConfig(num_q_heads // num_kv_heads, num_q_heads, page_block, sinks, win, window is not None,
                        layer.k_bias is not None, layer.k_dinv is not None, q_dtype == torch.bfloat16,
                        layer.v_code_offset, layer.k_scale_offset, stride_token,
                        SUB_STEPS, STAGES)


_COMPILED: dict[DecodeConfig, object] = {}


def compiled(config: DecodeConfig):
    """The NVRTC-compiled kernel for ``config`` (compiled once per process; ~1 s).  Never inside a CUDA-graph
    capture: a module a capture would need is refused there with the config it lacks (the server compiles its
    layers' modules at startup, ``VllmRuntime._enable_cuda_decode``)."""
    kernel = _COMPILED.get(config)
    if kernel is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"the CUDA decode loop was not compiled before this CUDA-graph capture for {config} "
                               f"(compiled: {list(_COMPILED)})")
        from torch.cuda import _compile_kernel  # torch >= 2.8

        kernel = _COMPILED[config] = _compile_kernel(config.defines() + SOURCE.read_text(), "aquakv_decode_codes")
    return kernel


def launch_decode_codes(query, kv_cache, block_table, seq_lens, query_start_loc, plan, layer, logit_scale: float,
                        m, l, acc_v, window) -> None:
    """Write the split-K partials of the decode codes segments (what ``_fused_attention_kernel`` writes for
    ``plan.segments`` segments of a RING_FIRST decode launch) into m, l, acc_v [segments (+ ring), N, Hq(, h)]."""
    n, num_q_heads, h = query.shape
    _, heads, page_block, _ = kv_cache.shape
    config = decode_config(layer, num_q_heads, heads, page_block, kv_cache.stride(2), query.dtype,
                           None if window is None else (window.sinks, window.window))
    kernel = compiled(config)
    k_terms, v_terms = layer.k_lanes.table, layer.v_lanes.table  # (g0, step) float32 each
    dummy = layer.rot_k
    tags = window.tags if window is not None else block_table
    kernel(grid=(plan.q_seq.shape[0], heads, plan.segments), block=(32 * WARPS, 1, 1),
           args=[query, layer.sign_k, dummy if layer.k_bias is None else layer.k_bias,
                 dummy if layer.k_dinv is None else layer.k_dinv, kv_cache, block_table, seq_lens, query_start_loc,
                 k_terms, v_terms, m, l, acc_v, tags, plan.segments, n, logit_scale, query.stride(0),
                 query.stride(1), kv_cache.stride(0), kv_cache.stride(1), block_table.stride(0), plan.tile])

