"""Artifact round trip and refusals: corrupt JSON, truncated tensors, wrong model, newer format."""

import json
import os
import shutil

import pytest
import torch

from conftest import edit_config, query_energy
from vllm_aquakv.artifact import ArtifactError, load_artifact, model_fingerprint, save_artifact
from vllm_aquakv.calibration.models import make_tiny_llama
from vllm_aquakv.reference import AquaKVCache, AquaKVConfig


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny")), num_layers=3, kv_heads=2, head_dim=32)


def calibrated(rng, config=AquaKVConfig()):
    ks = [torch.randn(200, 2, 32, generator=rng) + i for i in range(3)]
    vs = [torch.randn(200, 2, 32, generator=rng) for _ in range(3)]
    return AquaKVCache.calibrate(config, ks, vs, query_energy=query_energy(3, 2, 32, rng)), ks, vs


@pytest.mark.parametrize("config", [AquaKVConfig(), AquaKVConfig(key_predictor="lowrank:4", value_predictor="per_head",
                                                                  layer0_grid="16bit", key_topology="anchor:2"),
                                    AquaKVConfig(key_channel_scale="query", layer0_grid="16bit"),
                                    AquaKVConfig(key_channel_scale="query", key_rope="post", key_predictor="mean")])
def test_roundtrip_decodes_identically(tiny_model, tmp_path, rng, config):
    cache, ks, vs = calibrated(rng, config)
    save_artifact(cache, str(tmp_path / "aquakv"), {"fingerprint": model_fingerprint(tiny_model)})
    loaded, manifest = load_artifact(str(tmp_path / "aquakv"), tiny_model)
    assert manifest["config"] == config.to_json()
    assert set(loaded.key_channel_scales()) == set(cache.key_channel_scales())
    assert bool(cache.key_channel_scales()) == (config.key_channel_scale == "query")
    a, b = cache.reconstruct(ks, vs), loaded.reconstruct(ks, vs)
    assert all(torch.equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))


def test_key_channel_scale_refusals(tiny_model, tmp_path, rng):
    """An artifact whose manifest asks for key channel scales but whose tensors lack one, or hold a non-positive one or
    one that is not a power of two (the kernels' exact 16-bit q / D), is refused at load with the re-calibration hint
    (no crash later in serving)."""
    from safetensors.torch import load_file, save_file

    cache, _, _ = calibrated(rng, AquaKVConfig(key_channel_scale="query"))
    art = str(tmp_path / "aquakv")
    save_artifact(cache, art, {"fingerprint": model_fingerprint(tiny_model)})
    path = os.path.join(art, "adapters.safetensors")
    tensors = load_file(path)
    layer = int(torch.randint(0, 3, (1,), generator=rng))
    for broken in ({k: v for k, v in tensors.items() if k != f"key_channel_scale.{layer}"},
                   {**tensors, f"key_channel_scale.{layer}": -tensors[f"key_channel_scale.{layer}"]},
                   {**tensors, f"key_channel_scale.{layer}": 1.5 * tensors[f"key_channel_scale.{layer}"]}):
        save_file(broken, path, metadata={"format": "vllm-aquakv"})
        with pytest.raises(ArtifactError, match="re-run aquakv-calibrate"):
            load_artifact(art, tiny_model)


def test_refusals(tiny_model, tmp_path, rng):
    cache, _, _ = calibrated(rng)
    art = str(tmp_path / "aquakv")
    save_artifact(cache, art, {"fingerprint": model_fingerprint(tiny_model)})
    with pytest.raises(ArtifactError, match="no aquakv artifact"):
        load_artifact(str(tmp_path / "missing"))
    # another model (same shape, other weights)
    other = make_tiny_llama(str(tmp_path / "other"), num_layers=3, kv_heads=2, head_dim=32, seed=1)
    with pytest.raises(ArtifactError, match="fitted on another model"):
        load_artifact(art, other)
    # corrupt manifest
    bad = str(tmp_path / "bad")
    shutil.copytree(art, bad)
    with open(os.path.join(bad, "manifest.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(bad)
    # truncated tensors
    shutil.rmtree(bad)
    shutil.copytree(art, bad)
    path = os.path.join(bad, "adapters.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="safetensors"):
        load_artifact(bad)
    # newer format, and a predictor of the wrong shape
    shutil.rmtree(bad)
    shutil.copytree(art, bad)
    man = json.load(open(os.path.join(bad, "manifest.json")))
    json.dump({**man, "format_version": 99}, open(os.path.join(bad, "manifest.json"), "w"))
    with pytest.raises(ArtifactError, match="format_version"):
        load_artifact(bad)
    json.dump({**man, "model": {**man["model"], "num_kv_heads": 4}}, open(os.path.join(bad, "manifest.json"), "w"))
    with pytest.raises(ArtifactError):
        load_artifact(bad)
    # grids: an artifact from before the fp16 rounding (float32 grid within fp16 rounding, its own digest) loads; a
    # different grid, or a digest that does not match the stored grid, is refused
    from safetensors.torch import load_file, save_file

    from vllm_aquakv.artifact import _grid_hash

    name = next(iter(man["grids"]))
    grid = load_file(os.path.join(art, "adapters.safetensors"))[f"grid.{name}"]
    for stored, digest_of, ok in ((grid * (1 + 1e-5), "stored", True), (grid * 1.01, "stored", False),
                                  (grid * (1 + 1e-5), "shipped", False)):
        shutil.rmtree(bad)
        shutil.copytree(art, bad)
        tensors = {**load_file(os.path.join(bad, "adapters.safetensors")), f"grid.{name}": stored.contiguous()}
        save_file(tensors, os.path.join(bad, "adapters.safetensors"))
        digest = _grid_hash(stored if digest_of == "stored" else grid)
        json.dump({**man, "grids": {**man["grids"], name: digest}}, open(os.path.join(bad, "manifest.json"), "w"))
        if ok:
            load_artifact(bad)
        else:
            with pytest.raises(ArtifactError, match="differs from this vllm-aquakv's grids"):
                load_artifact(bad)


def test_calibrate_cli_post_rope_and_overwrite(tmp_path, rng):
    """aquakv-calibrate end to end on a tiny model in the fused-kernel mode: the artifact loads with post-RoPE keys;
    a second run refuses to replace it without --overwrite and replaces it with."""
    from vllm_aquakv.calibration.calibrate import main

    model = make_tiny_llama(str(tmp_path / "m"), num_layers=2, kv_heads=2, head_dim=32)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 400, (3000,), generator=rng)))
    args = [model, "--text-file", str(text), "--tokens", "512", "--seq-len", "128", "--key-rope", "post",
            "--key-predictor", "none", "--value-predictor", "per_head", "--value-topology", "k_same"]
    main(args)
    cache, manifest = load_artifact(os.path.join(model, "aquakv"), model)
    assert cache.config.key_rope == "post" and manifest["calibration"]["tokens"] == 512
    assert cache.predictors["v", 1].sources == (("k", 1),)
    with pytest.raises(SystemExit, match="--overwrite"):
        main(args)
    main(args + ["--overwrite", "--seed", "5"])
    assert load_artifact(os.path.join(model, "aquakv"), model)[0].config.seed == 5


def test_calibrate_speed_preset_for_any_rope_type(tmp_path, rng):
    """A model whose RoPE pre-RoPE artifacts cannot serve (YaRN) calibrates with --preset speed (post-RoPE keys,
    rotated by the model's own rotary embedding); the key mean is then the mean of the model's post-RoPE keys, which
    YaRN's attention scaling (~1.14 at factor 4) multiplies; the paper's preset is still refused, naming the fix."""
    from transformers import AutoModelForCausalLM

    from vllm_aquakv.calibration.calibrate import main
    from vllm_aquakv.calibration.capture import tokenize_windows

    model = make_tiny_llama(str(tmp_path / "m"), num_layers=2, kv_heads=2, head_dim=32)
    edit_config(model, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                         "original_max_position_embeddings": 8192})
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 400, (3000,), generator=rng)))
    args = [model, "--text-file", str(text), "--tokens", "512", "--seq-len", "128"]
    with pytest.raises(SystemExit, match="--preset speed"):
        main(args)
    main(args + ["--preset", "speed"])
    cache, _ = load_artifact(os.path.join(model, "aquakv"), model)
    assert cache.config.key_rope == "post"
    # independent of aquakv's rope code: the post-RoPE keys transformers itself attends with, captured from its
    # apply_rotary_pos_emb (the same 4 x 128 calibration windows)
    from transformers import AutoTokenizer
    from transformers.models.llama import modeling_llama

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    windows = tokenize_windows(AutoTokenizer.from_pretrained(model), [text.read_text()], 128, 512)
    seen, rotate = [], modeling_llama.apply_rotary_pos_emb

    def record(q, k, cos, sin, *a, **kw):
        out = rotate(q, k, cos, sin, *a, **kw)
        seen.append(out[1][0].transpose(0, 1).reshape(-1, 2, 32))  # [T, H, h]
        return out

    modeling_llama.apply_rotary_pos_emb = record
    try:
        with torch.no_grad():
            for w in windows:
                hf(w[None])
    finally:
        modeling_llama.apply_rotary_pos_emb = rotate
    layer1 = torch.cat(seen[1::2])  # [tokens, H, h] of layer 1
    mean = cache.predictors["k", 1].bias.reshape(2, 32)  # the key mean predictor's intercept
    assert torch.allclose(mean, layer1.mean(0), atol=1e-4), (mean - layer1.mean(0)).abs().max()  # means ~0.4


def test_fused_qkv_model_captures_the_keys_and_values_it_attends_with(tmp_path, rng):
    """A Phi-3-style model (one qkv_proj per layer): the capture's slices of the fused projection are the K/V that
    transformers' own attention receives (recorded by an attention function: keys post-RoPE, so ours go through
    Rope first); aquakv-calibrate fits it, and the reference cache's replacement K/V flow back through the fused
    output (the logits change)."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from vllm_aquakv.calibration.calibrate import main, model_text_config
    from vllm_aquakv.calibration.capture import KVCapture
    from vllm_aquakv.calibration.hf_cache import ReconstructedKV
    from vllm_aquakv.rope import Rope

    model_dir = make_tiny_llama(str(tmp_path / "m"), num_layers=2, hidden=128, heads=4, kv_heads=2, arch="phi3")
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seen = []

    def record(module, query, key, value, *args, **kwargs):
        seen.append((key[0].transpose(0, 1), value[0].transpose(0, 1)))  # [T, H, h] each
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register("aquakv_test_record", record)
    hf.set_attn_implementation("aquakv_test_record")
    ids = torch.randint(0, 500, (1, 40), generator=rng)
    with torch.no_grad(), KVCapture(hf) as cap:
        plain = hf(ids).logits
    hf.set_attn_implementation("sdpa")
    rope = Rope(model_text_config(model_dir), 32)
    for layer, (key, value) in enumerate(seen):
        assert torch.allclose(rope.apply(cap.keys[layer][0], torch.arange(40)), key, atol=1e-5)
        assert torch.allclose(cap.values[layer][0], value, atol=1e-6)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 400, (3000,), generator=rng)))
    main([model_dir, "--text-file", str(text), "--tokens", "512", "--seq-len", "128"])
    cache, _ = load_artifact(os.path.join(model_dir, "aquakv"), model_dir)
    with torch.no_grad(), ReconstructedKV(hf, cache):
        coded = hf(ids).logits
    assert torch.isfinite(coded).all() and not torch.allclose(coded, plain, atol=1e-4)


def _nan_keys(model_dir: str) -> None:
    from safetensors.torch import load_file, save_file

    path = os.path.join(model_dir, "model.safetensors")
    tensors = load_file(path)
    name = next(n for n in tensors if n.endswith("layers.1.self_attn.k_proj.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("case, match", [
    ("sliding window", "sliding-window attention"),
    ("sliding layer types", "sliding-window attention"),
    ("MLA", "latent attention"),
    ("head_dim 48", "power of two"),
    ("yarn rope", "rope types"),
    ("no config", "no config.json"),
    ("empty text", "is empty"),
    ("short text", "text too short"),
    ("NaN weights", "NaN/inf keys in layer 1"),
    ("unknown predictor", "predictor"),
])
def test_calibrate_refuses_bad_input_with_one_message(case, match, tmp_path, rng):
    """Each model or input aquakv-calibrate cannot handle ends in one `aquakv-calibrate: ...` message that says what
    is wrong, and leaves no artifact behind (nothing a loader could accept)."""
    from vllm_aquakv.calibration.calibrate import main

    model = make_tiny_llama(str(tmp_path / "m"), num_layers=2, kv_heads=2, head_dim=48 if case == "head_dim 48" else 32)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 400, (3000,), generator=rng)))
    args = [model, "--text-file", str(text), "--tokens", "512", "--seq-len", "128"]
    if case == "sliding window":
        edit_config(model, sliding_window=64, use_sliding_window=True)
    elif case == "sliding layer types":
        edit_config(model, layer_types=["sliding_attention", "full_attention"], sliding_window=64)
    elif case == "MLA":
        edit_config(model, kv_lora_rank=64, q_lora_rank=128)
    elif case == "yarn rope":
        edit_config(model, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    elif case == "no config":
        os.remove(os.path.join(model, "config.json"))
    elif case == "empty text":
        text.write_text(" \n\n")
    elif case == "short text":
        text.write_text("only a few words")
    elif case == "NaN weights":
        _nan_keys(model)
    elif case == "unknown predictor":
        args += ["--key-predictor", "quadratic"]
    with pytest.raises(SystemExit, match=match) as err:
        main(args)
    assert str(err.value).startswith("aquakv-calibrate: ")
    assert not os.path.exists(os.path.join(model, "aquakv"))


def test_calibrate_presets(tmp_path, rng):
    """--preset speed sets the fused kernels' mode, --preset quality (the default) the paper's; an explicit option
    overrides its preset; the manifest records the preset."""
    from vllm_aquakv.calibration.calibrate import main, parse_args

    model = make_tiny_llama(str(tmp_path / "m"), num_layers=2, kv_heads=2, head_dim=32)
    quality = parse_args([model])
    assert (quality.key_rope, quality.key_predictor, quality.layer0, quality.key_channel_scale) == (
        "pre", "dense", "d2n256", "none")
    speed = parse_args([model, "--preset", "speed", "--layer0", "16bit"])
    assert (speed.key_rope, speed.key_predictor, speed.value_predictor, speed.layer0) == ("post", "mean", "none",
                                                                                          "16bit")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 400, (3000,), generator=rng)))
    main([model, "--preset", "speed", "--text-file", str(text), "--tokens", "512", "--seq-len", "128"])
    cache, manifest = load_artifact(os.path.join(model, "aquakv"), model)
    assert manifest["calibration"]["preset"] == "speed"
    assert cache.config.key_rope == "post" and cache.config.layer0_grid == "u1n4"
    assert cache.codecs["k", 1].grid_name == cache.codecs["v", 1].grid_name == "u1n4"
    assert cache.predictors["v", 1].structure == "none" and cache.predictors["k", 1].structure == "mean"
    assert cache.config.key_channel_scale == "none" and not cache.key_channel_scales()
    scaled = parse_args([model, "--preset", "speed", "--key-channel-scale", "query"])
    assert scaled.key_channel_scale == "query" and scaled.key_rope == "post"
