"""GPU smoke test of the plugin on vLLM 0.26 + CUDA: the fused Triton attention kernel vs the torch path vs auto.

Builds a random-weight Llama-3.2-3B-shaped model on the GPU, calibrates a fused-kernel-mode artifact
(``aquakv-calibrate --preset speed``) on random token text (predictors are
meaningless on random weights: this checks plumbing and speed, not quality), then runs LLM(...) with
kv_cache_dtype aquakv (fused kernel), aquakv with ``aquakv_kernels: false`` (torch path) and auto at equal
--gpu-memory-utilization; records vLLM's KV-cache token counts, the greedy tokens (fused vs torch path) and the
wall time of generate() for 3 short prompts + 32 prompts of 2,048 tokens (64 new tokens each; torch path:
the 3 short prompts only).  Run on the device machine (see
benchmarks/gpu/README.md):

    python3 benchmarks/gpu/plugin_smoke.py $OUT [--short | --parity] [--fp32-model] [--profile] [--graphs]
        [--decode-graphs | --overlap-write | --cuda-decode | --ring-beside | --fused-window] [--model DIR]

``--parity``: the three short prompts through the fused kernels and the torch path only (no auto run).
``--from-json RUN.json --machine NAME --versions-from RESULTS.json``: rebuild the results table of an earlier run.

``--profile`` (aquakv and auto only, prefix caching off) repeats each generate() under the torch profiler (top
operators by CPU and by GPU self time, total GPU time) and under cProfile (Python functions by cumulative time).
``--graphs`` runs aquakv and auto as a user's ``vllm serve`` would (torch.compile and CUDA graphs, no
enforce_eager) beside the eager aquakv run, and compares their greedy tokens.
``--decode-graphs`` runs aquakv with PIECEWISE graphs and with FULL decode graphs (``aquakv_decode_graphs``): the same
kernels, so their greedy tokens and prompt logprobs must be equal.
``--overlap-write`` runs aquakv (FULL decode graphs) with each decode layer's cache write before its attention and
beside it on a second stream (``aquakv_overlap_write``): the same arithmetic, so equal tokens and logprobs, or a race.
``--ring-beside`` runs aquakv (FULL decode graphs, 3 short prompts + 16 of 2,048 tokens) with the 16-bit ring's decode
pass after the codes launch and beside it (``aquakv_ring_beside``): the same arithmetic, so equal tokens and logprobs.
``--cuda-decode`` runs aquakv (FULL decode graphs) with the decode codes loop in Triton and in CUDA
(``aquakv_cuda_decode``, kernels/decode_codes.cu; steps of >= 16 requests): other arithmetic order (fp16 mma), so
near-equal tokens and logprobs.
``--fused-window`` runs aquakv (FULL decode graphs, 3 short prompts + 16 of 2,048 tokens) with the 16-bit window's
prefill part through FlashAttention's sliding-window call + vLLM's merge kernel and through one Triton launch
(``aquakv_fused_window_prefill``, kernels/reconstruct.py window_attention_merge): other summation order, so near-equal
tokens and logprobs; both are also compared with the torch path on the 3 short prompts.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def main(args):
    out_dir = args.out_dir
    from vllm_runner import run_vllm
    from vllm_aquakv.calibration.models import make_tiny_llama

    # --model DIR: an existing Llama-3.2-3B-shaped model folder (e.g. throughput.py's), instead of making one
    model = args.model or "/tmp/llama3b-shape"
    t0 = time.time()
    if not os.path.exists(os.path.join(model, "config.json")):
        make_tiny_llama(model, num_layers=28, hidden=3072, heads=24, kv_heads=8, head_dim=128, vocab=128256,
                        ffn=8192, device="cuda")
    made = time.time() - t0
    words = os.path.join("/tmp", "calib.txt")
    with open(words, "w") as f:
        g = torch.Generator().manual_seed(0)
        f.write(" ".join("w" + str(int(i)) for i in torch.randint(0, 5000, (20000,), generator=g)))
    t1 = time.time()
    subprocess.run([sys.executable, "-m", "vllm_aquakv.calibration.calibrate", model, "--text-file", words,
                    "--tokens", "4096", "--seq-len", "512", "--device", "cuda", "--preset", "speed",
                    "--overwrite"], check=True, cwd="/tmp")
    calibrated = time.time() - t1
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, 120000, (n,), generator=g).tolist() for n in (200, 333, 517)]
    result = {"model": "Llama-3.2-3B shape, random bf16 weights", "seconds_make_model": made,
              "seconds_calibrate": calibrated, "runs": {}}
    batch = [torch.randint(10, 120000, (2048,), generator=g).tolist() for _ in range(32)]
    if args.short or args.parity:  # correctness runs only: the three short prompts everywhere
        batch = []
    runs = {"aquakv": ("aquakv", {}), "aquakv-torch-path": ("aquakv", {"additional_config": {"aquakv_kernels": False}}),
            "auto": ("auto", {})}
    if args.graphs:
        runs = {"aquakv": ("aquakv", {}), "aquakv-graphs": ("aquakv", {"enforce_eager": False}),
                "auto-graphs": ("auto", {"enforce_eager": False})}
    pair = None  # two aquakv runs whose greedy tokens and prompt logprobs must be equal: (label, run a, run b)
    graphs = {"enforce_eager": False}
    if args.decode_graphs:
        runs = {"aquakv-graphs": ("aquakv", {**graphs, "additional_config": {"aquakv_decode_graphs": False}}),
                "aquakv-decode-graphs": ("aquakv", {**graphs, "additional_config": {"aquakv_decode_graphs": True}})}
        pair = ("FULL decode graphs vs PIECEWISE", "aquakv-decode-graphs", "aquakv-graphs")
    if args.overlap_write:
        runs = {"aquakv-write-serial": ("aquakv", {**graphs, "additional_config": {"aquakv_overlap_write": False}}),
                "aquakv-write-beside": ("aquakv", {**graphs, "additional_config": {"aquakv_overlap_write": True}})}
        pair = ("decode cache writes beside attention vs before it", "aquakv-write-beside", "aquakv-write-serial")
    if args.cuda_decode:
        runs = {"aquakv-triton-decode": ("aquakv", {**graphs, "additional_config": {"aquakv_cuda_decode": False}}),
                "aquakv-cuda-decode": ("aquakv", {**graphs, "additional_config": {"aquakv_cuda_decode": True}})}
        pair = ("decode codes loop in CUDA vs Triton", "aquakv-cuda-decode", "aquakv-triton-decode")
    if args.ring_beside:  # 3 + 16 prompts: decode-only steps of 19 and 3 requests, whose ring's pass runs beside
        batch = batch[:16]
        runs = {"aquakv-ring-after": ("aquakv", {**graphs, "additional_config": {"aquakv_ring_beside": False}}),
                "aquakv-ring-beside": ("aquakv", {**graphs, "additional_config": {"aquakv_ring_beside": True}})}
        pair = ("the ring's decode pass beside the codes launch vs after it", "aquakv-ring-beside",
                "aquakv-ring-after")
    if args.fused_window:  # prefill chunks of 200-2,048 tokens with the window, both ways, and the torch path (the
        # three short prompts) as the reference both are compared with
        batch = batch[:16]
        runs = {"aquakv-window-flash": ("aquakv", {**graphs, "additional_config": {
                    "aquakv_fused_window_prefill": False}}),
                "aquakv-window-fused": ("aquakv", {**graphs, "additional_config": {
                    "aquakv_fused_window_prefill": True}}),
                "aquakv-torch-path": runs["aquakv-torch-path"]}
        pair = ("the window's prefill in one Triton launch vs FlashAttention + merge", "aquakv-window-fused",
                "aquakv-window-flash")
    if args.profile:  # where the end-to-end time goes: aquakv vs auto, prefix caching off
        runs = {k: (d, {**e, "enable_prefix_caching": False}) for k, (d, e) in runs.items() if k != "aquakv-torch-path"}
    if args.parity:  # greedy tokens and prompt logprobs: fused kernels vs the torch path only
        runs = {k: runs[k] for k in ("aquakv", "aquakv-torch-path")}
    model_dtype = "bfloat16"
    if args.fp32_model:  # float32 model: are fused-vs-torch gaps bf16 amplification of rounding noise?
        model_dtype = "float32"
        runs = {k: runs[k] for k in ("aquakv", "aquakv-torch-path")}
    result["long_prompts"] = len(batch)
    for name, (dtype, extra) in runs.items():
        t = time.time()
        # the torch path is too slow for the batch: it runs the three short prompts only
        todo = prompts if name == "aquakv-torch-path" or model_dtype == "float32" else prompts + batch
        profile = 40 if args.profile else 0
        extra = dict(extra)
        eager = extra.pop("enforce_eager", True)
        r = run_vllm(model=model, kv_cache_dtype=dtype, dtype=model_dtype, max_model_len=4096, block_size=16,
                     prompt_token_ids=todo, max_tokens=64, also_prompt_logprobs=3, profile=profile,
                     enforce_eager=eager, engine={"gpu_memory_utilization": 0.5, "skip_tokenizer_init": True, **extra})
        for key, table in r.get("profile", {}).items():
            print(f"{name}: {key}\n{table}", flush=True)
        r["seconds"] = time.time() - t
        r["outputs"] = r["outputs"][:3]
        result["runs"][name] = r
        print(name, "kv_tokens", r["kv_tokens"], "seconds", round(r["seconds"], 1), "generate",
              round(r["generate_seconds"], 2), f"({len(todo)} prompts)", flush=True)
    def mean_abs(x, y):
        d = [abs(p - q) for u, v in zip(x, y) for p, q in zip(u[1:], v[1:])]
        return sum(d) / len(d)

    result["model_dtype"] = model_dtype
    if pair is not None:
        label, b, a = pair[0], result["runs"][pair[1]], result["runs"][pair[2]]
        result["pair"] = {"label": label, "runs": pair[1:], "first_divergence": first_divergence(b["outputs"],
                                                                                                a["outputs"]),
                          "prompt_logprob_mean_abs_diff": mean_abs(b["prompt_logprobs"], a["prompt_logprobs"]),
                          "generate_s": [b["generate_seconds"], a["generate_seconds"]]}
        torch_path = result["runs"].get("aquakv-torch-path")
        if torch_path is not None:  # each run of the pair against the torch path, on the three short prompts
            result["pair"]["vs_torch_path"] = {
                name: {"first_divergence": first_divergence(result["runs"][name]["outputs"], torch_path["outputs"]),
                       "prompt_logprob_mean_abs_diff": mean_abs(result["runs"][name]["prompt_logprobs"][:3],
                                                                torch_path["prompt_logprobs"][:3])}
                for name in pair[1:]}
        finish(out_dir, result)
        return
    if args.graphs:
        a = result["runs"]["aquakv"]
        result["graphs_vs_eager_first_divergence"] = first_divergence(result["runs"]["aquakv-graphs"]["outputs"],
                                                                      a["outputs"])
        result["graphs_vs_eager_prompt_logprob_mean_abs_diff"] = mean_abs(
            result["runs"]["aquakv-graphs"]["prompt_logprobs"], a["prompt_logprobs"])
        finish(out_dir, result)
        return
    if args.profile:
        finish(out_dir, result)
        return
    t = result["runs"]["aquakv-torch-path"]
    result["prompt_logprob_mean_abs_diff_vs_torch_path"] = {
        name: mean_abs(r["prompt_logprobs"], t["prompt_logprobs"]) for name, r in result["runs"].items() if r is not t}
    a = result["runs"]["aquakv"]
    result["fused_vs_torch_path_first_divergence"] = first_divergence(a["outputs"], t["outputs"])
    if "auto" in result["runs"]:
        result["capacity_ratio"] = a["kv_tokens"] / result["runs"]["auto"]["kv_tokens"]
    finish(out_dir, result)


PAIR_RUNS = {  # what the two runs of a pair are, for the table's caption
    "FULL decode graphs vs PIECEWISE": "aquakv-graphs: attention eager between PIECEWISE graphs (`aquakv_decode_graphs` "
                                       "false); aquakv-decode-graphs: decode-only steps in FULL CUDA graphs.",
    "decode cache writes beside attention vs before it": "aquakv-write-serial: each decode layer's cache write before "
                                                         "its attention (`aquakv_overlap_write` false); "
                                                         "aquakv-write-beside: on a second stream beside it (default).",
    "the ring's decode pass beside the codes launch vs after it": "aquakv-ring-after: the 16-bit ring's decode pass "
        "after the codes launch (`aquakv_ring_beside` false); aquakv-ring-beside: on a second stream beside it "
        "(default; decode steps whose codes launch does not fill the GPU: here 3 short prompts + 16 of 2,048 tokens).",
    "the window's prefill in one Triton launch vs FlashAttention + merge": "aquakv-window-flash: the 16-bit window's "
        "prefill part through FlashAttention's sliding-window call + vLLM's merge kernel "
        "(`aquakv_fused_window_prefill` false); aquakv-window-fused: in one Triton launch (default; "
        "kernels/reconstruct.py window_attention_merge); aquakv-torch-path (where run: the 3 short prompts, eager): "
        "the reference both are compared with.",
    "decode codes loop in CUDA vs Triton": "aquakv-triton-decode: the decode codes loop in Triton "
                                           "(`aquakv_cuda_decode` false); aquakv-cuda-decode: in CUDA (true, the "
                                           "default on sm_90 since 2026-12-06; steps of >= 16 requests).",
}


def first_divergence(outputs: list[list[int]], others: list[list[int]]) -> list[int]:
    """Per prompt, the index of the first generated token where the two runs differ (the length if none)."""
    return [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), len(p)) for p, q in zip(outputs, others)]


def finish(out_dir: str, result: dict, **extra) -> None:
    """Write the raw plugin_smoke.json and its table in the shared results shape (plugin_smoke_<gpu>.json + .md;
    ``extra``: machine / versions when rebuilt with --from-json)."""
    from vllm_aquakv.results import gpu_tag, machine, write_results

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "plugin_smoke.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    gpu = extra.get("machine") or machine()
    path = os.path.join(out_dir, f"plugin_smoke_{gpu_tag(gpu)}.json")
    if "pair" in result:  # --decode-graphs, --overlap-write: two runs of the same kernels
        pair = result["pair"]
        rows = [{"kv_cache_dtype": name, "kv_tokens": r["kv_tokens"], "generate_s": r["generate_seconds"],
                 "seconds_incl_engine_start": r["seconds"]} for name, r in result["runs"].items()]
        md = [f"{result['model']}, {result['model_dtype']}; artifact `aquakv-calibrate --preset speed` on random token "
              "text (plumbing, not quality), default 16-bit sinks/window; LLM(..., enforce_eager=False, block_size=16, "
              "--gpu-memory-utilization 0.5): vLLM's default compilation and CUDA graphs; 3 short prompts + "
              f"{result.get('long_prompts', 32)} of 2,048 tokens, 64 greedy tokens each. "
              + PAIR_RUNS[pair["label"]] + "\n",
              "| run | KV tokens | generate() s | s incl. engine start |", "| --- | --- | --- | --- |"]
        md += [f"| {r['kv_cache_dtype']} | {r['kv_tokens']:,} | {r['generate_s']:.2f} | "
               f"{r['seconds_incl_engine_start']:.1f} |" for r in rows]
        md += [f"\n{pair['label'][0].upper() + pair['label'][1:]}: first differing generated token per short prompt "
               f"{pair['first_divergence']} (64 = none), prompt logprobs mean abs diff "
               f"{pair['prompt_logprob_mean_abs_diff']:.4f} nats."]
        md += [f"Against the torch path (3 short prompts), {name}: first differing generated token "
               f"{v['first_divergence']}, prompt logprobs mean abs diff {v['prompt_logprob_mean_abs_diff']:.4f} nats."
               for name, v in pair.get("vs_torch_path", {}).items()]
        write_results(path, "plugin_smoke", result["model"], rows, "\n".join(md), **extra)
        return
    diverge = result.get("fused_vs_torch_path_first_divergence")
    logprob = result.get("prompt_logprob_mean_abs_diff_vs_torch_path", {})
    rows = [{"kv_cache_dtype": name, "kv_tokens": r["kv_tokens"], "generate_s": r["generate_seconds"],
             "seconds_incl_engine_start": r["seconds"], "prompt_logprob_mean_abs_diff_vs_torch_path": logprob.get(name),
             "first_divergence_vs_torch_path": diverge if name == "aquakv" else None}
            for name, r in result["runs"].items()]
    md = [f"{result['model']}, {result['model_dtype']}; artifact `aquakv-calibrate --preset speed` on random token "
          "text (plumbing, not quality); LLM(..., enforce_eager=True, block_size=16, --gpu-memory-utilization 0.5); "
          "64 greedy tokens per prompt.\n",
          "| run | KV tokens | generate() s | s incl. engine start | prompt logprob mean abs diff vs torch path | "
          "first differing generated token vs torch path |", "| --- | --- | --- | --- | --- | --- |"]
    num = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    md += [f"| {r['kv_cache_dtype']} | {r['kv_tokens']:,} | {r['generate_s']:.2f} | "
           f"{r['seconds_incl_engine_start']:.1f} | {num(r['prompt_logprob_mean_abs_diff_vs_torch_path'], '.4f')} | "
           f"{r['first_divergence_vs_torch_path'] or '-'} |" for r in rows]
    write_results(path, "plugin_smoke", result["model"], rows, "\n".join(md), **extra)


def from_json(args) -> None:
    """``OUT --from-json RUN.json --machine NAME --versions-from RESULTS.json``: rebuild the table of an earlier run's
    plugin_smoke.json."""
    with open(args.from_json) as f:
        result = json.load(f)
    with open(args.versions_from) as f:
        versions = json.load(f)["versions"]
    finish(args.out_dir, result, machine=args.machine, versions=versions)


def parse_args():
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", nargs="?", default="/tmp/out")
    ap.add_argument("--model", default=None, help="an existing Llama-3.2-3B-shaped model folder instead of a new one")
    for flag in ("--short", "--parity", "--fp32-model", "--profile", "--graphs", "--decode-graphs", "--overlap-write",
                 "--cuda-decode", "--ring-beside", "--fused-window"):
        ap.add_argument(flag, action="store_true")
    ap.add_argument("--from-json", default=None, help="rebuild the table of this earlier run (runs nothing)")
    ap.add_argument("--machine", default=None, help="with --from-json: the GPU the run was on")
    ap.add_argument("--versions-from", default=None, help="with --from-json: a results JSON whose versions to record")
    return ap.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()
    from_json(ARGS) if ARGS.from_json else main(ARGS)
