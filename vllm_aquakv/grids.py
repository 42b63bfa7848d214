"""MSE-optimal vector-quantization grids for the standard Gaussian ("EDEN"/HIGGS-style).

A grid named ``d{dim}n{points}`` quantizes ``dim`` consecutive N(0,1) coordinates jointly to the nearest of
``points`` centres, costing ``log2(points) / dim`` bits per value.  Grids are made once, offline, by Lloyd's
algorithm (k-means) on a large seeded Gaussian sample and shipped in ``vllm_aquakv/data/grids.safetensors``;
serving only loads them.  Regenerate (deterministic, about 10 minutes on 2 cores) with::

    python -m vllm_aquakv.grids --write

Each grid records its *design MSE*: the mean squared error per coordinate, measured on a fresh held-out
Gaussian sample that Lloyd did not see.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time

import torch

GRID_FILE = os.path.join(os.path.dirname(__file__), "data", "grids.safetensors")

# name -> (dim, points).  Bits per value = log2(points) / dim.
GRID_SPECS: dict[str, tuple[int, int]] = {
    "d1n4": (1, 4),  # 2 bits, scalar (Lloyd-Max)
    "d1n8": (1, 8),  # 3 bits, scalar
    "d1n16": (1, 16),  # 4 bits, scalar
    "d2n16": (2, 16),  # 2 bits
    "d2n64": (2, 64),  # 3 bits
    "d2n256": (2, 256),  # 4 bits
    "d4n256": (4, 256),  # 2 bits
    "u1n4": (1, 4),  # 2 bits, scalar, uniform: the CUDA decode kernel's fast path (no table lookups)
}

# Uniform scalar grids: levels (i - (points - 1) / 2) * step, computed rather than shipped.  The step is the
# MSE-optimal uniform step for N(0,1) (Max 1960: 0.9957 for 4 levels) rounded to 255/256, so that every level is
# exact in float16 and the levels stay exactly equally spaced (the kernel decodes code c as g0 + step * c).
UNIFORM_STEPS: dict[str, float] = {"u1n4": 255 / 256}


def grid_bits_per_value(name: str) -> float:
    """Code bits per quantized value for grid ``name``."""
    dim, points = _spec(name)
    return math.log2(points) / dim


def grid_code_bits(name: str) -> int:
    """Bits of one code (one grid index covering ``dim`` values)."""
    return int(math.log2(_spec(name)[1]))


def _spec(name: str) -> tuple[int, int]:
    if name not in GRID_SPECS:
        raise ValueError(f"unknown grid {name!r}; choose one of {sorted(GRID_SPECS)}")
    return GRID_SPECS[name]


@functools.lru_cache(maxsize=None)
def _load_all() -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    if not os.path.exists(GRID_FILE):
        raise FileNotFoundError(
            f"grid file {GRID_FILE} is missing; the package is incomplete. Reinstall vllm-aquakv, or "
            "regenerate it with `python -m vllm_aquakv.grids --write`."
        )
    with safe_open(GRID_FILE, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads((f.metadata() or {}).get("grids", "{}"))
    return tensors, meta


def load_grid(name: str) -> torch.Tensor:
    """The shipped grid ``name`` as a float32 tensor [points, dim], its coordinates rounded to float16 so that the
    CUDA kernel's fp16 lookup tables hold exactly the values the torch path decodes with."""
    dim, points = _spec(name)
    if name in UNIFORM_STEPS:
        return ((torch.arange(points, dtype=torch.float32) - (points - 1) / 2) * UNIFORM_STEPS[name])[:, None]
    tensors, _ = _load_all()
    if name not in tensors:
        raise KeyError(f"grid {name!r} is not in {GRID_FILE}; regenerate with `python -m vllm_aquakv.grids --write`")
    grid = tensors[name].half().float()
    if tuple(grid.shape) != (points, dim):
        raise ValueError(f"grid {name!r} in {GRID_FILE} has shape {tuple(grid.shape)}, expected {(points, dim)}")
    return grid


def grid_info(name: str) -> dict:
    """Generation record of grid ``name``: design MSE, iterations, sample sizes, seed."""
    _spec(name)
    if name in UNIFORM_STEPS:
        return _uniform_info(name)
    return dict(_load_all()[1][name])


@functools.lru_cache(maxsize=None)
def _uniform_info(name: str) -> dict:
    """The record of a computed uniform grid: its MSE on a seeded sample of 2^20 N(0,1) values."""
    sample = torch.randn(1 << 20, 1, generator=torch.Generator().manual_seed(7))
    return {"design_mse": quantization_mse(load_grid(name), sample), "converged": True, "uniform": True,
            "step": UNIFORM_STEPS[name], "bits_per_value": grid_bits_per_value(name), "eval_samples": 1 << 20}


def nearest(z: torch.Tensor, grid: torch.Tensor, chunk: int = 1 << 18) -> torch.Tensor:
    """Index of the nearest grid point for each row of ``z`` [N, dim] -> int64 [N].

    argmin ||z - c||^2 = argmax (2 z.c - ||c||^2); computed in float32, ties go to the lowest index.
    """
    z = z.float()
    grid = grid.float().to(z.device)
    bias = (grid * grid).sum(-1)  # [points]
    out = torch.empty(z.shape[0], dtype=torch.int64, device=z.device)
    for i in range(0, z.shape[0], chunk):
        scores = 2.0 * (z[i : i + chunk] @ grid.T) - bias  # [chunk, points]
        out[i : i + chunk] = scores.argmax(-1)
    return out


def quantization_mse(grid: torch.Tensor, samples: torch.Tensor) -> float:
    """Mean squared error per coordinate of quantizing ``samples`` [N, dim] to ``grid``."""
    q = grid[nearest(samples, grid)]
    return float(((samples.double() - q.double()) ** 2).mean())


def _kmeans_pp(sample: torch.Tensor, points: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on ``sample`` [N, dim]."""
    centres = [sample[torch.randint(sample.shape[0], (1,), generator=gen)]]
    dist = ((sample - centres[0]) ** 2).sum(-1)
    for _ in range(points - 1):
        idx = torch.multinomial(dist / dist.sum(), 1, generator=gen)
        centres.append(sample[idx])
        dist = torch.minimum(dist, ((sample - centres[-1]) ** 2).sum(-1))
    return torch.cat(centres)


def lloyd(
    dim: int,
    points: int,
    samples: int = 1 << 20,
    seed: int = 0,
    restarts: int = 2,
    max_iter: int = 1000,
    tol: float = 1e-5,
) -> tuple[torch.Tensor, dict]:
    """Fit a ``points``-centre grid for N(0, I_dim) by Lloyd's algorithm; returns (grid [points, dim], record).

    Deterministic for a given seed.  Each restart is seeded by k-means++ on a subsample and iterated until the
    relative MSE improvement falls below ``tol``; the restart with the lowest training MSE wins.  The record
    holds the design MSE on a fresh held-out sample of the same size, iterations and convergence.
    """
    gen = torch.Generator().manual_seed(seed)
    train = torch.randn(samples, dim, generator=gen)
    held_out = torch.randn(samples, dim, generator=gen)
    best = None
    for r in range(restarts):
        centres = _kmeans_pp(train[: 1 << 16], points, gen).double()
        prev = math.inf
        converged = False
        for it in range(1, max_iter + 1):
            assign = nearest(train, centres.float())
            mse = float(((train.double() - centres[assign]) ** 2).mean())  # MSE of the current centres
            if prev - mse <= tol * mse:
                converged = True
                break
            prev = mse
            sums = torch.zeros(points, dim, dtype=torch.float64).index_add_(0, assign, train.double())
            counts = torch.bincount(assign, minlength=points).double()
            empty = counts == 0
            centres = torch.where(empty[:, None], centres, sums / counts.clamp(min=1)[:, None])
        if best is None or mse < best[1]:
            best = (centres.float(), mse, it, converged, r)
    grid, train_mse, iters, converged, restart = best
    # Canonical order (by norm, then coordinates) so that the file does not depend on restart internals.
    order = sorted(range(points), key=lambda i: (round(float(grid[i].norm()), 6), *grid[i].tolist()))
    grid = grid[order].contiguous()
    record = {
        "dim": dim,
        "points": points,
        "bits_per_value": math.log2(points) / dim,
        "design_mse": quantization_mse(grid, held_out),
        "train_mse": train_mse,
        "iterations": iters,
        "converged": converged,
        "restart": restart,
        "restarts": restarts,
        "samples": samples,
        "seed": seed,
        "tol": tol,
    }
    return grid, record


def write_grids(path: str = GRID_FILE, names: list[str] | None = None, samples: int = 1 << 20) -> dict:
    """Generate every grid in GRID_SPECS (or ``names``) and save them with their records."""
    from safetensors.torch import save_file

    tensors, meta = {}, {}
    for i, name in enumerate(names or [g for g in GRID_SPECS if g not in UNIFORM_STEPS]):
        dim, points = GRID_SPECS[name]
        t0 = time.time()
        grid, record = lloyd(dim, points, samples=samples, seed=1000 + i, restarts=2 if points <= 16 else 1)
        if not record["converged"]:
            raise RuntimeError(f"Lloyd did not converge for {name}: {record}")
        tensors[name], meta[name] = grid, record
        print(f"{name}: design MSE {record['design_mse']:.5f} ({record['iterations']} iters, {time.time() - t0:.0f} s)",
              flush=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(tensors, path, metadata={"grids": json.dumps(meta)})
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help=f"regenerate {GRID_FILE}")
    ap.add_argument("--samples", type=int, default=1 << 20)
    args = ap.parse_args()
    if args.write:
        write_grids(samples=args.samples)
    else:
        for name in GRID_SPECS:
            info = grid_info(name)
            print(f"{name}: {info['bits_per_value']:.2f} bits/value, design MSE {info['design_mse']:.5f}")


if __name__ == "__main__":
    main()
