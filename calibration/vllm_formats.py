"""Fake-quant simulations of three of vLLM 0.26's own KV-cache formats, for aquakv-eval's baseline rows.

Each simulation maps one layer's K or V [T, H, h] (keys post-RoPE, as vLLM stores them) to what vLLM's attention
effectively uses after its store (write) kernel and its read/dequant, expressed in the original (unrotated) basis,
float32.  Reference: vllm/v1/attention/ops/{int4_per_token_head,triton_turboquant_store,triton_turboquant_decode}.py,
vllm/v1/attention/backends/turboquant_attn.py, model_executor/layers/quantization/turboquant/{config,centroids}.py.

``int4_per_token_head``: K and V rotated by the randomized Hadamard transform H·D (Sylvester H, unnormalized, signs D
from torch.bernoulli with seed 0x9E3779B9), per (token, head) asymmetric min-max 4-bit codes (round half away from
zero), fp32 scale whose low 4 mantissa bits are overwritten by the 4-bit zero point (the read truncates the scale);
the attention rotates the query instead, which equals un-rotating K and V by D·H / h.

``turboquant_{k3v4,3bit}_nc``: keys normalized, rotated by the orthonormal Sylvester Hadamard (no signs, same in
every layer), 3-bit Lloyd-Max codes for N(0, 1/h), fp16 norm, norm correction (the centroid vector rescaled to unit
norm before use); values unrotated, per (token, head) uniform min-max 4/3-bit codes (round half up), fp16 scale and
fp16 minimum.  vLLM keeps the first and last 2 layers of a dense model in 16 bits for these presets
(``TurboQuantConfig.get_boundary_skip_layers``); so does ``vllm_reconstruct``.

int4's rotated K/V are rounded to the input dtype as vLLM rounds them to the model dtype (a no-op for the float32
evaluator).  Not simulated: the rounding of int4's rotated query; on CUDA, int4's rotation runs in bf16 (Hadacore or
Triton MMA); TurboQuant continuation-prefill chunks over 128 tokens read K/V dequantized to fp16; GPU division/FMA may
flip a code at an exact rounding tie.  TurboQuant's first prefill chunk attends the raw K/V (flash-attention), so in
vLLM its errors reach generated tokens, not prompt logprobs; the rows use aquakv-eval's serving semantics (every
token through codes).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

FORMATS = ("int4_per_token_head", "turboquant_k3v4_nc", "turboquant_3bit_nc")
_TQ_BITS = {"turboquant_k3v4_nc": (3, 4), "turboquant_3bit_nc": (3, 3)}  # (key Lloyd-Max bits, value uniform bits)


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform H x along the last dim (vLLM's butterfly, same summation order)."""
    d, h = x.shape[-1], 1
    if d & (d - 1):
        raise ValueError(f"vLLM's Hadamard rotations need a power-of-two head_dim, got {d}")
    while h < d:
        xv = x.reshape(*x.shape[:-1], d // (2 * h), 2, h)
        x = torch.stack([xv[..., 0, :] + xv[..., 1, :], xv[..., 0, :] - xv[..., 1, :]], dim=-2).reshape(x.shape)
        h <<= 1
    return x


def _hadamard(d: int, device) -> torch.Tensor:
    return _fwht(torch.eye(d, device=device)) / math.sqrt(d)  # TurboQuant's Pi = Pi.T: orthonormal Sylvester [h, h]


@lru_cache(maxsize=8)
def rht_signs(d: int) -> torch.Tensor:
    """int4's ±1 signs D [d] (vLLM ``_get_rht_signs(d, round_idx=0)``)."""
    gen = torch.Generator(device="cpu").manual_seed(0x9E3779B9)
    return 2.0 * torch.bernoulli(torch.full((d,), 0.5), generator=gen) - 1.0


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, (x + 0.5).trunc(), (x - 0.5).trunc())  # Triton's (x ± 0.5).to(int32)


def int4_rotated(x: torch.Tensor) -> torch.Tensor:
    """int4_per_token_head store + dequant of K or V [T, H, h] in vLLM's rotated basis (H·D·x, norm sqrt(h))."""
    y = _fwht(x.float() * rht_signs(x.shape[-1]).to(x.device)).to(x.dtype).float()  # [T, H, h], model dtype
    lo, hi = y.amin(-1, keepdim=True), y.amax(-1, keepdim=True)  # [T, H, 1]
    scale = ((hi - lo) / 15.0).clamp(min=1e-6)
    zp = _round_half_away(-lo / scale).clamp(0.0, 15.0)
    q = _round_half_away(y * (1.0 / scale) + zp).clamp(0.0, 15.0)
    scale_read = (scale.view(torch.int32) & -16).view(torch.float32)  # zero point lives in the low mantissa bits
    return (q - zp) * scale_read


def int4_per_token_head(x: torch.Tensor) -> torch.Tensor:
    """int4_per_token_head of K or V [T, H, h] as attention uses it, in the original basis -> [T, H, h] float32
    (vLLM rotates the query and un-rotates the output: the same as un-rotating K and V by D·H / h)."""
    d = x.shape[-1]
    return _fwht(int4_rotated(x)) * rht_signs(d).to(x.device) / d


def _gaussian_pdf(x: float, sigma2: float) -> float:
    return (1.0 / math.sqrt(2 * math.pi * sigma2)) * math.exp(-x * x / (2 * sigma2))


def _trapz(f, a: float, b: float, n: int = 200) -> float:
    h = (b - a) / n
    result = 0.5 * (f(a) + f(b))
    for i in range(1, n):  # vLLM's summation order: centroids equal to the bit
        result += f(a + i * h)
    return result * h


@lru_cache(maxsize=16)
def lloyd_max_centroids(d: int, bits: int) -> torch.Tensor:
    """TurboQuant's sorted Lloyd-Max centroids [2^bits] for N(0, 1/d) (vLLM ``get_centroids``, same iteration)."""
    n, sigma2 = 2**bits, 1.0 / d
    lo, hi = -3.5 * math.sqrt(sigma2), 3.5 * math.sqrt(sigma2)
    c = [lo + (hi - lo) * (i + 0.5) / n for i in range(n)]
    pdf = lambda x: _gaussian_pdf(x, sigma2)  # noqa: E731
    for _ in range(200):
        edges = [lo * 3] + [(c[i] + c[i + 1]) / 2.0 for i in range(n - 1)] + [hi * 3]
        new = []
        for i in range(n):
            num, den = _trapz(lambda x: x * pdf(x), edges[i], edges[i + 1]), _trapz(pdf, edges[i], edges[i + 1])
            new.append(num / den if den > 1e-15 else c[i])
        if max(abs(new[i] - c[i]) for i in range(n)) < 1e-10:
            break
        c = new
    return torch.tensor(c, dtype=torch.float32)


def turboquant_key_rotated(x: torch.Tensor, bits: int) -> torch.Tensor:
    """TurboQuant key store + decode [T, H, h] -> norm * normalized centroids [T, H, h] in the Hadamard basis."""
    T, H, d = x.shape
    flat = x.float().reshape(T * H, d)  # [N, h]
    norms = flat.norm(dim=1, keepdim=True)  # [N, 1]
    y = (flat / (norms + 1e-8)) @ _hadamard(d, x.device)
    c = lloyd_max_centroids(d, bits).to(x.device)
    idx = torch.searchsorted((c[:-1] + c[1:]) / 2, y.contiguous(), right=True)  # the kernel's bisection on y >= mid
    ck = c[idx]  # [N, h]
    ck = ck * (1.0 / torch.sqrt(ck.square().sum(1, keepdim=True) + 1e-16))  # norm correction ("nc")
    return (norms.half().float() * ck).reshape(T, H, d)  # fp16 norm


def turboquant(x: torch.Tensor, stream: str, fmt: str) -> torch.Tensor:
    """TurboQuant ``fmt`` store + decode of one layer's K (stream 'k', post-RoPE) or V [T, H, h] as the decode
    kernel uses it, in the original basis -> [T, H, h] float32."""
    key_bits, value_bits = _TQ_BITS[fmt]
    if stream == "k":  # the decode scores q @ Pi.T against norm * c, i.e. q against norm * c @ Pi
        return turboquant_key_rotated(x, key_bits) @ _hadamard(x.shape[-1], x.device)
    levels = 2**value_bits - 1
    v = x.float()
    lo, hi = v.amin(-1, keepdim=True), v.amax(-1, keepdim=True)  # [T, H, 1]
    scale = (hi - lo) / levels
    scale = torch.where(scale > 1e-8, scale, 1e-8)
    q = ((v - lo) / scale + 0.5).trunc().clamp(0, levels)
    return q * scale.half().float() + lo.half().float()  # fp16 scale and minimum


def quantize(fmt: str, x: torch.Tensor, stream: str) -> torch.Tensor:
    """vLLM format ``fmt`` (one of FORMATS) applied to K or V [T, H, h] -> float32, original basis."""
    return int4_per_token_head(x) if fmt == "int4_per_token_head" else turboquant(x, stream, fmt)


def boundary_layers(fmt: str, num_layers: int) -> set[int]:
    """Layers vLLM serves in 16 bits under ``fmt``: first/last min(2, L // 2) for TurboQuant (dense models)."""
    if fmt not in _TQ_BITS:
        return set()
    n = min(2, num_layers // 2)
    return set(range(n)) | set(range(num_layers - n, num_layers))


def bits_per_value(fmt: str, head_dim: int, num_layers: int | None = None) -> float:
    """Cache bits per K/V value of ``fmt`` as vLLM allocates it per token and head (codes + scales/norms, TurboQuant
    slot padded to even bytes); with ``num_layers``, averaged over layers counting 16-bit boundary layers."""
    if fmt == "int4_per_token_head":
        slot = 2 * (head_dim // 2 + 4)  # K and V: packed nibbles + fp32 scale (zero point inside)
    else:
        kb, vb = _TQ_BITS[fmt]
        slot = math.ceil(head_dim * kb / 8) + 2 + math.ceil(head_dim * vb / 8) + 4  # + fp16 norm, fp16 scale/zero
        slot += slot % 2
    bits = 8 * slot / (2 * head_dim)
    if num_layers is None:
        return bits
    n16 = len(boundary_layers(fmt, num_layers))
    return (bits * (num_layers - n16) + 16 * n16) / num_layers


def vllm_reconstruct(fmt: str, num_layers: int, rope=None, key_rope: str = "post"):
    """A ``MixedCache`` reconstruct function for ``fmt``: keys are quantized post-RoPE (positions 0..T-1, RoPE applied
    and undone with ``rope`` when the evaluator hands them pre-RoPE, key_rope 'pre'); boundary layers stay exact."""
    skip = boundary_layers(fmt, num_layers)

    def reconstruct(stream: str, layer: int, x: torch.Tensor, _recon=None) -> torch.Tensor:
        if layer in skip:
            return x.float()
        if stream == "k" and key_rope == "pre":
            pos = torch.arange(x.shape[0], device=x.device)
            return rope.undo(quantize(fmt, rope.apply(x, pos), stream), pos)
        return quantize(fmt, x, stream)

    return reconstruct
