"""Reference semantics of the whole AQUA-KV cache, in plain torch: the ground truth for every later test.

For one sequence of T tokens the cache holds, for every layer l and stream s in (k, v):

- codes + scales of the residual r = x - P_{s,l}(sources), for EVERY token, where the predictor's sources are
  *reconstructions* (prediction + dequantized residual) of earlier streams of the same token, exactly what a
  decoder can rebuild (see ``AquaKVConfig.sources``);
- a 16-bit copy of the first ``num_sink_tokens`` tokens (attention sinks) and of the last ``window`` tokens
  (the recent window); attention reads those instead of the reconstruction.  Because every token's codes
  depend only on that token, "compress when the token leaves the window" and "write codes at once and keep
  a 16-bit copy while it is in the window" store the same thing; the latter is what the paged cache does.
- layer 0 has no cross-layer source: it is quantized directly (``layer0_grid``, by default at 4 bits, with
  the per-channel mean as its only predictor) or kept in 16-bit (``layer0_grid="16bit"``).

Keys are pre-RoPE (``key_rope="pre"``, the paper) or post-RoPE (``key_rope="post"``: the fused-kernel mode, whose
attention scores are taken in the Hadamard domain without decoding keys; then keys have no cross-layer predictor,
only none or a per-channel mean).  The cache is frame-agnostic: callers hand it keys in the configured frame.
``AquaKVCache.calibrate`` fits the predictors layer by layer with quantization in the loop (each layer's predictor
sees the reconstructions the decoder will see).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import torch

from .codec import Encoded, HiggsCodec, check_head_dim, matmul_precision, rel_mse
from .grids import GRID_SPECS
from .predictors import LinearPredictor, RidgeStats, Source, parse_structure

KEY_TOPOLOGIES = ("chain", "anchor:G", "none")
VALUE_TOPOLOGIES = ("k_same+v_prev", "k_same", "v_prev", "none")
STREAMS = ("k", "v")
KEY_CHANNEL_SCALES = ("none", "query")
MAX_CHANNEL_SCALE = 64.0  # key channel scales stay within [1 / this, this] of their geometric mean per head (a power
# of two, as every scale is)


def key_channel_scale(query_energy: torch.Tensor, residual_energy: torch.Tensor) -> torch.Tensor:
    """The per-channel key scale D [H, h] that minimizes the expected attention-score error of HIGGS codes: the
    rotation spreads the error of D r evenly over channels, so a score's error q . (r - r_hat) has variance
    ~ sum_i E[q_i^2] / D_i^2 * sum_i D_i^2 E[r_i^2], least (Cauchy-Schwarz) at D_i^4 = E[q_i^2] / E[r_i^2].
    query_energy: E[q_i^2] per KV head's channel (its query heads together) [H, h]; residual_energy: E[r_i^2] of the
    key residual (after prediction) [H, h].  Normalized to geometric mean 1 per head, clamped to MAX_CHANNEL_SCALE,
    and rounded to powers of two (at most 2^0.5 from the optimum per channel, which raises the bound by at most
    1.5625x, ~1.17x for spread-out channels), so that multiplying by D or 1 / D is exact in every float format: the
    cache write's 16-bit rotation of 16-bit keys takes D S (S the +-1 sign matrix) as exact 16-bit numbers
    (``kernels.cache_write``), and the attention kernels' 16-bit q / D rounds nothing (``kernels.attention``; a
    bfloat16 q / D cost 0.55-0.69% of the attention output on the H100)."""
    q, r = query_energy.double(), residual_energy.double()
    floor = lambda e: e.clamp(min=1e-6 * e.mean(-1, keepdim=True).clamp(min=1e-30))  # noqa: E731  (dead channels)
    log2_d = 0.25 * (floor(q).log2() - floor(r).log2())
    limit = math.log2(MAX_CHANNEL_SCALE)
    log2_d = (log2_d - log2_d.mean(-1, keepdim=True)).clamp(-limit, limit)
    return torch.exp2(log2_d.round()).float()


class NonFiniteFit(ValueError):
    """A fitted predictor holds NaN or inf; the message says which and what to do."""


@dataclass(frozen=True)
class AquaKVConfig:
    """Settings of an AQUA-KV cache (all JSON-able; saved in the artifact manifest)."""

    key_grid: str = "d2n16"
    value_grid: str = "d2n16"
    layer0_grid: str = "d2n256"  # or "16bit"
    group_size: int | None = None  # None: head_dim (one fp16 scale per token and KV head)
    rotate: bool = True
    seed: int = 0
    num_sink_tokens: int = 4
    window: int = 128
    key_predictor: str = "dense"
    value_predictor: str = "dense"
    key_topology: str = "chain"  # chain | anchor:G | none
    value_topology: str = "k_same+v_prev"  # k_same+v_prev | k_same | v_prev | none
    ridge: float = 1e-3
    exact_dtype: str = "bfloat16"  # dtype of the 16-bit sinks / window / layers
    key_rope: str = "pre"  # keys quantized before RoPE (paper) or after it ("post": fused-kernel mode)
    # per-channel scale of the key residual before HIGGS (``codec`` docstring): "query" fits it to the calibration
    # queries' energy per channel (``key_channel_scale``; opt-in), "none" leaves keys as they are (the default)
    key_channel_scale: str = "none"

    def __post_init__(self):
        for g in (self.key_grid, self.value_grid):
            if g not in GRID_SPECS:
                raise ValueError(f"unknown grid {g!r}; choose one of {sorted(GRID_SPECS)}")
        if self.layer0_grid != "16bit" and self.layer0_grid not in GRID_SPECS:
            raise ValueError(f"layer0_grid must be '16bit' or one of {sorted(GRID_SPECS)}, got {self.layer0_grid!r}")
        parse_structure(self.key_predictor)
        parse_structure(self.value_predictor)
        name, _, arg = self.key_topology.partition(":")
        if self.key_topology not in ("chain", "none") and not (name == "anchor" and arg.isdigit() and int(arg) >= 2):
            raise ValueError(f"key_topology must be chain, none or anchor:G (G >= 2), got {self.key_topology!r}")
        if self.value_topology not in VALUE_TOPOLOGIES:
            raise ValueError(f"value_topology must be one of {VALUE_TOPOLOGIES}, got {self.value_topology!r}")
        if self.num_sink_tokens < 0 or self.window < 0:
            raise ValueError("num_sink_tokens and window must be >= 0")
        if self.key_rope not in ("pre", "post"):
            raise ValueError(f"key_rope must be 'pre' or 'post', got {self.key_rope!r}")
        if self.key_rope == "post" and parse_structure(self.key_predictor)[0] not in ("none", "mean"):
            raise ValueError("key_rope='post' keys are predicted by none or mean only (a position-dependent frame "
                             f"defeats cross-layer predictors), got key_predictor={self.key_predictor!r}")
        if self.key_channel_scale not in KEY_CHANNEL_SCALES:
            raise ValueError(f"key_channel_scale must be one of {KEY_CHANNEL_SCALES}, got {self.key_channel_scale!r}")
        if self.exact_dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"exact_dtype must be bfloat16, float16 or float32, got {self.exact_dtype!r}")

    def sources(self, stream: str, layer: int) -> tuple[Source, ...]:
        """Which reconstructed streams predict (stream, layer); () for layer 0 and topology 'none'."""
        if layer == 0:
            return ()
        if stream == "k":
            if self.key_rope == "post":
                return ()
            if self.key_topology == "chain":
                return (("k", layer - 1),)
            if self.key_topology.startswith("anchor:"):
                group = int(self.key_topology.split(":")[1])
                anchor = layer - layer % group
                return () if anchor == layer else (("k", anchor),)
            return ()
        return {
            "k_same+v_prev": (("k", layer), ("v", layer - 1)),
            "k_same": (("k", layer),),
            "v_prev": (("v", layer - 1),),
            "none": (),
        }[self.value_topology]

    def grid(self, stream: str, layer: int) -> str:
        """Grid name of (stream, layer), or '16bit'."""
        if layer == 0:
            return self.layer0_grid
        return self.key_grid if stream == "k" else self.value_grid

    def to_json(self) -> dict:
        """Plain dict for the manifest."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "AquaKVConfig":
        """Inverse of to_json; unknown keys are an error (a newer artifact format)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown aquakv config keys {sorted(unknown)}: artifact from a newer vllm-aquakv?")
        return cls(**data)


@dataclass
class CacheState:
    """What the cache stores for one sequence of ``length`` tokens."""

    length: int
    codes: dict[tuple[str, int], Encoded]  # (stream, layer) -> per-token codes/scales (quantized layers)
    exact_positions: torch.Tensor  # int64 [n_exact]: sink and window token positions
    exact: dict[tuple[str, int], torch.Tensor]  # (stream, layer) -> [n_exact, H, h] (all T for 16-bit layers)


class AquaKVCache:
    """The AQUA-KV cache of one model: config, per-(stream, layer) codecs and predictors."""

    def __init__(self, config: AquaKVConfig, num_layers: int, num_kv_heads: int, head_dim: int,
                 predictors: dict[tuple[str, int], LinearPredictor] | None = None,
                 signs: torch.Tensor | None = None, key_channel_scales: dict[int, torch.Tensor] | None = None):
        check_head_dim(head_dim)
        self.config, self.num_layers, self.num_kv_heads, self.head_dim = config, num_layers, num_kv_heads, head_dim
        self.exact_dtype = getattr(torch, config.exact_dtype)
        self.codecs: dict[tuple[str, int], HiggsCodec | None] = {}
        for stream, layer in self.keys():
            grid = config.grid(stream, layer)
            self.codecs[stream, layer] = None if grid == "16bit" else HiggsCodec(
                num_kv_heads, head_dim, grid, config.group_size, config.rotate, config.seed, signs)
        self.signs = next(c.signs for c in self.codecs.values() if c is not None)
        for layer, d in (key_channel_scales or {}).items():  # [H, h] per key layer (``key_channel_scale``)
            if self.codecs["k", layer] is not None:
                self.codecs["k", layer].set_channel_scale(d)
        self.predictors = predictors or {}
        self.calibration_metrics: dict[str, dict] = {}  # filled by calibrate(): per 'k.l' / 'v.l' relMSE
        # CUDA float32 precision of the predictors' products ("tf32": the torch serving path with aquakv_kernels, for
        # its cache write and its reads alike, so both predict the same; None: as torch is set)
        self.predict_precision: str | None = None

    def to(self, device) -> "AquaKVCache":
        """Move codecs and predictors to ``device`` (in place); returns self."""
        for codec in self.codecs.values():
            if codec is not None:
                codec.to(device)
        for pred in self.predictors.values():
            pred.to(device)
        self.signs = self.signs.to(device)
        return self

    def shard_granularity(self) -> str | None:
        """'head' when every KV head is encoded and predicted from that head alone (head-local predictors, scale
        groups within a head), so a tensor-parallel rank can serve its heads with a slice; None otherwise."""
        if (self.config.group_size or self.head_dim) > self.head_dim:
            return None
        return "head" if all(p.head_local() for p in self.predictors.values()) else None

    def shard(self, first_head: int, num_heads: int) -> "AquaKVCache":
        """The cache of KV heads [first_head, first_head + num_heads) only (a tensor-parallel rank's heads); needs
        ``shard_granularity() == 'head'``."""
        if self.shard_granularity() != "head":
            raise ValueError("this artifact's predictors or scale groups mix KV heads: it cannot be sharded by head")
        heads = slice(first_head, first_head + num_heads)
        preds = {key: p.shard(heads) for key, p in self.predictors.items()}
        scales = {layer: d[heads] for layer, d in self.key_channel_scales().items()}
        return AquaKVCache(self.config, self.num_layers, num_heads, self.head_dim, preds, self.signs, scales)

    def key_channel_scales(self) -> dict[int, torch.Tensor]:
        """The key codecs' channel scales D [H, h] by layer (none without ``key_channel_scale``)."""
        return {layer: c.channel_scale for (stream, layer), c in self.codecs.items()
                if stream == "k" and c is not None and c.channel_scale is not None}

    def keys(self) -> list[tuple[str, int]]:
        """(stream, layer) in encoding order: k_0, v_0, k_1, v_1, ..."""
        return [(s, l) for l in range(self.num_layers) for s in STREAMS]

    # ---- encode / decode --------------------------------------------------------------------------------
    def _exact_positions(self, length: int) -> torch.Tensor:
        sinks = torch.arange(min(self.config.num_sink_tokens, length))
        window = torch.arange(max(self.config.num_sink_tokens, length - self.config.window), length)
        return torch.cat([sinks, window])

    def _check_inputs(self, ks: list[torch.Tensor], vs: list[torch.Tensor]) -> None:
        want = (self.num_kv_heads, self.head_dim)
        if len(ks) != self.num_layers or len(vs) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layers of K and V, got {len(ks)} and {len(vs)}")
        for x in (*ks, *vs):
            if x.ndim != 3 or tuple(x.shape[1:]) != want or x.shape[0] != ks[0].shape[0]:
                raise ValueError(f"every K/V must be [T, {want[0]}, {want[1]}] with the same T, got {tuple(x.shape)}")

    def _sources(self, stream: str, layer: int, recon: dict) -> list[torch.Tensor]:
        pred = self.predictors.get((stream, layer))
        return [recon[s] for s in pred.sources] if pred is not None else []

    def _predict(self, stream: str, layer: int, recon: dict, like: torch.Tensor) -> torch.Tensor:
        pred = self.predictors.get((stream, layer))
        if pred is None:
            return torch.zeros(like.shape, dtype=torch.float32, device=like.device)
        with matmul_precision(self.predict_precision):
            return pred.predict(self._sources(stream, layer, recon), like)

    def encode(self, ks: list[torch.Tensor], vs: list[torch.Tensor], fit_stats: bool = False) -> CacheState:
        """Encode one sequence: ks/vs are per-layer pre-RoPE [T, num_kv_heads, head_dim] tensors."""
        self._check_inputs(ks, vs)
        length = ks[0].shape[0]
        pos = self._exact_positions(length)
        recon, codes, exact = {}, {}, {}
        for stream, layer in self.keys():
            x = (ks if stream == "k" else vs)[layer]
            stored, recon[stream, layer] = self.encode_stream(stream, layer, x, recon)
            if isinstance(stored, Encoded):
                codes[stream, layer] = stored
                exact[stream, layer] = x[pos].to(self.exact_dtype)
            else:  # 16-bit layer: the decoder sees the 16-bit value everywhere
                exact[stream, layer] = stored
        return CacheState(length, codes, pos, exact)

    def encode_stream(self, stream: str, layer: int, x: torch.Tensor, recon: dict) -> tuple[Encoded | torch.Tensor, torch.Tensor]:
        """Encode one stream of tokens x [N, H, h] given the sources' reconstructions for the same tokens.

        Returns (what is stored: Encoded codes, or the 16-bit tensor of a 16-bit layer; the reconstruction
        the decoder will see, float32).  The one encoding rule shared by the reference, calibration, the
        transformers hooks and the serving path.
        """
        codec = self.codecs[stream, layer]
        if codec is None:
            exact = x.to(self.exact_dtype)
            return exact, exact.float()
        prediction = self._predict(stream, layer, recon, x)
        enc = codec.encode(x.float() - prediction)
        return enc, prediction + codec.decode(enc)

    def decode_codes(self, state: CacheState) -> dict[tuple[str, int], torch.Tensor]:
        """Reconstruction from codes only (no sink/window override) for every (stream, layer): [T, H, h]."""
        recon = {}
        for stream, layer in self.keys():
            if (stream, layer) not in state.codes:
                recon[stream, layer] = state.exact[stream, layer].float()
                continue
            enc = state.codes[stream, layer]
            residual = self.codecs[stream, layer].decode(enc)
            recon[stream, layer] = self._predict(stream, layer, recon, residual) + residual
        return recon

    def decode(self, state: CacheState) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """What attention reads: per-layer K, V [T, H, h] float32, 16-bit sinks and window merged in."""
        recon = self.decode_codes(state)
        for key, x in recon.items():
            if key in state.codes:
                x[state.exact_positions] = state.exact[key].float()
        return ([recon["k", l] for l in range(self.num_layers)], [recon["v", l] for l in range(self.num_layers)])

    def reconstruct(self, ks: list[torch.Tensor], vs: list[torch.Tensor]) -> tuple[list, list]:
        """decode(encode(ks, vs))."""
        return self.decode(self.encode(ks, vs))

    # ---- calibration (in memory; the calibration package streams the same steps) -----------------------
    @classmethod
    def calibrate(cls, config: AquaKVConfig, ks: list[torch.Tensor], vs: list[torch.Tensor],
                  signs: torch.Tensor | None = None, progress: bool = False,
                  fit_mask: torch.Tensor | None = None,
                  query_energy: list[torch.Tensor] | None = None) -> "AquaKVCache":
        """Fit every predictor by ridge regression on reconstructed sources, layer by layer, in order.

        ks/vs: per-layer [T, H, h] K/V of the calibration tokens (one long sequence or many concatenated:
        predictors are per token, so sequence boundaries do not matter).  ``fit_mask`` (bool [T]) selects the
        tokens the regressions see, e.g. without the attention-sink tokens that stay 16-bit anyway and whose
        outsized K/V would bias the fit for everything else.  ``query_energy`` (per layer [H, h]: E[q_i^2] of the
        queries each KV head's keys meet, in the keys' frame) is needed with ``key_channel_scale="query"``: each key
        layer's channel scale is fitted to it and to its residual after prediction (``key_channel_scale``).
        """
        num_kv_heads, head_dim = ks[0].shape[1:]
        cache = cls(config, len(ks), num_kv_heads, head_dim, {}, signs)
        cache._check_inputs(ks, vs)
        if config.key_channel_scale == "query" and (query_energy is None or len(query_energy) != len(ks)):
            raise ValueError("key_channel_scale='query' needs the calibration queries' energy of every layer")
        from tqdm import tqdm

        last_use = {}  # drop each reconstruction after the last layer that reads it: memory O(1) layers for a chain
        for stream, layer in cache.keys():
            for src in config.sources(stream, layer):
                last_use[src] = max(last_use.get(src, -1), layer)
        recon = {}
        for stream, layer in tqdm(cache.keys(), desc="fit predictors", unit="stream", disable=not progress):
            for key in [k for k in recon if last_use.get(k, -1) < layer]:
                del recon[key]
            x = (ks if stream == "k" else vs)[layer]
            codec = cache.codecs[stream, layer]
            if codec is None:
                recon[stream, layer] = x.to(cache.exact_dtype).float()
                continue
            structure = config.key_predictor if stream == "k" else config.value_predictor
            sources = config.sources(stream, layer)
            stats = RidgeStats(per_head=parse_structure(structure)[0] == "per_head")
            rows = slice(None) if fit_mask is None else fit_mask
            stats.update([recon[s][rows] for s in sources], x[rows])
            cache.predictors[stream, layer] = LinearPredictor.fit(structure, sources, stats, config.ridge,
                                                                  (num_kv_heads, head_dim))
            if not all(torch.isfinite(t).all() for t in cache.predictors[stream, layer].tensors("").values()):
                raise NonFiniteFit(f"the {stream.upper()} predictor of layer {layer} came out NaN/inf (its inputs or "
                                   f"targets hold NaN/inf or overflow); check the captured K/V, or raise --ridge "
                                   f"(now {config.ridge})")
            prediction = cache._predict(stream, layer, recon, x)
            residual = x.float() - prediction
            if stream == "k" and config.key_channel_scale == "query":
                residual_energy = (residual[rows] ** 2).mean(0)  # [H, h]
                codec.set_channel_scale(key_channel_scale(query_energy[layer].to(x.device), residual_energy))
            recon[stream, layer] = prediction + codec.quantize(residual)
            cache.calibration_metrics[f"{stream}.{layer}"] = {
                "prediction_rel_mse": rel_mse(x, prediction), "reconstruction_rel_mse": rel_mse(x, recon[stream, layer])}
        return cache

    # ---- accounting ------------------------------------------------------------------------------------
    def bits(self, context_len: int) -> dict:
        """Exact storage accounting at ``context_len`` tokens, in bits per cached value.

        ``bits_per_value``: codes + scales averaged over all quantized (stream, layer) pairs; ``fp16_layers``:
        the (stream, layer) pairs kept in 16-bit; ``exact_tokens``: sinks + window tokens held in 16-bit;
        ``bits_total``: everything stored (16-bit copies replace codes where they exist, as in the reference
        semantics) averaged over all values of all layers.
        """
        rates = {key: (c.bits_per_value if c is not None else 16.0) for key, c in self.codecs.items()}
        quantized = [r for key, r in rates.items() if self.codecs[key] is not None]
        n_exact = len(self._exact_positions(context_len))
        total = sum(
            16.0 * context_len if self.codecs[key] is None else 16.0 * n_exact + r * (context_len - n_exact)
            for key, r in rates.items()
        ) / (len(rates) * context_len)
        return {
            "key_bits": rates["k", min(1, self.num_layers - 1)],
            "value_bits": rates["v", min(1, self.num_layers - 1)],
            "layer0_bits": rates["k", 0],
            "bits_per_value": sum(quantized) / len(quantized) if quantized else 16.0,
            "fp16_layers": [f"{s}{l}" for (s, l), c in self.codecs.items() if c is None],
            "exact_tokens": n_exact,
            "context_len": context_len,
            "bits_total": total,
        }

    def describe(self) -> str:
        """One-line JSON summary (settings and bits at 4k context)."""
        return json.dumps({**self.config.to_json(), **self.bits(4096)})
