"""Run a transformers model with its K/V replaced by the AQUA-KV reconstruction (the serving semantics).

Inside ``ReconstructedKV(model, cache)``, every layer's pre-RoPE keys (k_proj, or k_norm where the model has one)
and values (v_proj) are replaced by what the aquakv cache stores and decodes for them, layer by layer, with the
predictors fed from earlier layers' reconstructions.  Attention then reads reconstructed K/V for every token,
which is exactly what ``vllm serve --kv-cache-dtype aquakv`` does (no 16-bit sinks/window).  Works with
transformers' own KV cache and generate(), since each token's reconstruction depends only on that token.
"""

from __future__ import annotations

import torch

from ..reference import AquaKVCache
from .capture import install_kv_hooks


class ReconstructedKV:
    """Context manager installing the replacement hooks on every attention layer."""

    def __init__(self, model, cache: AquaKVCache):
        self.model, self.cache = model, cache
        self.recon: dict[tuple[str, int], torch.Tensor] = {}  # this forward's tokens, per (stream, layer)
        self._handles = []

    def _hook(self, stream: str, layer: int):
        def hook(_module, _inputs, output):
            c = self.cache
            x = output.detach().float().reshape(-1, c.num_kv_heads, c.head_dim)  # [B*T, H, h]
            if stream == "k" and layer == 0:
                self.recon.clear()  # a new forward pass starts at layer 0
            _, self.recon[stream, layer] = c.encode_stream(stream, layer, x, self.recon)
            return self.recon[stream, layer].reshape(output.shape).to(output.dtype)
        return hook

    def __enter__(self) -> "ReconstructedKV":
        self._handles = install_kv_hooks(self.model, self._hook)
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self.recon.clear()
