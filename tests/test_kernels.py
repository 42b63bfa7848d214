"""Triton kernels against their torch twins (TRITON_INTERPRET=1 on CPU, real kernels on a GPU)."""

import pytest
import torch

from vllm_aquakv.codec import HiggsCodec
from vllm_aquakv.serving import SlotLayout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("grid,head_dim,heads,page_block", [("d2n16", 64, 3, 16), ("d2n64", 32, 2, 32),
                                                            ("d2n256", 128, 2, 16), ("d4n256", 64, 1, 32),
                                                            ("d1n8", 32, 2, 16)])
def test_dequant_paged_matches_torch_twin(grid, head_dim, heads, page_block, rng):
    from vllm_aquakv.kernels.dequant import dequant_paged

    k_codec = HiggsCodec(heads, head_dim, grid, seed=int(torch.randint(0, 99, (1,), generator=rng)))
    v_codec = HiggsCodec(heads, head_dim, "d2n16", seed=3)
    layout = SlotLayout(k_codec, v_codec, heads, head_dim, torch.bfloat16)
    seq_len, num_blocks = 45, 8
    k = torch.randn(seq_len, heads, head_dim, generator=rng) * 3 + torch.randn(heads, head_dim, generator=rng)
    v = torch.randn(seq_len, heads, head_dim, generator=rng)
    slots = layout.pack([k_codec.encode(k), v_codec.encode(v)])  # [T, H, slot]
    cache = torch.zeros(num_blocks, heads, page_block, layout.slot_bytes, dtype=torch.uint8)
    table = torch.randperm(num_blocks, generator=rng)[: -(-seq_len // page_block)].to(torch.int32)
    pos = torch.arange(seq_len)
    cache[table[pos // page_block].long(), :, pos % page_block] = slots
    cache, table = cache.to(DEVICE), table.to(DEVICE)
    k_enc, v_enc = layout.unpack(slots)
    for codec, enc, offset in ((k_codec, k_enc, 0), (v_codec, v_enc, sum(layout.parts[0]))):
        got = dequant_paged(cache, table, seq_len, codec, offset, block_t=16).cpu()
        want = codec.decode(enc)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
