"""The codes loop of decode steps as a hand-written CUDA kernel (``decode_codes.cu``), compiled at run time by NVRTC.

For the speed preset's uniform 2-bit codes (u1n4) the Triton kernel's key-tile loop is bound by instruction issue
(offline SASS: 791 warp instructions per 128 tokens and warp, ~3 per cached value, 27-39% of its HBM floor on the
H100).  ``decode_codes.cu`` does the same work on mma.sync with the codes masked in place as float16 subnormals: one
LOP3 per pair of key values, one PRMT per 8 value codes, the P^T fragments by warp shuffles, and a rescale of the
running sums only when a running max grows.  It writes the split-K partials of ``_fused_attention_kernel``'s codes
segments (decode launches, RING_FIRST).  Fused (``AttentionPlan.cuda_fused``, opt-in) it is the step's one
launch: one more block per (request, KV head) reads the 16-bit sinks and window (with one codes segment, as from 33
requests, the segment's block does first), and the last block of each (request, KV head) to finish merges the partials
into the output (what the ring's own launch and ``_combine_kernel`` do otherwise, each a launch of its own).  Its
torch twin is the same as the Triton kernel's, ``vllm_aquakv.serving.TorchServingPath.attend``.

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
# fused launches count the finished blocks of each (request, KV head) in one int32 of a zeroed buffer per device
COUNTER_SLOTS = 1 << 16
_OUT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


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
    fused: bool = False  # ring pass and combine in the launch (FUSED)
    has_v_bias: bool = False
    out_kind: int = 0  # the output's dtype (fused): 0 float32, 1 bfloat16, 2 float16
    ring_bf16: bool = True  # the ring's and this step's 16-bit keys and values are bfloat16 (else float16)

    def defines(self) -> str:
        values = dict(G=self.group, NUM_Q_HEADS=self.num_q_heads, PAGE_BLOCK=self.page_block, SINKS=self.sinks,
                      WINDOW=self.window, HAS_WINDOW=int(self.has_window), HAS_K_BIAS=int(self.has_k_bias),
                      HAS_K_SCALE=int(self.has_k_scale), Q_BF16=int(self.q_bf16), V_CODE_OFFSET=self.v_code_offset,
                      K_SCALE_OFFSET=self.k_scale_offset, STRIDE_TOKEN=self.stride_token,
                      SUB_STEPS=self.sub_steps, STAGES=self.stages, FUSED=int(self.fused),
                      HAS_V_BIAS=int(self.has_v_bias), OUT_KIND=self.out_kind, RING_BF16=int(self.ring_bf16),
                      # registers (offline sm_90 compile): 96 with stages, none spilled in the loop (the fused ring
                      # pass and combine spill a few bytes outside it up to G = 4, in it at G = 8: 128 there), else 115
                      MIN_BLOCKS=5 if self.stages and not (self.fused and self.group > 4) else 4)
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


def decode_refusal(query: torch.Tensor, kv_cache: torch.Tensor, plan, layer, window,
                   out: torch.Tensor | None = None) -> str | None:
    """Why this launch's codes segments cannot run on the CUDA decode loop (None: they can; ``out``: the output
    buffer, None for a new float32 one)."""
    if query.device.type != "cuda" or torch.version.cuda is None:
        return "not a CUDA device"
    if not plan.cuda_decode:
        return "turned off (AttentionPlan.cuda_decode)"
    if plan.block_q != 1 or plan.block_m > 16:
        return "decode launches only (one query token per request)"
    if plan.qk_int8:
        return "int8 scores run in the Triton kernel"
    if plan.cuda_fused:
        if plan.q_seq.shape[0] * kv_cache.shape[1] > COUNTER_SLOTS:
            return f"more than {COUNTER_SLOTS} (request, KV head) pairs in one fused launch"
        if out is not None and (out.dtype not in _OUT_KINDS or out.stride(-1) != 1):
            return f"the fused launch writes float32, bfloat16 or float16 outputs with contiguous rows, not {out.dtype}"
        if window is not None and (window.ring_k.dtype not in (torch.bfloat16, torch.float16)
                                   or any(x.dtype != window.ring_k.dtype for x in (window.ring_v, window.key, window.value))
                                   or not (window.ring_k.is_contiguous() and window.ring_v.is_contiguous())
                                   or window.ring_k.data_ptr() % 16 or window.ring_v.data_ptr() % 16
                                   or window.key.stride(-1) != 1 or window.value.stride(-1) != 1):
            return "the fused launch reads contiguous, 16-byte aligned bfloat16 or float16 rings"
    elif window is not None and not plan.ring_launch:
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
                  q_dtype: torch.dtype, window: tuple[int, int] | None, fused: bool = False,
                  out_dtype: torch.dtype | None = None, ring_dtype: torch.dtype | None = None) -> DecodeConfig:
    """The module a layer's decode launches use (``window``: (sinks, window) of the 16-bit ring, or None;
    ``fused``: one launch with the ring pass and the combine, writing ``out_dtype`` (default: ``q_dtype``) from a
    ring of ``ring_dtype`` (default: ``q_dtype``))."""
    sinks, win = window or (0, 0)
    return DecodeConfig(num_q_heads // num_kv_heads, num_q_heads, page_block, sinks, win, window is not None,
                        layer.k_bias is not None, layer.k_dinv is not None, q_dtype == torch.bfloat16,
                        layer.v_code_offset, layer.k_scale_offset, stride_token,
                        SUB_STEPS, STAGES, fused, fused and layer.v_bias is not None,
                        _OUT_KINDS[out_dtype or q_dtype] if fused else 0, (ring_dtype or q_dtype) == torch.bfloat16)


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


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def counters(device) -> torch.Tensor:
    """The zeroed int32 [COUNTER_SLOTS] buffer of ``device`` in which fused launches count their finished blocks
    (each launch leaves it zeroed).  Made once per device, never inside a CUDA-graph capture (the server makes it at
    startup)."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device(device.type, torch.cuda.current_device())
    buf = _COUNTERS.get(device)
    if buf is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"the fused CUDA decode launch's block counters were not made before this CUDA-graph "
                               f"capture on {device} (counters(device) makes them)")
        buf = _COUNTERS[device] = torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device)
    return buf


def kernel_attributes(config: DecodeConfig) -> dict[str, int]:
    """The CUDA driver's numbers for the compiled module: registers, static shared memory and local (spilled) bytes
    per thread, and resident blocks per SM."""
    import ctypes

    from torch.cuda._utils import _get_gpu_runtime_library

    lib, func = _get_gpu_runtime_library(), compiled(config).func
    attrs = {}
    for name, attr in (("registers", 4), ("shared_bytes", 1), ("local_bytes", 3)):  # CU_FUNC_ATTRIBUTE_*
        value = ctypes.c_int()
        lib.cuFuncGetAttribute(ctypes.byref(value), attr, func)
        attrs[name] = value.value
    blocks = ctypes.c_int()
    lib.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(blocks), func, 32 * WARPS, 0)
    attrs["blocks_per_sm"] = blocks.value
    return attrs


def launch_config(query, kv_cache, plan, layer, window, out=None) -> DecodeConfig:
    """The module ``launch_decode_codes`` runs for these arguments (``out``: needed with ``plan.cuda_fused``)."""
    _, num_q_heads, _ = query.shape
    _, heads, page_block, _ = kv_cache.shape
    fused = plan.cuda_fused
    return decode_config(layer, num_q_heads, heads, page_block, kv_cache.stride(2), query.dtype,
                         None if window is None else (window.sinks, window.window), fused,
                         out.dtype if fused else None, window.ring_k.dtype if fused and window is not None else None)


def launch_decode_codes(query, kv_cache, block_table, seq_lens, query_start_loc, plan, layer, logit_scale: float,
                        m, l, acc_v, window, acc_x=None, out=None) -> None:
    """Write the split-K partials of the decode codes segments (what ``_fused_attention_kernel`` writes for
    ``plan.segments`` segments of a RING_FIRST decode launch) into m, l, acc_v [segments (+ ring), N, Hq(, h)];
    with ``plan.cuda_fused`` also the ring's partial (acc_x: its value sums) and, merged, the output ``out``
    [N, Hq, h]."""
    n = query.shape[0]
    heads = kv_cache.shape[1]
    fused = plan.cuda_fused
    ring = window is not None and fused
    kernel = compiled(launch_config(query, kv_cache, plan, layer, window, out))
    k_terms, v_terms = layer.k_lanes.table, layer.v_lanes.table  # (g0, step) float32 each
    dummy = layer.rot_k
    tags = window.tags if window is not None else block_table
    ring_args = ((window.ring_k, window.ring_v, window.key, window.value, window.key.stride(0), window.key.stride(1),
                  window.value.stride(0), window.value.stride(1)) if ring
                 else (query,) * 4 + (0,) * 4)  # (unread without the fused ring)
    fused_args = [*ring_args, acc_v if acc_x is None else acc_x, layer.sign_v,
                  dummy if layer.v_bias is None else layer.v_bias,
                  acc_v if out is None else out, *((0, 0) if out is None else (out.stride(0), out.stride(1))),
                  counters(query.device) if fused else seq_lens]
    ring_block = ring and plan.segments > 1  # (with one segment, its block reads the ring first)
    kernel(grid=(plan.q_seq.shape[0], heads, plan.segments + int(ring_block)), block=(32 * WARPS, 1, 1),
           args=[query, layer.sign_k, dummy if layer.k_bias is None else layer.k_bias,
                 dummy if layer.k_dinv is None else layer.k_dinv, kv_cache, block_table, seq_lens, query_start_loc,
                 k_terms, v_terms, m, l, acc_v, tags, plan.segments, n, logit_scale, query.stride(0),
                 query.stride(1), kv_cache.stride(0), kv_cache.stride(1), block_table.stride(0), plan.tile,
                 *fused_args])

