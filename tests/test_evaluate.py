"""aquakv-eval's simulated cache: exact limits (window covering everything = unquantized; no sinks/window = the
transformers reference hooks = what vLLM serves) and the KIVI baseline against a float64 reimplementation."""

import json
import os

import pytest
import torch
from conftest import query_energy

from vllm_aquakv.calibration.evaluate import MixedCache, copy_prompts, kivi_quantize, perplexity
from vllm_aquakv.calibration.hf_cache import ReconstructedKV
from vllm_aquakv.calibration.models import make_tiny_llama
from vllm_aquakv.reference import AquaKVCache, AquaKVConfig
from vllm_aquakv.rope import Rope


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = make_tiny_llama(str(tmp_path_factory.mktemp("tiny")), num_layers=3, kv_heads=2, head_dim=32)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, model


@pytest.mark.parametrize("key_rope", ["pre", "post"])
def test_mixed_cache_limits(tiny, rng, key_rope):
    path, model = tiny
    cache = AquaKVCache(AquaKVConfig(key_predictor="none", value_predictor="none", key_rope=key_rope), 3, 2, 32)
    rope = Rope(json.load(open(os.path.join(path, "config.json"))), 32)
    windows = torch.randint(0, 512, (2, 64), generator=rng)
    recon = lambda s, l, x, r: cache.encode_stream(s, l, x, r)[1]  # noqa: E731
    plain = perplexity(model, windows)
    everything_exact = perplexity(model, windows, MixedCache(model, recon, 2, 32, sinks=0, window=64, rope=rope,
                                                                 key_rope=key_rope))
    assert everything_exact == pytest.approx(plain, rel=1e-5)
    all_codes = perplexity(model, windows, MixedCache(model, recon, 2, 32, sinks=0, window=0, rope=rope,
                                                      key_rope=key_rope))
    hooks = perplexity(model, windows, ReconstructedKV(model, cache, rope))
    assert all_codes == pytest.approx(hooks, rel=1e-4)
    assert abs(all_codes / plain - 1) > 1e-6  # quantization is really in the loop (a random model barely cares)
    partial = perplexity(model, windows, MixedCache(model, recon, 2, 32, sinks=4, window=16, rope=rope,
                                                    key_rope=key_rope))
    assert partial != pytest.approx(all_codes, rel=1e-6) and partial != pytest.approx(plain, rel=1e-6)


def test_kivi_matches_float64(rng):
    x = torch.randn(256, 2, 64, generator=rng) * 3
    for stream in "kv":
        got = kivi_quantize(x, stream)
        xd = x.double()
        g = xd.reshape(2, 128, 2, 64) if stream == "k" else xd
        dim = 1 if stream == "k" else -1
        lo = g.amin(dim, keepdim=True).half().double()
        hi = g.amax(dim, keepdim=True).half().double()
        scale = (hi - lo) / 3
        u = (g - lo) / scale  # each value's position on the 4-level grid
        level = lambda n: (n.clamp(0, 3) * scale + lo).reshape(x.shape)  # noqa: E731
        close = lambda want: (got.double() - want).abs() <= 1e-4  # noqa: E731
        # a position within 1e-4 of a half step may round either way in float32 (15 of 3,000 seeds did)
        tie = ((u - u.floor() - 0.5).abs() < 1e-4).reshape(x.shape)
        ok = close(level(u.round())) | (tie & (close(level(u.floor())) | close(level(u.ceil()))))
        assert ok.all() and tie.float().mean() < 0.01, (~ok).sum()
        assert len(torch.unique(got[:, 0, 0] if stream == "k" else got[0, 0])) <= 4 * (2 if stream == "k" else 1)


def test_copy_prompts_repeat_their_passage(rng):
    hay = torch.randint(0, 1000, (5000,), generator=rng).tolist()
    for ids in copy_prompts(hay, 512, 3, seed=int(torch.randint(0, 1000, (), generator=rng))):
        assert len(ids) == 512 and ids[:64] == ids[-64:]
    with pytest.raises(ValueError, match="too few"):
        copy_prompts(hay, 2048, 1)


def test_aquakv_eval_end_to_end(tiny, tmp_path):
    """The CLI on a tiny calibrated model: perplexity rows for every cache and copy-retrieval accuracy in [0, 1] for
    the unquantized, serving and paper rows (a random model does not copy: plumbing, not quality)."""
    import subprocess
    import sys

    from vllm_aquakv.calibration.evaluate import main

    path, _ = tiny
    subprocess.run([sys.executable, "-m", "vllm_aquakv.calibration.calibrate", path, "--tokens", "1024", "--seq-len",
                    "128", "--overwrite"], check=True)
    out = tmp_path / "eval.json"
    main([path, "--windows", "1", "--ctx", "128", "--retrieval-ctx", "256", "--retrieval-trials", "2", "--json",
          str(out)])
    rows = json.load(open(out))["rows"]
    copied = {(r["kv_cache_dtype"], r["semantics"].split(" (")[0]): r["copy_accuracy"] for r in rows
              if "copy_accuracy" in r}
    assert set(copied) == {("auto (fp32)", "-"), ("aquakv", "serving"), ("aquakv", "paper"),
                           ("higgs-no-predictor", "serving"), ("kivi-2bit", "serving"),
                           ("int4_per_token_head", "serving"), ("turboquant_k3v4_nc", "serving"),
                           ("turboquant_3bit_nc", "serving")}
    assert all(0.0 <= a <= 1.0 for a in copied.values())
    assert all(r["ppl"] > 1 for r in rows)


@pytest.mark.parametrize("key_channel_scale", ["none", "query"])
def test_int8_scores_emulation_is_the_kernels(rng, key_channel_scale):
    """aquakv-eval --int8-scores rounds each query as the fused kernel does (its lane-order rotation of q / D with the
    key channel scale D, units of max |q A| / 127: float64 reference here) and scores codes with the rounded query and
    the key mean with the exact one; pre-RoPE artifacts (not served by the kernel) are refused."""
    from vllm_aquakv.calibration.evaluate import Int8Scores
    from vllm_aquakv.kernels.attention import fused_layer_or_reason
    from vllm_aquakv.serving import TorchServingPath

    h, heads = 64, 2
    config = AquaKVConfig(key_rope="post", key_predictor="mean", value_predictor="none", value_topology="none",
                          key_grid="u1n4", value_grid="u1n4", layer0_grid="u1n4", key_channel_scale=key_channel_scale)
    k = torch.randn(200, heads, h, generator=rng) + 3 * torch.randn(heads, h, generator=rng)
    v = torch.randn(200, heads, h, generator=rng)
    cache = AquaKVCache.calibrate(config, [k, k], [v, v], query_energy=query_energy(2, heads, h, rng))
    emulation = Int8Scores(cache)
    fused = fused_layer_or_reason(cache, TorchServingPath(cache, None).layouts[1], 1)
    q = torch.randn(1, 3 * heads, 5, h, generator=rng)  # [1, Hq, T, h], as MixedCache hands queries over
    rot = fused.rot_k.double()  # the kernel's rotation, columns in lane order
    d = 1.0 if fused.k_dinv is None else 1 / fused.k_dinv.double().repeat_interleave(3, 0)[None, :, None, :]
    q_rot = (q.double() / d) @ rot
    unit = q_rot.abs().amax(-1, keepdim=True) / 127
    got = emulation.rounded(1, q)
    # in the codes' frame, in units of each row's step: the integers the kernel scores with. float32 against float64:
    # a value within 1e-4 of a half may round the other way, by one unit (seen once in CI: -60.4999998 -> -61); a
    # missing D or a wrong unit puts every lane off its integer
    x = q_rot / unit
    off = (((got.double() / d) @ rot) / unit - x.round()).abs()
    near_half = ((x.abs() % 1) - 0.5).abs() < 1e-4
    assert ((off < 1e-3) | (near_half & ((off - 1).abs() < 1e-3))).all(), off.max()
    assert not torch.allclose(got, q, atol=1e-3)  # the rounding is really there
    assert torch.equal(emulation.key_bias(1, k.transpose(0, 1)[None])[0, :, 0], cache.predictors["k", 1].bias.float())
    pre = AquaKVCache.calibrate(AquaKVConfig(**{**config.to_json(), "key_rope": "pre"}), [k, k], [v, v],
                                query_energy=query_energy(2, heads, h, rng))
    with pytest.raises(ValueError, match="post-RoPE"):
        Int8Scores(pre)
