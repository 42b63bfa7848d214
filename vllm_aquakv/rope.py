"""Rotary position embedding of Llama-style models, to undo it on written keys and redo it on read keys.

Supported: rope_type default, linear and llama3 with full rotary dim and the NeoX ("rotate half") layout that
Llama/Qwen2/Mistral use in vLLM and transformers.  Anything else is refused with ``UnsupportedModel``.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModel(ValueError):
    """The model cannot be served correctly with aquakv; the message says why and what to do."""


def rope_settings(cfg: dict) -> tuple[str, float, dict]:
    """(rope_type, theta, parameters) from a HF config dict (transformers 4.x or 5.x keys)."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = float(params.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
    return rope_type, theta, params


def inverse_frequencies(cfg: dict, head_dim: int) -> torch.Tensor:
    """inv_freq [head_dim / 2] (float32) of the model's RoPE; raises UnsupportedModel for other schemes."""
    rope_type, theta, p = rope_settings(cfg)
    partial = float(cfg.get("partial_rotary_factor", 1.0) or 1.0)
    if partial != 1.0:
        raise UnsupportedModel(f"aquakv needs full rotary embeddings; this model has partial_rotary_factor={partial}")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModel(f"aquakv supports rope types {SUPPORTED_ROPE_TYPES}; this model uses {rope_type!r}. "
                               "Use another --kv-cache-dtype for it.")
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if rope_type == "linear":
        inv = inv / float(p["factor"])
    elif rope_type == "llama3":
        factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old_len = float(p["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv = torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv.float()


class Rope:
    """cos/sin tables for positions; ``apply`` rotates [..., H, h] by position, ``undo`` rotates back."""

    def __init__(self, cfg: dict, head_dim: int):
        self.inv_freq = inverse_frequencies(cfg, head_dim)

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None]  # [N, h/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [N, 1, h]
        return emb.cos(), emb.sin()

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [N, H, h] (pre-RoPE) -> post-RoPE, float32."""
        cos, sin = self._cos_sin(positions)
        x = x.float()
        return x * cos + self._rotate_half(x) * sin

    def undo(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [N, H, h] (post-RoPE) -> pre-RoPE, float32 (the inverse rotation)."""
        cos, sin = self._cos_sin(positions)
        x = x.float()
        return x * cos - self._rotate_half(x) * sin
