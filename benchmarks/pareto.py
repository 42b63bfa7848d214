"""Pareto study on SmolLM2-135M-Instruct: perplexity delta vs bits/value vs decode cost, per predictor structure x
topology x bits.  K/V are captured once; every configuration is calibrated in memory on the same calibration
tokens (wiki-train) and evaluated on the same held-out windows (wiki-heldout, or --text essays / news) with
aquakv-eval's simulated cache, in serving semantics (every token through codes) and paper semantics (16-bit sinks 4 / window 128).

    .venv/bin/python benchmarks/pareto.py [--calib-tokens 16384] [--windows 4] [--ctx 1024] [--text wiki-heldout]

Writes benchmarks/results/pareto_smollm2.{json,md,png}.  Decode cost from vllm_aquakv.cost (Llama-3.2-3B shape:
8 KV heads x 128, 24 query heads), the shape the kernels are budgeted for.
"""

import argparse
import json
import os
import time

import torch

from vllm_aquakv.calibration.calibrate import load_model
from vllm_aquakv.calibration.capture import KeysInFrame, capture_kv, tokenize_windows
from vllm_aquakv.calibration.evaluate import MixedCache, kivi_bits, kivi_quantize, perplexity
from vllm_aquakv.calibration.models import smollm2_path
from vllm_aquakv.calibration.texts import TEXT_SETS, load_texts
from vllm_aquakv.cost import decode_cost
from vllm_aquakv.reference import AquaKVCache, AquaKVConfig
from vllm_aquakv.results import write_results
from vllm_aquakv.rope import Rope

# (label, config overrides); 2-bit 2-D grids and a 4-bit layer 0 unless said otherwise
CONFIGS = [
    ("HIGGS, no predictor", dict(key_predictor="none", value_predictor="none")),
    ("mean only", dict(key_predictor="mean", value_predictor="mean")),
    ("paper: dense chain K, dense [K_l;V_l-1] V", dict()),
    ("paper, keys 3 bit", dict(key_grid="d2n64")),
    # at most 2.3 bits/value on head_dim 64 (the default 4-bit layer 0 costs SmolLM2 0.067 b/v; head_dim 128: 2.20)
    ("paper, layer 0 at 2 bit", dict(layer0_grid="d2n16")),
    ("K mean, V dense from K_l", dict(key_predictor="mean", value_topology="k_same")),
    ("K per-head chain, V dense from K_l", dict(key_predictor="per_head", value_topology="k_same")),
    ("K low-rank 32 chain, V dense from K_l", dict(key_predictor="lowrank:32", value_topology="k_same")),
    ("K dense anchor:4, V dense from K_l", dict(key_topology="anchor:4", value_topology="k_same")),
    ("K per-head anchor:4, V dense from K_l", dict(key_predictor="per_head", key_topology="anchor:4",
                                                value_topology="k_same")),
    ("K per-head anchor:4 3 bit, V dense from K_l", dict(key_predictor="per_head", key_topology="anchor:4",
                                                      value_topology="k_same", key_grid="d2n64")),
    ("K mean 3 bit, V dense from K_l", dict(key_predictor="mean", value_topology="k_same", key_grid="d2n64")),
    # kernel-friendly: nothing crosses layers or KV heads, so one program per (sequence, KV head) decodes all it needs
    ("K mean, V per-head from K_l", dict(key_predictor="mean", value_predictor="per_head", value_topology="k_same")),
    ("K mean 3 bit, V per-head from K_l", dict(key_predictor="mean", value_predictor="per_head",
                                               value_topology="k_same", key_grid="d2n64")),
    # fused-kernel mode: keys quantized after RoPE, attention scores taken in the Hadamard domain (no key decode)
    ("post-RoPE K none, V none", dict(key_rope="post", key_predictor="none", value_predictor="none")),
    ("post-RoPE K none, V none, scalar d1n4", dict(key_rope="post", key_predictor="none", value_predictor="none",
                                                   key_grid="d1n4", value_grid="d1n4")),
    # aquakv-calibrate --preset speed until 2026-12-02 (d2n16 codes; measured on the H100 as aquakv-window)
    ("speed preset before 2026-12-02 (d2n16): post-RoPE K mean, V none",
     dict(key_rope="post", key_predictor="mean", value_predictor="none", value_topology="none", layer0_grid="d2n16")),
    # aquakv-calibrate --preset speed since 2026-12-02: uniform 2-bit scalar codes (u1n4), which the CUDA kernel
    # decodes arithmetically (no tables)
    ("speed preset, uniform u1n4 codes", dict(key_rope="post", key_predictor="mean", value_predictor="none",
                                               value_topology="none", key_grid="u1n4", value_grid="u1n4",
                                               layer0_grid="u1n4")),
    ("speed preset, uniform u1n4 codes, layer 0 d2n16", dict(key_rope="post", key_predictor="mean",
                                                              value_predictor="none", value_topology="none",
                                                              key_grid="u1n4", value_grid="u1n4",
                                                              layer0_grid="d2n16")),
    ("speed preset, Lloyd d1n4 codes, layer 0 d2n16", dict(key_rope="post", key_predictor="mean",
                                                            value_predictor="none", value_topology="none",
                                                            key_grid="d1n4", value_grid="d1n4", layer0_grid="d2n16")),
    ("post-RoPE K mean, V mean", dict(key_rope="post", key_predictor="mean", value_predictor="mean")),
    ("post-RoPE K mean, V per-head from K_l", dict(key_rope="post", key_predictor="mean", value_predictor="per_head",
                                                    value_topology="k_same")),
    ("post-RoPE K mean 3 bit, V per-head from K_l", dict(key_rope="post", key_predictor="mean", key_grid="d2n64",
                                                          value_predictor="per_head", value_topology="k_same")),
]
SHAPE_3B = dict(num_kv_heads=8, head_dim=128, num_q_heads=24)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--text", default="wiki-heldout", choices=[t for t in TEXT_SETS if t != "wiki-train"],
                    help="held-out text set (calibration is always wiki-train)")
    ap.add_argument("--only", nargs="*", help="run only configurations whose label contains one of these")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "pareto_smollm2.json"))
    args = ap.parse_args()
    t0 = time.time()
    path = smollm2_path()
    model, tok = load_model(path, "cpu")
    rope = Rope(json.load(open(os.path.join(path, "config.json"))), model.config.head_dim)
    ks, vs = capture_kv(model, tokenize_windows(tok, load_texts("wiki-train"), 1024, args.calib_tokens))
    windows = tokenize_windows(tok, load_texts(args.text), args.ctx, args.windows * args.ctx)
    H, D = ks[0].shape[1:]
    plain = perplexity(model, windows)
    rows = []

    def evaluate(label, recon_fns, bits, cost, config):
        for (semantics, sinks, window), recon_fn in zip((("serving", 0, 0), ("paper", 4, 128)), recon_fns):
            ppl = perplexity(model, windows, MixedCache(model, recon_fn, H, D, sinks, window, rope,
                                                        config.get("key_rope", "pre")))
            rows.append({"label": label, "text": args.text, "semantics": semantics, "bits_per_value": bits,
                         "ppl": ppl,
                         "rel_ppl_delta": ppl / plain - 1, **cost, "config": config})
            print(f"{label:45s} {semantics:8s} {bits:.3f} bits  ppl {ppl:.3f} ({100 * (ppl / plain - 1):+.2f}%)  "
                  f"decode {cost['bytes_per_value']:.2f} B/value {cost['flops_per_value']:.0f} FLOP/value", flush=True)

    # as aquakv-calibrate does: sink tokens (first 4 of each 1024-token sequence) stay out of the fit when they are
    # served in 16-bit (paper semantics), and are fitted when every token is quantized (serving semantics)
    no_sinks = torch.arange(ks[0].shape[0]) % 1024 >= 4
    for label, overrides in CONFIGS:
        if args.only and not any(o in label for o in args.only):
            continue
        config = AquaKVConfig(**overrides)
        k_frame = KeysInFrame(ks, rope, 1024, config.key_rope)
        fns = [lambda s, l, x, r, c=AquaKVCache.calibrate(config, k_frame, vs, fit_mask=mask): c.encode_stream(s, l, x, r)[1]
               for mask in (None, no_sinks)]
        evaluate(label, fns, AquaKVCache(config, len(ks), H, D).bits(args.ctx)["bits_per_value"],
                 decode_cost(config, **SHAPE_3B), config.to_json())
    kivi = lambda s, l, x, r: kivi_quantize(x, s)  # noqa: E731
    evaluate("KIVI-style 2 bit (baseline)", [kivi, kivi], kivi_bits(D),
             {"bytes_per_value": kivi_bits(128) / 8, "flops_per_value": 2.0 * 3 + 2, "notes": []}, {})
    md = [f"SmolLM2-135M-Instruct, fp32. Calibration: {ks[0].shape[0]} wiki-train tokens. Evaluation: {args.windows} "
          f"held-out {args.text} windows x {args.ctx} tokens; unquantized ppl {plain:.4f}. "
          "Serving = every token through codes; "
          "paper = 16-bit sinks 4 + window 128. Decode cost per cached value per step for the Llama-3.2-3B shape "
          "(budget on an H100: ~0.29 B and <= ~85 FLOP per value to stay bandwidth-bound at 2.3 bits).\n",
          "| configuration | bits/value | ppl delta, serving | ppl delta, paper | decode B/value | decode FLOP/value |",
          "| --- | --- | --- | --- | --- | --- |"]
    for i in range(0, len(rows), 2):
        a, b = rows[i], rows[i + 1]
        md.append(f"| {a['label']} | {a['bits_per_value']:.3f} | {100 * a['rel_ppl_delta']:+.2f}% | "
                  f"{100 * b['rel_ppl_delta']:+.2f}% | {a['bytes_per_value']:.2f} | {a['flops_per_value']:.0f} |")
    write_results(args.out, "pareto", "SmolLM2-135M-Instruct (Q4_1 GGUF wheel, fp32)", rows, "\n".join(md),
                  unquantized_ppl=plain, seconds=round(time.time() - t0))
    plot(rows, os.path.splitext(args.out)[0] + ".png")
    print("\n".join(md))


def plot(rows, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, semantics in zip(axes, ("serving", "paper")):
        for r in (r for r in rows if r["semantics"] == semantics):
            ax.scatter(r["bytes_per_value"], 100 * r["rel_ppl_delta"], s=25)
            ax.annotate(r["label"], (r["bytes_per_value"], 100 * r["rel_ppl_delta"]), fontsize=6)
        ax.axvline(2.0, color="gray", ls="--", lw=0.8)
        ax.text(2.02, ax.get_ylim()[1] * 0.9, "bf16 reads 2 B/value", fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1)
        ax.set_xlabel("decode bytes read per cached value (Llama-3.2-3B shape)")
        ax.set_ylabel("perplexity increase, %")
        ax.set_title(f"SmolLM2-135M, {semantics} semantics")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
