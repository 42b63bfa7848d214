"""Run a transformers model with its K/V replaced by the AQUA-KV reconstruction (the serving semantics).

Inside ``ReconstructedKV(model, cache)``, every layer's pre-RoPE keys (k_proj, or k_norm where the model has one)
and values (v_proj) are replaced by what the aquakv cache stores and decodes for them, layer by layer, with the
predictors fed from earlier layers' reconstructions.  Attention then reads reconstructed K/V for every token,
which is exactly what ``vllm serve --kv-cache-dtype aquakv`` does (no 16-bit sinks/window).  Works with
transformers' own KV cache and generate(), since each token's reconstruction depends only on that token.
For an artifact with post-RoPE keys (``key_rope="post"``) pass ``rope``; batch 1 only, positions continue
from one forward to the next (generate) and restart when the context manager is entered.
"""

from __future__ import annotations

import torch

from ..reference import AquaKVCache
from .capture import install_kv_hooks


class ReconstructedKV:
    """Context manager installing the replacement hooks on every attention layer."""

    def __init__(self, model, cache: AquaKVCache, rope=None):
        if cache.config.key_rope == "post" and rope is None:
            raise ValueError("an artifact with post-RoPE keys needs the model's Rope")
        self.model, self.cache, self.rope = model, cache, rope
        self.start = 0  # position of this forward's first token
        self.recon: dict[tuple[str, int], torch.Tensor] = {}  # this forward's tokens, per (stream, layer)
        self._handles = []

    def _hook(self, stream: str, layer: int):
        def hook(_module, _inputs, output):
            c = self.cache
            x = output.detach().float().reshape(-1, c.num_kv_heads, c.head_dim)  # [B*T, H, h]
            if stream == "k" and layer == 0:
                if self.recon:
                    self.start += self.recon["k", 0].shape[0]
                self.recon.clear()  # a new forward pass starts at layer 0
            post = stream == "k" and c.config.key_rope == "post"
            pos = torch.arange(self.start, self.start + x.shape[0], device=x.device)
            _, self.recon[stream, layer] = c.encode_stream(stream, layer, self.rope.apply(x, pos) if post else x,
                                                           self.recon)
            rec = self.rope.undo(self.recon[stream, layer], pos) if post else self.recon[stream, layer]
            return rec.reshape(output.shape).to(output.dtype)
        return hook

    def __enter__(self) -> "ReconstructedKV":
        self.start = 0
        self.recon.clear()
        self._handles = install_kv_hooks(self.model, self._hook)
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self.recon.clear()
