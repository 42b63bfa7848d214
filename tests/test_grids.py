"""The shipped grids: shapes, design MSE reproduced on fresh Gaussian samples, and known optima."""

import math

import pytest
import torch

from vllm_aquakv.grids import GRID_SPECS, grid_bits_per_value, grid_info, load_grid, lloyd, nearest, quantization_mse


@pytest.mark.parametrize("name", sorted(GRID_SPECS))
def test_grid_design_mse_on_fresh_samples(name, rng):
    dim, points = GRID_SPECS[name]
    grid = load_grid(name)
    assert grid.shape == (points, dim) and torch.isfinite(grid).all()
    assert len({tuple(p) for p in grid.tolist()}) == points, "duplicate grid points"
    info = grid_info(name)
    assert info["converged"]
    fresh = torch.randn(10**6 // dim, dim, generator=rng)  # 10^6 fresh N(0,1) values
    mse = quantization_mse(grid, fresh)
    assert abs(mse / info["design_mse"] - 1) < 0.02, (mse, info["design_mse"])
    assert grid_bits_per_value(name) == math.log2(points) / dim


def test_grids_beat_scalar_lloyd_max():
    # The best scalar 2-bit Gaussian quantizer has MSE 0.1175 (Max 1960); vector grids at 2 bits must beat it.
    scalar = grid_info("d1n4")["design_mse"]
    assert abs(scalar - 0.1175) < 0.002
    assert grid_info("d2n16")["design_mse"] < 0.1175 * 0.95
    assert grid_info("d4n256")["design_mse"] < grid_info("d2n16")["design_mse"]
    # more points, less error
    assert grid_info("d2n256")["design_mse"] < grid_info("d2n64")["design_mse"] < grid_info("d2n16")["design_mse"]


def test_nearest_matches_float64_brute_force(rng):
    grid = load_grid("d2n64")
    z = torch.randn(5000, 2, generator=rng) * 1.5
    dist = torch.cdist(z.double(), grid.double())  # [N, points]
    best = dist.min(-1).values
    got = dist.gather(1, nearest(z, grid)[:, None])[:, 0]
    assert torch.allclose(got, best, atol=1e-5)


def test_lloyd_recovers_lloyd_max_scalar():
    # Independent check of the generator: the 2-level optimal scalar quantizer of N(0,1) is +-sqrt(2/pi).
    grid, record = lloyd(1, 2, samples=1 << 18, seed=5, restarts=1)
    assert record["converged"]
    assert torch.allclose(grid.abs().flatten(), torch.full((2,), math.sqrt(2 / math.pi)), atol=0.01)
    assert abs(record["design_mse"] - (1 - 2 / math.pi)) < 0.003
