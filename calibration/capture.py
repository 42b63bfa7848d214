"""Capture pre-RoPE keys and values of every layer of a Hugging Face decoder with forward hooks."""

from __future__ import annotations

import os

import torch


class NonFiniteActivations(ValueError):
    """Captured K/V hold NaN or inf; the message says where."""


def attention_modules(model) -> list:
    """The self-attention module of every decoder layer (Llama/Qwen2/Mistral-style models)."""
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(f"{type(model).__name__} has no model.layers[i].self_attn; aquakv supports Llama-style decoders")
    attns = [layer.self_attn for layer in layers]
    for a in attns:
        if not (hasattr(a, "k_proj") and hasattr(a, "v_proj")) and not (hasattr(a, "qkv_proj") and not
                                                                         hasattr(a, "k_norm")):
            raise ValueError(f"{type(model).__name__}'s attention has neither separate k_proj/v_proj nor one "
                             "qkv_proj ([q | k | v], Phi-3 style), or latent attention; aquakv supports "
                             "Llama/Qwen2/Mistral/Phi-3-style decoders")
    return attns


def install_kv_hooks(model, make_hook) -> list:
    """Forward hooks on every layer's pre-RoPE key module (k_norm where the model has one, e.g. Qwen3, else k_proj)
    and value module (v_proj), or on a fused qkv_proj whose output [..., q | k | v] the hook splits (Phi-3);
    ``make_hook(stream, layer)`` returns the hook (it may return a replacement output).  Returns the handles."""
    _, kv_heads, head_dim = kv_shape(model.config)
    handles = []
    for layer, attn in enumerate(attention_modules(model)):
        if not hasattr(attn, "k_proj"):
            kv = kv_heads * head_dim
            hook = _split_qkv_hook(make_hook("k", layer), make_hook("v", layer), attn.qkv_proj.out_features - 2 * kv, kv)
            handles.append(attn.qkv_proj.register_forward_hook(hook))
            continue
        k_mod = getattr(attn, "k_norm", None) or attn.k_proj
        handles.append(k_mod.register_forward_hook(make_hook("k", layer)))
        handles.append(attn.v_proj.register_forward_hook(make_hook("v", layer)))
    return handles


def _split_qkv_hook(k_hook, v_hook, q_size: int, kv_size: int):
    """One forward hook on a fused qkv projection: runs the key and value hooks on their slices of the output
    [..., q_size + 2 kv_size] and reassembles it from what they return (a replacement, or None: unchanged)."""
    def hook(module, inputs, output):
        q, k, v = output.split([q_size, kv_size, kv_size], dim=-1)
        k_new, v_new = k_hook(module, inputs, k), v_hook(module, inputs, v)
        if k_new is None and v_new is None:
            return None
        return torch.cat([q, k if k_new is None else k_new, v if v_new is None else v_new], dim=-1)
    return hook


class QueryEnergy:
    """Context manager: while active, every forward (one window of positions 0..T-1) adds each layer's queries to
    E[q_i^2] per KV head and channel (the query heads of a KV head together), taken where the keys are quantized:
    pre-RoPE, or rotated by ``rope`` to their positions for post-RoPE keys.  Hooks on q_norm where the model has one
    (Qwen3), else q_proj, or the query slice of a fused qkv_proj (Phi-3).  ``energy()``: per layer [H, h] float32."""

    def __init__(self, model, rope=None):
        self.model, self.rope = model, rope
        self.num_q_heads = model.config.num_attention_heads
        _, self.num_kv_heads, self.head_dim = kv_shape(model.config)
        self.sums: list[torch.Tensor] = []
        self.tokens = 0
        self._handles = []

    def _hook(self, layer: int, fused_qkv: bool):
        def hook(_module, _inputs, output):
            q = output[..., :self.num_q_heads * self.head_dim] if fused_qkv else output  # [..., q | k | v] -> q
            q = q.detach().float().reshape(-1, self.num_q_heads, self.head_dim)  # batch 1: [T, Hq, h]
            if self.rope is not None:
                q = self.rope.apply(q, torch.arange(q.shape[0], device=q.device))
            group = q.reshape(q.shape[0], self.num_kv_heads, -1, self.head_dim)  # [T, H, G, h]
            self.sums[layer] += (group.double() ** 2).sum((0, 2)).cpu()
            if layer == 0:
                self.tokens += q.shape[0]
        return hook

    def __enter__(self) -> "QueryEnergy":
        attns = attention_modules(self.model)
        self.sums = [torch.zeros(self.num_kv_heads, self.head_dim, dtype=torch.float64) for _ in attns]
        for layer, attn in enumerate(attns):
            module = getattr(attn, "q_norm", None) or getattr(attn, "q_proj", None)
            self._handles.append((module or attn.qkv_proj).register_forward_hook(self._hook(layer, module is None)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def energy(self) -> list[torch.Tensor]:
        """E[q_i^2] per layer, [H, h] (summed over each KV head's query heads, averaged over tokens)."""
        if self.tokens == 0:
            raise ValueError("no queries were captured")
        return [(s / self.tokens).float() for s in self.sums]


def kv_shape(config) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a transformers config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


class KVCapture:
    """Context manager: while active, every forward appends per-layer pre-RoPE K and V [T, H, h] (float32, CPU).

    Keys are taken after k_proj (and after k_norm where the model has one, e.g. Qwen3), before rotary
    embedding; values after v_proj.  Batch rows are concatenated along T.
    """

    def __init__(self, model):
        self.model = model
        _, self.num_kv_heads, self.head_dim = kv_shape(model.config)
        self.keys: list[list[torch.Tensor]] = []
        self.values: list[list[torch.Tensor]] = []
        self._handles = []

    def _hook(self, store: list[torch.Tensor], stream: str, layer: int):
        def hook(_module, _inputs, output):
            x = output.detach().float().reshape(-1, self.num_kv_heads, self.head_dim).cpu()
            if not torch.isfinite(x).all():
                raise NonFiniteActivations(
                    f"the model produced NaN/inf {'keys' if stream == 'k' else 'values'} in layer {layer}: its "
                    "weights or activations overflow. Check that the model runs in float32 with transformers "
                    "(aquakv-calibrate loads it in float32) and that its weights are not corrupt")
            store.append(x)
        return hook

    def __enter__(self) -> "KVCapture":
        n = len(attention_modules(self.model))
        self.keys, self.values = [[] for _ in range(n)], [[] for _ in range(n)]
        self._handles = install_kv_hooks(
            self.model,
            lambda stream, layer: self._hook((self.keys if stream == "k" else self.values)[layer], stream, layer))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def take(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer K and V [T_total, H, h] captured so far; clears the buffers."""
        ks = [torch.cat(x) for x in self.keys]
        vs = [torch.cat(x) for x in self.values]
        for buf in (*self.keys, *self.values):
            buf.clear()
        return ks, vs


def tokenize_windows(tokenizer, docs: list[str], window: int, max_tokens: int) -> torch.Tensor:
    """Concatenate docs (EOS-separated), cut into [N, window] token windows, at most ``max_tokens`` in all."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= max_tokens:
            break
    n = min(len(ids), max_tokens) // window
    if n == 0:
        raise ValueError(f"text too short: {len(ids)} tokens, fewer than one sequence of {window}; give more text "
                         "or use shorter sequences (aquakv-calibrate: --seq-len; aquakv-eval: --ctx)")
    return torch.tensor(ids[: n * window]).reshape(n, window)


@torch.no_grad()
def capture_kv(model, windows: torch.Tensor, progress: bool = True, spill_dir: str | None = None,
               queries: QueryEnergy | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run the model on token windows [N, T] one at a time; per-layer K, V [N*T, H, h] float32.

    With ``spill_dir``, each layer's K and V go to a float32 memory-mapped file there as soon as a window is done,
    so RAM holds one window's activations, not the whole calibration set (needed for large models).  ``queries``
    (a ``QueryEnergy``) also sums the queries' energy in the same forwards.
    """
    import contextlib

    import numpy as np
    from tqdm import tqdm

    total = windows.numel()
    stores = None
    with KVCapture(model) as cap, (queries or contextlib.nullcontext()):
        for i, row in enumerate(tqdm(windows, desc="capture K/V", unit="window", disable=not progress)):
            model(row[None].to(model.device))
            if spill_dir is None:
                continue
            ks, vs = cap.take()
            if stores is None:
                os.makedirs(spill_dir, exist_ok=True)
                shape = (total, cap.num_kv_heads, cap.head_dim)
                stores = [[np.lib.format.open_memmap(os.path.join(spill_dir, f"{s}{l}.npy"), mode="w+",
                                                     dtype=np.float32, shape=shape) for l in range(len(ks))]
                          for s in "kv"]
            t0 = i * windows.shape[1]
            for store, xs in zip(stores, (ks, vs)):
                for mm, x in zip(store, xs):
                    mm[t0:t0 + x.shape[0]] = x.numpy()
        if spill_dir is None:
            return cap.take()
    for store in stores:
        for mm in store:
            mm.flush()
    return tuple([torch.from_numpy(mm) for mm in store] for store in stores)


def reconstruct_in_key_frame(reconstruct, stream: str, layer: int, x: torch.Tensor, recon: dict, rope, key_rope: str,
                             positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``reconstruct(stream, layer, x, recon)`` on pre-RoPE x [T, H, h] in the artifact's key frame (keys rotated
    to ``positions`` first when key_rope is 'post').  Returns (the reconstruction in that frame, which later
    predictors read; the reconstruction back in the pre-RoPE frame of x)."""
    post = stream == "k" and key_rope == "post"
    rec = reconstruct(stream, layer, rope.apply(x, positions) if post else x, recon)
    return rec, (rope.undo(rec, positions) if post else rec)


class KeysInFrame:
    """Captured pre-RoPE keys (per layer [N*T, H, h], windows of ``seq_len`` tokens from position 0) seen in the
    artifact's key frame: unchanged for key_rope 'pre', rotated by each token's position for 'post'.  Layers are
    rotated on access, so memory-mapped captures stay on disk."""

    def __init__(self, ks: list[torch.Tensor], rope, seq_len: int, key_rope: str):
        self.ks, self.rope, self.seq_len, self.post = ks, rope, seq_len, key_rope == "post"

    def __len__(self) -> int:
        return len(self.ks)

    def __getitem__(self, layer: int) -> torch.Tensor:
        k = self.ks[layer]
        if not self.post:
            return k
        return self.rope.apply(k, torch.arange(k.shape[0], device=k.device) % self.seq_len)

    def __iter__(self):
        return (self[l] for l in range(len(self)))
