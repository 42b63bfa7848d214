"""Linear predictors of one layer's K or V from already-reconstructed K/V, and their ridge fit.

A predictor maps its *sources* (e.g. the reconstructed keys of the previous layer), each [T, num_kv_heads,
head_dim], to a prediction [T, num_kv_heads, head_dim].  Structures:

- ``none``      prediction 0 (plain HIGGS on the raw data)
- ``mean``      intercept only (per-channel mean; free in a kernel)
- ``dense``     y = x W + b over all heads of all sources (the paper): W [S*d, d]
- ``per_head``  block-diagonal: head j of the output from head j of every source: W [H, S*h, h]
- ``lowrank:R`` y = x U V + b with U [S*d, R], V [R, d] (reduced-rank ridge regression)

Fitting is closed-form ridge regression in float64 from streamed sufficient statistics (``RidgeStats``), so
calibration can accumulate over any number of tokens without holding them.  The ridge strength is relative:
lambda = ridge * trace(Cov(x)) / dim(x).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Source = tuple[str, int]  # ("k" | "v", layer index)

STRUCTURES = ("none", "mean", "dense", "per_head", "lowrank")


def parse_structure(spec: str) -> tuple[str, int | None]:
    """'dense' -> ('dense', None); 'lowrank:16' -> ('lowrank', 16). Raises ValueError on anything else."""
    name, _, arg = spec.partition(":")
    if name not in STRUCTURES or (name == "lowrank") != bool(arg):
        raise ValueError(f"unknown predictor structure {spec!r}; use none, mean, dense, per_head or lowrank:R")
    rank = int(arg) if arg else None
    if rank is not None and rank < 1:
        raise ValueError(f"lowrank rank must be >= 1, got {rank}")
    return name, rank


def _features(inputs: list[torch.Tensor], per_head: bool) -> torch.Tensor:
    """Sources [T, H, h] each -> dense features [T, S*H*h], or per-head features [H, T, S*h]."""
    if per_head:
        return torch.cat(inputs, dim=-1).transpose(0, 1)  # [H, T, S*h]
    return torch.cat([x.reshape(x.shape[0], -1) for x in inputs], dim=-1)  # [T, S*d]


@dataclass
class RidgeStats:
    """Streamed sums for ridge regression of target [T, H, h] on sources; dense or per head (batched over H)."""

    per_head: bool
    n: int = 0
    sx: torch.Tensor | None = None  # [..., p]
    sy: torch.Tensor | None = None  # [..., q]
    xtx: torch.Tensor | None = None  # [..., p, p]
    xty: torch.Tensor | None = None  # [..., p, q]

    def update(self, inputs: list[torch.Tensor], target: torch.Tensor) -> None:
        """Add T tokens: inputs list of [T, H, h], target [T, H, h]."""
        x = _features([i.double() for i in inputs], self.per_head) if inputs else None
        y = _features([target.double()], self.per_head)
        tdim = -2  # token axis of x/y in both layouts
        if self.sy is None:
            self.sy = torch.zeros_like(y.sum(tdim))
            if x is not None:
                self.sx = torch.zeros_like(x.sum(tdim))
                self.xtx = torch.zeros(*x.shape[:-2], x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)
                self.xty = torch.zeros(*x.shape[:-2], x.shape[-1], y.shape[-1], dtype=torch.float64, device=x.device)
        self.n += target.shape[0]
        self.sy += y.sum(tdim)
        if x is not None:
            self.sx += x.sum(tdim)
            self.xtx += x.transpose(-1, -2) @ x
            self.xty += x.transpose(-1, -2) @ y


@dataclass
class LinearPredictor:
    """One layer-stream's predictor.  ``weight`` is None for none/mean; ``factors`` (U, V) for lowrank."""

    structure: str
    sources: tuple[Source, ...]
    bias: torch.Tensor | None = None  # [H, h]
    weight: torch.Tensor | None = None  # dense [S*d, d]; per_head [H, S*h, h]
    factors: tuple[torch.Tensor, torch.Tensor] | None = None  # lowrank U [S*d, R], V [R, d]
    meta: dict = field(default_factory=dict)

    def predict(self, inputs: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """Prediction [T, H, h] float32 from sources (each [T, H, h]); ``like`` gives shape/device."""
        name = parse_structure(self.structure)[0]
        out = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
        if name == "none":
            return out
        if self.weight is not None or self.factors is not None:
            x = _features([i.float() for i in inputs], name == "per_head")
            if name == "per_head":
                out += (x @ self.weight.float()).transpose(0, 1)  # [H, T, h] -> [T, H, h]
            elif name == "dense":
                out += (x @ self.weight.float()).reshape(like.shape)
            else:
                u, v = self.factors
                out += ((x @ u.float()) @ v.float()).reshape(like.shape)
        return out + self.bias.float()

    @classmethod
    def fit(cls, structure: str, sources: tuple[Source, ...], stats: RidgeStats, ridge: float,
            shape: tuple[int, int]) -> "LinearPredictor":
        """Closed-form ridge fit from ``stats``; ``shape`` = (num_kv_heads, head_dim) of the target."""
        name, rank = parse_structure(structure)
        if name == "none":
            return cls(structure, sources)
        my = stats.sy / stats.n  # [q] or [H, h]
        if name == "mean" or not sources:
            return cls("mean", (), bias=my.reshape(shape).float())
        mx = stats.sx / stats.n
        cov_xx = stats.xtx / stats.n - mx[..., :, None] * mx[..., None, :]  # [..., p, p]
        cov_xy = stats.xty / stats.n - mx[..., :, None] * my[..., None, :]  # [..., p, q]
        p = cov_xx.shape[-1]
        lam = ridge * torch.diagonal(cov_xx, dim1=-2, dim2=-1).sum(-1) / p
        eye = torch.eye(p, dtype=torch.float64, device=cov_xx.device)
        w = torch.linalg.solve(cov_xx + lam[..., None, None] * eye, cov_xy)  # [..., p, q]
        bias = my - (mx[..., None, :] @ w)[..., 0, :]
        meta = {"ridge_lambda": lam.max().item(), "tokens": stats.n}
        if name == "lowrank":
            # Reduced-rank regression: keep the top-R directions of the fitted values' covariance W^T Cxx W.
            fitted_cov = w.T @ cov_xx @ w
            _, vecs = torch.linalg.eigh(fitted_cov)
            v = vecs[:, -rank:].T  # [R, q]
            u = w @ v.T  # [p, R]
            bias = my - mx @ u @ v
            return cls(structure, sources, bias=bias.reshape(shape).float(), factors=(u.float(), v.float()), meta=meta)
        return cls(structure, sources, bias=bias.reshape(shape).float(), weight=w.float(), meta=meta)

    def head_local(self) -> bool:
        """True when each KV head's prediction reads only that head (none, mean, per_head): shardable by head."""
        return parse_structure(self.structure)[0] in ("none", "mean", "per_head")

    def shard(self, heads: slice) -> "LinearPredictor":
        """This predictor for the KV heads ``heads`` only (a tensor-parallel rank's slice); needs ``head_local``."""
        if not self.head_local():
            raise ValueError(f"a {self.structure} predictor mixes all KV heads and cannot be sharded")
        cut = lambda t: None if t is None else t[heads].contiguous()  # noqa: E731  bias [H, h], weight [H, S*h, h]
        return LinearPredictor(self.structure, self.sources, bias=cut(self.bias), weight=cut(self.weight),
                               meta=self.meta)

    def to(self, device) -> "LinearPredictor":
        """Move the parameters to ``device`` (in place); returns self."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        self.bias, self.weight = move(self.bias), move(self.weight)
        if self.factors is not None:
            self.factors = tuple(move(f) for f in self.factors)
        return self

    # ---- serialization (safetensors tensors + JSON) -----------------------------------------------------
    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors to save under ``prefix`` (e.g. 'layers.3.key.')."""
        out = {}
        if self.bias is not None:
            out[prefix + "bias"] = self.bias.contiguous()
        if self.weight is not None:
            out[prefix + "weight"] = self.weight.contiguous()
        if self.factors is not None:
            out[prefix + "u"], out[prefix + "v"] = (f.contiguous() for f in self.factors)
        return out

    def describe(self) -> dict:
        """JSON-able description: structure and sources."""
        return {"structure": self.structure, "sources": [list(s) for s in self.sources], **self.meta}

    @classmethod
    def load(cls, desc: dict, tensors: dict[str, torch.Tensor], prefix: str) -> "LinearPredictor":
        """Rebuild from ``describe()`` output and the saved tensors."""
        u, v = tensors.get(prefix + "u"), tensors.get(prefix + "v")
        meta = {k: val for k, val in desc.items() if k not in ("structure", "sources")}
        return cls(desc["structure"], tuple((s, int(l)) for s, l in desc["sources"]), bias=tensors.get(prefix + "bias"),
                   weight=tensors.get(prefix + "weight"), factors=(u, v) if u is not None else None, meta=meta)
