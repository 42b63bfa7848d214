"""aquakv-calibrate: fit AQUA-KV predictors for a local Hugging Face model and write the artifact.

    aquakv-calibrate MODEL_DIR [--text wiki-train | --text-file a.txt ...] [--tokens 65536] [--out MODEL_DIR/aquakv]

Captures pre-RoPE K/V with forward hooks on calibration text, fits the predictors layer by layer by ridge
regression on reconstructed inputs (quantization in the loop), and writes ``adapters.safetensors`` +
``manifest.json`` (see ``vllm_aquakv.artifact``).  Never downloads anything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time

import torch

from ..artifact import default_artifact_dir, model_fingerprint, save_artifact
from ..grids import GRID_SPECS
from ..reference import AquaKVCache, AquaKVConfig
from ..codec import head_dim_supported
from ..rope import UnsupportedModel, calibration_rope, check_full_rotary, inverse_frequencies
from .capture import KeysInFrame, QueryEnergy, capture_kv, kv_shape, tokenize_windows
from .texts import TEXT_SETS, load_texts

BITS_TO_GRID = {2: "d2n16", 3: "d2n64", 4: "d2n256"}
# --preset: the two defaults picked from the Pareto study (README "Defaults"); explicit options override them
PRESETS = {
    # the paper's AQUA-KV: pre-RoPE keys, dense previous-layer key chain, values from [K_l; V_{l-1}], 4-bit layer 0;
    # served through the torch path (reconstructs each context every step)
    "quality": {},
    # the fused CUDA kernels' mode: post-RoPE keys minus their mean, values without predictor, every layer at 2 bits
    # (one slot size) in uniform scalar codes (u1n4), which the decode kernel turns into numbers without table lookups
    # (3x faster on the H200 than d2n16's tables; quality: benchmarks/results/eval_smollm2_speed_key_scale.md; the
    # key channel scale stays opt-in: better perplexity, worse long-range copying on SmolLM2)
    "speed": {"key_rope": "post", "key_predictor": "mean", "value_predictor": "none", "value_topology": "none",
              "key_grid": "u1n4", "value_grid": "u1n4", "layer0": "u1n4"},
}


def build_parser() -> argparse.ArgumentParser:
    """CLI options (shared by aquakv-eval)."""
    d = AquaKVConfig()
    ap = argparse.ArgumentParser(prog="aquakv-calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="local Hugging Face model folder (Llama/Qwen2/Mistral-style decoder)")
    ap.add_argument("--out", help="artifact folder (default: MODEL/aquakv, where serving looks)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing artifact in the output folder")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quality",
                    help="quality: the paper's AQUA-KV (default); speed: the fused CUDA kernels' mode (post-RoPE "
                         "keys, key mean, no value predictor, uniform 2-bit codes u1n4 on every layer); options "
                         "below override it")
    ap.add_argument("--text", default="wiki-train", choices=TEXT_SETS, help="built-in calibration text set")
    ap.add_argument("--text-file", nargs="*", default=[], help="calibration text files (override --text)")
    ap.add_argument("--tokens", type=int, default=65536, help="calibration tokens")
    ap.add_argument("--seq-len", type=int, default=1024, help="tokens per calibration sequence")
    ap.add_argument("--key-bits", type=int, choices=sorted(BITS_TO_GRID), help="shortcut for --key-grid")
    ap.add_argument("--value-bits", type=int, choices=sorted(BITS_TO_GRID), help="shortcut for --value-grid")
    ap.add_argument("--key-grid", default=d.key_grid, choices=sorted(GRID_SPECS))
    ap.add_argument("--value-grid", default=d.value_grid, choices=sorted(GRID_SPECS))
    ap.add_argument("--layer0", default=d.layer0_grid, help="grid of layer 0 (no predictor) or '16bit'")
    ap.add_argument("--group-size", type=int, default=None, help="values per fp16 scale (default head_dim)")
    ap.add_argument("--sinks", type=int, default=d.num_sink_tokens, help="16-bit attention-sink tokens (evaluation)")
    ap.add_argument("--window", type=int, default=d.window, help="16-bit recent-window tokens (evaluation)")
    ap.add_argument("--key-predictor", default=d.key_predictor, help="none | mean | dense | per_head | lowrank:R")
    ap.add_argument("--value-predictor", default=d.value_predictor, help="none | mean | dense | per_head | lowrank:R")
    ap.add_argument("--key-topology", default=d.key_topology, help="chain | anchor:G | none")
    ap.add_argument("--value-topology", default=d.value_topology, help="k_same+v_prev | k_same | v_prev | none")
    ap.add_argument("--key-rope", default=d.key_rope, choices=("pre", "post"),
                    help="quantize keys before RoPE (paper) or after it (fused-kernel mode; key predictor none/mean)")
    ap.add_argument("--key-channel-scale", default=d.key_channel_scale, choices=("query", "none"),
                    help="query: scale each key channel by (E[q^2] / E[r^2])^(1/4) of the calibration queries and key "
                         "residuals before quantizing: lower perplexity, but worse long-range copying on SmolLM2 "
                         "(README 'Defaults'); none: keys as they are (the default)")
    ap.add_argument("--ridge", type=float, default=d.ridge, help="relative ridge strength")
    ap.add_argument("--seed", type=int, default=0, help="Hadamard sign seed")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--fit-without-sinks", action="store_true",
                    help="leave the first --sinks tokens of every sequence out of the fits (for serving with 16-bit sinks)")
    ap.add_argument("--spill-dir", help="keep captured K/V in memory-mapped files under this folder instead of RAM "
                                        "(large models: tokens x layers x 2 x kv_heads x head_dim x 4 bytes of disk)")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options with the chosen --preset's settings as defaults (options given explicitly win)."""
    ap = build_parser()
    preset = ap.parse_known_args(argv)[0].preset
    ap.set_defaults(**PRESETS[preset])
    return ap.parse_args(argv)


def config_from_args(args) -> AquaKVConfig:
    """AquaKVConfig from parsed CLI options."""
    return AquaKVConfig(
        key_grid=BITS_TO_GRID[args.key_bits] if args.key_bits else args.key_grid,
        value_grid=BITS_TO_GRID[args.value_bits] if args.value_bits else args.value_grid,
        layer0_grid=args.layer0, group_size=args.group_size, seed=args.seed, num_sink_tokens=args.sinks,
        window=args.window, key_predictor=args.key_predictor, value_predictor=args.value_predictor,
        key_topology=args.key_topology, value_topology=args.value_topology, ridge=args.ridge,
        key_rope=args.key_rope, key_channel_scale=args.key_channel_scale)


def model_text_config(model_dir: str) -> dict:
    """The model's config.json (its text_config for multimodal wrappers)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        hf = json.load(f)
    return hf.get("text_config", hf)


def check_model_config(model_dir: str, key_rope: str = "pre") -> None:
    """Refuse, from config.json alone (before any weight is loaded), a model that aquakv cannot serve: MLA,
    sliding-window layers, a head_dim that is not a power of two, and for pre-RoPE keys (``key_rope``) a RoPE variant
    other than default/linear/llama3 (post-RoPE artifacts serve any: ``vllm_aquakv.rope``)."""
    from types import SimpleNamespace

    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise UnsupportedModel(f"{model_dir} is not a local Hugging Face model folder (no config.json)")
    cfg = model_text_config(model_dir)
    if cfg.get("kv_lora_rank") or cfg.get("q_lora_rank"):
        raise UnsupportedModel("this model uses multi-head latent attention (MLA), which aquakv does not support")
    sliding = (cfg.get("sliding_window") and cfg.get("use_sliding_window", True)) or any(
        "sliding" in str(t) for t in cfg.get("layer_types") or ())
    if sliding:
        raise UnsupportedModel("this model has sliding-window attention layers, which aquakv does not support "
                               "(serve it with another --kv-cache-dtype)")
    if "num_attention_heads" not in cfg or "num_hidden_layers" not in cfg:
        raise UnsupportedModel("config.json has no num_attention_heads/num_hidden_layers: not a Llama-style decoder")
    _, _, head_dim = kv_shape(SimpleNamespace(**{"head_dim": None, "num_key_value_heads": None, **cfg}))
    if not head_dim_supported(head_dim):
        raise UnsupportedModel(f"aquakv needs head_dim to be a power of two in [16, 512]; this model has {head_dim}")
    if key_rope == "pre":
        inverse_frequencies(cfg, head_dim)  # raises for RoPE variants the serving path cannot undo and redo
    else:
        check_full_rotary(cfg)  # (inverse_frequencies checks it too)


def load_model(model_dir: str, device: str):
    """(model in float32 on ``device``, tokenizer) from a local folder; no hub access."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise UnsupportedModel(f"{model_dir} is not a local Hugging Face model folder (no config.json)")
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).to(device).eval()
    return model, tok


def calibration_docs(args) -> tuple[list[str], str]:
    """Calibration documents (non-empty) and a label for the manifest."""
    if args.text_file:
        missing = [f for f in args.text_file if not os.path.isfile(f)]
        if missing:
            raise SystemExit(f"aquakv-calibrate: no such text file: {', '.join(missing)}")
        docs = [open(f, encoding="utf-8").read() for f in args.text_file]
        label = "files:" + ",".join(os.path.basename(f) for f in args.text_file)
    else:
        docs, label = load_texts(args.text), args.text
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise SystemExit(f"aquakv-calibrate: the calibration text ({label}) is empty; give text files with --text-file "
                         f"or a built-in set with --text ({', '.join(TEXT_SETS)})")
    return docs, label


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``aquakv-calibrate``: bad input ends in one ``aquakv-calibrate: ...`` line saying what to do."""
    args = parse_args(argv)
    try:
        config = config_from_args(args)
        _calibrate(args, config)
    except ValueError as e:  # UnsupportedModel, NonFiniteActivations, NonFiniteFit, and bad configuration values
        raise SystemExit(f"aquakv-calibrate: {e}") from e


def _calibrate(args, config: AquaKVConfig) -> None:
    out = args.out or default_artifact_dir(args.model)
    if os.path.exists(os.path.join(out, "manifest.json")) and not args.overwrite:
        raise SystemExit(f"aquakv-calibrate: an artifact already exists at {out}; pass --overwrite to replace it "
                         "(or --out DIR to write elsewhere)")
    check_model_config(args.model, config.key_rope)
    t0 = time.time()
    docs, label = calibration_docs(args)
    model, tok = load_model(args.model, args.device)
    windows = tokenize_windows(tok, docs, args.seq_len, args.tokens)
    # post-RoPE keys: the captured (pre-RoPE) keys are rotated as the model does before the fit
    rope = None if config.key_rope == "pre" else calibration_rope(model, model_text_config(args.model),
                                                                   kv_shape(model.config)[2], windows.shape[1])
    print(f"[aquakv-calibrate] {args.model}: {windows.numel()} tokens of {label} in {windows.shape[0]} sequences",
          flush=True)
    spill = (tempfile.TemporaryDirectory(prefix="aquakv-capture-", dir=args.spill_dir) if args.spill_dir
             else contextlib.nullcontext())
    queries = QueryEnergy(model, rope) if config.key_channel_scale == "query" else None  # in the keys' frame
    with spill as spill_path:
        ks, vs = capture_kv(model, windows, spill_dir=spill_path, queries=queries)
        del model
        _fit_and_save(args, config, ks, vs, windows, label, out, t0, rope, queries and queries.energy())


def _fit_and_save(args, config, ks, vs, windows, label, out, t0, rope=None, query_energy=None) -> None:
    """Fit on captured K/V (in RAM or memory-mapped), measure, write the artifact."""
    # --fit-without-sinks: tokens that stay 16-bit when served with sinks (the first of each sequence) leave the fit.
    # Off by default: vLLM quantizes every token today, sinks included, and they must be predicted well then.
    fit_mask = ((torch.arange(windows.numel()) % windows.shape[1]) >= config.num_sink_tokens
                if args.fit_without_sinks else None)
    if config.key_rope == "post":  # the model's RoPE is only needed to rotate the captured keys
        ks = KeysInFrame(ks, rope, windows.shape[1], "post")
    cache = AquaKVCache.calibrate(config, ks, vs, progress=True, fit_mask=fit_mask, query_energy=query_energy)
    metrics = cache.calibration_metrics
    path = save_artifact(
        cache, out, {"fingerprint": model_fingerprint(args.model), "path": os.path.abspath(args.model)},
        calibration={"preset": args.preset, "text": label, "tokens": int(windows.numel()), "seq_len": args.seq_len,
                     "fit_without_sinks": bool(args.fit_without_sinks),
                     "seconds": round(time.time() - t0, 1)},
        metrics=metrics)
    bits = cache.bits(4096)
    k_err = sum(m["reconstruction_rel_mse"] for k, m in metrics.items() if k.startswith("k.")) / cache.num_layers
    v_err = sum(m["reconstruction_rel_mse"] for k, m in metrics.items() if k.startswith("v.")) / cache.num_layers
    folder = os.path.dirname(path)
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if os.path.isfile(os.path.join(folder, f)))
    print(f"[aquakv-calibrate] wrote {path} ({size / 2 ** 20:.2f} MiB): "
          f"{bits['bits_per_value']:.3f} bits/value (codes + scales); calibration relMSE keys {k_err:.4f}, values "
          f"{v_err:.4f}; {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
