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
from .kernels.attention import WindowInputs
from .kernels.reconstruct import PrefillSplit, _on_device, attend_rows, context_rows, decode_residual, flash_twin
from .reference import AquaKVCache
from .rope import Rope


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
class ContextRows:
    """Every request's whole context in one step, as T rows (request by request, positions ascending): where each
    token's slot is, and where its reconstruction goes for attention (``split``)."""

    split: PrefillSplit  # the rows' attention layout (``kernels.reconstruct.context_rows``) and its K/V scratch
    blocks: torch.Tensor  # [T] int64 paged block of each context token
    offsets: torch.Tensor  # [T] int64 its slot in that block
    positions: torch.Tensor  # [T] int64 its position
    dst: torch.Tensor  # [T] int64 its row in ``split.scratch``
    new: torch.Tensor  # [N] int64 the row (among the T) of each of this step's tokens

    @classmethod
    def make(cls, query_start_loc: list[int], seq_lens: list[int], block_table: torch.Tensor, page_block: int,
             device, exact: tuple[int, int] | None) -> "ContextRows":
        """The step's rows from host lists (query_start_loc [R + 1], seq_lens [R]) and vLLM's block table."""
        split = context_rows(query_start_loc, seq_lens, device, exact)
        q_lens = [b - a for a, b in zip(query_start_loc[:-1], query_start_loc[1:])]
        starts = [0]
        for n in seq_lens[:-1]:
            starts.append(starts[-1] + n)
        lens, q_len, start, q_start = _on_device([seq_lens, q_lens, starts, query_start_loc[:-1]], torch.int64,
                                                 device)
        num_reqs, total, n = len(seq_lens), sum(seq_lens), query_start_loc[-1]
        req = torch.repeat_interleave(torch.arange(num_reqs, device=device), lens, output_size=total)  # [T]
        positions = torch.arange(total, device=device) - start[req]
        tok_req = torch.repeat_interleave(torch.arange(num_reqs, device=device), q_len, output_size=n)  # [N]
        new = start[tok_req] + (lens - q_len)[tok_req] + torch.arange(n, device=device) - q_start[tok_req]
        return cls(split, block_table[req, positions // page_block].long(), positions % page_block, positions,
                   split.cu_k.long()[req] + positions, new)


@dataclass
class StepState:
    """Per-forward-step scratch shared by all layers: the step's context rows and their reconstructions."""

    rows: ContextRows | None = None  # made by the step's first ``attend``
    recon: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # (stream, layer) -> [T, H, h] float32
    window: object = None  # window.WindowStep: this step's 16-bit ring entries (with ``TorchServingPath.exact``)


class TorchServingPath:
    """Cache write and paged attention for every layer, in plain torch."""

    def __init__(self, cache: AquaKVCache, rope: Rope | None):  # rope: for pre-RoPE artifacts only
        self.cache, self.rope = cache, rope
        self.fused: dict = {}  # layer -> kernels.attention.FusedLayer, for layers served by the fused kernel (CUDA)
        self.int8_scores = False  # fused decode steps score on int8 tensor cores (``aquakv_int8_scores``)
        self.cuda_decode = False  # fused decode steps of u1n4 codes run the CUDA codes loop (``aquakv_cuda_decode``)
        self.overlap_write = False  # fused decode steps with the window write beside attention (``aquakv_overlap_write``)
        self.ring_beside = False  # small fused decodes read the ring beside their codes (``aquakv_ring_beside``)
        # fused prefills with the window: its part and the merge in one Triton launch (``aquakv_fused_window_prefill``)
        self.fused_window_prefill = False
        self.slice_tokens: int | None = None  # context tokens per slice of ``attend``'s reconstruction (None: by device)
        self.exact = None  # window.ExactTokens: 16-bit sinks + recent window (aquakv_window; runtime sets the default)
        # compat.flash_attention's function: prefill steps of the fused kernels, and every step of this path, attend
        # over reconstructed K/V through it (None: ``flash_twin``, torch)
        self.flash = None
        self.merge = None  # compat.merge_attention_states's function (the window's prefill merges two FA calls)
        # (stream, layer) -> kernels.attention.stream_decoder's (lane table, rotation): ``decode_slots`` decodes
        # those streams' codes in one Triton launch (kernels.reconstruct.decode_residual) instead of ~40 torch ops
        self.residual_decoders: dict = {}
        self.layouts = [SlotLayout(cache.codecs["k", l], cache.codecs["v", l], cache.num_kv_heads, cache.head_dim,
                                   cache.exact_dtype) for l in range(cache.num_layers)]
        # the last layer whose predictors read (stream, layer): scratch is dropped after it
        self.last_use: dict[tuple[str, int], int] = {}
        for (_, layer), pred in cache.predictors.items():
            for src in pred.sources:
                self.last_use[src] = max(self.last_use.get(src, -1), layer)

    def use_residual_kernel(self) -> str:
        """Decode the codes of every stream the kernels can decode (``kernels.attention.stream_decoder``) with the Triton
        residual kernel (on CPU: in the interpreter, for tests) and, on CUDA, run the predictors on TF32; returns a
        note of what that covers."""
        from .kernels.attention import stream_decoder

        reasons = set()
        for key, codec in self.cache.codecs.items():
            decoder = None if codec is None else stream_decoder(codec)
            if isinstance(decoder, str):
                reasons.add(decoder)
            elif decoder is not None:
                self.residual_decoders[key] = decoder
        tf32 = self.cache.signs.device.type == "cuda"
        self.cache.predict_precision = "tf32" if tf32 else None  # cache write and read alike
        for (stream, layer), decoder in self.residual_decoders.items():  # compile every variant now, not mid-request
            layout, i = self.layouts[layer], "kv".index(stream)
            slots = torch.zeros(1, self.cache.num_kv_heads, layout.slot_bytes, dtype=torch.uint8,
                                device=self.cache.signs.device)
            decode_residual(slots, decoder, layout.code_offsets[i], layout.scale_offsets[i])
        coded = sum(c is not None for c in self.cache.codecs.values())
        note = f"codes of {len(self.residual_decoders)} of {coded} streams decoded by a Triton kernel"
        return (note + (f" (the others: {'; '.join(sorted(reasons))})" if reasons else "")
                + (", predictors on TF32" if tf32 else ""))

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
                if src not in step.recon:
                    raise RuntimeError(f"aquakv: layer {layer}'s cache write needs {src}'s reconstruction, which this "
                                       "step's attention did not make (an earlier layer skipped attend)")
                sources[src] = step.recon[src][step.rows.new]
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
        self.decode_slots(layer, kv_cache[block_table[pos // block_size].long(), :, pos % block_size], recon)

    def decode_slots(self, layer: int, slots: torch.Tensor, recon: dict) -> None:
        """Reconstruct ``layer``'s K (the artifact's key frame) and V of the tokens whose slots are ``slots``
        [T, H, slot] into ``recon`` (float32 [T, H, h]), predicted from the same tokens' earlier entries of ``recon``."""
        layout, parts = self.layouts[layer], None
        if self.residual_decoders:
            slots = slots.contiguous()  # decode_residual reads rows of slot_bytes
        for i, stream in enumerate("kv"):
            codec, decoder = self.cache.codecs[stream, layer], self.residual_decoders.get((stream, layer))
            if decoder is not None:
                residual = codec.unscale(decode_residual(slots, decoder, layout.code_offsets[i],
                                                         layout.scale_offsets[i]))
            else:
                parts = parts or layout.unpack(slots)
                if codec is None:
                    recon[stream, layer] = parts[i].float()
                    continue
                residual = codec.decode(parts[i])
            recon[stream, layer] = self.cache._predict(stream, layer, recon, residual) + residual

    def attend(self, layer: int, query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
               seq_lens: list[int], query_start_loc: list[int], scale: float, step: StepState,
               key: torch.Tensor | None = None, value: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention of this step's queries [N, Hq, h] (post-RoPE) over reconstructed contexts -> [N, Hq, h]
        (in query's dtype through FlashAttention, else float32); with ``exact``, sinks and window from 16 bits (this
        step's own tokens from key/value [N, H, h]).  Every request's context is reconstructed at once (its codes,
        the predictions from earlier layers, RoPE), into 16-bit rows that FlashAttention reads (``self.flash``;
        ``flash_twin`` in float32 where there is none, e.g. on CPU)."""
        page_block, heads, head_dim = kv_cache.shape[2], self.cache.num_kv_heads, self.cache.head_dim
        ring = self.exact
        if step.rows is None:  # the step's first layer
            step.rows = ContextRows.make(query_start_loc, seq_lens, block_table, page_block, query.device,
                                         None if ring is None else (ring.sinks, ring.window))
        rows = step.rows
        dtype = query.dtype if self.flash is not None else torch.float32
        k_rows, v_rows = rows.split.scratch(heads, head_dim, dtype, query.device)  # [rows, H, h]
        total = rows.positions.shape[0]
        # what later layers read, each in the buffer of an earlier layer's reconstruction that this layer reads last
        # where there is one (slice a of it is overwritten only after slice a's decode has read it): the chain then
        # holds 2 context-sized float32 streams, not 4 (``runtime.torch_path_bytes_per_token``)
        dying = [src for src, x in step.recon.items() if src[1] < layer and self.last_use.get(src, -1) == layer]
        kept = {}
        for stream in "kv":
            if self.last_use.get((stream, layer), -1) > layer:
                kept[stream, layer] = (step.recon[dying.pop()] if dying else
                                       torch.empty(total, heads, head_dim, device=query.device, dtype=torch.float32))
        # in slices: on CPU of ~1 MB per tensor, which stay in cache through the ~30 ops of a decode (one slice of all
        # contexts ran 2x slower on 2 cores); on CUDA of ~256 MB, which bounds the decode's temporaries (outside
        # vLLM's memory profile) at a few launches per slice
        chunk = self.slice_tokens or max(256, (2 ** 26 if query.is_cuda else 2 ** 18) // (heads * head_dim))
        for a in range(0, total, chunk):
            part = {src: x[a:a + chunk] for src, x in step.recon.items()}  # the earlier layers' rows of the slice
            self.decode_slots(layer, kv_cache[rows.blocks[a:a + chunk], :, rows.offsets[a:a + chunk]], part)
            k, v = part["k", layer], part["v", layer]  # [slice, H, h]
            for src, x in kept.items():
                x[a:a + chunk] = part[src]
            if self.cache.config.key_rope == "pre":
                k = self.rope.apply(k, rows.positions[a:a + chunk])
            k_rows[rows.dst[a:a + chunk]] = k.to(dtype)
            v_rows[rows.dst[a:a + chunk]] = v.to(dtype)
        step.recon.update(kept)
        window = None if ring is None else WindowInputs(ring.k[layer], ring.v[layer], ring.tags, key, value,
                                                        ring.sinks, ring.window)
        q = query.to(dtype)
        out = torch.empty_like(q)
        attend_rows(q, k_rows, v_rows, block_table, page_block, rows.split, scale, out, self.flash or flash_twin,
                    window, self.merge)
        for done in [src for src in step.recon if self.last_use.get(src, -1) <= layer]:
            del step.recon[done]  # no later layer reads it
        return out
