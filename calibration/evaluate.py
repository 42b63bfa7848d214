"""aquakv-eval: perplexity of a model with its KV cache compressed, against the unquantized cache and baselines.

    aquakv-eval MODEL [--artifact MODEL/aquakv] [--windows 8] [--ctx 1024] [--retrieval-ctx 2048] [--json out.json]

Protocol (the same every time): held-out text (default wiki-heldout: every 5th Wikipedia article, disjoint from
the calibration split), concatenated with EOS separators and cut into non-overlapping windows of ``--ctx`` tokens;
each window is a fresh sequence; perplexity = exp(mean NLL of tokens 1..ctx-1 of every window); model in float32.

Cache semantics, simulated exactly in one forward pass per window: query i reads key/value j (j <= i) from the
16-bit copy when j < sinks or i - j < window, else from the reconstruction.  ``serving`` = sinks 0, window 0 (what
vLLM serves today: every token through codes); ``paper`` = the artifact's sinks/window (default 4/128).

Rows: unquantized; AQUA-KV (serving and paper semantics); HIGGS without predictors at the same grids; KIVI-style
2-bit (keys per channel over groups of 128 tokens, values per token over groups of head_dim, asymmetric min-max,
fp16 scale and zero per group); vLLM 0.26's own int4_per_token_head, turboquant_k3v4_nc and turboquant_3bit_nc
(calibration/vllm_formats.py: their store and read kernels' math on post-RoPE keys; TurboQuant's first and last two
layers stay 16-bit as in vLLM and count in its bits/value).

Long-context retrieval (``--retrieval-ctx``, default 2048 tokens, capped at the model's context): a 64-token essay
passage at the start of a prompt and again at its end; the score is the teacher-forced top-1 accuracy of predicting
the second occurrence (tokens 2..64), which needs attention to find and copy the first one across the whole
context; for the unquantized cache and every serving/paper row.  A copy check, not a pass-key one: SmolLM2-135M
cannot retrieve a pass key even unquantized (0-1 of 3 at 512-2048 tokens), but it copies (0.80 at 2048).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from ..artifact import default_artifact_dir, load_artifact
from ..reference import AquaKVCache
from ..rope import Rope, calibration_rope
from .calibrate import load_model, model_text_config
from .capture import install_kv_hooks, reconstruct_in_key_frame, tokenize_windows
from .texts import TEXT_SETS, load_texts

_ATTN_NAME = "aquakv_eval"


def kivi_quantize(x: torch.Tensor, stream: str, bits: int = 2, key_group: int = 128) -> torch.Tensor:
    """KIVI-style fake quantization of one layer's K or V [T, H, h] (float32 out)."""
    levels = 2**bits - 1
    if stream == "k":  # per channel, groups of key_group tokens
        t = x.shape[0] - x.shape[0] % key_group
        g = x[:t].reshape(-1, key_group, *x.shape[1:])  # [groups, G, H, h]
        lo, hi = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
    else:  # per token, groups of head_dim channels
        g, t = x, x.shape[0]
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    lo, hi = lo.half().float(), hi.half().float()
    scale = ((hi - lo) / levels).clamp(min=1e-8)
    q = ((g - lo) / scale).round().clamp(0, levels) * scale + lo
    out = x.clone().float()
    out[:t] = q.reshape(t, *x.shape[1:])
    return out  # a tail shorter than key_group stays exact (KIVI's full-precision residual)


def kivi_bits(head_dim: int, bits: int = 2, key_group: int = 128) -> float:
    """Bits per value of the KIVI baseline: mean of keys and values, codes + fp16 scale and zero per group."""
    return bits + (32 / key_group + 32 / head_dim) / 2


class MixedCache:
    """Context manager: the model attends to K/V as a cache with 16-bit sinks/window would serve them.

    ``reconstruct(stream, layer, x, recon)`` gives the stored-and-decoded version of x [T, H, h], e.g.
    ``AquaKVCache.encode_stream``'s second output; keys are handed to it pre-RoPE, or post-RoPE when
    ``key_rope="post"`` (batch 1, positions 0..T-1).  Hooks record exact and reconstructed pre-RoPE K/V per
    layer; a registered attention function mixes them per (query, key) pair.
    """

    def __init__(self, model, reconstruct, num_kv_heads: int, head_dim: int, sinks: int, window: int, rope: Rope,
                 key_rope: str = "pre", int8_scores: "Int8Scores | None" = None):
        self.model, self.reconstruct = model, reconstruct
        self.int8_scores = int8_scores  # scores of reconstructed keys as the fused kernel's int8 option computes them
        self.h, self.d, self.sinks, self.window, self.rope = num_kv_heads, head_dim, sinks, window, rope
        self.key_rope = key_rope
        self.delta: dict[tuple[str, int], torch.Tensor] = {}  # recon - exact, pre-RoPE [T, H, h]
        self.recon: dict[tuple[str, int], torch.Tensor] = {}
        self.errors: dict[tuple[str, int], list[float]] = {}  # per-layer sums: [err, energy]
        self._handles = []

    def _hook(self, stream: str, layer: int):
        def hook(_module, _inputs, output):
            x = output.detach().float().reshape(-1, self.h, self.d)  # batch 1: [T, H, h]
            if stream == "k" and layer == 0:
                self.recon.clear()
            pos = torch.arange(x.shape[0], device=x.device)
            self.recon[stream, layer], rec = reconstruct_in_key_frame(self.reconstruct, stream, layer, x, self.recon,
                                                                      self.rope, self.key_rope, pos)
            self.delta[stream, layer] = rec - x
            e = self.errors.setdefault((stream, layer), [0.0, 0.0])
            e[0] += float(((rec - x) ** 2).sum())
            e[1] += float((x**2).sum())
        return hook

    def _attention(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        # query [1, Hq, T, h]; key/value [1, H, T, h] exact (key post-RoPE)
        layer, t = module.layer_idx, query.shape[2]
        pos = torch.arange(t, device=query.device)
        k_rec = key + self.rope.apply(self.delta["k", layer], pos).transpose(0, 1)[None].to(key.dtype)
        v_rec = value + self.delta["v", layer].transpose(0, 1)[None].to(value.dtype)
        group = query.shape[1] // key.shape[1]
        rep = lambda x: x.repeat_interleave(group, dim=1)  # noqa: E731
        s_exact = query @ rep(key).transpose(2, 3) * scaling  # [1, Hq, T, T]
        s_rec = query @ rep(k_rec).transpose(2, 3) * scaling
        if self.int8_scores is not None:  # + (q' - q) . (k_rec - b_k): the rounded queries meet the codes' part only
            dq = self.int8_scores.rounded(layer, query) - query
            s_rec = s_rec + dq @ rep(k_rec - self.int8_scores.key_bias(layer, key)).transpose(2, 3) * scaling
        i, j = pos[:, None], pos[None, :]
        exact = (j < self.sinks) | (i - j < self.window)
        scores = torch.where(exact, s_exact, s_rec).masked_fill(j > i, float("-inf"))
        p = scores.softmax(-1)
        out = (p * exact) @ rep(value) + (p * ~exact) @ rep(v_rec)
        return out.transpose(1, 2).contiguous(), p

    def __enter__(self) -> "MixedCache":
        from transformers import AttentionInterface

        AttentionInterface.register(_ATTN_NAME, self._attention)
        self._previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(_ATTN_NAME)
        self._handles = install_kv_hooks(self.model, self._hook)
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self.model.set_attn_implementation(self._previous)

    def layer_errors(self) -> dict[str, float]:
        """relMSE of the reconstruction per 'k.l' / 'v.l' over everything evaluated."""
        return {f"{s}.{l}": e / max(n, 1e-30) for (s, l), (e, n) in sorted(self.errors.items(), key=lambda kv: kv[0][::-1])}


class Int8Scores:
    """The fused kernel's ``aquakv_int8_scores`` in torch (kernels/attention.py ``_int8_scores``): each query row is
    rounded to int8 in its layer's key rotation (units of max |q A| / 127) and scores the codes' part of a key with
    that, while the key mean b_k meets the exact query.  For artifacts the kernel serves: post-RoPE keys whose
    predictor has no sources (a mean or none)."""

    def __init__(self, cache: AquaKVCache):
        if cache.config.key_rope != "post":
            raise ValueError("--int8-scores emulates the fused kernels, which serve post-RoPE artifacts (--preset speed)")
        for layer in range(cache.num_layers):
            kp = cache.predictors.get(("k", layer))
            if kp is not None and kp.sources:
                raise ValueError(f"--int8-scores: layer {layer}'s key predictor reads {kp.sources}; the fused kernels "
                                 "serve key predictors without sources (--preset speed)")
        self.cache = cache

    def rounded(self, layer: int, query: torch.Tensor) -> torch.Tensor:
        """query [..., h] as the kernel scores the codes with it: rounded to int8 per row in the layer's key
        rotation (the codec's own ``rotate_heads``)."""
        codec = self.cache.codecs["k", layer]
        d = 1.0  # the codes hold D (k - b_k) with a key channel scale D [H, h]: q / D meets them
        if codec.channel_scale is not None:  # query [1, Hq, T, h]: each query head takes its KV head's D
            d = codec.channel_scale.repeat_interleave(query.shape[1] // codec.num_kv_heads, 0)[None, :, None, :]
            d = d.to(query.device)
        q = codec.rotate_heads(query / d)
        unit = q.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127
        return (codec.unrotate_heads((q / unit).round() * unit) * d).to(query.dtype)

    def key_bias(self, layer: int, key: torch.Tensor) -> torch.Tensor:
        """The key mean b_k [1, H, 1, h] in key's dtype and device (zeros without one)."""
        kp = self.cache.predictors.get(("k", layer))
        if kp is None or kp.bias is None:
            return torch.zeros_like(key[:, :, :1])
        return kp.bias.to(key.device, key.dtype)[None, :, None, :]


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, ctx=None) -> float:
    """exp(mean NLL) over tokens 1.. of each window [N, T], one forward per window, inside ``ctx`` if given."""
    import contextlib

    from tqdm import tqdm

    nll, n = 0.0, 0
    with ctx or contextlib.nullcontext():
        for row in tqdm(windows, desc="perplexity", unit="window", leave=False):
            logp = model(row[None].to(model.device)).logits[0].float().log_softmax(-1)
            nll -= logp[:-1].gather(1, row[1:, None].to(model.device)).sum().item()
            n += row.numel() - 1
    return math.exp(nll / n)


def copy_prompts(hay: list[int], ctx: int, trials: int, span: int = 64, seed: int = 0) -> list[list[int]]:
    """``trials`` token lists of exactly ``ctx`` tokens from ``hay``: a ``span``-token passage, filler from
    elsewhere in ``hay``, and the same passage again."""
    if len(hay) < 4 * ctx + 1:
        raise ValueError(f"the retrieval haystack has {len(hay)} tokens, too few for {ctx}-token prompts")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(trials):
        start = int(torch.randint(0, len(hay) - 4 * ctx, (1,), generator=gen))
        passage = hay[start:start + span]
        out.append(passage + hay[start + 2 * ctx:start + 3 * ctx - 2 * span] + passage)
    return out


@torch.no_grad()
def copy_accuracy(model, prompts: list[list[int]], span: int = 64, ctx=None) -> float:
    """Mean teacher-forced top-1 accuracy of predicting tokens 2..span of each prompt's second passage (which needs
    attention to find and copy the first one across the whole context), inside ``ctx`` if given."""
    import contextlib

    hits = []
    with ctx or contextlib.nullcontext():
        for ids in prompts:
            pred = model(torch.tensor([ids], device=model.device)).logits[0, -span:-1].argmax(-1).cpu()
            hits.append((pred == torch.tensor(ids[-span + 1:])).float().mean().item())
    return sum(hits) / len(hits)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``aquakv-eval``."""
    ap = argparse.ArgumentParser(prog="aquakv-eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--artifact", help="artifact folder (default MODEL/aquakv)")
    ap.add_argument("--text", default="wiki-heldout", choices=TEXT_SETS)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--json", help="write results here (and a .md twin)")
    ap.add_argument("--retrieval-ctx", type=int, default=2048,
                    help="context of the copy-retrieval check (capped at the model's max positions; 0: skip)")
    ap.add_argument("--retrieval-trials", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--int8-scores", action="store_true", help="also the artifact with the fused kernels' "
                    "aquakv_int8_scores (queries rounded to int8 for the codes' scores), emulated in torch")
    args = ap.parse_args(argv)
    t0 = time.time()
    art = args.artifact or default_artifact_dir(args.model)
    cache, manifest = load_artifact(art, args.model)
    model, tok = load_model(args.model, args.device)
    retrieval_ctx = min(args.retrieval_ctx, getattr(model.config, "max_position_embeddings", args.retrieval_ctx))
    rope = calibration_rope(model, model_text_config(args.model), cache.head_dim, max(args.ctx, retrieval_ctx))
    windows = tokenize_windows(tok, load_texts(args.text), args.ctx, args.windows * args.ctx)
    H, D, cfg = cache.num_kv_heads, cache.head_dim, cache.config

    def aqua(c: AquaKVCache):
        return lambda s, l, x, recon: c.encode_stream(s, l, x, recon)[1]

    plain = perplexity(model, windows)
    rows = [{"kv_cache_dtype": "auto (fp32)", "semantics": "-", "bits_per_value": 32.0, "bits_total": 32.0, "ppl": plain}]
    bpv = cache.bits(args.ctx)["bits_per_value"]
    runs = [("aquakv", "serving", aqua(cache), 0, 0, bpv),
            ("aquakv", "sinks only", aqua(cache), cfg.num_sink_tokens, 0, bpv),
            ("aquakv", "window only", aqua(cache), 0, cfg.window, bpv),
            ("aquakv", "paper", aqua(cache), cfg.num_sink_tokens, cfg.window, bpv)]
    int8 = Int8Scores(cache) if args.int8_scores else None
    if int8 is not None:
        runs += [("aquakv int8 scores", "serving", aqua(cache), 0, 0, bpv),
                 ("aquakv int8 scores", "paper", aqua(cache), cfg.num_sink_tokens, cfg.window, bpv)]
    if not args.no_baselines:
        higgs = AquaKVCache(type(cfg)(**{**cfg.to_json(), "key_predictor": "none", "value_predictor": "none",
                                         "key_channel_scale": "none"}),
                            cache.num_layers, H, D, signs=cache.signs)
        runs.append(("higgs-no-predictor", "serving", aqua(higgs), 0, 0, higgs.bits(args.ctx)["bits_per_value"]))
        runs.append(("kivi-2bit", "serving", lambda s, l, x, recon: kivi_quantize(x, s), 0, 0, kivi_bits(D)))
        from .vllm_formats import FORMATS, bits_per_value, vllm_reconstruct

        for fmt in FORMATS:  # vLLM's own formats: keys quantized post-RoPE whatever the artifact's key frame
            runs.append((fmt, "serving", vllm_reconstruct(fmt, cache.num_layers, rope, cfg.key_rope), 0, 0,
                         bits_per_value(fmt, D, cache.num_layers)))
    copy = []
    if retrieval_ctx > 0:
        copy = copy_prompts(tok("\n".join(load_texts("essays")))["input_ids"], retrieval_ctx, args.retrieval_trials)
        rows[0]["copy_accuracy"] = copy_accuracy(model, copy)
    per_layer = {}
    for name, semantics, fn, sinks, window, bits in runs:
        rounding = int8 if name == "aquakv int8 scores" else None
        mixed = MixedCache(model, fn, H, D, sinks, window, rope, cfg.key_rope, rounding)
        ppl = perplexity(model, windows, mixed)
        n_exact = min(args.ctx, sinks + window)
        rows.append({"kv_cache_dtype": name, "semantics": f"{semantics} (sinks {sinks}, window {window})",
                     "bits_per_value": bits, "bits_total": (16 * n_exact + bits * (args.ctx - n_exact)) / args.ctx,
                     "ppl": ppl, "rel_ppl_delta": ppl / plain - 1})
        if copy and semantics in ("serving", "paper"):  # a fresh cache: its per-layer errors stay perplexity's
            retrieval = MixedCache(model, fn, H, D, sinks, window, rope, cfg.key_rope, rounding)
            rows[-1]["copy_accuracy"] = copy_accuracy(model, copy, ctx=retrieval)
        per_layer[f"{name}/{semantics}"] = mixed.layer_errors()
        print(f"{name:20s} {semantics:8s} bits {bits:.3f}  ppl {ppl:.4f}  ({100 * (ppl / plain - 1):+.2f}%)", flush=True)
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    md = [f"Held-out {args.text}: {windows.shape[0]} windows x {args.ctx} tokens ({tokens} predicted tokens), fp32.\n",
          "bits/value = codes + scales; bits total = with the 16-bit sinks/window tokens at this context length.\n",
          "| cache | semantics | bits/value | bits total | ppl | rel. delta |", "| --- | --- | --- | --- | --- | --- |"]
    md += [f"| {r['kv_cache_dtype']} | {r['semantics']} | {r['bits_per_value']:.3f} | {r['bits_total']:.2f} | "
           f"{r['ppl']:.4f} | {100 * r.get('rel_ppl_delta', 0):+.2f}% |" for r in rows]
    if copy:
        md += [f"\nCopy retrieval at {retrieval_ctx} tokens ({args.retrieval_trials} prompts from the essays text set): "
               "a 64-token passage at the start of the prompt and again at its end; teacher-forced top-1 accuracy "
               "on the second occurrence, which needs attention to copy the first across the whole context.\n",
               "| cache | semantics | copy accuracy |", "| --- | --- | --- |"]
        md += [f"| {r['kv_cache_dtype']} | {r['semantics']} | {r['copy_accuracy']:.3f} |" for r in rows
               if "copy_accuracy" in r]
    errs = per_layer["aquakv/serving"]
    md += ["\nAQUA-KV per-layer relMSE of the reconstruction on the evaluated tokens:\n", "| layer | keys | values |",
           "| --- | --- | --- |"]
    md += [f"| {l} | {errs[f'k.{l}']:.4f} | {errs[f'v.{l}']:.4f} |" for l in range(cache.num_layers)]
    print("\n".join(md))
    if args.json:
        from ..results import write_results

        write_results(args.json, "eval", args.model, rows, "\n".join(md), per_layer=per_layer,
                      config=manifest["config"], tokens=tokens, retrieval_ctx=retrieval_ctx,
                      seconds=round(time.time() - t0, 1))


if __name__ == "__main__":
    main()
