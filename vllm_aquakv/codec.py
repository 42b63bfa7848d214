"""The HIGGS codec: the one quantizer used by calibration, the CPU serving path and the Triton kernels' twin.

Encoding one token's K or V of one layer, x [num_kv_heads, head_dim] (a residual in AQUA-KV):

1. Rotate each KV head: y = H (s * x) / sqrt(head_dim), with H the Sylvester Hadamard matrix and s fixed
   random signs (one vector [head_dim] per codec, seeded, stored in the artifact).
2. Flatten the heads to y [d = num_kv_heads * head_dim] and cut it into groups of ``group_size`` consecutive
   values (default: head_dim, i.e. one group per (token, KV head)).  Scale of a group: its L2 norm, rounded
   to fp16 (clamped to the fp16 range).
3. Normalise z = y * sqrt(group_size) / scale, so coordinates are ~N(0, 1), and quantize consecutive
   ``grid_dim``-tuples of z to the nearest point of the grid (``vllm_aquakv.grids``).
4. Pack the grid indices (``code_bits`` each) into bytes, layout below.

Decoding reverses it: grid lookup, times scale / sqrt(group_size), inverse rotation y -> s * H y / sqrt(h).

With a ``channel_scale`` D [num_kv_heads, head_dim] (keys, ``AquaKVConfig.key_channel_scale``), step 1 rotates D * x
and decoding divides by D after the inverse rotation: the rotation spreads the quantization error evenly over the
channels of D * x, so channels scaled down by D get less of it.  For keys D^4 ~ E[q_i^2] / E[r_i^2] (queries' energy
over the residual's, per channel): an attention score's error q . (x - x_hat) then shrinks (q . x = (q / D) . (D x)).

Packed layout (THE definition; kernels read exactly this)
---------------------------------------------------------
Per token and stream (K or V) of a layer, the d values give m = d / grid_dim codes of b = code_bits bits.
``codes`` is uint8 [d * b / (8 * grid_dim)] per token: code i occupies bits [i*b, (i+1)*b) of the byte string
read as one little-endian bit string (bit j of the string is bit j % 8 of byte j // 8, least significant
first).  So 4-bit codes are two per byte (code 2j in the low nibble of byte j), 8-bit codes one per byte,
2-bit codes four per byte from the low bits up, and 6-bit codes four per three bytes.  Codes follow value
order: head 0's values first.  ``scales`` is fp16 [d / group_size] per token, group order.  A byte of a
token never holds codes of two different KV heads when b * head_dim / grid_dim is a multiple of 8, which
every supported (grid, head_dim >= 16) pair satisfies.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .grids import GRID_SPECS, grid_bits_per_value, grid_code_bits, load_grid, nearest

FP16_MAX = 65504.0


def head_dim_supported(head_dim: int) -> bool:
    """Whether the Hadamard rotation handles this head size (powers of two from 16 to 512)."""
    return 16 <= head_dim <= 512 and head_dim & (head_dim - 1) == 0


def check_head_dim(head_dim: int) -> None:
    """Refuse head sizes the Hadamard rotation cannot handle (powers of two from 16 to 512)."""
    if not head_dim_supported(head_dim):
        raise ValueError(
            f"aquakv needs head_dim to be a power of two between 16 and 512 (Hadamard rotation); this model has "
            f"head_dim={head_dim}. Use another --kv-cache-dtype for this model."
        )


def hadamard_signs(head_dim: int, seed: int) -> torch.Tensor:
    """Fixed random +-1 signs [head_dim] (float32) of the randomized Hadamard rotation, from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (head_dim,), generator=gen) * 2 - 1).float()


_CODE_TABLES: dict[tuple, torch.Tensor] = {}  # (bits, device) -> codes of every byte value [256, 8 // bits]
_HADAMARD: dict[tuple, torch.Tensor] = {}  # (n, device) -> H [n, n] (``fwht`` on CUDA)


@contextmanager
def matmul_precision(precision: str | None):
    """CUDA float32 matrix products at ``precision`` ("tf32", "ieee") inside the block, restored after (None: as is)."""
    if precision is None:
        yield
        return
    matmul = torch.backends.cuda.matmul
    old, matmul.fp32_precision = matmul.fp32_precision, precision
    try:
        yield
    finally:
        matmul.fp32_precision = old


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh-Hadamard transform over the last dim (a power of two): x @ H (Sylvester order), as
    log2(n) levels of sums and differences, two levels per pass over the data (the one-level butterfly's additions
    in the same order, so the same float32 results bit for bit, ~2x faster on CPU; tests/test_codec.py compares
    them).  Element-wise, so a row's transform does not depend on the batch it is in.  (A matrix product with H is ~10x faster on CPU but rounds differently, and
    with it tests/test_vllm_plugin.py::test_perplexity_through_vllm_equals_reference failed: vLLM 14.26 vs reference
    14.51 with every token as codes; not explained: one guess is that BLAS results depend on the thread count, which
    differs between the test process and vLLM's engine.)  On CUDA: one matrix product with H instead (float32
    products; tests/test_kernels.py::test_decode_residual_matches_codec holds it to the CPU's butterflies)."""
    n = x.shape[-1]
    shape = x.shape
    if x.is_cuda:  # on the GPU one product with H (the butterflies are ~30 launches); CUDA rounds its own way anyway
        key = (n, x.device)
        if key not in _HADAMARD:
            _HADAMARD[key] = fwht(torch.eye(n)).to(x.device)  # [n, n] +-1, by the butterflies on the CPU
        return (x.reshape(-1, n) @ _HADAMARD[key].to(x.dtype)).reshape(shape)
    y = x.reshape(-1, n)
    step = 1
    while 4 * step <= n:  # levels step and 2 step at once: 4-point butterflies
        y = y.view(-1, n // (4 * step), 4, step)  # [rows, blocks, quarter, step]
        a, b, c, d = y[:, :, 0], y[:, :, 1], y[:, :, 2], y[:, :, 3]
        ab_sum, ab_diff, cd_sum, cd_diff = a + b, a - b, c + d, c - d
        y = torch.stack((ab_sum + cd_sum, ab_diff + cd_diff, ab_sum - cd_sum, ab_diff - cd_diff), dim=2)
        step *= 4
    if step < n:  # an odd number of levels: the last one alone
        y = y.view(-1, 1, 2, step)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
    return y.reshape(shape)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [..., m] (each < 2**bits) into uint8 [..., m * bits / 8], LSB-first bit string."""
    m = codes.shape[-1]
    if (m * bits) % 8:
        raise ValueError(f"{m} codes of {bits} bits do not fill whole bytes")
    if 8 % bits == 0:  # whole codes per byte: code k of a byte at bits k * bits..
        per_byte = 8 // bits
        shifts = torch.arange(0, 8, bits, device=codes.device)
        return (codes.long().reshape(*codes.shape[:-1], m // per_byte, per_byte) << shifts).sum(-1).to(torch.uint8)
    shifts = torch.arange(bits, device=codes.device)
    bit_string = (codes.long()[..., None] >> shifts) & 1  # [..., m, bits]
    bit_string = bit_string.reshape(*codes.shape[:-1], m * bits // 8, 8)
    weights = 1 << torch.arange(8, device=codes.device)
    return (bit_string * weights).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, m: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: uint8 [..., m * bits / 8] -> int64 codes [..., m]."""
    if 8 % bits == 0:  # whole codes per byte: one lookup of the byte's codes
        key = (bits, str(packed.device))
        if key not in _CODE_TABLES:
            _CODE_TABLES[key] = _unpack_bit_string(torch.arange(256, dtype=torch.uint8, device=packed.device)[:, None],
                                                   bits, 8 // bits)  # [256, 8 / bits]
        codes = torch.nn.functional.embedding(packed.long(), _CODE_TABLES[key])  # [..., bytes, 8 / bits]
        return codes.reshape(*packed.shape[:-1], m)
    return _unpack_bit_string(packed, bits, m)


def _unpack_bit_string(packed: torch.Tensor, bits: int, m: int) -> torch.Tensor:
    bit_string = (packed.long()[..., None] >> torch.arange(8, device=packed.device)) & 1  # [..., nbytes, 8]
    bit_string = bit_string.reshape(*packed.shape[:-1], m, bits)
    return (bit_string << torch.arange(bits, device=packed.device)).sum(-1)


@dataclass(frozen=True)
class Encoded:
    """Packed codes uint8 [..., code_bytes] and fp16 scales [..., num_groups], per token."""

    codes: torch.Tensor
    scales: torch.Tensor


class HiggsCodec:
    """Randomized-Hadamard + per-group norm + vector-quantization codec for [..., num_kv_heads, head_dim] data.

    ``grid`` names a grid of ``vllm_aquakv.grids``; ``group_size`` defaults to head_dim and must divide
    head_dim or be a multiple of it that divides num_kv_heads * head_dim; ``rotate=False`` skips the
    Hadamard rotation (for studies); ``signs`` overrides the seeded signs (e.g. loaded from an artifact);
    ``channel_scale`` [num_kv_heads, head_dim] (positive) scales each channel before encoding (module docstring).
    """

    def __init__(
        self,
        num_kv_heads: int,
        head_dim: int,
        grid: str = "d2n16",
        group_size: int | None = None,
        rotate: bool = True,
        seed: int = 0,
        signs: torch.Tensor | None = None,
        channel_scale: torch.Tensor | None = None,
    ):
        check_head_dim(head_dim)
        if grid not in GRID_SPECS:
            raise ValueError(f"unknown grid {grid!r}; choose one of {sorted(GRID_SPECS)}")
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.d = num_kv_heads * head_dim
        self.grid_name = grid
        self.grid_dim, self.num_points = GRID_SPECS[grid]
        self.code_bits = grid_code_bits(grid)
        self.group_size = group_size or head_dim
        g = self.group_size
        if not (head_dim % g == 0 or (g % head_dim == 0 and self.d % g == 0)) or g % self.grid_dim:
            raise ValueError(
                f"group_size={g} must divide head_dim={head_dim} or be a multiple of it dividing "
                f"num_kv_heads*head_dim={self.d}, and be a multiple of the grid dim {self.grid_dim}"
            )
        self.num_groups = self.d // g
        self.num_codes = self.d // self.grid_dim
        self.code_bytes = self.num_codes * self.code_bits // 8
        self.rotate = rotate
        self.seed = seed
        self.signs = (signs if signs is not None else hadamard_signs(head_dim, seed)).float()
        if tuple(self.signs.shape) != (head_dim,):
            raise ValueError(f"signs must have shape ({head_dim},), got {tuple(self.signs.shape)}")
        self.grid = load_grid(grid)
        self._table: torch.Tensor | None = None  # ``_byte_table``
        self.channel_scale: torch.Tensor | None = None
        if channel_scale is not None:
            self.set_channel_scale(channel_scale)

    def set_channel_scale(self, d: torch.Tensor) -> None:
        """Scale channels by d [num_kv_heads, head_dim] (positive powers of two, ``reference.key_channel_scale``:
        exact in every float format) before encoding, and back after decoding."""
        d = d.float()
        if tuple(d.shape) != (self.num_kv_heads, self.head_dim):
            raise ValueError(f"channel_scale must be [{self.num_kv_heads}, {self.head_dim}], got {tuple(d.shape)}")
        if not (torch.isfinite(d).all() and (d > 0).all() and torch.equal(torch.exp2(d.log2().round()), d)):
            raise ValueError(f"channel_scale must hold positive powers of two (as aquakv-calibrate writes them), got "
                             f"values from {d.min().item():.6g} to {d.max().item():.6g}")
        self.channel_scale = d.to(self.signs.device)

    def to(self, device) -> "HiggsCodec":
        """Move signs and grid to ``device`` (in place); returns self."""
        self.signs, self.grid = self.signs.to(device), self.grid.to(device)
        if self.channel_scale is not None:
            self.channel_scale = self.channel_scale.to(device)
        self._table = None
        return self

    # ---- bit accounting -------------------------------------------------------------------------------
    @property
    def bits_per_value(self) -> float:
        """Code bits plus scale bits per value: log2(points)/grid_dim + 16/group_size."""
        return grid_bits_per_value(self.grid_name) + 16.0 / self.group_size

    @property
    def bytes_per_token(self) -> int:
        """Stored bytes per token for all KV heads of one stream: codes + fp16 scales."""
        return self.code_bytes + 2 * self.num_groups

    # ---- rotation ---------------------------------------------------------------------------------------
    def rotate_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[..., num_kv_heads, head_dim] -> rotated, float32."""
        x = x.float()
        if not self.rotate:
            return x
        return fwht(x * self.signs.to(x.device)) / math.sqrt(self.head_dim)

    def unrotate_heads(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of ``rotate_heads``."""
        if not self.rotate:
            return y
        return fwht(y) * self.signs.to(y.device) / math.sqrt(self.head_dim)

    # ---- encode / decode --------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> Encoded:
        """Quantize x [..., num_kv_heads, head_dim] -> Encoded(codes [..., code_bytes], scales [..., num_groups])."""
        lead = x.shape[:-2]
        if tuple(x.shape[-2:]) != (self.num_kv_heads, self.head_dim):
            raise ValueError(f"expected [..., {self.num_kv_heads}, {self.head_dim}], got {tuple(x.shape)}")
        if self.channel_scale is not None:
            x = x.float() * self.channel_scale
        y = self.rotate_heads(x).reshape(-1, self.num_groups, self.group_size)  # [N, groups, g]
        scales = y.norm(dim=-1).clamp(max=FP16_MAX).to(torch.float16)  # [N, groups]
        s = scales.float()[..., None]
        z = torch.where(s > 0, y * math.sqrt(self.group_size) / torch.where(s > 0, s, 1.0), 0.0)
        idx = nearest(z.reshape(-1, self.grid_dim), self.grid)  # [N * num_codes]
        codes = pack_codes(idx.reshape(-1, self.num_codes), self.code_bits)
        return Encoded(codes.reshape(*lead, self.code_bytes), scales.reshape(*lead, self.num_groups))

    def decode(self, enc: Encoded) -> torch.Tensor:
        """Encoded -> reconstruction [..., num_kv_heads, head_dim], float32."""
        lead = enc.codes.shape[:-1]
        packed = enc.codes.reshape(-1, self.code_bytes)
        if 8 % self.code_bits == 0:  # whole codes per byte: each byte looks up its grid coordinates at once
            z = torch.nn.functional.embedding(packed.long(), self._byte_table(packed.device))  # [N, bytes, values]
        else:
            z = self.grid.to(packed.device)[unpack_codes(packed, self.code_bits, self.num_codes)]  # [N, codes, d]
        z = z.reshape(-1, self.num_groups, self.group_size)  # [N, groups, g]
        y = z * (enc.scales.reshape(-1, self.num_groups, 1).float() / math.sqrt(self.group_size))
        x = self.unscale(self.unrotate_heads(y.reshape(-1, self.num_kv_heads, self.head_dim)))
        return x.reshape(*lead, self.num_kv_heads, self.head_dim)

    def unscale(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., num_kv_heads, head_dim] divided by the channel scale (unchanged without one): the last step of
        ``decode``, for decoders that rotate back themselves (``kernels.reconstruct.decode_residual``)."""
        return x if self.channel_scale is None else x / self.channel_scale

    def _byte_table(self, device) -> torch.Tensor:
        """[256, codes per byte * grid dim]: the grid coordinates of every code byte, in code order (cached)."""
        if self._table is None or self._table.device != torch.device(device):
            per_byte = 8 // self.code_bits
            codes = unpack_codes(torch.arange(256, dtype=torch.uint8, device=device)[:, None], self.code_bits, per_byte)
            self._table = self.grid.to(device)[codes].reshape(256, per_byte * self.grid_dim)
        return self._table

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)): the reconstruction the decoder will see, float32."""
        return self.decode(self.encode(x))

    def describe(self) -> dict:
        """JSON-able settings (signs are stored separately as a tensor)."""
        return {
            "grid": self.grid_name,
            "group_size": self.group_size,
            "rotate": self.rotate,
            "seed": self.seed,
            "code_bits": self.code_bits,
            "bits_per_value": self.bits_per_value,
            "channel_scale": self.channel_scale is not None,
        }


def rel_mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """||x - x_hat||^2 / ||x||^2 over all elements (float64)."""
    x, x_hat = x.double(), x_hat.double()
    return float(((x - x_hat) ** 2).sum() / (x**2).sum().clamp(min=1e-300))
