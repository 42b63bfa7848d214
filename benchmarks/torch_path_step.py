"""Decode-step time of the torch serving path (the quality default's path: artifacts the fused kernels do not serve),
without vLLM: every layer's cache write of one token per request, then attention over every request's context
reconstructed from its codes (predictor chain, RoPE) at once, through FlashAttention on CUDA where vLLM has it
(``TorchServingPath.flash``), else through ``flash_twin`` (float32 torch, the CPU path).

The paged cache holds random codes with unit scales and the 16-bit ring starts empty (speed only: the work per
token does not depend on the code values); the artifact is fitted on random correlated K/V.  On CUDA a bf16 row
times vLLM's FlashAttention alone over bf16 pages of the same contexts (the attention a bf16 cache runs per
layer), for scale.

    python benchmarks/torch_path_step.py OUT.json [--preset quality|speed] [--batches 1,16] [--contexts 512,4096]
        [--layers 28 --kv-heads 8 --q-heads 24 --head-dim 128] [--no-window] [--steps 3] [--profile] [--torch-decode]

On CUDA the codes are decoded by the Triton residual kernel and the predictors run on TF32, as vLLM serves the path
with ``aquakv_kernels`` (the default); ``--torch-decode`` times the all-torch float32 path (``aquakv_kernels`` false).

``--profile``: one more decode step per shape under torch.profiler; its ops by self device time and by self host
time go to OUT's name with ``.profile.txt`` (where a step's time goes).
"""

import argparse
import time

import torch

from vllm_aquakv import compat
from vllm_aquakv.codec import Encoded
from vllm_aquakv.reference import AquaKVCache, AquaKVConfig
from vllm_aquakv.results import write_results
from vllm_aquakv.rope import Rope
from vllm_aquakv.serving import StepState, TorchServingPath
from vllm_aquakv.window import ExactTokens

PRESETS = {"quality": AquaKVConfig(),
           "speed": AquaKVConfig(key_rope="post", key_predictor="mean", value_predictor="none", value_topology="none",
                                 key_grid="u1n4", value_grid="u1n4", layer0_grid="u1n4")}
PAGE_BLOCK = 16


def random_artifact(preset: str, layers: int, heads: int, head_dim: int) -> AquaKVCache:
    """An artifact of the preset's structure fitted on random K/V with per-channel offsets and a layer chain."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1024, heads * head_dim, generator=g) + torch.randn(heads * head_dim, generator=g) * 3
    ks, vs = [], []
    for _ in range(layers):
        k = 0.8 * k + 0.5 * torch.randn(k.shape, generator=g)
        ks.append(k.reshape(-1, heads, head_dim))
        vs.append(torch.randn(k.shape, generator=g).reshape(-1, heads, head_dim))
    return AquaKVCache.calibrate(PRESETS[preset], ks, vs)


def random_pages(path: TorchServingPath, layer: int, blocks: int, device) -> torch.Tensor:
    """A paged cache [blocks, H, PAGE_BLOCK, slot] of random codes with unit fp16 scales (16-bit layers: randn)."""
    cache, n = path.cache, blocks * PAGE_BLOCK
    parts = []
    for stream in "kv":
        codec = cache.codecs[stream, layer]
        if codec is None:
            parts.append(torch.randn(n, cache.num_kv_heads, cache.head_dim))
        else:
            parts.append(Encoded(torch.randint(0, 256, (n, codec.code_bytes), dtype=torch.uint8),
                                 torch.ones(n, codec.num_groups, dtype=torch.float16)))
    slots = path.layouts[layer].pack(parts)  # [n, H, slot]
    return slots.view(blocks, PAGE_BLOCK, cache.num_kv_heads, -1).transpose(1, 2).contiguous().to(device)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def decode_step(path, kv, table, batch, context, q_heads, dtype, device):
    """A function that runs one decode step (every layer's write + attend) of ``batch`` requests at ``context``
    tokens, on inputs drawn once."""
    cache = path.cache
    heads, h, layers = cache.num_kv_heads, cache.head_dim, cache.num_layers
    pos = torch.full((batch,), context - 1, device=device)
    slots = table[:, (context - 1) // PAGE_BLOCK].long() * PAGE_BLOCK + (context - 1) % PAGE_BLOCK
    qsl, seq_lens = list(range(batch + 1)), [context] * batch
    key, value = (torch.randn(batch, heads, h, device=device).to(dtype) for _ in range(2))
    query = torch.randn(batch, q_heads, h, device=device).to(dtype)

    def run():
        step = StepState()
        for layer in range(layers):
            path.write(layer, kv[layer], slots, key, value, pos, step, [1] * batch, table, seq_lens)
            path.attend(layer, query, kv[layer], table, seq_lens, qsl, h ** -0.5, step, key, value)
    return run


def time_decode_steps(run, steps, device) -> float:
    """Seconds per decode step of ``run`` (``decode_step``): the best of ``steps`` after one warm-up step."""
    times = []
    for _ in range(steps + 1):
        sync(device)
        t0 = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def profile_decode_step(run, batch, context, device, top: int = 20) -> str:
    """torch.profiler tables (self device time, self host time) of one more step of ``run`` (``decode_step``)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
        sync(device)
    ops = prof.key_averages()
    by = ["self_cpu_time_total"] + (["self_device_time_total"] if len(activities) == 2 else [])
    return "\n".join(f"## batch {batch}, context {context}: by {key}\n{ops.table(sort_by=key, row_limit=top)}"
                     for key in reversed(by))


def time_bf16_attention(flash, batch, context, heads, q_heads, h, layers, steps, device) -> float:
    """Seconds per decode step of FlashAttention alone over bf16 pages (one call per layer)."""
    pages = -(-context // 64)
    k, v = (torch.randn(batch * pages, 64, heads, h, device=device, dtype=torch.bfloat16) for _ in range(2))
    table = torch.arange(batch * pages, dtype=torch.int32, device=device).view(batch, pages)
    q = torch.randn(batch, q_heads, h, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=device)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    times = []
    for _ in range(steps + 1):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(layers):
            flash(q, k, v, out, cu_q, 1, lens, context, h ** -0.5, table)
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quality")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--contexts", default="512,4096")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--q-heads", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--no-window", action="store_true", help="every token as codes (no 16-bit sinks/window)")
    ap.add_argument("--steps", type=int, default=3, help="timed decode steps per shape (the best one is reported)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler tables of one step per shape")
    ap.add_argument("--torch-decode", action="store_true", help="CUDA: decode codes and predict in float32 torch")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cache = random_artifact(args.preset, args.layers, args.kv_heads, args.head_dim)
    cache.to(device)
    rope = Rope({"rope_theta": 500000.0}, args.head_dim)
    rope.inv_freq = rope.inv_freq.to(device)
    path = TorchServingPath(cache, rope)
    flash = compat.flash_attention(args.head_dim) if device == "cuda" else None
    path.flash, path.merge = flash, compat.merge_attention_states() if flash else None
    decode = "torch" if device == "cpu" or args.torch_decode else "triton"
    if decode == "triton":
        print(path.use_residual_kernel())
    rows, profiles = [], []
    for batch in map(int, args.batches.split(",")):
        for context in map(int, args.contexts.split(",")):
            per_req = -(-(context + 1) // PAGE_BLOCK)
            table = torch.arange(batch * per_req, dtype=torch.int32, device=device).view(batch, per_req)
            kv = [random_pages(path, layer, batch * per_req, device) for layer in range(args.layers)]
            path.exact = None if args.no_window else ExactTokens(
                cache.config.num_sink_tokens, cache.config.window, batch, args.layers, args.kv_heads, args.head_dim,
                dtype, device)
            run = decode_step(path, kv, table, batch, context, args.q_heads, dtype, device)
            t = time_decode_steps(run, args.steps, device)
            if args.profile:
                profiles.append(profile_decode_step(run, batch, context, device))
            rows.append({"kv_cache_dtype": f"aquakv-{args.preset}", "attention": "flash" if flash else "flash_twin",
                         "decode": decode, "window": not args.no_window, "batch": batch, "context": context, "step_ms": t * 1e3,
                         "per_layer_us": t * 1e6 / args.layers})
            if flash is not None:
                t_bf16 = time_bf16_attention(flash, batch, context, args.kv_heads, args.q_heads, args.head_dim,
                                             args.layers, args.steps, device)
                rows.append({"kv_cache_dtype": "auto (FlashAttention alone)", "attention": "flash", "batch": batch,
                             "context": context, "step_ms": t_bf16 * 1e3, "per_layer_us": t_bf16 * 1e6 / args.layers})
                rows[-2]["vs_bf16_attention"] = t / t_bf16
            print(rows[-1] if flash is None else rows[-2], flush=True)
            del kv
    table_md = ["| kv-cache-dtype | codes decode | attention | batch | context | decode step ms | per layer us | "
                "x bf16 attention |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = f"{r['vs_bf16_attention']:.1f}x" if "vs_bf16_attention" in r else "-"
        table_md.append(f"| {r['kv_cache_dtype']} | {r.get('decode', '-')} | {r['attention']} | {r['batch']} | {r['context']} | "
                        f"{r['step_ms']:.2f} | {r['per_layer_us']:.0f} | {ratio} |")
    shape = f"{args.layers} layers, {args.q_heads} q / {args.kv_heads} KV heads, head_dim {args.head_dim}"
    write_results(args.out, "torch_path_step", f"random artifact ({args.preset} preset structure), {shape}",
                  rows, "Decode step of the torch serving path (cache write + attention, every layer; best of "
                  f"{args.steps}), {'without' if args.no_window else 'with'} the 16-bit sinks/window (ring cold).\n\n"
                  + "\n".join(table_md))
    if profiles:
        with open(args.out.rsplit(".", 1)[0] + ".profile.txt", "w") as f:
            f.write("\n\n".join(profiles) + "\n")
    compat_note = "" if device == "cuda" else " (CPU: attention through flash_twin in float32)"
    print(f"wrote {args.out}{compat_note}")


if __name__ == "__main__":
    main()
