"""The HIGGS codec against an independent float64 implementation, packing, refusals and bit accounting."""

import math

import pytest
import torch

from vllm_aquakv.codec import HiggsCodec, fwht, pack_codes, unpack_codes, rel_mse
from vllm_aquakv.grids import GRID_SPECS, grid_code_bits, grid_info, load_grid


def sylvester(n: int) -> torch.Tensor:
    """H[i, j] = (-1)^popcount(i & j): the Sylvester Hadamard matrix, from its closed form."""
    i = torch.arange(n)
    bits = (i[:, None] & i[None, :]).tolist()
    return torch.tensor([[(-1.0) ** bin(b).count("1") for b in row] for row in bits], dtype=torch.float64)


def fwht_radix2(x: torch.Tensor) -> torch.Tensor:
    """The textbook butterfly, one level per pass: ``fwht`` (two levels per pass) must add in its order."""
    n = x.shape[-1]
    y = x.reshape(-1, n)
    step = 1
    while step < n:
        y = y.view(-1, n // (2 * step), 2, step)  # [rows, blocks, pair half, step]
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        step *= 2
    return y.reshape(x.shape)


def test_fwht_is_sylvester_hadamard(rng):
    for n in (2, 8, 16, 32, 64, 128, 256):  # even and odd numbers of levels
        x = torch.randn(7, 3, n, generator=rng, dtype=torch.float64)
        assert torch.allclose(fwht(x), x @ sylvester(n), atol=1e-10)
        assert torch.allclose(fwht(fwht(x)), n * x, atol=1e-9)  # H H = n I
        x32 = x.float()  # float32 in, float32 out, within float32 rounding of the exact transform
        assert fwht(x32).dtype == torch.float32
        assert torch.allclose(fwht(x32).double(), x32.double() @ sylvester(n), atol=1e-4)
        rows = x32.reshape(-1, n)  # each row's transform is the same alone as in a batch (codes must not depend on it)
        assert all(torch.equal(fwht(rows[i:i + 1]), fwht(rows)[i:i + 1]) for i in range(rows.shape[0]))
        # two levels per pass add in the same order as one: the same float32 and bfloat16 bits (codes written before
        # and after this change agree; the GPU twins compare against it)
        wide = torch.randn(500, n, generator=rng) * torch.logspace(-3, 3, n)
        for z in (wide, wide.bfloat16(), x32):
            assert torch.equal(fwht(z), fwht_radix2(z))


@pytest.mark.parametrize("bits", sorted({grid_code_bits(g) for g in GRID_SPECS} | {1, 5, 7}))
def test_pack_roundtrip_every_width(bits, rng):
    m = 64
    codes = torch.randint(0, 2**bits, (5, 3, m), generator=rng)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 3, m * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, m), codes)


def test_pack_layout_by_hand():
    # 2-bit codes [1, 2, 3, 0] -> LSB first: 0b00_11_10_01 = 0x39
    assert pack_codes(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0x39]
    # 4-bit: code 2j in the low nibble of byte j
    assert pack_codes(torch.tensor([0xA, 0x5]), 4).tolist() == [0x5A]
    # 6-bit codes a,b,c,d in 3 bytes: bit string a | b<<6 | c<<12 | d<<18, little-endian
    a, b, c, d = 0x3F, 0x01, 0x2A, 0x15
    v = a | b << 6 | c << 12 | d << 18
    assert pack_codes(torch.tensor([a, b, c, d]), 6).tolist() == [v & 255, v >> 8 & 255, v >> 16 & 255]


def float64_codec(x, codec, stored_scales):
    """Independent float64 HIGGS: explicit Hadamard matrix, brute-force nearest. x [N, H, h] -> (idx, dist, x_hat,
    scales). x_hat decodes with ``stored_scales`` (the codec's fp16 scales, which may differ by one fp16 ulp where
    the float32 and float64 norms round differently)."""
    h, g, gd = codec.head_dim, codec.group_size, codec.grid_dim
    rot = torch.diag(codec.signs.double()) @ sylvester(h) / math.sqrt(h)  # x_row @ rot == rotation
    y = (x.double() @ rot) if codec.rotate else x.double()
    y = y.reshape(x.shape[0], -1, g)
    s = y.norm(dim=-1, keepdim=True).to(torch.float16).double()  # the stored fp16 scale
    z = (y * math.sqrt(g) / s).reshape(-1, gd)
    grid = load_grid(codec.grid_name).double()
    dist = torch.cdist(z, grid)
    idx = dist.argmin(-1)
    s_used = stored_scales.double().reshape(s.shape)
    y_hat = (grid[idx].reshape(y.shape) * s_used / math.sqrt(g)).reshape(x.shape)
    x_hat = (y_hat @ rot.T) if codec.rotate else y_hat
    return idx, dist, x_hat, s


@pytest.mark.parametrize("grid,group,rotate", [("d2n16", None, True), ("d2n64", 32, True), ("d2n256", 128, True),
                                                ("d4n256", None, True), ("d1n8", None, False), ("d2n16", None, False)])
def test_codec_matches_float64_reference(grid, group, rotate, rng):
    codec = HiggsCodec(2, 64, grid, group_size=group, rotate=rotate, seed=int(torch.randint(0, 1000, (1,), generator=rng)))
    x = torch.randn(300, 2, 64, generator=rng) * 3 + torch.randn(2, 64, generator=rng)
    enc = codec.encode(x)
    assert enc.codes.shape == (300, codec.code_bytes) and enc.scales.shape == (300, codec.num_groups)
    idx = unpack_codes(enc.codes, codec.code_bits, codec.num_codes).reshape(-1)
    ref_idx, dist, ref_hat, ref_scales = float64_codec(x, codec, enc.scales)
    # fp16 scales equal up to one ulp (float32 vs float64 norm rounding)
    assert torch.allclose(enc.scales.double().reshape(ref_scales.shape), ref_scales, rtol=1e-3, atol=0)
    same = idx == ref_idx
    assert same.float().mean() > 0.999
    # where float32 and float64 disagree, it is a near tie
    d_got, d_ref = dist.gather(1, idx[:, None])[:, 0], dist.gather(1, ref_idx[:, None])[:, 0]
    assert torch.all((d_got - d_ref).abs()[~same] < 1e-4)
    x_hat = codec.decode(enc)
    rows = same.reshape(300, -1).all(-1)
    assert torch.allclose(x_hat[rows].double(), ref_hat[rows], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("grid", sorted(GRID_SPECS))
def test_codec_error_is_grid_error_on_gaussian_data(grid, rng):
    codec = HiggsCodec(4, 128, grid)
    x = torch.randn(2000, 4, 128, generator=rng)
    err = rel_mse(x, codec.quantize(x))
    # norm-scaled Gaussian groups lose ~grid MSE per coordinate (fp16 scale adds ~1e-7)
    assert abs(err / grid_info(grid)["design_mse"] - 1) < 0.06, err


def test_rotation_helps_on_outlier_channels(rng):
    x = torch.randn(1000, 2, 64, generator=rng)
    x[..., 3] *= 30  # one outlier channel, as in real keys
    with_rot = rel_mse(x, HiggsCodec(2, 64, "d2n16").quantize(x))
    without = rel_mse(x, HiggsCodec(2, 64, "d2n16", rotate=False).quantize(x))
    assert with_rot < without


def test_zero_group_and_inverse_rotation(rng):
    codec = HiggsCodec(2, 32, "d2n16")
    x = torch.randn(10, 2, 32, generator=rng)
    x[3] = 0
    assert torch.allclose(codec.unrotate_heads(codec.rotate_heads(x)), x, atol=1e-5)
    out = codec.quantize(x)
    assert torch.isfinite(out).all() and torch.equal(out[3], torch.zeros(2, 32))


@pytest.mark.parametrize("head_dim", [0, 48, 96, 8, 1024])
def test_refuses_bad_head_dim(head_dim):
    with pytest.raises(ValueError, match="power of two"):
        HiggsCodec(2, head_dim)


def test_refuses_bad_group_and_grid():
    with pytest.raises(ValueError, match="group_size"):
        HiggsCodec(2, 64, group_size=48)
    with pytest.raises(ValueError, match="unknown grid"):
        HiggsCodec(2, 64, grid="d3n8")


def test_bits_per_value_by_hand():
    # d2n16: 4-bit index per 2 values = 2 bits/value; fp16 scale per 64 values = 0.25 -> 2.25
    c = HiggsCodec(3, 64, "d2n16")
    assert c.bits_per_value == 2.25
    assert c.code_bytes == 3 * 64 * 2 // 8 == 48 and c.bytes_per_token == 48 + 3 * 2
    # d2n64 = 3 bits; group 256 over 2 heads of 128: 16/256 -> 3.0625
    c = HiggsCodec(2, 128, "d2n64", group_size=256)
    assert c.bits_per_value == 3.0625 and c.code_bytes == 96 and c.num_groups == 1
    # d4n256 = 8 bits per 4 values = 2 bits; group 32 -> 2.5
    assert HiggsCodec(1, 64, "d4n256", group_size=32).bits_per_value == 2.5
