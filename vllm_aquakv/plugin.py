"""vLLM general plugin (entry point ``vllm.general_plugins: aquakv``): makes ``--kv-cache-dtype aquakv`` work.

vLLM calls ``register()`` in every process (API server, engine core, workers) before it parses
``--kv-cache-dtype`` and before it builds the model.  It must be idempotent and cheap: it only patches vLLM's
dtype list, registers the backend, and wraps backend selection and KV-page sizing; the artifact is loaded later,
in the worker, when the first aquakv layer asks for its page size.
"""

from __future__ import annotations


def register() -> None:
    """Entry point: register the aquakv KV-cache dtype and attention backend with vLLM."""
    from . import compat
    from .runtime import check_selection, slot_bytes_for_layer

    compat.check_supported()
    compat.register_cache_dtype()
    compat.register_backend()
    compat.route_platform(check_selection)
    compat.patch_kv_cache_spec(slot_bytes_for_layer)
