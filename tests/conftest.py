import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors (before triton is imported)

import pytest  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def edit_config(model_dir: str, **changes) -> dict:
    """Update a model folder's config.json with ``changes``; returns the new config."""
    import json

    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)
    return cfg


@pytest.fixture
def rng():
    """A fresh, unseeded generator per test (inputs differ run to run); the seed is printed on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed: {seed}")
    return torch.Generator().manual_seed(seed)


def query_energy(num_layers: int, heads: int, head_dim: int, rng) -> list:
    """Random E[q_i^2] per layer [H, h] spread over ~3 orders of magnitude (``AquaKVCache.calibrate``'s input for
    ``key_channel_scale="query"``): the key channel scales it gives differ a lot between channels."""
    return [torch.exp(2 * torch.randn(heads, head_dim, generator=rng)) for _ in range(num_layers)]


@pytest.fixture(scope="session")
def smollm2_calibrated(tmp_path_factory):
    """SmolLM2-135M-Instruct (from its wheel) in a temp folder of links, calibrated with aquakv-calibrate (4k tokens)."""
    import subprocess
    import sys

    from vllm_aquakv.calibration.models import smollm2_path

    src = smollm2_path()
    dst = tmp_path_factory.mktemp("smollm2")
    for name in os.listdir(src):
        if name != "aquakv":
            os.symlink(os.path.join(src, name), dst / name)
    subprocess.run([sys.executable, "-m", "vllm_aquakv.calibration.calibrate", str(dst), "--tokens", "4096",
                    "--seq-len", "512"], check=True)
    return str(dst)


from vllm_runner import run_vllm  # noqa: E402,F401  (re-exported for the tests)
