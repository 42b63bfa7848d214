"""Run a transformers model with its K/V replaced by the AQUA-KV reconstruction (the serving semantics).

Inside ``ReconstructedKV(model, cache)``, every layer's pre-RoPE keys (k_proj, or k_norm where the model has one)
and values (v_proj) are replaced by what the aquakv cache stores and decodes for them, layer by layer, with the
predictors fed from earlier layers' reconstructions.  Attention then reads reconstructed K/V for every token,
which is exactly what ``vllm serve --kv-cache-dtype aquakv`` does (no 16-bit sinks/window).  Works with
transformers' own KV cache and generate(), since each token's reconstruction depends only on that token.
For an artifact with post-RoPE keys (``key_rope="post"``) pass ``rope``; batch 1 only.  The first position of
each forward is the model call's own: its ``cache_position`` (generate), else the length of its
``past_key_values``, else 0 (a fresh sequence).
"""

from __future__ import annotations

import torch

from ..reference import AquaKVCache
from .capture import install_kv_hooks, reconstruct_in_key_frame


class ReconstructedKV:
    """Context manager installing the replacement hooks on every attention layer."""

    def __init__(self, model, cache: AquaKVCache, rope=None):
        if cache.config.key_rope == "post" and rope is None:
            raise ValueError("an artifact with post-RoPE keys needs the model's Rope")
        self.model, self.cache, self.rope = model, cache, rope
        self.start = 0  # position of this forward's first token (set by a pre-hook on the model call)
        self.recon: dict[tuple[str, int], torch.Tensor] = {}  # this forward's tokens, per (stream, layer)
        self._handles = []

    def _hook(self, stream: str, layer: int):
        def hook(_module, _inputs, output):
            c = self.cache
            x = output.detach().float().reshape(-1, c.num_kv_heads, c.head_dim)  # [B*T, H, h]
            if stream == "k" and layer == 0:
                self.recon.clear()  # a new forward pass starts at layer 0
            pos = torch.arange(self.start, self.start + x.shape[0], device=x.device)
            self.recon[stream, layer], rec = reconstruct_in_key_frame(
                lambda s, l, xs, r: c.encode_stream(s, l, xs, r)[1], stream, layer, x, self.recon, self.rope,
                c.config.key_rope, pos)
            return rec.reshape(output.shape).to(output.dtype)
        return hook

    def _first_position(self, _module, _args, kwargs):
        cache_position, past = kwargs.get("cache_position"), kwargs.get("past_key_values")
        if cache_position is not None:
            self.start = int(cache_position.reshape(-1)[0])
        else:
            self.start = past.get_seq_length() if past is not None else 0

    def __enter__(self) -> "ReconstructedKV":
        self.recon.clear()
        self._handles = install_kv_hooks(self.model, self._hook)
        self._handles.append(self.model.register_forward_pre_hook(self._first_position, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self.recon.clear()
