"""Rotary position embedding of Llama-style models, to undo it on written keys and redo it on read keys.

Serving a pre-RoPE artifact (the paper's keys) needs it: supported are rope_type default, linear and llama3 with
full rotary dim and the NeoX ("rotate half") layout that Llama/Qwen2/Mistral use in vLLM and transformers; anything
else is refused with ``UnsupportedModel``.  A post-RoPE artifact (``--preset speed``) stores keys as vLLM hands them
and never rotates them when serving, so it serves any RoPE variant; calibrating and evaluating one only rotate the
captured keys, with the model's own rotary embedding where ``Rope`` does not know its type (``model_rope``).
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


def check_full_rotary(cfg: dict) -> None:
    """Refuse (``UnsupportedModel``) a config whose RoPE rotates only part of each head."""
    partial = float(cfg.get("partial_rotary_factor") or rope_settings(cfg)[2].get("partial_rotary_factor") or 1.0)
    if partial != 1.0:
        raise UnsupportedModel(f"aquakv needs full rotary embeddings; this model has partial_rotary_factor={partial}")


def inverse_frequencies(cfg: dict, head_dim: int) -> torch.Tensor:
    """inv_freq [head_dim / 2] (float32) of the model's RoPE; raises UnsupportedModel for other schemes."""
    rope_type, theta, p = rope_settings(cfg)
    check_full_rotary(cfg)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModel(f"aquakv's pre-RoPE artifacts support rope types {SUPPORTED_ROPE_TYPES}; this model "
                               f"uses {rope_type!r}. Calibrate it with --preset speed (post-RoPE keys: any rope "
                               "type), or use another --kv-cache-dtype for it.")
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


class TableRope(Rope):
    """A model's RoPE as cos/sin tables [P, h] for positions 0..P-1 (unit-norm pairs, NeoX layout) times ``scale``,
    its attention scaling (YaRN's mscale), which multiplies the rotated keys (``model_rope``)."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, scale: float):
        self.cos, self.sin, self.scale, self.inv_freq = cos, sin, scale, None

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if int(positions.max()) >= self.cos.shape[0]:
            raise ValueError(f"positions up to {int(positions.max())}; this RoPE table holds {self.cos.shape[0]}")
        at = positions.to(self.cos.device).long()
        return self.cos[at][:, None, :].to(positions.device), self.sin[at][:, None, :].to(positions.device)

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return super().apply(x, positions) * self.scale

    def undo(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return super().undo(x, positions) / self.scale


def model_rope(model, head_dim: int, positions: int) -> TableRope:
    """The RoPE of a transformers decoder from its own rotary embedding module (``model.model.rotary_emb``: every
    rope type transformers implements), as tables for positions 0..positions-1; refused (``UnsupportedModel``) where
    it does not rotate the full head (``head_dim``) in the NeoX layout, checked against the model file's
    ``apply_rotary_pos_emb``."""
    import sys

    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    if rotary is None:
        raise UnsupportedModel(f"{type(model).__name__} has no model.rotary_emb: aquakv cannot rotate its keys")
    try:
        with torch.no_grad():
            cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(positions)[None])  # [1, P, rot dim]
    except (TypeError, ValueError, RuntimeError, IndexError) as e:
        raise UnsupportedModel(f"{type(model).__name__}'s rotary embedding does not take (x, position_ids [1, P]) "
                               f"as Llama's does ({type(e).__name__}: {e}): aquakv cannot rotate its keys") from e
    if cos.dim() != 3 or cos.shape[:2] != (1, positions) or cos.shape[-1] != head_dim:
        raise UnsupportedModel(f"aquakv needs full rotary embeddings of one position axis; this model's give "
                               f"cos/sin of shape {tuple(cos.shape)} for {positions} positions of head_dim {head_dim}")
    scale = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
    rope = TableRope(cos[0].float() / scale, sin[0].float() / scale, scale)
    apply_rotary = getattr(sys.modules.get(type(model).__module__), "apply_rotary_pos_emb", None)
    if apply_rotary is not None:  # the model's own rotation of random keys [1, 2, P', h] must be ours
        n = min(positions, 64)
        x = torch.randn(1, 2, n, head_dim, generator=torch.Generator().manual_seed(0))
        theirs = apply_rotary(x, x, cos[:, :n], sin[:, :n])[1][0].transpose(0, 1)  # [P', 2, h]
        if not torch.allclose(theirs, rope.apply(x[0].transpose(0, 1), torch.arange(n)), atol=1e-5, rtol=1e-4):
            raise UnsupportedModel(f"{type(model).__name__} does not rotate keys in the NeoX (rotate-half) layout "
                                   "that aquakv implements")
    return rope


def calibration_rope(model, cfg: dict, head_dim: int, positions: int) -> Rope:
    """The RoPE that calibration and evaluation apply to captured pre-RoPE keys: ``Rope`` from config.json (the
    inverse frequencies serving uses) where it knows the rope type, else the model's own (``model_rope``, for
    post-RoPE artifacts, whose serving never rotates keys)."""
    try:
        return Rope(cfg, head_dim)
    except UnsupportedModel:
        return model_rope(model, head_dim, positions)
