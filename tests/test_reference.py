"""Reference semantics of the AQUA-KV cache: sinks/window, chain consistency, predictors, bit accounting."""

import pytest
import torch

from vllm_aquakv.codec import HiggsCodec, rel_mse
from vllm_aquakv.grids import grid_info
from vllm_aquakv.predictors import LinearPredictor, RidgeStats
from vllm_aquakv.reference import AquaKVCache, AquaKVConfig

L, H, D = 4, 2, 32


def correlated_kv(rng, T=400):
    """Synthetic K/V with the structure AQUA-KV exploits: per-channel offsets, K_l ~ K_{l-1}, V_l ~ K_l."""
    ks, vs = [], []
    k = torch.randn(T, H * D, generator=rng) * 2 + torch.randn(H * D, generator=rng) * 5
    v_prev = torch.randn(T, H * D, generator=rng)
    for _ in range(L):
        a = torch.eye(H * D) + 0.3 * torch.randn(H * D, H * D, generator=rng) / D**0.5
        k = k @ a + 0.3 * torch.randn(T, H * D, generator=rng)
        b = 0.5 * torch.randn(2 * H * D, H * D, generator=rng) / D**0.5
        v = torch.cat([k, v_prev], 1) @ b + 0.3 * torch.randn(T, H * D, generator=rng)
        ks.append(k.reshape(T, H, D))
        vs.append(v.reshape(T, H, D))
        v_prev = v
    return ks, vs


def test_sinks_and_window_are_exact_16bit(rng):
    ks, vs = correlated_kv(rng, T=200)
    cfg = AquaKVConfig(num_sink_tokens=4, window=16)
    cache = AquaKVCache.calibrate(cfg, ks, vs)
    k_hat, v_hat = cache.reconstruct(ks, vs)
    exact = torch.cat([torch.arange(4), torch.arange(184, 200)])
    middle = torch.arange(4, 184)
    for x, x_hat in zip(ks + vs, k_hat + v_hat):
        assert torch.equal(x_hat[exact], x[exact].to(torch.bfloat16).float())
        assert not torch.allclose(x_hat[middle], x[middle], atol=1e-3)  # really quantized


def test_short_sequence_is_all_exact(rng):
    ks, vs = correlated_kv(rng, T=10)
    cache = AquaKVCache(AquaKVConfig(num_sink_tokens=4, window=8), L, H, D)
    k_hat, _ = cache.reconstruct(ks, vs)
    assert all(torch.equal(a, b.to(torch.bfloat16).float()) for a, b in zip(k_hat, ks))


def test_decoder_sees_what_encoder_saw(rng):
    """The chain uses reconstructions: decoding from stored codes alone reproduces the encoder's prediction inputs."""
    ks, vs = correlated_kv(rng)
    cfg = AquaKVConfig(num_sink_tokens=0, window=0)
    cache = AquaKVCache.calibrate(cfg, ks, vs)
    state = cache.encode(ks, vs)
    recon = cache.decode_codes(state)
    # Re-derive every layer's residual codes from the decoded reconstructions: they must match the stored ones.
    for (stream, layer), enc in state.codes.items():
        x = (ks if stream == "k" else vs)[layer]
        pred = cache.predictors[stream, layer].predict([recon[s] for s in cache.predictors[stream, layer].sources], x)
        again = cache.codecs[stream, layer].encode(x - pred)
        assert torch.equal(again.codes, enc.codes) and torch.equal(again.scales, enc.scales)


def test_error_is_quantizer_error_of_the_residual(rng):
    ks, vs = correlated_kv(rng)
    cfg = AquaKVConfig(num_sink_tokens=0, window=0, layer0_grid="d2n16")
    cache = AquaKVCache.calibrate(cfg, ks, vs)
    state = cache.encode(ks, vs)
    recon = cache.decode_codes(state)
    grid_mse = grid_info("d2n16")["design_mse"]
    for (stream, layer), pred_obj in cache.predictors.items():
        x = (ks if stream == "k" else vs)[layer]
        residual = x - pred_obj.predict([recon[s] for s in pred_obj.sources], x)
        err = ((x - recon[stream, layer]) ** 2).sum() / (residual**2).sum()
        assert err < 1.25 * grid_mse, (stream, layer, float(err))


def test_predictors_beat_plain_higgs(rng):
    ks, vs = correlated_kv(rng)
    errs = {}
    for name, kp, vp in [("none", "none", "none"), ("mean", "mean", "mean"), ("per_head", "per_head", "per_head"),
                         ("lowrank", "lowrank:8", "lowrank:8"), ("dense", "dense", "dense")]:
        cfg = AquaKVConfig(num_sink_tokens=0, window=0, key_predictor=kp, value_predictor=vp)
        k_hat, v_hat = AquaKVCache.calibrate(cfg, ks, vs).reconstruct(ks, vs)
        errs[name] = sum(rel_mse(torch.stack(a[1:]), torch.stack(b[1:])) for a, b in ((ks, k_hat), (vs, v_hat)))
    assert errs["dense"] < errs["per_head"] < errs["mean"] < errs["none"], errs
    assert errs["dense"] < errs["lowrank"] < errs["mean"], errs


def test_no_predictor_reduces_to_higgs(rng):
    ks, vs = correlated_kv(rng, T=50)
    cfg = AquaKVConfig(num_sink_tokens=0, window=0, key_predictor="none", value_predictor="none", layer0_grid="d2n16")
    k_hat, v_hat = AquaKVCache.calibrate(cfg, ks, vs).reconstruct(ks, vs)
    codec = HiggsCodec(H, D, "d2n16")
    for x, x_hat in zip(ks + vs, k_hat + v_hat):
        assert torch.equal(x_hat, codec.quantize(x))


def test_16bit_layer0(rng):
    ks, vs = correlated_kv(rng, T=64)
    cache = AquaKVCache.calibrate(AquaKVConfig(layer0_grid="16bit", num_sink_tokens=0, window=0), ks, vs)
    k_hat, v_hat = cache.reconstruct(ks, vs)
    assert torch.equal(k_hat[0], ks[0].to(torch.bfloat16).float())
    assert not torch.equal(k_hat[1], ks[1].to(torch.bfloat16).float())


def test_topologies():
    cfg = AquaKVConfig(key_topology="anchor:4", value_topology="k_same")
    assert cfg.sources("k", 0) == () and cfg.sources("k", 4) == () and cfg.sources("k", 6) == (("k", 4),)
    assert cfg.sources("v", 5) == (("k", 5),)
    paper = AquaKVConfig()
    assert paper.sources("k", 3) == (("k", 2),) and paper.sources("v", 3) == (("k", 3), ("v", 2))
    with pytest.raises(ValueError):
        AquaKVConfig(key_topology="anchor:1")
    with pytest.raises(ValueError):
        AquaKVConfig(value_predictor="dense2")


def test_ridge_fit_matches_float64_least_squares(rng):
    x = [torch.randn(500, H, D, generator=rng, dtype=torch.float64) + 3]
    w_true = torch.randn(H * D, H * D, generator=rng, dtype=torch.float64)
    y = (x[0].reshape(500, -1) @ w_true + 1.5).reshape(500, H, D) + 0.01 * torch.randn(500, H, D, generator=rng)
    stats = RidgeStats(per_head=False)
    stats.update([x[0][:200]], y[:200])  # streamed in two parts
    stats.update([x[0][200:]], y[200:])
    pred = LinearPredictor.fit("dense", (("k", 0),), stats, ridge=0.0, shape=(H, D))
    xa = torch.cat([x[0].reshape(500, -1), torch.ones(500, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(xa, y.reshape(500, -1)).solution
    assert torch.allclose(pred.weight.double(), sol[:-1], atol=1e-3)
    assert torch.allclose(pred.bias.double().flatten(), sol[-1], atol=1e-3)


def test_per_head_and_full_rank_match_dense_on_block_diagonal_data(rng):
    x = torch.randn(600, H, D, generator=rng)
    w = torch.randn(H, D, D, generator=rng)
    y = torch.einsum("thd,hde->the", x, w) + 0.01 * torch.randn(600, H, D, generator=rng)
    preds = {}
    for structure in ("dense", "per_head", f"lowrank:{H * D}"):
        stats = RidgeStats(per_head=structure == "per_head")
        stats.update([x], y)
        preds[structure] = LinearPredictor.fit(structure, (("k", 0),), stats, 1e-6, (H, D)).predict([x], y)
    assert torch.allclose(preds["per_head"], preds["dense"], atol=0.05)
    assert torch.allclose(preds[f"lowrank:{H * D}"], preds["dense"], atol=1e-3)
    assert rel_mse(y, preds["per_head"]) < 1e-3


def test_bits_accounting_by_hand():
    # SmolLM2 shape: 30 layers, 3 KV heads, head_dim 64; 2-bit 2-D grids + fp16 scale per head, layer 0 at 4 bits
    cache = AquaKVCache(AquaKVConfig(num_sink_tokens=4, window=128), 30, 3, 64)
    b = cache.bits(1024)
    assert b["key_bits"] == b["value_bits"] == 2.25 and b["layer0_bits"] == 4.25
    assert b["bits_per_value"] == pytest.approx((29 * 2.25 + 4.25) / 30)
    assert b["exact_tokens"] == 132
    per_stream = [(16 * 132 + r * (1024 - 132)) / 1024 for r in [4.25] + [2.25] * 29]
    assert b["bits_total"] == pytest.approx(sum(per_stream) / 30)
    assert cache.bits(100)["bits_total"] == 16.0  # everything still in the window


def test_fit_mask_excludes_outlier_tokens(rng):
    ks, vs = correlated_kv(rng, T=300)
    spiked = [k.clone() for k in ks]
    for k in spiked:
        k[::50] *= 100  # "sink" tokens with outsized keys, one per 50-token sequence
    mask = torch.arange(300) % 50 != 0
    cfg = AquaKVConfig(num_sink_tokens=0, window=0, key_predictor="mean", value_predictor="mean")
    masked = AquaKVCache.calibrate(cfg, spiked, vs, fit_mask=mask)
    biased = AquaKVCache.calibrate(cfg, spiked, vs)
    for l in range(L):
        want = ks[l][mask].mean(0)
        assert torch.allclose(masked.predictors["k", l].bias, want, atol=1e-4)
        assert not torch.allclose(biased.predictors["k", l].bias, want, atol=1e-1)


def test_calibrate_on_memory_mapped_capture_equals_in_ram(tmp_path, rng):
    """--spill-dir path: capture to memory-mapped files gives the same K/V and the same fit as in RAM."""
    from transformers import AutoModelForCausalLM

    from vllm_aquakv.calibration.capture import capture_kv
    from vllm_aquakv.calibration.models import make_tiny_llama

    path = make_tiny_llama(str(tmp_path / "m"), num_layers=3, kv_heads=2, head_dim=32)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    windows = torch.randint(0, 500, (3, 40), generator=rng)
    ks, vs = capture_kv(model, windows, progress=False)
    ks2, vs2 = capture_kv(model, windows, progress=False, spill_dir=str(tmp_path / "spill"))
    assert all(torch.equal(a, b) for a, b in zip(ks + vs, ks2 + vs2)) and ks[0].shape == (120, 2, 32)
    a, b = AquaKVCache.calibrate(AquaKVConfig(), ks, vs), AquaKVCache.calibrate(AquaKVConfig(), ks2, vs2)
    assert all(torch.equal(a.predictors[k].bias, b.predictors[k].bias) for k in a.predictors)
    assert set(a.calibration_metrics) == {f"{s}.{l}" for s in "kv" for l in range(3)}


def test_head_local_artifact_shards_by_head(rng):
    """Tensor parallelism: a cache whose predictors read only their own KV head, cut to one head, encodes and decodes
    that head exactly as the whole cache does; a dense predictor (mixes heads) refuses to be cut."""
    ks, vs = correlated_kv(rng)
    cfg = AquaKVConfig(num_sink_tokens=0, window=0, key_predictor="per_head", value_predictor="per_head",
                       group_size=D)
    cache = AquaKVCache.calibrate(cfg, ks, vs)
    assert cache.shard_granularity() == "head"
    whole_k, whole_v = cache.decode(cache.encode(ks, vs))
    for head in range(H):
        part = cache.shard(head, 1)
        assert part.num_kv_heads == 1
        k1, v1 = part.decode(part.encode([k[:, head:head + 1] for k in ks], [v[:, head:head + 1] for v in vs]))
        for layer in range(L):
            assert torch.equal(k1[layer], whole_k[layer][:, head:head + 1])
            assert torch.equal(v1[layer], whole_v[layer][:, head:head + 1])
    dense = AquaKVCache.calibrate(AquaKVConfig(num_sink_tokens=0, window=0), ks, vs)
    assert dense.shard_granularity() is None
    with pytest.raises(ValueError, match="mix KV heads"):
        dense.shard(0, 1)


def test_non_finite_fit_is_refused(rng):
    """A NaN/inf in the calibration K/V ends the fit with a message naming the stream and layer."""
    from vllm_aquakv.reference import NonFiniteFit

    ks = [torch.randn(64, 2, 32, generator=rng) for _ in range(3)]
    vs = [torch.randn(64, 2, 32, generator=rng) for _ in range(3)]
    vs[2][5, 1, 3] = float("inf")
    with pytest.raises(NonFiniteFit, match="V predictor of layer 2"):
        AquaKVCache.calibrate(AquaKVConfig(), ks, vs)


def test_key_channel_scale_minimizes_the_score_error_bound(rng):
    """``key_channel_scale`` rounds the minimum of sum_i E[q_i^2] / D_i^2 * sum_i D_i^2 E[r_i^2] (D_i^4 = E[q_i^2] /
    E[r_i^2], float64 here) to powers of two at geometric mean ~1 per head: each channel at most 2^0.5 from that
    optimum, so the bound at most 1.5625x its minimum and below no scale at all; dead channels are clamped."""
    from vllm_aquakv.reference import MAX_CHANNEL_SCALE, key_channel_scale

    q = torch.exp(2 * torch.randn(3, 16, generator=rng, dtype=torch.float64))
    r = torch.exp(2 * torch.randn(3, 16, generator=rng, dtype=torch.float64))
    objective = lambda d: (q / d ** 2).sum(-1) * (d ** 2 * r).sum(-1)  # noqa: E731  per head
    d = key_channel_scale(q, r).double()
    assert torch.equal(torch.exp2(d.log2().round()), d)  # powers of two: exact in any float format
    assert (d.log2().mean(-1).abs() <= 0.5).all()
    optimum = (q / r) ** 0.25
    ratio = d / (optimum / optimum.log2().mean(-1, keepdim=True).exp2())  # against the normalized optimum
    assert ((ratio >= 2 ** -0.5 - 1e-12) & (ratio <= 2 ** 0.5 + 1e-12)).all()
    best = objective(optimum)
    assert (objective(d) <= 1.5625 * best + 1e-9).all() and (objective(d) < objective(torch.ones_like(d))).all()
    q[0, 3] = 0.0  # a channel no query reads: clamped, finite and positive
    d = key_channel_scale(q, r)
    assert torch.isfinite(d).all() and (d > 0).all() and d.max() / d.min() <= MAX_CHANNEL_SCALE ** 2 * 1.0001


def test_key_channel_scale_cuts_the_score_error(rng):
    """With queries concentrated on a few key channels, the codec with the fitted channel scale gives attention scores
    closer to the exact ones than without (fresh Gaussian keys and queries; the HIGGS codec itself)."""
    from vllm_aquakv.reference import key_channel_scale

    heads, h = 2, 64
    q_std = torch.exp(1.5 * torch.randn(heads, h, generator=rng))  # queries' scale per channel
    k = torch.randn(4000, heads, h, generator=rng) * torch.exp(torch.randn(heads, h, generator=rng))
    q = torch.randn(300, heads, h, generator=rng) * q_std
    plain = HiggsCodec(heads, h, "u1n4")
    scaled = HiggsCodec(heads, h, "u1n4", channel_scale=key_channel_scale(q_std ** 2, (k ** 2).mean(0)))
    err = lambda c: torch.einsum("qhd,khd->qhk", q, k - c.quantize(k)).pow(2).mean()  # noqa: E731
    assert err(scaled) < 0.8 * err(plain), (err(scaled), err(plain))


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
def test_query_energy_hooks_see_the_model_queries(tmp_path, rng, arch):
    """QueryEnergy (calibration's query statistics) equals E[q^2] computed from the tiny model's own queries (q_proj;
    Qwen3: after its per-head q_norm; Phi-3: the query slice of qkv_proj), pre-RoPE and rotated to each window's
    positions, with each KV head's query heads together."""
    from transformers import AutoModelForCausalLM

    from vllm_aquakv.calibration.capture import QueryEnergy, capture_kv
    from vllm_aquakv.calibration.models import make_tiny_llama
    from vllm_aquakv.rope import Rope

    path = make_tiny_llama(str(tmp_path / "m"), num_layers=2, heads=4, kv_heads=2, head_dim=32, arch=arch)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    windows = torch.randint(0, 500, (3, 24), generator=rng)
    rope = Rope({"rope_theta": model.config.rope_parameters["rope_theta"]}, 32)
    seen = []
    attn = model.model.layers[1].self_attn
    module = {"llama": getattr(attn, "q_proj", None), "qwen3": getattr(attn, "q_norm", None),
              "phi3": getattr(attn, "qkv_proj", None)}[arch]
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.detach()[..., :4 * 32] if arch == "phi3"
                                                                      else o.detach()))
    for frame in (None, rope):
        seen.clear()
        queries = QueryEnergy(model, frame)
        capture_kv(model, windows, progress=False, queries=queries)
        q = torch.cat([o.reshape(-1, 4, 32) for o in seen])  # [3 * 24, Hq, h]
        if frame is not None:
            q = rope.apply(q, torch.arange(24).repeat(3))
        want = (q.double() ** 2).reshape(-1, 2, 2, 32).sum(2).mean(0)  # [H, h]
        assert torch.allclose(queries.energy()[1].double(), want, rtol=1e-5)
    handle.remove()
