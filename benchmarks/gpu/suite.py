"""Issue 7's whole GPU table in one command: `vllm bench throughput` and `vllm bench serve` for every KV format, at
several prompt lengths, on one model at equal --gpu-memory-utilization.

On the GPU machine (see benchmarks/gpu/README.md), after the vLLM bundle (with FlashAttention 2 for turboquant:
``WITH_FA2=1``) and the staged plugin:

    python3 benchmarks/gpu/suite.py $OUT [--formats auto,fp8,...] [--input-lens 4096,8192,16384] [--output-len 512]
        [--num-prompts 256] [--serve-prompts 64] [--request-rate 1] [--timeout 420] [--no-serve] [--model DIR]
        [--gpu-memory-utilization 0.9] [--max-num-seqs N]

The all-formats table of benchmarks/results/throughput_h200_8192_512_all_formats.md is this, in a memory the bf16
cache fills with 22 prompts of 64 (int4 and turboquant do not finish 256 prompts at 0.9 in a device call):

    python3 benchmarks/gpu/suite.py $OUT --no-serve --input-lens 8192 --num-prompts 64 \
        --gpu-memory-utilization 0.2 --max-num-seqs 64 --timeout 265 \
        --formats auto,fp8,int4_per_token_head,turboquant_3bit_nc,turboquant_k3v4_nc,aquakv-window

For each prompt length it runs ``throughput.py`` (all formats) and then ``serve.py`` (all formats), each format in its
own engine, and leaves their JSON + markdown (throughput_<gpu>_<in>_<out>, serve_<gpu>_<in>_<out>) and logs in
$OUT/<in>/.  A format that fails or does not finish in --timeout seconds keeps its row with the log's tail; the
others still run.  The default formats are issue 7's: vLLM's own (auto, fp8, int4_per_token_head,
turboquant_3bit_nc, turboquant_k3v4_nc) and aquakv's speed default (``aquakv-window``: the server's default on
CUDA), the same without the 16-bit window (``aquakv``) and the quality default (``aquakv-quality``: pre-RoPE chain,
served by the torch path on CUDA, so expect it to time out).  Copy the JSON you keep to benchmarks/results/ and run
``python benchmarks/report.py`` and ``python benchmarks/plots.py`` there.  A full run takes hours: one device call
holds a format or two (``--formats``, ``--input-lens``).
"""

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FORMATS = "auto,fp8,int4_per_token_head,turboquant_3bit_nc,turboquant_k3v4_nc,aquakv-window,aquakv,aquakv-quality"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", nargs="?", default="/tmp/out")
    ap.add_argument("--formats", default=FORMATS)
    ap.add_argument("--input-lens", default="4096,8192,16384")
    ap.add_argument("--output-len", type=int, default=512)
    ap.add_argument("--num-prompts", type=int, default=256, help="throughput requests per format")
    ap.add_argument("--serve-prompts", type=int, default=64, help="serve requests per format")
    ap.add_argument("--request-rate", type=float, default=1.0)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--max-num-seqs", type=int, default=None, help="vLLM's --max-num-seqs for every format")
    ap.add_argument("--timeout", type=int, default=420, help="seconds per format and benchmark")
    ap.add_argument("--no-serve", action="store_true")
    ap.add_argument("--model", default=None, help="model folder (default: the random Llama-3.2-3B shape, built once)")
    args = ap.parse_args()
    common = ["--formats", args.formats, "--output-len", str(args.output_len),
              "--gpu-memory-utilization", str(args.gpu_memory_utilization)] + (["--model", args.model] if args.model else []) \
        + (["--max-num-seqs", str(args.max_num_seqs)] if args.max_num_seqs else [])
    failed = []
    for input_len in (int(n) for n in args.input_lens.split(",")):
        out = os.path.join(args.out_dir, str(input_len))
        runs = [("throughput.py", ["--num-prompts", str(args.num_prompts), "--timeout", str(args.timeout)])]
        if not args.no_serve:
            runs.append(("serve.py", ["--num-prompts", str(args.serve_prompts), "--request-rate",
                                      str(args.request_rate), "--bench-timeout", str(args.timeout)]))
        for script, extra in runs:
            t0 = time.time()
            print(f"[suite] {script} --input-len {input_len} -> {out}", flush=True)
            rc = subprocess.run([sys.executable, os.path.join(HERE, script), out, "--input-len", str(input_len),
                                 *common, *extra]).returncode
            print(f"[suite] {script} --input-len {input_len}: rc {rc}, {time.time() - t0:.0f} s", flush=True)
            if rc:
                failed.append(f"{script} --input-len {input_len} (rc {rc})")
    if failed:
        print("[suite] failed: " + "; ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
