#!/usr/bin/env bash
# Stage this checkout as an installed package under $1 (default /tmp/aquakv-site) without pip: the GPU machine has
# no network and may lack setuptools. Copies vllm_aquakv/ with kernels/ and calibration/ mapped inside it, and
# writes a dist-info with the vllm.general_plugins entry point so vLLM loads the plugin. Then:
#   export PYTHONPATH=$1:$PYTHONPATH
set -euo pipefail
site=${1:-/tmp/aquakv-site}
root=$(cd "$(dirname "$0")/../.." && pwd)
rm -rf "$site" && mkdir -p "$site"
cp -r "$root/vllm_aquakv" "$site/vllm_aquakv"
cp -r "$root/kernels" "$site/vllm_aquakv/kernels"
cp -r "$root/calibration" "$site/vllm_aquakv/calibration"
info="$site/vllm_aquakv-0.1.0.dist-info"
mkdir -p "$info"
printf 'Metadata-Version: 2.1\nName: vllm-aquakv\nVersion: 0.1.0\n' > "$info/METADATA"
printf '[vllm.general_plugins]\naquakv = vllm_aquakv.plugin:register\n' > "$info/entry_points.txt"
echo "[stage_plugin] vllm-aquakv staged in $site"
