#!/usr/bin/env bash
# Install vllm-aquakv into a Python that already has vLLM: the official vLLM images (GPU and CPU), or any venv.
# Both Dockerfiles run it, and tests/test_docker.py runs it in a fresh venv.
#   docker/install-plugin.sh [SOURCE_DIR]      (default: this checkout; PYTHON=... picks the interpreter)
# The package goes in without dependencies, so the image's vLLM and torch stay exactly as they are. Then the script
# checks that vLLM will find the plugin (the vllm.general_plugins entry point) and says so.
set -euo pipefail
src=${1:-$(cd "$(dirname "$0")/.." && pwd)}
python=${PYTHON:-python3}
if command -v uv >/dev/null 2>&1 && [ -z "${PYTHON:-}" ]; then
  uv pip install --system --no-cache --no-deps "$src"   # the vLLM images manage their Python with uv
else
  "$python" -m pip install --no-cache-dir --no-deps "$src"
fi
"$python" - <<'PY'
from importlib.metadata import entry_points, version

names = [e.name for e in entry_points(group="vllm.general_plugins")]
if "aquakv" not in names:
    raise SystemExit(f"vllm-aquakv is installed but its vLLM plugin entry point is missing (found {names})")
print(f"[install-plugin] vllm-aquakv {version('vllm-aquakv')} installed; vLLM loads it as plugin 'aquakv'")
PY
