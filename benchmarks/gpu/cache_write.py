"""Cache-write microbenchmark on the GPU: the fused write of one decode step's new tokens (kernels/cache_write.py),
as the served speed preset runs it (u1n4 codes, key mean, no value predictor, 16-bit sinks 4 + window 128 stored in
the same launch), against vLLM's bf16 ``reshape_and_cache_flash`` of the same tokens.

A decode step writes one token per sequence: 8 KV heads x batch tokens, so the default launch has only 8 x
ceil(batch / 16) programs, each a dependent chain of loads, rotations and grid searches.  This times the launch
choices that change that chain: keys and values in programs of their own (``split_streams``) and the warps per
program.  Times are CUDA-graph replay medians (GPU time only), one layer, Llama-3.2-3B's KV shape (8 x 128).
Prefill-sized writes (``--tokens 2048,8192``: a chunk's tokens, each into its own slot and ring entry) can also be
timed with more tokens per program (``--block-n 16,64``) and other warp counts (``--warps``); ``--exact-inputs``
also times each launch with the 16-bit rotation (``write_fused(exact_inputs=True)``; without the flag every named
launch is the float32 rotation).  The row "aquakv default launch" is what serving runs (``launch_settings``: since
2026-12-03 the 16-bit rotation, and 64-token programs for steps of >= 1024 tokens).  "..., key channel scale": the same launch for
artifacts calibrated with ``--key-channel-scale query`` (opt-in: a per-head diag(D) S in the 16-bit rotation of keys).

    python3 benchmarks/gpu/cache_write.py OUT_DIR [--tokens 1,4,16,64,256] [--block-n 16] [--warps 1,2,4,8]
        [--exact-inputs]
    (needs vLLM 0.26 for the bf16 row: README.md)

Writes cache_write_<gpu>.json + .md (shared RESULTS.md shape) under OUT_DIR.
"""

import argparse
import os
import sys

import torch
import triton

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # (vllm_aquakv from the staged package: it holds the kernels)

from decode_attention import D, H, MODES, PAGE, fused_setup  # noqa: E402

SPEED = "aquakv speed preset u1n4 + sinks/window (16-bit 4 + 128)"
SCALED = "aquakv speed preset u1n4 + sinks/window, key channel scale"  # --key-channel-scale query (opt-in)


def time_ms(fn) -> float:
    """Median GPU time of ``fn`` replayed from a CUDA graph."""
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")


def step_inputs(tokens: int, layout_bytes: int):
    """Up to 256 tokens, a decode step of ``tokens`` sequences; more, one prompt's prefill chunk: the new bf16 K/V
    [tokens, H, D], distinct random slots in a cache of 4x as many blocks, and the window ring with each token's (row,
    column) as ``ExactTokens.prepare_write`` makes them (a prefill's tokens outside its sinks 4 + window 128 go to
    the scratch row, the ring's last)."""
    from vllm_aquakv.window import WindowStep, ring_column

    blocks = 4 * tokens + 4
    slots = torch.randperm(blocks * PAGE, device="cuda")[:tokens]
    key, value = (torch.randn(tokens, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    kv = torch.zeros(blocks, H, PAGE, layout_bytes, dtype=torch.uint8, device="cuda")
    tok = torch.arange(tokens, device="cuda")
    if tokens <= 256:  # one token per request: each in its own ring row
        rows, cols, ring_rows = tok, torch.randint(0, 4 + 128, (tokens,), device="cuda"), tokens + 1
    else:
        in_ring = (tok < 4) | (tok >= tokens - 128)
        rows, cols, ring_rows = torch.where(in_ring, 0, 1), torch.where(in_ring, ring_column(tok, 4, 128), 0), 2
    ring_k, ring_v = (torch.zeros(ring_rows, 4 + 128, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return key, value, slots, kv, (ring_k, ring_v, WindowStep(rows, cols, tok)), blocks


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", nargs="?", default="/tmp/out")
    ap.add_argument("--tokens", default="1,4,16,64,256", help="decode batch sizes (tokens of the step)")
    ap.add_argument("--block-n", default="16", help="tokens per program (write_fused's block_n), comma list")
    ap.add_argument("--warps", default="1,2,4,8", help="warps per program, comma list")
    ap.add_argument("--exact-inputs", action="store_true", help="also each launch with write_fused(exact_inputs=True)")
    args = ap.parse_args()
    from vllm_aquakv.kernels.cache_write import write_fused
    from vllm_aquakv.results import gpu_tag, machine, write_results

    path, fused = fused_setup(MODES[SPEED])
    _, scaled = fused_setup(MODES[SCALED])
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        key, value, slots, kv, ring, blocks = step_inputs(tokens, path.slot_bytes(1))
        row = {"tokens": tokens}
        try:
            from vllm import _custom_ops as ops

            k_cache, v_cache = (torch.zeros(blocks, PAGE, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            one = torch.ones((), device="cuda")
            row["bf16 reshape_and_cache_flash"] = time_ms(
                lambda: ops.reshape_and_cache_flash(key, value, k_cache, v_cache, slots, "auto", one, one))
        except ImportError as e:
            print(f"no vLLM bf16 row: {e}", flush=True)
        row["aquakv default launch"] = time_ms(lambda: write_fused(fused, kv, slots, key, value, ring=ring))
        row["aquakv default launch, key channel scale"] = time_ms(
            lambda: write_fused(scaled, kv, slots, key, value, ring=ring))
        variants = [(b, split, w, exact) for b in args.block_n.split(",") for split in (False, True)
                    for w in args.warps.split(",") for exact in ((False, True) if args.exact_inputs else (False,))]
        for block_n, split, warps, exact in variants:
            name = (f"aquakv {'split' if split else 'one program'}, {warps} warps"
                    + ("" if block_n == "16" else f", {block_n} tokens per program")
                    + (", 16-bit rotation" if exact else ""))
            row[name] = time_ms(lambda: write_fused(fused, kv, slots, key, value, block_n=int(block_n), ring=ring,
                                                    split_streams=split, num_warps=int(warps), exact_inputs=exact))
        rows.append(row)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    names = [k for k in rows[0] if k != "tokens"]
    md = [f"Cache write of one decode step (one layer, {H} KV heads x {D}; {SPEED}, ring stored in the same launch), "
          "CUDA-graph replay medians in microseconds.\n",
          "| launch | " + " | ".join(f"{r['tokens']} tokens" for r in rows) + " |",
          "| --- |" + " --- |" * len(rows)]
    md += [f"| {n} | " + " | ".join(f"{1000 * r[n]:.1f}" if n in r else "-" for r in rows) + " |" for n in names]
    print("\n".join(md))
    write_results(os.path.join(args.out_dir, f"cache_write_{gpu_tag(machine())}.json"), "cache_write",
                  "one layer of Llama-3.2-3B's KV shape, random K/V (timing only)", rows, "\n".join(md))


if __name__ == "__main__":
    main()
