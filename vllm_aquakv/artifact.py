"""The calibration artifact: ``adapters.safetensors`` + ``manifest.json`` in a folder (default ``MODEL/aquakv/``).

manifest.json (format_version 1)::

    {"format": "vllm-aquakv", "format_version": 1,
     "config": {...AquaKVConfig...},
     "model": {"num_layers", "num_kv_heads", "head_dim", "fingerprint", "architecture", "path"},
     "predictors": {"k.3": {"structure": "dense", "sources": [["k", 2]], ...}, ...},
     "grids": {"d2n16": "<sha256 of the grid tensor>", ...},
     "calibration": {...data, token counts...}, "metrics": {...per-layer relMSE...}, "bits": {...}}

adapters.safetensors holds ``signs`` [head_dim] (Hadamard signs), ``grid.<name>`` for every grid used, and
``predictors.<stream>.<layer>.{bias,weight,u,v}``.  Never a pickle.  ``load_artifact`` verifies everything it can
(format, tensors present with the right shapes, grids equal to the shipped ones, the model's fingerprint) and
raises ``ArtifactError`` with what to do.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re

import torch

from .grids import load_grid
from .predictors import LinearPredictor
from .reference import AquaKVCache, AquaKVConfig

FORMAT = "vllm-aquakv"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "adapters.safetensors"
_KV_WEIGHT = re.compile(r"layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|qkv_proj)\.(weight|bias)$")


class ArtifactError(ValueError):
    """A missing, corrupt or mismatched aquakv artifact; the message says what to do."""


def default_artifact_dir(model_dir: str) -> str:
    """Where calibration writes and serving looks by default: MODEL/aquakv."""
    return os.path.join(model_dir, "aquakv")


def model_fingerprint(model_dir: str) -> str:
    """sha256 over the model's layer/head shape and the bytes of every k_proj/v_proj(/k_norm) tensor, in order (a
    fused qkv_proj's whole tensor where the model has one).

    These weights decide the K/V the artifact was fitted on; reading them is cheap next to the whole model.
    """
    from safetensors import safe_open

    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    h = hashlib.sha256()
    shape = {k: cfg.get(k) for k in ("num_hidden_layers", "num_key_value_heads", "num_attention_heads",
                                     "hidden_size", "head_dim")}
    h.update(json.dumps(shape, sort_keys=True).encode())
    found = []
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                m = _KV_WEIGHT.search(name)
                if m:
                    found.append(((int(m.group(1)), m.group(2), m.group(3)), path, name))
    if not found:
        raise ArtifactError(f"no layers.N.self_attn.k_proj/v_proj (or qkv_proj) weights found in {model_dir}/*.safetensors: "
                            "aquakv needs a Llama-style model stored as safetensors")
    for _, path, name in sorted(found):
        with safe_open(path, framework="pt") as f:
            t = f.get_tensor(name)
        h.update(name.encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _grid_hash(grid: torch.Tensor) -> str:
    return hashlib.sha256(grid.contiguous().numpy().tobytes()).hexdigest()


def save_artifact(cache: AquaKVCache, out_dir: str, model_info: dict, calibration: dict | None = None,
                  metrics: dict | None = None) -> str:
    """Write ``cache`` (config, predictors, signs, grids) to ``out_dir``; returns the manifest path."""
    from safetensors.torch import save_file

    tensors = {"signs": cache.signs.contiguous()}
    grids = sorted({c.grid_name for c in cache.codecs.values() if c is not None})
    for name in grids:
        tensors[f"grid.{name}"] = load_grid(name).contiguous()
    predictors = {}
    for (stream, layer), pred in sorted(cache.predictors.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        key = f"{stream}.{layer}"
        predictors[key] = pred.describe()
        tensors.update(pred.tensors(f"predictors.{key}."))
    for layer, d in cache.key_channel_scales().items():
        tensors[f"key_channel_scale.{layer}"] = d.float().cpu().contiguous()
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": cache.config.to_json(),
        "model": {"num_layers": cache.num_layers, "num_kv_heads": cache.num_kv_heads, "head_dim": cache.head_dim,
                  **model_info},
        "predictors": predictors,
        "shard_granularity": cache.shard_granularity(),  # "head": tensor-parallel ranks serve slices of it
        "grids": {name: _grid_hash(tensors[f"grid.{name}"]) for name in grids},
        "bits": cache.bits(4096),
        "calibration": calibration or {},
        "metrics": metrics or {},
    }
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, TENSORS + ".tmp"), metadata={"format": FORMAT})
    with open(os.path.join(out_dir, MANIFEST + ".tmp"), "w") as f:
        json.dump(manifest, f, indent=1)
    # the manifest goes last and an old one first: a crash in between leaves no manifest, so nothing loads that
    # pairs one run's manifest with another run's tensors
    if os.path.exists(os.path.join(out_dir, MANIFEST)):
        os.remove(os.path.join(out_dir, MANIFEST))
    os.replace(os.path.join(out_dir, TENSORS + ".tmp"), os.path.join(out_dir, TENSORS))
    os.replace(os.path.join(out_dir, MANIFEST + ".tmp"), os.path.join(out_dir, MANIFEST))
    return os.path.join(out_dir, MANIFEST)


def load_artifact(art_dir: str, model_dir: str | None = None) -> tuple[AquaKVCache, dict]:
    """Load and verify an artifact; with ``model_dir``, also check the model fingerprint. Returns (cache, manifest)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out = "" if model_dir and os.path.abspath(art_dir) == os.path.abspath(default_artifact_dir(model_dir)) else \
        f" --out {art_dir}"
    hint = "re-run aquakv-calibrate for this model" + (f" (aquakv-calibrate {model_dir}{out} --overwrite)"
                                                       if model_dir else "")
    man_path, ten_path = os.path.join(art_dir, MANIFEST), os.path.join(art_dir, TENSORS)
    if not os.path.exists(man_path) or not os.path.exists(ten_path):
        raise ArtifactError(f"no aquakv artifact in {art_dir} (need {MANIFEST} and {TENSORS}): {hint}")
    try:
        with open(man_path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{man_path} is not valid JSON ({e}): the artifact is corrupt; {hint}") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{man_path} is not a vllm-aquakv manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{man_path} has format_version {manifest.get('format_version')}, this vllm-aquakv reads "
                            f"{FORMAT_VERSION}: upgrade vllm-aquakv or {hint}")
    try:
        tensors = load_file(ten_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{ten_path} is not a readable safetensors file ({e}): {hint}") from None
    try:
        config = AquaKVConfig.from_json(manifest["config"])
        m = manifest["model"]
        num_layers, num_kv_heads, head_dim = int(m["num_layers"]), int(m["num_kv_heads"]), int(m["head_dim"])
        for name, digest in manifest["grids"].items():
            # the stored grid is intact, and it is the shipped grid; artifacts written before the grids were rounded
            # to fp16 (2026-11-25) hold the float32 grid, which decodes the same codes to within fp16 rounding
            stored = tensors[f"grid.{name}"]
            if _grid_hash(stored) != digest or not torch.equal(stored.half().float(), load_grid(name)):
                raise ArtifactError(f"grid {name} in {art_dir} differs from this vllm-aquakv's grids: {hint}")
        predictors = {}
        for key, desc in manifest["predictors"].items():
            stream, layer = key.split(".")
            pred = LinearPredictor.load(desc, tensors, f"predictors.{key}.")
            predictors[stream, int(layer)] = pred
        scales = {}
        if config.key_channel_scale != "none":  # one [H, h] per quantized key layer
            for layer in range(num_layers):
                if config.grid("k", layer) != "16bit":
                    scales[layer] = tensors[f"key_channel_scale.{layer}"]
        cache = AquaKVCache(config, num_layers, num_kv_heads, head_dim, predictors, tensors["signs"], scales)
    except ArtifactError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{art_dir} is incomplete or inconsistent ({type(e).__name__}: {e}): {hint}") from None
    _check_predictor_shapes(cache, art_dir, hint)
    if model_dir is not None:
        want = manifest["model"].get("fingerprint")
        got = model_fingerprint(model_dir)
        if want != got:
            raise ArtifactError(f"the artifact in {art_dir} was fitted on another model (fingerprint {str(want)[:12]}, "
                                f"this model {got[:12]}): {hint}")
    return cache, manifest


def _check_predictor_shapes(cache: AquaKVCache, art_dir: str, hint: str) -> None:
    """Run every predictor once on random inputs of the right shape: a wrong tensor shape fails here, not in serving."""
    probe = torch.randn(2, cache.num_kv_heads, cache.head_dim)
    for (stream, layer), pred in cache.predictors.items():
        try:
            out = pred.predict([probe] * len(pred.sources), probe)
        except (RuntimeError, AttributeError, TypeError) as e:
            raise ArtifactError(f"predictor {stream}.{layer} in {art_dir} does not fit the model shape ({e}): {hint}") from None
        if out.shape != probe.shape or not torch.isfinite(out).all():
            raise ArtifactError(f"predictor {stream}.{layer} in {art_dir} gives bad output: {hint}")
