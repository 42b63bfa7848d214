"""relMSE of the HIGGS codec alone (no predictor) on real pre-RoPE K/V of SmolLM2-135M, per layer.

For each layer and stream (keys, values), each bit width (2-D grids d2n16/d2n64/d2n256 = 2/3/4 bits, plus the
4-D 2-bit grid and the scalar 2-bit grid) and with / without the Hadamard rotation: ||x - Q(x)||^2 / ||x||^2
over the captured tokens.  Keys are raw pre-RoPE keys (their large per-channel offsets included).

    .venv/bin/python benchmarks/codec_relmse.py [--tokens 8192]
"""

import argparse
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_aquakv.calibration.capture import capture_kv, tokenize_windows
from vllm_aquakv.calibration.models import smollm2_path
from vllm_aquakv.calibration.texts import load_texts
from vllm_aquakv.codec import HiggsCodec, rel_mse
from vllm_aquakv.results import write_results

GRIDS = ["d2n16", "d2n64", "d2n256", "d4n256", "d1n4"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "codec_relmse_smollm2.json"))
    args = ap.parse_args()
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ks, vs = capture_kv(model, tokenize_windows(tok, load_texts("wiki-heldout"), 1024, args.tokens))
    rows = []
    for stream, xs in (("k", ks), ("v", vs)):
        for layer, x in enumerate(xs):
            for grid in GRIDS:
                for rotate in (True, False):
                    codec = HiggsCodec(x.shape[1], x.shape[2], grid, rotate=rotate)
                    rows.append({"stream": stream, "layer": layer, "grid": grid, "rotate": rotate,
                                 "bits_per_value": codec.bits_per_value, "rel_mse": rel_mse(x, codec.quantize(x))})
    # markdown: mean over layers, then a per-layer table for the 2-D grids
    def mean(stream, grid, rotate):
        vals = [r["rel_mse"] for r in rows if (r["stream"], r["grid"], r["rotate"]) == (stream, grid, rotate)]
        return sum(vals) / len(vals)

    md = ["Mean over layers of relMSE (codes + fp16 scale per (token, KV head), no predictor, no sinks/window).\n",
          "| grid | bits/value | keys, Hadamard | keys, no rotation | values, Hadamard | values, no rotation |",
          "| --- | --- | --- | --- | --- | --- |"]
    for grid in GRIDS:
        bpv = next(r["bits_per_value"] for r in rows if r["grid"] == grid)
        md.append(f"| {grid} | {bpv:.2f} | " + " | ".join(f"{mean(s, grid, rot):.4f}" for s in "kv" for rot in (True, False)) + " |")
    md += ["\nPer layer, 2-D grids (H = Hadamard, raw = no rotation).\n",
           "| layer | " + " | ".join(f"{s}{b} {t}" for s in "kv" for b in (2, 3, 4) for t in ("H", "raw")) + " |",
           "| --- |" + " --- |" * 12]
    for layer in range(len(ks)):
        cells = []
        for s in "kv":
            for grid in ("d2n16", "d2n64", "d2n256"):
                for rot in (True, False):
                    cells.append(next(r["rel_mse"] for r in rows if (r["stream"], r["layer"], r["grid"], r["rotate"])
                                      == (s, layer, grid, rot)))
        md.append(f"| {layer} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
    write_results(args.out, "codec_relmse", "SmolLM2-135M-Instruct (Q4_1 GGUF wheel, fp32)", rows, "\n".join(md),
                  tokens=int(ks[0].shape[0]), text="wiki-heldout")
    print("\n".join(md[:3 + len(GRIDS)]))


if __name__ == "__main__":
    main()
