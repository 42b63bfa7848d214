"""`vllm bench throughput` per --kv-cache-dtype on one model and one request set at equal memory (issue 7's workload).

On the GPU machine (see benchmarks/gpu/README.md), after the vLLM bundle and the staged plugin:

    python3 benchmarks/gpu/throughput.py $OUT [--formats auto,aquakv,fp8] [--input-len 8192] [--output-len 512]
        [--num-prompts 256] [--gpu-memory-utilization 0.9] [--max-num-seqs N] [--model DIR]

Without ``--model`` it builds shared/BASELINES.md's model (Llama-3.2-3B shape, random bf16 weights, 3-letter
WordLevel tokenizer: ``make_model.py``) in /tmp, so its bf16/fp8 rows can be checked against BASELINES.md.  An aquakv
format named in ``AQUAKV_PRESETS`` (``aquakv``, ``aquakv-window``) needs an artifact in MODEL/<format>: if there is
none, one is calibrated on the GPU with the preset's settings (on random weights and random words, so it measures
speed, not quality) and vLLM gets ``--kv-cache-dtype aquakv --additional-config '{"aquakv_artifact": ...}'``.  Each format runs ``vllm bench throughput --dataset-name random
--random-range-ratio 0`` with vLLM's defaults otherwise (torch.compile, CUDA graphs, chunked prefill, prefix caching),
and the row records vLLM's logged KV-cache tokens, its maximum concurrency, engine start time and throughput.
Writes throughput_<in>_<out>.json + .md (shared RESULTS.md shape) under $OUT.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))


DESCRIPTION = "Llama-3.2-3B shape, random bf16 weights (benchmarks/gpu/make_model.py, as shared/BASELINES.md)"


def make_inputs(model: str | None) -> tuple[str, str]:
    """The model folder (built if not given) and its description."""
    if model:
        return model, os.path.basename(model.rstrip("/"))
    model = "/tmp/llama3b-bench"
    if not os.path.exists(os.path.join(model, "config.json")):
        subprocess.run([sys.executable, os.path.join(HERE, "make_model.py"), model, "3b"], check=True)
    return model, DESCRIPTION


# aquakv formats: name -> (aquakv-calibrate settings, extra --additional-config); each gets its own artifact
# MODEL/<name>, named to vLLM with --additional-config (post-RoPE keys, the fused Triton kernels' mode, except
# aquakv-quality)
AQUAKV_PRESETS = {
    # the quality default (aquakv-calibrate's default: the paper's pre-RoPE chain), served with the window as the server
    # does; the fused kernels do not take it, so it runs on the torch path (slow: expect a timeout)
    "aquakv-quality": ("--preset quality", {"aquakv_window": True}),
    # aquakv-calibrate --preset speed (key mean, no value predictor, uniform 2-bit codes: the fused decode kernel's
    # arithmetic decode), every token as codes
    "aquakv": ("--preset speed", {"aquakv_window": False}),
    # the same with 16-bit sinks 4 + window 128 (vllm_aquakv/window.py): what the server does by default since
    # 2026-12-02 (prefill through two FlashAttention calls)
    "aquakv-window": ("--preset speed", {"aquakv_window": True}),
    # the same with the FULL CUDA graphs of decode-only steps named explicitly (the default since 2026-12-02's sixth
    # session; the name the first runs with them used)
    "aquakv-window-graphs": ("--preset speed", {"aquakv_window": True, "aquakv_decode_graphs": True}),
    # the window with attention eager between PIECEWISE graphs (the default before those runs)
    "aquakv-window-piecewise": ("--preset speed", {"aquakv_window": True, "aquakv_decode_graphs": False}),
    # the window with decode scores on int8 tensor cores (aquakv_int8_scores, opt-in since 2026-12-04); the
    # artifact of aquakv-window (``ARTIFACT_OF``)
    "aquakv-window-int8": ("--preset speed", {"aquakv_window": True, "aquakv_int8_scores": True}),
    # the window with each decode layer's cache write before its attention on one stream (aquakv_overlap_write false:
    # how every decode step ran before 2026-12-04; the default now writes beside the attention on a second stream)
    "aquakv-window-serial": ("--preset speed", {"aquakv_window": True, "aquakv_overlap_write": False}),
    # the window with the step's ring bookkeeping in one Triton launch named explicitly (aquakv_fused_ring_step: the
    # default on CUDA since 2026-12-06, after serve_h100_8192_256_same_run / throughput_h100_4096_1024; the name those
    # runs used)
    "aquakv-window-fused-step": ("--preset speed", {"aquakv_window": True, "aquakv_fused_ring_step": True}),
    # the window with that bookkeeping as torch ops at the step's first layer (the default before 2026-12-06)
    "aquakv-window-torch-step": ("--preset speed", {"aquakv_window": True, "aquakv_fused_ring_step": False}),
    # the window with the decode codes loop in Triton (aquakv_cuda_decode false; the default before 2026-12-06's
    # throughput_h100_8192_512_cuda_decode / throughput_h100_4096_1024_cuda_decode runs)
    "aquakv-window-triton-decode": ("--preset speed", {"aquakv_window": True, "aquakv_cuda_decode": False}),
    # the window with the decode codes loop in CUDA (kernels/decode_codes.cu) named explicitly: the default on sm_90
    # since those runs (the name they used)
    "aquakv-window-cuda-decode": ("--preset speed", {"aquakv_window": True, "aquakv_cuda_decode": True}),
    # the window's prefill part through FlashAttention's sliding-window call + vLLM's merge kernel
    # (aquakv_fused_window_prefill false: the default before 2026-12-07), and in one Triton launch named explicitly
    "aquakv-window-flash-merge": ("--preset speed", {"aquakv_window": True, "aquakv_fused_window_prefill": False}),
    "aquakv-window-fused-merge": ("--preset speed", {"aquakv_window": True, "aquakv_fused_window_prefill": True}),
    # the speed preset before 2026-12-02: d2n16 codes through nibble lookup tables
    "aquakv-d2n16": ("--preset speed --key-grid d2n16 --value-grid d2n16 --layer0 d2n16", {"aquakv_window": False}),
}


# formats that serve another format's artifact (same calibration, other serving options)
# vLLM's commands run from here, not from the checkout: vLLM starts `python -m` helpers (the model registry's
# inspection) that put the working directory first on sys.path, where the checkout's vllm_aquakv/ (its kernels/ live
# at the top level) shadowed the installed plugin: "No module named 'vllm_aquakv.kernels'" (H200, 2026-12-05)
NEUTRAL_CWD = "/tmp"
ARTIFACT_OF = {"aquakv-window-int8": "aquakv-window", "aquakv-window-serial": "aquakv-window",
               "aquakv-window-fused-step": "aquakv-window", "aquakv-window-torch-step": "aquakv-window",
               "aquakv-window-triton-decode": "aquakv-window", "aquakv-window-cuda-decode": "aquakv-window",
               "aquakv-window-flash-merge": "aquakv-window", "aquakv-window-fused-merge": "aquakv-window"}


def ensure_artifact(model: str, fmt: str = "aquakv") -> tuple[str, float]:
    """The artifact folder MODEL/<fmt> of an aquakv format (``AQUAKV_PRESETS``; ``ARTIFACT_OF`` names a shared one),
    calibrated on the GPU if missing; returns (folder, seconds the calibration took)."""
    fmt = ARTIFACT_OF.get(fmt, fmt)
    out = os.path.join(model, fmt)
    if os.path.exists(os.path.join(out, "manifest.json")):
        return out, 0.0
    import itertools
    import random
    import string

    words = ["".join(w) for w in itertools.islice(itertools.product(string.ascii_lowercase, repeat=3), 17000)]
    rng = random.Random(0)
    text = os.path.join("/tmp", "bench-calibration.txt")
    with open(text, "w") as f:
        f.write(" ".join(rng.choice(words) for _ in range(20000)))
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "vllm_aquakv.calibration.calibrate", model, "--text-file", text,
                    "--tokens", "4096", "--seq-len", "512", "--device", "cuda", "--out", out,
                    *AQUAKV_PRESETS[fmt][0].split()], check=True, cwd=NEUTRAL_CWD)
    return out, time.time() - t0


def kv_cache_args(model: str, fmt: str, max_num_seqs: int | None = None) -> list[str]:
    """The vLLM arguments that select a format: ``--kv-cache-dtype`` (and the artifact of an aquakv preset), and
    ``--max-num-seqs`` where given (the same for every format)."""
    seqs = ["--max-num-seqs", str(max_num_seqs)] if max_num_seqs else []
    if fmt not in AQUAKV_PRESETS:
        return ["--kv-cache-dtype", fmt, *seqs]
    art, _ = ensure_artifact(model, fmt)
    extra = AQUAKV_PRESETS[fmt][1]
    # the window's ring has one row per --max-num-seqs (vLLM's H100 default of 1024 would give it 15 GB here)
    if extra.get("aquakv_window") and not seqs:
        seqs = ["--max-num-seqs", "256"]
    return ["--kv-cache-dtype", "aquakv", "--additional-config", json.dumps({"aquakv_artifact": art, **extra}), *seqs]


def kv_tokens(log: str) -> int | None:
    """vLLM's logged "KV cache size: N tokens" (the last one) from an engine or server log."""
    found = re.findall(r"KV cache size: ([\d,]+) tokens", log)
    return int(found[-1].replace(",", "")) if found else None


def steady_decode(log: str) -> tuple[float | None, int | None]:
    """The highest of vLLM's 10-second "Avg generation throughput" log lines with no prompt tokens in the interval
    (pure decode) and its running requests: a figure that a format which does not finish in the timeout still gives
    (shared/BASELINES.md's "pure-decode tok/s")."""
    lines = re.findall(r"Avg prompt throughput: ([\d.]+) tokens/s, Avg generation throughput: ([\d.]+) tokens/s, "
                       r"Running: (\d+) reqs", log)
    decode = [(float(gen), int(running)) for prompt, gen, running in lines if float(prompt) == 0.0]
    return max(decode) if decode else (None, None)


def workload_args(ap: argparse.ArgumentParser, output_len: int, num_prompts: int) -> None:
    """The arguments every GPU vLLM benchmark here shares: output folder, formats, request shape, memory, model."""
    ap.add_argument("out_dir", nargs="?", default="/tmp/out")
    ap.add_argument("--formats", default="auto,aquakv")
    ap.add_argument("--input-len", type=int, default=8192)
    ap.add_argument("--output-len", type=int, default=output_len)
    ap.add_argument("--num-prompts", type=int, default=num_prompts)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--max-num-seqs", type=int, default=None, help="vLLM's --max-num-seqs for every format (default: "
                    "vLLM's, 256 for aquakv with the window); a small one also shortens CUDA-graph capture")
    ap.add_argument("--model", default=None)


def bench(model: str, dtype: str, args, out_dir: str) -> dict:
    """One `vllm bench throughput` run; its row (throughput, KV tokens, engine start) or the failure."""
    max_len = args.input_len + args.output_len + 64
    tag = f"{dtype}_{args.input_len}_{args.output_len}"
    out_dir = args.from_logs or out_dir  # --from-logs: an earlier run's log and result files, as that run left them
    result_json = os.path.join(out_dir, f"tp_{tag}.json")
    t0 = time.time()
    if args.from_logs:
        rc = "from log"
    else:
        cmd = ["vllm", "bench", "throughput", "--model", model, "--dataset-name", "random",
               "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
               "--num-prompts", str(args.num_prompts), "--random-range-ratio", "0",
               *kv_cache_args(model, dtype, args.max_num_seqs),
               "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--max-model-len", str(max_len),
               "--output-json", result_json]
        with open(os.path.join(out_dir, f"log_{tag}.txt"), "w") as log:
            rc = run_until_results(cmd, log, result_json, args.timeout)
    with open(os.path.join(out_dir, f"log_{tag}.txt")) as f:
        text = f.read()
    found = lambda pattern: (re.findall(pattern, text) or [None])[-1]  # noqa: E731
    row = {"kv_cache_dtype": dtype, "input_len": args.input_len, "output_len": args.output_len,
           "num_prompts": args.num_prompts, "gpu_memory_utilization": args.gpu_memory_utilization,
           "max_num_seqs": args.max_num_seqs, "rc": rc, "wall_s": round(time.time() - t0, 1),
           "kv_tokens": kv_tokens(text),
           "max_concurrency": float(found(r"Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x") or "nan"),
           "engine_init_s": float(found(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+)") or
                                  "nan"),
           "backend": found(r"Using (\w+) (?:attention )?backend"), "cudagraph_mode": found(r"cudagraph_mode=(\w+)")}
    row["steady_decode_tokens_per_s"], row["steady_decode_running"] = steady_decode(text)
    add_result(row, rc, result_json, args.output_len, text)
    return row


def run_until_results(cmd: list[str], log, result_json: str, timeout: float, grace: float = 20.0) -> int | str:
    """Run ``cmd`` (its own process group, output to ``log``) until it exits, or until ``timeout`` seconds; once it
    has written ``result_json``, give it ``grace`` seconds to exit, then stop it and its engine processes (vLLM 0.26
    on the H200 sometimes did not exit after writing its results).  Returns the exit status, "timeout" or
    "stopped after results"."""
    import signal

    if os.path.exists(result_json):
        os.remove(result_json)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=NEUTRAL_CWD)
    start, written = time.time(), None
    while proc.poll() is None:
        now = time.time()
        if written is None and os.path.exists(result_json):
            written = now
        if now - start > timeout or (written is not None and now - written > grace):
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return "stopped after results" if written is not None else "timeout"
        time.sleep(1.0)
    return proc.returncode


def add_result(row: dict, rc, result_json: str, output_len: int, log: str) -> None:
    """Fill a row from `vllm bench throughput`'s --output-json (elapsed, total and output tok/s), or keep the log's
    tail when the run failed.  A run that wrote its results and then did not exit (the H200's auto run,
    2026-12-02) counts, with a note."""
    if rc != 0 and os.path.exists(result_json):
        row["note"] = {"timeout": f"rc {rc}: vLLM wrote its results; the process did not exit before the timeout",
                       "stopped after results": "vLLM wrote its results, then did not exit within 20 s: stopped",
                       }.get(rc, "rebuilt from the run's log and result files (--from-logs)")
    if os.path.exists(result_json) and (rc == 0 or "note" in row):
        with open(result_json) as f:
            res = json.load(f)
        row["elapsed_s"] = res["elapsed_time"]
        row["total_tokens_per_s"] = res["tokens_per_second"]
        row["output_tokens_per_s"] = res["num_requests"] * output_len / res["elapsed_time"]
    else:
        row["log_tail"] = log[-3000:]


def add_ratios(rows: list[dict], suffix: str,
               fields: tuple = (("kv_tokens", "kv_tokens"), ("output_tokens_per_s", "speedup"))) -> None:
    """For each (key, name) of ``fields``: <name>_<suffix> of every row, its key over the ``auto`` row's, where both
    figures exist (default: kv_tokens_<suffix> and speedup_<suffix>)."""
    base = next((r for r in rows if r["kv_cache_dtype"] == "auto"), None)
    for r in rows:
        for key, name in fields:
            if base and base.get(key) and r.get(key):
                r[f"{name}_{suffix}"] = r[key] / base[key]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    workload_args(ap, output_len=512, num_prompts=256)
    ap.add_argument("--timeout", type=int, default=420, help="seconds per format")
    ap.add_argument("--from-logs", default=None, help="rebuild the tables from the log_*.txt and tp_*.json an "
                    "earlier run left in this folder (runs nothing; give --machine and --versions-from)")
    ap.add_argument("--machine", default=None, help="with --from-logs: the GPU the run was on")
    ap.add_argument("--versions-from", default=None, help="with --from-logs: a results JSON of the same machine "
                    "and day whose versions to record")
    ap.add_argument("--note", default="", help="what the run shows, kept in the JSON and under the table")
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    formats = args.formats.split(",")
    if args.from_logs:
        model, description = "/tmp/llama3b-bench", DESCRIPTION
        calibration_s = 0.0
    else:
        model, description = make_inputs(args.model)
        calibration_s = sum(ensure_artifact(model, f)[1] for f in formats if f in AQUAKV_PRESETS)
    extra = {"calibration_seconds": round(calibration_s, 1)}  # the results file's fields beside the measured ones
    if args.from_logs:
        with open(args.versions_from) as f:
            extra.update(machine=args.machine, versions=json.load(f)["versions"])
    if args.note:
        extra["note"] = args.note
    rows = []
    for dtype in formats:  # the results file is rewritten after each format: a run cut short keeps what finished
        rows.append(bench(model, dtype, args, args.out_dir))
        r = rows[-1]
        print(f"{dtype}: rc {r['rc']} KV tokens {r['kv_tokens']} output tok/s {r.get('output_tokens_per_s')} "
              f"engine init {r['engine_init_s']} s wall {r['wall_s']} s", flush=True)
        write_table(rows, formats, args, description, final=dtype == formats[-1], **extra)


def write_table(rows: list[dict], formats: list[str], args, description: str, final: bool, **extra) -> None:
    """The markdown table of ``rows`` (printed when ``final``) and the results JSON under args.out_dir, with the
    header fields ``extra`` (calibration seconds; --from-logs: machine and versions; --note)."""
    from vllm_aquakv.results import gpu_tag, machine, write_results

    add_ratios(rows, "vs_bf16")
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    md = [f"`vllm bench throughput`, random dataset, {args.input_len} in / {args.output_len} out, {args.num_prompts} "
          f"prompts, --gpu-memory-utilization {args.gpu_memory_utilization}"
          + (f", --max-num-seqs {args.max_num_seqs} (every format)" if args.max_num_seqs else "")
          + ", vLLM defaults otherwise (torch.compile, "
          f"CUDA graphs, chunked prefill, prefix caching). aquakv artifacts (calibrated on random words: speed only): "
          + "; ".join(f"{k}: `{v[0]}` {json.dumps(v[1]) if v[1] else ''}" for k, v in AQUAKV_PRESETS.items()
                      if k in formats) + ".\n",
          "| kv-cache-dtype | KV tokens | vs bf16 | max concurrency | elapsed s | output tok/s | vs bf16 | "
          "pure-decode tok/s (running) | engine init s | rc |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    md += [f"| {r['kv_cache_dtype']} | {fmt(r['kv_tokens'], ',')} | {fmt(r.get('kv_tokens_vs_bf16'), '.2f')}x | "
           f"{r['max_concurrency']:.1f} | {fmt(r.get('elapsed_s'), '.2f')} | "
           f"{fmt(r.get('output_tokens_per_s'), ',.1f')} | "
           f"{fmt(r.get('speedup_vs_bf16'), '.2f')}x | {fmt(r.get('steady_decode_tokens_per_s'), ',.0f')} "
           f"({r.get('steady_decode_running') or '-'}) | {r['engine_init_s']:.0f} | {r['rc']} |" for r in rows]
    md += [f"\n{args.note}"] if args.note else []
    if final:
        print("\n".join(md))
    gpu = gpu_tag(args.machine or machine())
    write_results(os.path.join(args.out_dir, f"throughput_{gpu}_{args.input_len}_{args.output_len}.json"),
                  "throughput", description, rows, "\n".join(md), **extra)


if __name__ == "__main__":
    main()
