"""The torch serving path of the aquakv cache: paged slot layout, cache write and attention over reconstructed K/V.

This is the CPU serving path and the plain-torch twin of the Triton kernels.  Semantics (``docs``: README,
"Serving semantics"): every token of every layer is stored as codes (16-bit only for layers whose grid is
'16bit'); attention always reads the reconstruction, for the tokens of the current step too, so prefill,
chunked prefill, prefix-cache hits and decode see exactly the same K/V, and a prompt's logprobs equal
``AquaKVCache`` evaluated with ``num_sink_tokens=0, window=0``.

Paged layout: vLLM hands each layer a uint8 cache [num_blocks, num_kv_heads, block_size, slot_bytes]; the slot of
one (token, KV head) is ``[K codes | V codes | K fp16 scales | V fp16 scales]`` (codes packed as in
``vllm_aquakv.codec``; codes first so that they start 4-byte aligned for the kernel's word loads), or ``[K | V]`` in
the 16-bit dtype for a 16-bit layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .codec import Encoded, HiggsCodec
from .reference import AquaKVCache
from .rope import Rope
from .window import window_attention


class SlotLayout:
    """Byte layout of one (token, KV head) slot of one layer: every stream's codes (or 16-bit values), then every
    stream's fp16 scales."""

    def __init__(self, k_codec: HiggsCodec | None, v_codec: HiggsCodec | None, num_kv_heads: int, head_dim: int,
                 exact_dtype: torch.dtype):
        self.codecs = (k_codec, v_codec)
        self.num_kv_heads, self.head_dim, self.exact_dtype = num_kv_heads, head_dim, exact_dtype
        self.parts = [self._part_bytes(c) for c in self.codecs]  # [(code_bytes, scale_bytes)] per stream
        (k_code, k_scale), (v_code, v_scale) = self.parts
        self.code_offsets = (0, k_code)
        self.scale_offsets = (k_code + v_code, k_code + v_code + k_scale)
        self.slot_bytes = k_code + v_code + k_scale + v_scale

    def _part_bytes(self, codec: HiggsCodec | None) -> tuple[int, int]:
        if codec is None:
            return self.head_dim * self.exact_dtype.itemsize, 0
        if codec.group_size > self.head_dim:
            raise ValueError(f"serving needs group_size <= head_dim ({self.head_dim}), the artifact has "
                             f"{codec.group_size}: recalibrate with --group-size {self.head_dim} or smaller")
        return codec.code_bytes // self.num_kv_heads, 2 * codec.num_groups // self.num_kv_heads

    def pack(self, parts: list[Encoded | torch.Tensor]) -> torch.Tensor:
        """[K, V] (Encoded per token, or 16-bit [N, H, h]) -> uint8 slots [N, H, slot_bytes]."""
        codes, scales = [], []
        for codec, part in zip(self.codecs, parts):
            if codec is None:
                n = part.shape[0]
                codes.append(part.to(self.exact_dtype).contiguous().view(torch.uint8).reshape(n, self.num_kv_heads, -1))
            else:
                n = part.codes.shape[0]
                codes.append(part.codes.reshape(n, self.num_kv_heads, -1))  # [N, H, code bytes per head]
                scales.append(part.scales.contiguous().view(torch.uint8).reshape(n, self.num_kv_heads, -1))
        return torch.cat(codes + scales, dim=-1)

    def unpack(self, slots: torch.Tensor) -> list[Encoded | torch.Tensor]:
        """uint8 slots [N, H, slot_bytes] -> [K, V] as Encoded or 16-bit [N, H, h]."""
        n, parts = slots.shape[0], []
        for codec, (code_bytes, scale_bytes), at, sat in zip(self.codecs, self.parts, self.code_offsets,
                                                             self.scale_offsets):
            raw = slots[..., at:at + code_bytes]
            if codec is None:
                parts.append(raw.contiguous().view(self.exact_dtype).reshape(n, self.num_kv_heads, self.head_dim))
            else:
                scales = slots[..., sat:sat + scale_bytes].contiguous().view(torch.float16)
                parts.append(Encoded(raw.reshape(n, -1), scales.reshape(n, -1)))
        return parts


@dataclass
class StepState:
    """Per-forward-step scratch shared by all layers: reconstructed K/V of each request's whole context."""

    recon: list[dict[tuple[str, int], torch.Tensor]] = field(default_factory=list)  # per request
    window: object = None  # window.WindowStep: this step's 16-bit ring entries (with ``TorchServingPath.exact``)


class TorchServingPath:
    """Cache write and paged attention for every layer, in plain torch."""

    def __init__(self, cache: AquaKVCache, rope: Rope):
        self.cache, self.rope = cache, rope
        self.fused: dict = {}  # layer -> kernels.attention.FusedLayer, for layers served by the fused kernel (CUDA)
        self.int8_scores = False  # fused decode steps score on int8 tensor cores (``aquakv_int8_scores``)
        self.overlap_write = False  # fused decode steps with the window write beside attention (``aquakv_overlap_write``)
        self.exact = None  # window.ExactTokens: 16-bit sinks + recent window (aquakv_window; runtime sets the default)
        self.flash = None  # compat.flash_attention's function: prefill steps through reconstruction + FlashAttention
        self.merge = None  # compat.merge_attention_states's function (the window's prefill merges two FA calls)
        self.layouts = [SlotLayout(cache.codecs["k", l], cache.codecs["v", l], cache.num_kv_heads, cache.head_dim,
                                   cache.exact_dtype) for l in range(cache.num_layers)]
        # the last layer whose predictors read (stream, layer): scratch is dropped after it
        self.last_use: dict[tuple[str, int], int] = {}
        for (_, layer), pred in cache.predictors.items():
            for src in pred.sources:
                self.last_use[src] = max(self.last_use.get(src, -1), layer)

    def slot_bytes(self, layer: int) -> int:
        """Bytes per (token, KV head) of ``layer``'s paged cache."""
        return self.layouts[layer].slot_bytes

    def capacity_ratio(self, dense_itemsize: int = 2) -> float:
        """Tokens aquakv fits per token of an unquantized cache of ``dense_itemsize`` bytes per value, at equal memory."""
        dense = 2 * self.cache.head_dim * dense_itemsize
        return dense * self.cache.num_layers / sum(self.slot_bytes(l) for l in range(self.cache.num_layers))

    # ---- write ---------------------------------------------------------------------------------------
    def write(self, layer: int, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, key: torch.Tensor,
              value: torch.Tensor, positions: torch.Tensor, step: StepState, query_lens: list[int],
              block_table: torch.Tensor | None = None, seq_lens: list[int] | None = None) -> None:
        """Encode this step's tokens (key post-RoPE [N, H, h], value [N, H, h]) into their paged slots (and, with
        ``exact``, the sink/window tokens into the 16-bit ring: needs block_table and seq_lens)."""
        n = slot_mapping.shape[0]
        if self.exact is not None:
            qsl = [0]
            for q in query_lens:
                qsl.append(qsl[-1] + q)
            self.exact.write_step(layer, step, key[:n], value[:n], block_table, seq_lens, qsl, slot_mapping,
                                  kv_cache.shape[2])
        sources = {}  # reconstructions of earlier layers for this step's tokens, in token order
        for src in {s for stream in "kv" for s in getattr(self.cache.predictors.get((stream, layer)), "sources", ())}:
            if src[1] != layer:
                sources[src] = torch.cat([r[src][-q:] for r, q in zip(step.recon, query_lens)])
        post = self.cache.config.key_rope == "post"
        k_in = key[:n].float() if post else self.rope.undo(key[:n], positions[:n])  # the artifact's key frame
        k_part, sources["k", layer] = self.cache.encode_stream("k", layer, k_in, sources)
        v_part, _ = self.cache.encode_stream("v", layer, value[:n].float(), sources)
        slots = self.layouts[layer].pack([k_part, v_part])  # [N, H, slot]
        valid = slot_mapping >= 0  # padded entries are -1
        block_size = kv_cache.shape[2]
        blocks, offsets = slot_mapping[valid] // block_size, slot_mapping[valid] % block_size
        kv_cache[blocks, :, offsets] = slots[valid]

    # ---- read + attend --------------------------------------------------------------------------------
    def read_context(self, layer: int, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int,
                     recon: dict) -> None:
        """Reconstruct one request's whole context of ``layer`` into ``recon`` (K in the artifact's key frame, V;
        [seq_len, H, h] each)."""
        block_size = kv_cache.shape[2]
        pos = torch.arange(seq_len, device=kv_cache.device)
        slots = kv_cache[block_table[pos // block_size].long(), :, pos % block_size]  # [L, H, slot]
        parts = self.layouts[layer].unpack(slots)
        for stream, part in zip("kv", parts):
            codec = self.cache.codecs[stream, layer]
            if codec is None:
                recon[stream, layer] = part.float()
                continue
            residual = codec.decode(part)
            recon[stream, layer] = self.cache._predict(stream, layer, recon, residual) + residual

    def attend(self, layer: int, query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
               seq_lens: list[int], query_start_loc: list[int], scale: float, step: StepState,
               key: torch.Tensor | None = None, value: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention of this step's queries [N, Hq, h] (post-RoPE) over reconstructed contexts -> [N, Hq, h];
        with ``exact``, sinks and window from 16 bits (this step's own tokens from key/value [N, H, h])."""
        if not step.recon:
            step.recon = [{} for _ in seq_lens]
        out = torch.empty(query.shape, dtype=torch.float32, device=query.device)
        for r, seq_len in enumerate(seq_lens):
            recon = step.recon[r]
            self.read_context(layer, kv_cache, block_table[r], seq_len, recon)
            k = recon["k", layer]
            if self.cache.config.key_rope == "pre":
                k = self.rope.apply(k, torch.arange(seq_len, device=query.device))
            v = recon["v", layer]
            q0, q1 = query_start_loc[r], query_start_loc[r + 1]
            if self.exact is None:
                out[q0:q1] = causal_attention(query[q0:q1].float(), k, v, scale, seq_len - (q1 - q0))
            else:
                block_size = kv_cache.shape[2]
                pos = torch.arange(seq_len, device=query.device)
                slots = block_table[r, pos // block_size].long() * block_size + pos % block_size
                exact = self.exact.exact_context(layer, r, slots, seq_len - (q1 - q0), key[q0:q1], value[q0:q1])
                out[q0:q1] = window_attention(query[q0:q1].float(), k, v, *exact, self.exact.sinks,
                                              self.exact.window, scale, seq_len - (q1 - q0))
            for done in [src for src in recon if self.last_use.get(src, -1) <= layer]:
                del recon[done]  # no later layer reads it
        return out


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, first_pos: int) -> torch.Tensor:
    """q [Tq, Hq, h] at positions first_pos.., k/v [Tk, H, h] at 0..Tk-1 (GQA: Hq a multiple of H) -> [Tq, Hq, h]."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # [Hq, Tq, Tk]
    q_pos = torch.arange(q.shape[0], device=q.device)[:, None] + first_pos
    k_pos = torch.arange(k.shape[0], device=q.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
