"""Decode-time cost model of a cache configuration (DESIGN.md §2): bytes read and FLOPs per cached value per step.

Per decode step, attention of layer l must touch every cached token of layer l.  Counted per cached value
(one of the 2 * num_kv_heads * head_dim numbers a token stores per layer):

- bytes: the layer's own codes + scales, plus whatever the predictors' sources cost to obtain for every cached
  token: a source in the same layer is free (already decoded); an anchor layer's keys cost their codes again; a
  previous-layer chain costs a 16-bit scratch of layer l-1 written and read every step (2 + 2 bytes per source
  value), since recomputing it would cost O(l) layers of decoding.
- FLOPs: attention itself (2 * G for QK and PV, G query heads per KV head), dequantization (~2), and the predictors
  applied per cached token: dense 2 * d_in, per-head 2 * h_in, low-rank 2 * R * (1 + d_in / d).  A value predictor
  whose only source is the same layer's keys is linear in the keys, so it can be applied once per query after the
  softmax-weighted sum: it costs ~2 * G per value (one more PV-like product) when it is per head, and H times that
  when it is dense (each query head then needs the weighted key sums of every KV head).
- Keys: pre-RoPE keys must be decoded per cached token (inverse Hadamard, 2 * h FLOPs per key value on tensor cores,
  then RoPE); post-RoPE keys (``key_rope="post"``) are scored in the Hadamard domain (q rotated once per query), so
  they cost nothing beyond dequantization.  Values are always summed in the Hadamard domain and rotated once.
"""

from __future__ import annotations

from .grids import grid_bits_per_value
from .predictors import parse_structure
from .reference import AquaKVConfig


def _predictor_flops(structure: str, n_sources: int, d: int, h: int) -> float:
    name, rank = parse_structure(structure)
    if name in ("none", "mean") or n_sources == 0:
        return 0.0
    if name == "dense":
        return 2.0 * n_sources * d
    if name == "per_head":
        return 2.0 * n_sources * h
    return 2.0 * rank * (1 + n_sources)


def decode_cost(config: AquaKVConfig, num_kv_heads: int, head_dim: int, num_q_heads: int, layer: int = 5) -> dict:
    """Bytes read and FLOPs per cached value per decode step for a typical layer (not 0, not an anchor)."""
    d, h, g = num_kv_heads * head_dim, head_dim, num_q_heads // num_kv_heads
    group = config.group_size or head_dim
    k_bits = grid_bits_per_value(config.key_grid) + 16 / group
    v_bits = grid_bits_per_value(config.value_grid) + 16 / group
    own = (k_bits + v_bits) / 16  # bytes per value, averaged over K and V
    extra_bytes, flops, notes = 0.0, 2.0 * g + 2.0, []
    for stream in "kv":
        structure = config.key_predictor if stream == "k" else config.value_predictor
        sources = config.sources(stream, layer) if parse_structure(structure)[0] not in ("none", "mean") else ()
        if stream == "k" and config.key_rope == "pre":
            flops += 2.0 * h / 2  # per-token inverse Hadamard of the keys (half the values are keys)
            notes.append("pre-RoPE keys decoded per token")
        if stream == "v" and sources == (("k", layer),):
            heads = 1 if parse_structure(structure)[0] == "per_head" else num_kv_heads
            flops += 2.0 * g * heads / 2  # after the softmax: PV-like products, half the values are V
            notes.append("V from same-layer K after softmax")
            continue
        flops += _predictor_flops(structure, len(sources), d, h) / 2
        for src_stream, src_layer in sources:
            if src_layer == layer:
                continue
            if src_layer == layer - 1 and config.key_topology == "chain" or src_stream == "v":
                extra_bytes += (2 + 2) / 2  # 16-bit scratch of the previous layer, written and read
                notes.append(f"{stream} needs a 16-bit scratch of layer l-1")
            else:
                extra_bytes += k_bits / 8 / 2  # the anchor's key codes
                notes.append(f"{stream} reads anchor layer {src_layer}'s key codes")
    return {"bytes_per_value": own + extra_bytes, "flops_per_value": flops, "notes": sorted(set(notes))}
