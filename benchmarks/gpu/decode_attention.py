"""Decode-attention microbenchmark on the GPU: aquakv's fused kernel vs vLLM's TRITON_ATTN (bf16, fp8).

Llama-3.2-3B attention shape (24 query / 8 KV heads, head_dim 128), paged blocks of 16 tokens handed out in random
order, one layer, every sequence at the full context; batch 1/16/64 x context 4k/16k/32k.  Times are
triton.testing.do_bench medians of one eager call as the backend makes it (aquakv: kernel + split-K combine +
epilogue in torch; vLLM: ``unified_attention`` with the TRITON_ATTN builder's 3-D split settings).  The HBM floor is
the bytes the call must read (the context's K/V or codes + scales; with the 16-bit sinks/window, their 16-bit K/V
and slot tags instead of their codes) over the GPU's peak (H100 3.35 TB/s, H200 4.8 TB/s).  Also the
prefill side at 4k prompts: aquakv cache write (torch: quantize + pack + scatter) + fused prefill attention vs
vLLM's bf16 prefill attention (cache write: the torch path and the Triton kernel).  Random codes and scales: timing
only.

    python3 benchmarks/gpu/decode_attention.py OUT_DIR [--no-sweep] [--only WORD,WORD] [--prefill-only]
        [--no-prefill] [--graphs] [--batches 1,16,64] [--contexts 4096,16384,32768] [--one-segment]
        [--min-programs 528,1056] [--ring-programs 1,2] [--combine-steps 1,2] [--profile] [--with-write]
    (needs vLLM 0.26: README.md)

``--no-sweep`` skips the launch-settings sweep and uses ``plan_attention``'s defaults; ``--only`` keeps the aquakv
modes whose label contains one of the words; ``--graphs`` times CUDA-graph replays (GPU time without the host's
launch cost; the eager default includes it where the host is slower than the GPU, as in small batches).  A mode with
the 16-bit window is timed with the plan's ring placement and with the ring in a launch of its own ("ring launch";
the default from 16 requests), and with ``--ring-programs N,..`` in N programs of the codes launch (the default below).
``--one-segment`` also times each aquakv mode unsplit (one split-K segment): what FULL-graph decode steps ran before
their plans were made for ``max_model_len`` (vLLM captures them with 1-token contexts); ``--min-programs`` also
times each aquakv mode with split-K plans for those program counts (the default plan aims at 264, 132 for window
decodes below 16 requests); ``--combine-steps`` also times each with the split-K combine walking that many partials
per iteration (the default: kernels/attention.py COMBINE_STEP).  Where the bundle
has FlashAttention, a "bf16 (vLLM FlashAttention)" row times vLLM's default bf16 decode on H100/H200 (FLASH_ATTN,
FA3) on the same pages: ``vs_fa3`` compares against it (``vs_bf16`` against TRITON_ATTN, as the issue asks).
"""

import argparse

import dataclasses
import os
import time

import torch
import triton

HQ, H, D, PAGE = 24, 8, 128, 16
PEAK_BW = {"H100": 3.35e12, "H200": 4.8e12}  # SXM HBM3 / HBM3e peak, bytes/s, by the device name's model
MODES = {  # label -> config overrides (post-RoPE keys: the fused kernel's mode)
    # the speed preset (aquakv-calibrate --preset speed): key mean, no value predictor, uniform 2-bit codes decoded
    # arithmetically (no table lookups); the same with the 1024-exponent decode, and with 16-bit sinks/window
    "aquakv speed preset u1n4 (K mean, 2.25 b)": dict(key_predictor="mean", value_predictor="none",
                                                      value_topology="none", key_grid="u1n4", value_grid="u1n4"),
    "aquakv speed preset u1n4, 1024 decode": dict(key_predictor="mean", value_predictor="none",
                                                  value_topology="none", key_grid="u1n4", value_grid="u1n4",
                                                  index_bits=1),
    "aquakv speed preset u1n4 + sinks/window (16-bit 4 + 128)": dict(key_predictor="mean", value_predictor="none",
                                                                    value_topology="none", key_grid="u1n4",
                                                                    value_grid="u1n4", window=(4, 128)),
    # the speed preset with --key-channel-scale query (opt-in, 2026-12-05): keys scaled per channel before HIGGS (one
    # more multiply per query in the kernel; random scales here)
    "aquakv speed preset u1n4 + sinks/window, key channel scale": dict(
        key_predictor="mean", value_predictor="none", value_topology="none", key_grid="u1n4", value_grid="u1n4",
        window=(4, 128), key_channel_scale="query"),
    "aquakv u1n4, V per-head from K_l (2.25 b)": dict(key_predictor="mean", value_predictor="per_head",
                                                      value_topology="k_same", key_grid="u1n4", value_grid="u1n4"),
    # the earlier speed preset's grid: 2-D codes through nibble lookup tables
    "aquakv speed preset d2n16 (K mean, table lookups, 2.25 b)": dict(key_predictor="mean", value_predictor="none",
                                                                       value_topology="none"),
    "aquakv speed (K mean, V per-head from K_l, 2.25 b)": dict(key_predictor="mean", value_predictor="per_head",
                                                                value_topology="k_same"),
    "aquakv plain HIGGS (K, V no predictor, 2.25 b)": dict(key_predictor="none", value_predictor="none",
                                                           value_topology="none"),
    # plain HIGGS with the key mean, 16-bit sinks 4 + recent window 128 (vllm_aquakv/window.py) read in the same pass
    "aquakv plain + sinks/window (K mean, 2.25 b + 16-bit 4 + 128)": dict(key_predictor="mean", value_predictor="none",
                                                                         value_topology="none", window=(4, 128)),
    "aquakv speed, 4-bit keys (3.25 b)": dict(key_predictor="mean", value_predictor="per_head",
                                              value_topology="k_same", key_grid="d2n256"),
    # 2-bit scalar codes (d1n4): decoded in registers by byte permutes, no table lookups
    "aquakv speed d1n4 (K mean, V per-head from K_l, 2.25 b)": dict(key_predictor="mean", value_predictor="per_head",
                                                                     value_topology="k_same", key_grid="d1n4",
                                                                     value_grid="d1n4"),
    "aquakv plain HIGGS d1n4 (2.25 b)": dict(key_predictor="none", value_predictor="none", value_topology="none",
                                             key_grid="d1n4", value_grid="d1n4"),
    # the same codes decoded through byte-indexed tables (one lookup of 4 coordinates per code byte)
    "aquakv speed, byte tables": dict(key_predictor="mean", value_predictor="per_head", value_topology="k_same",
                                      index_bits=8),
    "aquakv plain HIGGS, byte tables": dict(key_predictor="none", value_predictor="none", value_topology="none",
                                            index_bits=8),
}


def fused_setup(overrides, device="cuda"):
    """A 2-layer post-RoPE AquaKVCache with random predictors on ``device``; returns (serving path, layer-1
    FusedLayer)."""
    from vllm_aquakv.kernels.attention import fused_layer_or_reason, lane_table
    from vllm_aquakv.predictors import LinearPredictor
    from vllm_aquakv.reference import AquaKVCache, AquaKVConfig
    from vllm_aquakv.rope import Rope
    from vllm_aquakv.serving import TorchServingPath

    overrides = dict(overrides)
    index_bits = overrides.pop("index_bits", None)
    window = overrides.pop("window", None)
    cfg = AquaKVConfig(key_rope="post", layer0_grid="d2n16", **overrides)
    preds = {("k", 1): LinearPredictor(cfg.key_predictor, (), bias=torch.randn(H, D))}
    if cfg.value_predictor == "per_head":
        preds["v", 1] = LinearPredictor("per_head", (("k", 1),), bias=torch.randn(H, D),
                                        weight=torch.randn(H, D, D) / D ** 0.5)
    scales = ({1: torch.exp2(torch.randint(-2, 3, (H, D)).float())} if cfg.key_channel_scale == "query"
              else None)  # powers of two, as key_channel_scale gives
    cache = AquaKVCache(cfg, 2, H, D, preds, key_channel_scales=scales).to(device)
    rope = Rope({"rope_theta": 500000.0}, D)
    rope.inv_freq = rope.inv_freq.to(device)
    path = TorchServingPath(cache, rope)
    fused = fused_layer_or_reason(cache, path.layouts[1], 1)
    assert not isinstance(fused, str), fused
    if index_bits:
        kc, vc = cache.codecs["k", 1], cache.codecs["v", 1]
        fused = dataclasses.replace(fused, k_lanes=lane_table(kc.grid, kc.code_bits, D, index_bits),
                                    v_lanes=lane_table(vc.grid, vc.code_bits, D, index_bits))
    fused.window = window  # (sinks, window) or None: ``window_inputs`` builds the ring per batch
    return path, fused


def window_inputs(fused, block_table, ctx, q):
    """A full ring for every sequence of a decode batch at context ``ctx`` (its sinks and last window tokens, tagged
    with their slots, random 16-bit K/V), so that the kernel really reads them; None without a window."""
    from vllm_aquakv.kernels.attention import WindowInputs
    from vllm_aquakv.window import ExactTokens

    if getattr(fused, "window", None) is None:
        return None
    sinks, window = fused.window
    batch = block_table.shape[0]
    ring = ExactTokens(sinks, window, batch, 1, H, D, torch.bfloat16, "cuda")
    pos = torch.cat([torch.arange(sinks), torch.arange(ctx - window, ctx)]).cuda()
    slots = block_table[:, pos // PAGE].long() * PAGE + pos % PAGE  # [batch, sinks + window]
    ring.tags[torch.arange(batch, device="cuda")[:, None], ring.column(pos)[None, :]] = slots
    ring.k[0].normal_()
    ring.v[0].normal_()
    kv = torch.randn(batch, H, D, device="cuda", dtype=torch.bfloat16)  # this step's token (position ctx - 1)
    return WindowInputs(ring.k[0], ring.v[0], ring.tags, kv, kv, sinks, window)


def window_bytes(win, slot_bytes: int) -> int:
    """What the 16-bit sinks/window change in the bytes a decode step must read: each request's ring entries (16-bit
    K and V of every KV head, and their slot tags) are read, and those tokens' codes are not."""
    if win is None:
        return 0
    batch, entries = win.key.shape[0], win.sinks + win.window  # (the step's own token is one of the entries)
    ring = batch * entries * (2 * H * D * win.ring_k.element_size() + win.tags.element_size())
    return ring - batch * entries * H * slot_bytes


def random_slots(num_blocks, layout):
    """Random codes with valid fp16 scales in every slot: uint8 [num_blocks, H, PAGE, slot]."""
    kv = torch.randint(0, 256, (num_blocks, H, PAGE, layout.slot_bytes), dtype=torch.uint8, device="cuda")
    for (_, scale_bytes), at in zip(layout.parts, layout.scale_offsets):
        scales = (torch.rand(num_blocks, H, PAGE, scale_bytes // 2, device="cuda") * 10 + 1).half()
        kv[..., at:at + scale_bytes] = scales.view(torch.uint8)
    return kv


def vllm_triton_attention(batch, ctx, dtype, q, block_table, seq_lens, qsl):
    """A closure running vLLM's unified_attention on a bf16 or fp8 paged cache, like TRITON_ATTN does."""
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention

    num_blocks = batch * ctx // PAGE
    k = torch.randn(num_blocks, PAGE, H, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(num_blocks, PAGE, H, D, device="cuda", dtype=torch.bfloat16)
    if dtype == "fp8":
        k, v = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    out = torch.empty_like(q)
    descale = torch.ones(batch, H, device="cuda")
    threshold = 128 // H  # TritonAttentionMetadataBuilder: MIN_LAUNCH_GRID_SIZE_2D // num_kv_heads
    segm = 16
    seg_out = torch.empty(threshold, HQ, segm, D, device="cuda")
    seg_max = torch.empty(threshold, HQ, segm, device="cuda")
    seg_sum = torch.empty(threshold, HQ, segm, device="cuda")
    max_q = int((qsl[1:] - qsl[:-1]).max())

    def run():
        unified_attention(q=q, k=k, v=v, out=out, cu_seqlens_q=qsl, max_seqlen_q=max_q, seqused_k=seq_lens,
                          max_seqlen_k=ctx, softmax_scale=D ** -0.5, causal=True, window_size=(-1, -1),
                          block_table=block_table, softcap=0, q_descale=None, k_descale=descale, v_descale=descale,
                          seq_threshold_3D=threshold, num_par_softmax_segments=segm, softmax_segm_output=seg_out,
                          softmax_segm_max=seg_max, softmax_segm_expsum=seg_sum)
    return run, (k.numel() + v.numel()) * k.element_size()


def flash_decode_ms(batch, ctx, q, block_table, seq_lens, qsl) -> tuple[float, dict | None] | None:
    """(ms, with --profile GPU us per kernel) of vLLM's FlashAttention (FA3 on Hopper: the FLASH_ATTN backend, vLLM's bf16 default there) decoding the
    batch from bf16 pages of PAGE tokens; None where the bundle has no FlashAttention."""
    from vllm_aquakv import compat

    flash = compat.flash_attention(D)
    if flash is None:
        return None
    k, v = (torch.randn(batch * ctx // PAGE, PAGE, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty_like(q)
    run = lambda: flash(q, k, v, out, qsl, 1, seq_lens, ctx, D ** -0.5, block_table)  # noqa: E731
    ms = bench(run)
    kernels = kernel_us(run) if OPTIONS.profile else None
    k = v = run = None  # (frees the pages before empty_cache)
    torch.cuda.empty_cache()
    return ms, kernels


def kernel_us(fn, calls: int = 20) -> dict[str, float]:
    """GPU microseconds per call of each kernel ``fn`` launches (torch profiler over ``calls`` eager calls)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return {e.key: round(e.self_device_time_total / calls, 2) for e in prof.key_averages()
            if e.self_device_time_total > 0}


def decode_batch(batch: int, ctx: int):
    """One decode step of ``batch`` sequences at context ``ctx``: block table (random block order), seq_lens, query
    starts (host list and device tensor) and bf16 queries [batch, HQ, D]."""
    nb = ctx // PAGE
    block_table = torch.randperm(batch * nb, device="cuda", dtype=torch.int32).view(batch, nb)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    qsl_list = list(range(batch + 1))
    qsl = torch.tensor(qsl_list, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
    return block_table, seq_lens, qsl_list, qsl, q


def peak_bandwidth() -> tuple[str, float]:
    """(short GPU name, peak HBM bytes/s) of this device; the H100's figure for a GPU this table does not know."""
    name = torch.cuda.get_device_name()
    for model, bw in PEAK_BW.items():
        if model in name:
            return model.lower(), bw
    return "gpu", PEAK_BW["H100"]


# the command line's options that the helpers read (main() replaces the defaults)
OPTIONS = argparse.Namespace(graphs=False, profile=False)
# window_attention_merge launches timed after the served one (queries per program, keys per step, warps), each on the
# window blocks window_merge_block makes for it (42 queries for 21-query programs: 21 x 3 heads fill 63 of 64 rows
# where 16 fill 48, Llama-3.2-3B's group of 3: prefill_attention_h100_window_block_42.md)
WINDOW_MERGE_LAUNCHES = [(16, 32, 4), (21, 32, 4), (32, 32, 8), (16, 16, 4), (21, 32, 8), (42, 32, 8)]
PREFILL_KERNEL_US: dict[int, dict[str, float]] = {}  # --profile: the window's prefill, GPU us per call per kernel


def bench(fn):
    """Median ms of ``fn``: as called eagerly (host launch time included where it exceeds the GPU's), or with
    ``--graphs`` replayed from a CUDA graph (GPU time only)."""
    fn()
    torch.cuda.synchronize()
    if OPTIONS.graphs:
        return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def main():
    from vllm_aquakv.kernels import cuda_decode
    from vllm_aquakv.kernels.attention import fused_attention, plan_attention
    from vllm_aquakv.results import write_results

    global OPTIONS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", nargs="?", default="/tmp/out")
    ap.add_argument("--only", default=None, help="aquakv modes whose label contains one of these words (comma list)")
    for flag, text in (("--no-sweep", "plan_attention's defaults, no launch-settings sweep"),
                       ("--prefill-only", "the prefill table only"), ("--no-prefill", "the decode table only"),
                       ("--graphs", "time CUDA-graph replays (GPU time only)"),
                       ("--profile", "GPU time per kernel of each decode call (kernel_us) and of the window's prefill"),
                       ("--one-segment", "also each aquakv mode with one split-K segment"),
                       ("--qk-int8", "also each aquakv mode with scores on int8 tensor cores (AttentionPlan.qk_int8)"),
                       ("--triton-codes", "also each aquakv mode with the Triton codes loop where the CUDA one "
                                          "(kernels/decode_codes.cu, the default) runs: AttentionPlan.cuda_decode=False"),
                       ("--other-launches", "also each aquakv mode with the CUDA loop's other launch form "
                                            "(AttentionPlan.cuda_fused flipped): one launch with the ring's pass and "
                                            "the combine in it, or three (codes, the ring's own, the combine)"),
                       ("--ring-beside", "modes with the window: also the ring's own launch on a side stream, "
                                         "beside the codes launch (AttentionPlan.ring_beside)"),
                       ("--with-write", "modes with the window: also the decode layer step, cache write + attention, "
                                        "with the write before the attention and beside it on a second stream")):
        ap.add_argument(flag, action="store_true", help=text)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--contexts", default="4096,16384,32768")
    ap.add_argument("--min-programs", default="", help="also each aquakv mode split for these program counts")
    ap.add_argument("--ring-programs", default="", help="with the window: also the ring read by this many programs "
                    "of the codes launch (comma list; AttentionPlan.ring_programs)")
    ap.add_argument("--combine-steps", default="", help="also each aquakv mode with the combine walking this many "
                    "split-K partials per iteration (comma list of 1, 2, 4; AttentionPlan.combine_step)")
    ap.add_argument("--segment-tiles", default="", help="also each aquakv mode split with segments of at least this "
                    "many key tiles (comma list; plan_attention's min_segment_tiles, default MIN_SEGMENT_TILES)")
    ap.add_argument("--rows", default="", help="also each aquakv mode with decode programs of this many query rows "
                    "(comma list; plan_attention's decode_rows, default DECODE_MIN_ROWS)")
    ap.add_argument("--cuda-loops", default="", help="also the CUDA loop built as SxN: S 16-token steps per warp "
                    "iteration, N shared-memory stages (0: loads into registers) (comma list, e.g. 1x0,2x0,1x3; "
                    "kernels/cuda_decode.SUB_STEPS, STAGES)")
    ap.add_argument("--maxnreg", default="", help="also each aquakv mode with the codes launch capped at this many "
                    "registers per thread (comma list; AttentionPlan.maxnreg; e.g. 96: 5 programs of 4 warps per SM "
                    "instead of 4)")
    OPTIONS = args = ap.parse_args()
    default_sub = (cuda_decode.SUB_STEPS, cuda_decode.STAGES)
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    t0 = time.time()
    gpu, peak_bw = peak_bandwidth()
    only = args.only.split(",") if args.only else None
    setups = {label: fused_setup(o) for label, o in MODES.items() if not only or any(w in label for w in only)}
    sweep, best = ({}, {}) if args.no_sweep else tile_sweep(next(iter(setups.values())))
    print("best launch settings", best, flush=True)
    rows, steps_ms = [], []
    for batch in () if args.prefill_only else ints(args.batches):
        for ctx in ints(args.contexts):
            nb = ctx // PAGE
            block_table, seq_lens, qsl_list, qsl, q = decode_batch(batch, ctx)
            base = {"batch": batch, "context": ctx}
            ref_ms, first = None, len(rows)
            for dtype in ("bf16", "fp8"):
                run, nbytes = vllm_triton_attention(batch, ctx, dtype, q, block_table, seq_lens, qsl)
                ms = bench(run)
                ref_ms = ref_ms or ms
                rows.append({**base, "kv_cache_dtype": f"{dtype} (vLLM TRITON_ATTN)", "ms": ms, "bytes": nbytes,
                             "hbm_floor_ms": 1e3 * nbytes / peak_bw, "vs_bf16": ref_ms / ms})
                del run
                torch.cuda.empty_cache()
            fa3 = flash_decode_ms(batch, ctx, q, block_table, seq_lens, qsl)
            fa3_ms = fa3 and fa3[0]
            if fa3 is not None:
                nbytes = 2 * batch * ctx * H * D * 2
                rows.append({**base, "kv_cache_dtype": "bf16 (vLLM FlashAttention)", "ms": fa3_ms, "bytes": nbytes,
                             "hbm_floor_ms": 1e3 * nbytes / peak_bw, "vs_bf16": ref_ms / fa3_ms,
                             **({"kernel_us": fa3[1]} if fa3[1] else {})})
            for label, (path, fused) in setups.items():
                kv = random_slots(batch * nb, path.layouts[1])
                out = torch.empty_like(q)  # the model dtype, as vLLM's output buffer
                win = window_inputs(fused, block_table, ctx, q)
                plan = plan_attention(qsl_list, ctx, HQ, H, "cuda", window=win is not None, **best)
                # (ring_launch, ring_programs, ring_beside): the plan's, and with the window the ring's own launch
                # (after the codes launch, and beside it with --ring-beside) and N programs of the codes launch (those
                # without the sweep's register cap, as fused_attention picks it)
                planned = (plan.ring_launch, 0 if plan.ring_launch else plan.ring_programs, plan.ring_beside)
                rings = list(dict.fromkeys([planned] + ([(True, 0, False)] + [(True, 0, True)] * args.ring_beside
                                                        + [(False, r, False) for r in ints(args.ring_programs)]
                                                        if win is not None else [])))
                counts = [plan.segments] + ([1] if args.one_segment else [])
                counts += [plan_attention(qsl_list, ctx, HQ, H, "cuda", window=win is not None,
                                          **{**best, "min_programs": p}).segments
                           for p in ints(args.min_programs)]  # other split-K widths
                counts += [plan_attention(qsl_list, ctx, HQ, H, "cuda", window=win is not None,
                                          **{**best, "min_segment_tiles": t}).segments
                           for t in ints(args.segment_tiles)]
                steps = [None] + ints(args.combine_steps)  # None: the kernel's default
                qk = [None] + ([True] if args.qk_int8 else [])
                # rows per decode program: the plan's and those plan_attention pads --rows to
                block_ms = [plan.block_m] + [plan_attention(qsl_list, ctx, HQ, H, "cuda", decode_rows=r).block_m
                                             for r in ints(args.rows)]
                regs = [None] + ints(args.maxnreg)  # None: as fused_attention picks (the sweep's cap with a ring launch)
                # AttentionPlan.cuda_decode: the CUDA loop's SUB_STEPS, or False (the Triton loop)
                loops = ([default_sub] + [v for v in (tuple(int(x) for x in text.split("x"))
                                                      for text in args.cuda_loops.split(",") if text) if v != default_sub]
                         + ([False] if args.triton_codes else []))
                one_launch = [plan.cuda_fused] + ([not plan.cuda_fused] if args.other_launches else [])
                variants = [(ring, segments, step, q8, bm, reg, cd, one) for segments in dict.fromkeys(counts)
                            for ring in rings for step in steps for q8 in qk for bm in dict.fromkeys(block_ms)
                            for reg in regs for cd in loops for one in (one_launch if cd else [plan.cuda_fused])]
                warm = False  # the group's first timing, thrown away: the row timed first in a group came out 1-5%
                # slower than the same launch timed later (decode_attention_h100_cuda_segments.md and its _variants)
                for ring, segments, step, q8, block_m, reg, cd, one in variants:
                    ring_launch, ring_programs, beside = ring
                    p = dataclasses.replace(plan, ring_launch=ring_launch, ring_programs=ring_programs,
                                            ring_beside=beside, _partials=None,
                                            segments=segments,
                                            maxnreg=reg or (plan.maxnreg if ring_launch else None),
                                            combine_step=step, qk_int8=q8, block_m=block_m, cuda_decode=bool(cd),
                                            cuda_fused=one)
                    cuda_decode.SUB_STEPS, cuda_decode.STAGES = cd or default_sub
                    refusal = cuda_decode.decode_refusal(q, kv, p, fused, win, out)
                    if cd != default_sub and cuda_decode.decode_refusal(
                            q, kv, dataclasses.replace(p, cuda_decode=True), fused, win) is not None:
                        continue  # the Triton loop runs anyway: the plain row has it
                    call = lambda kv=kv, p=p: fused_attention(q, kv, block_table, seq_lens, qsl, p,  # noqa: E731
                                                              fused, D ** -0.5, out=out, window=win)
                    if not warm:
                        bench(call)
                        warm = True
                    ms = bench(call)
                    nbytes = kv.numel() + window_bytes(win, kv.shape[-1])
                    name = (label + ("" if win is None or ring == planned
                                     else ", ring launch beside" if beside
                                     else ", ring launch" if ring_launch else f", ring in {ring_programs} programs")
                            + ("" if segments == plan.segments else ", one segment" if segments == 1
                               else f", {segments} segments") + ("" if step is None else f", combine step {step}")
                            + (", int8 scores" if q8 else "")
                            + ("" if block_m == plan.block_m else f", {block_m} rows")
                            + ("" if reg is None else f", maxnreg {reg}") + ("" if cd else ", Triton codes loop")
                            + (f", CUDA loop {cd[0]}x{cd[1]}" if cd and cd != default_sub else "")
                            + ("" if one == plan.cuda_fused else ", one launch" if one else ", three launches"))
                    rows.append({**base, "kv_cache_dtype": name, "ms": ms, "bytes": nbytes,
                                 "codes_loop": "cuda" if refusal is None else f"triton ({refusal})",
                                 "segments": segments, "hbm_floor_ms": 1e3 * nbytes / peak_bw,
                                 "vs_bf16": ref_ms / ms})
                    if refusal is None:  # the CUDA module's resources, as the driver reports them
                        rows[-1]["cuda_kernel"] = cuda_decode.kernel_attributes(
                            cuda_decode.launch_config(q, kv, p, fused, win, out))
                    if args.profile:  # which launch of the call takes the time (attention kernel, combine, ...)
                        rows[-1]["kernel_us"] = kernel_us(lambda kv=kv, p=p: fused_attention(
                            q, kv, block_table, seq_lens, qsl, p, fused, D ** -0.5, out=out, window=win))
                if args.with_write and win is not None:
                    steps_ms.append({**base, "kv_cache_dtype": label, **layer_step(fused, kv, win, block_table, ctx,
                                                                                      q, seq_lens, qsl, plan, out)})
                    print(steps_ms[-1], flush=True)
                del kv
                torch.cuda.empty_cache()
            for r in rows[first:]:
                r["fraction_of_floor"] = r["hbm_floor_ms"] / r["ms"]
                if fa3_ms is not None:
                    r["vs_fa3"] = fa3_ms / r["ms"]
                print(f"batch {batch:3d} ctx {ctx:6d} {r['kv_cache_dtype']:55s} {r['ms']:8.3f} ms  "
                      f"{r['vs_bf16']:5.2f}x bf16  {100 * r['fraction_of_floor']:5.1f}% of HBM floor"
                      + (f"  kernels (us) {r['kernel_us']}" if "kernel_us" in r else "")
                      + (f"  {r['cuda_kernel']}" if "cuda_kernel" in r else ""), flush=True)
    prefill = {} if args.no_prefill else {n: prefill_overhead(setups, best, n) for n in (4096, 8192)}
    timer = "do_bench_cudagraph" if args.graphs else "do_bench"
    md = ["Decode attention, one layer, Llama-3.2-3B shape (24 q / 8 KV heads, head_dim 128), paged blocks of 16, "
          f"random codes; median of triton.testing.{timer}; HBM floor = bytes read / {peak_bw / 1e12:.2f} TB/s "
          f"({torch.cuda.get_device_name()}).\n",
          "| batch | context | kv-cache-dtype | ms | vs bf16 (TRITON_ATTN) | vs bf16 (FlashAttention) | % of own HBM "
          "floor |", "| --- | --- | --- | --- | --- | --- | --- |"]
    md += [f"| {r['batch']} | {r['context']} | {r['kv_cache_dtype']} | {r['ms']:.3f} | {r['vs_bf16']:.2f}x | "
           + (f"{r['vs_fa3']:.2f}x" if "vs_fa3" in r else "-") + f" | {100 * r['fraction_of_floor']:.1f}% |"
           for r in rows]
    if steps_ms:
        md += ["\nDecode layer step with the window (kernels/cache_write.py write_fused of the batch's new tokens + "
               "fused_attention), ms: the write alone, then before the attention (one stream) and beside it "
               "(``write_beside``, the backend's default for decode steps with the window):\n",
               "| batch | context | mode | write | write, then attention | write beside attention | saved |",
               "| --- | --- | --- | --- | --- | --- | --- |"]
        md += [f"| {r['batch']} | {r['context']} | {r['kv_cache_dtype']} | {r['write_ms']:.4f} | {r['serial_ms']:.4f} "
               f"| {r['beside_ms']:.4f} | {r['serial_ms'] - r['beside_ms']:.4f} |" for r in steps_ms]
    md += ["\nPrefill of one prompt, one layer:\n", "| step | 4096 tokens, ms | 8192 tokens, ms |",
           "| --- | --- | --- |"]
    md += [f"| {k} | {v:.3f} | {prefill[8192][k]:.3f} |" for k, v in prefill.get(4096, {}).items()]
    print("\n".join(md))
    name = f"prefill_attention_{gpu}.json" if args.prefill_only else f"decode_attention_{gpu}.json"
    write_results(os.path.join(args.out_dir, name), "decode_attention",
                  "Llama-3.2-3B attention shape (random data)", rows, "\n".join(md), prefill_ms=prefill,
                  layer_step_ms=steps_ms, **({"prefill_kernel_us": PREFILL_KERNEL_US} if PREFILL_KERNEL_US else {}),
                  tile_sweep_batch64_ctx16k=sweep, seconds=round(time.time() - t0))


def layer_step(fused, kv, win, block_table, ctx, q, seq_lens, qsl, plan, out) -> dict:
    """ms of one decode layer step with the window: the cache write of the batch's new tokens (position ctx - 1,
    into their slots and ring entries) alone, then before the attention on one stream, and beside it
    (``write_beside``)."""
    from vllm_aquakv.kernels.attention import fused_attention
    from vllm_aquakv.kernels.cache_write import write_beside, write_fused
    from vllm_aquakv.window import WindowStep, ring_column

    batch = q.shape[0]
    rows = torch.arange(batch, device="cuda")
    pos = torch.full((batch,), ctx - 1, device="cuda")
    slots = block_table[:, (ctx - 1) // PAGE].long() * PAGE + (ctx - 1) % PAGE
    ring = (win.ring_k, win.ring_v, WindowStep(rows, ring_column(pos, win.sinks, win.window), rows))
    attend = lambda: fused_attention(q, kv, block_table, seq_lens, qsl, plan, fused, D ** -0.5, out=out,  # noqa: E731
                                     window=win)
    write = lambda: write_fused(fused, kv, slots, win.key, win.value, ring=ring)  # noqa: E731

    def beside():
        stream = write_beside(fused, kv, slots, win.key, win.value, ring)
        attend()
        torch.cuda.current_stream().wait_stream(stream)

    return {"write_ms": bench(write), "serial_ms": bench(lambda: (write(), attend())), "beside_ms": bench(beside)}


def tile_sweep(setup) -> tuple[dict, dict]:
    """Speed mode at batch 64, context 16k over key tile x warps x pipeline stages, then programs per launch for the
    fastest (ms each); returns the timings and the fastest settings, which the tables then use."""
    from triton.runtime.errors import OutOfResources

    from vllm_aquakv.kernels.attention import fused_attention, plan_attention

    path, fused = setup
    batch, ctx = 64, 16384
    block_table, seq_lens, qsl_list, qsl, q = decode_batch(batch, ctx)
    kv = random_slots(batch * ctx // PAGE, path.layouts[1])
    out, best = {}, (float("inf"), {})
    # maxnreg 255: no cap (a plan's None means 128 for uniform codes, the swept mode)
    grid = [dict(tile=t, num_warps=4, num_stages=s, maxnreg=r) for t in (64, 128) for s in (1, 2, 3, 4)
            for r in (128, 255)] + [dict(tile=t, num_warps=8, num_stages=3) for t in (64, 128)]
    for kw in grid + [None] * 4:
        if kw is None:  # then the number of programs (split-K) for the fastest launch settings
            kw = dict(best[1], min_programs=(132, 528, 1056, 2112)[len(out) - len(grid)])
        plan = plan_attention(qsl_list, ctx, HQ, H, "cuda", **kw)
        key = "_".join(f"{k}{v}" for k, v in kw.items() if v is not None)
        try:
            ms = bench(lambda plan=plan: fused_attention(q, kv, block_table, seq_lens, qsl, plan, fused, D ** -0.5,
                                                         out=torch.empty_like(q)))
        except OutOfResources:
            out[key] = None
            continue
        out[key] = ms
        best = min(best, (ms, kw), key=lambda x: x[0])
        print("sweep", key, round(ms, 3), "ms", flush=True)
    return out, best[1]


def prefill_overhead(setups, best, n: int) -> dict:
    """One n-token prompt: aquakv write + prefill attention (fused kernel; reconstruction + FlashAttention) vs vLLM's
    bf16 prefill attention (ms)."""
    from vllm_aquakv.kernels.attention import fused_attention, plan_attention
    from vllm_aquakv import compat
    from vllm_aquakv.kernels.cache_write import write_fused
    from vllm_aquakv.kernels.reconstruct import prefill_attention, reconstruct, split_prefills
    from vllm_aquakv.serving import StepState

    nb = n // PAGE
    block_table = torch.randperm(nb, device="cuda", dtype=torch.int32).view(1, nb)
    seq_lens = torch.tensor([n], dtype=torch.int32, device="cuda")
    qsl_list = [0, n]
    qsl = torch.tensor(qsl_list, dtype=torch.int32, device="cuda")
    q = torch.randn(n, HQ, D, device="cuda", dtype=torch.bfloat16)
    key = torch.randn(n, H, D, device="cuda", dtype=torch.bfloat16)
    value = torch.randn(n, H, D, device="cuda", dtype=torch.bfloat16)
    slots = torch.arange(n, device="cuda")
    slots = block_table[0, slots // PAGE].long() * PAGE + slots % PAGE
    positions = torch.arange(n, device="cuda")
    run, _ = vllm_triton_attention(1, n, "bf16", q, block_table, seq_lens, qsl)
    out = {"bf16 attention (vLLM TRITON_ATTN)": bench(run)}
    label, (path, fused) = next(iter(setups.items()))
    kv = torch.zeros(nb, H, PAGE, path.slot_bytes(1), dtype=torch.uint8, device="cuda")
    write = lambda: path.write(1, kv, slots, key, value, positions, StepState(), [n])  # noqa: E731
    out["aquakv cache write, torch path"] = bench(write)
    out["aquakv cache write, Triton (kernels/cache_write.py)"] = bench(
        lambda: write_fused(fused, kv, slots, key, value))
    plan = plan_attention(qsl_list, n, HQ, H, "cuda")  # (the decode sweep's settings are not a prefill launch's)
    out["aquakv fused prefill attention"] = bench(
        lambda: fused_attention(q, kv, block_table, seq_lens, qsl, plan, fused, D ** -0.5, out=torch.empty_like(q)))
    flash = compat.flash_attention(D)
    if flash is not None:  # what the backend runs for prefill requests (kernels/reconstruct.py)
        cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
        o = torch.empty_like(q)
        pages = torch.arange(n // 64, dtype=torch.int32, device="cuda")[None]
        out["bf16 attention (vLLM FlashAttention, K/V in pages of 64)"] = bench(
            lambda: flash(q, key.view(-1, 64, H, D), value.view(-1, 64, H, D), o, cu, n, seq_lens, n, D ** -0.5,
                          pages))
        split = split_prefills(qsl_list, [n], "cuda")
        k_rows, v_rows = split.scratch(H, D, q.dtype, "cuda")
        out["aquakv reconstruct K/V (kernels/reconstruct.py)"] = bench(
            lambda: reconstruct(kv, block_table, seq_lens, split.rows, split.cu_k, n, fused, k_rows, v_rows))
        out["aquakv prefill attention: reconstruct + FlashAttention"] = bench(
            lambda: prefill_attention(q, kv, block_table, seq_lens, split, fused, D ** -0.5, o, flash))
        # with 16-bit sinks 4 + window 128: a fresh prompt (empty ring), two FlashAttention calls merged by LSE
        from vllm_aquakv.kernels.attention import WindowInputs
        from vllm_aquakv.window import ExactTokens

        ring = ExactTokens(4, 128, 1, 1, H, D, torch.bfloat16, "cuda")
        win = WindowInputs(ring.k[0], ring.v[0], ring.tags, key, value, 4, 128)
        split_w = split_prefills(qsl_list, [n], "cuda", exact=(4, 128))  # (FlashAttention's window call: any blocks)
        merge = compat.merge_attention_states()
        window_prefill = lambda: prefill_attention(q, kv, block_table, seq_lens, split_w, fused,  # noqa: E731
                                                   D ** -0.5, o, flash, win, merge)
        out["aquakv prefill attention with sinks/window: reconstruct + 2 FlashAttention + merge"] = bench(
            window_prefill)
        from vllm_aquakv.kernels import reconstruct as rc

        def fused_window_prefill():  # the split's window blocks as the backend makes them for the launch
            split = split_prefills(qsl_list, [n], "cuda", exact=(4, 128), window_block=rc.window_merge_block(HQ // H))
            return lambda: prefill_attention(q, kv, block_table, seq_lens, split, fused, D ** -0.5, o, flash, win,
                                             merge, fused_window=True)

        served = rc.WINDOW_MERGE_LAUNCH  # None: window_merge_launch's for the group (an override, read at each call)
        others = [x for x in WINDOW_MERGE_LAUNCHES if x != rc.window_merge_launch(HQ // H)]
        for i, launch in enumerate([served] + others + [served]):  # (the served launch also last: eager timings of
            # one launch drift by up to ~15% within a call, prefill_attention_h100_window_block_42.md)
            rc.WINDOW_MERGE_LAUNCH = launch
            label = ("" if i == 0 else ", served launch timed again" if i > len(others)
                     else f", launch {launch}, window blocks of {rc.window_merge_block(HQ // H)}")
            out["aquakv prefill attention with sinks/window: reconstruct + FlashAttention + fused window/merge"
                + label] = bench(fused_window_prefill())
        rc.WINDOW_MERGE_LAUNCH = served
        if OPTIONS.profile:  # where the window's prefill time goes, per GPU kernel (also in the JSON)
            PREFILL_KERNEL_US[n] = dict(sorted(kernel_us(window_prefill, 5).items(), key=lambda kv: -kv[1]))
            PREFILL_KERNEL_US[n].update({f"fused window/merge: {k}": us for k, us in sorted(
                kernel_us(fused_window_prefill(), 5).items(), key=lambda kv: -kv[1])})
            print(f"window prefill, {n} tokens, us per call:", flush=True)
            for name, us in PREFILL_KERNEL_US[n].items():
                print(f"  {us:9.1f}  {name[:150]}", flush=True)
    return out


if __name__ == "__main__":
    main()
