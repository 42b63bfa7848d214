"""Per-process serving state: find and verify the artifact, refuse what aquakv cannot serve, log the capacity.

Artifact discovery, in order: ``--additional-config '{"aquakv_artifact": "/path/to/aquakv"}'``, the environment
variable ``AQUAKV_ARTIFACT``, then ``MODEL/aquakv``.  Without an artifact the server refuses to start and prints the
``aquakv-calibrate`` command, unless ``--additional-config '{"aquakv_no_predictor": true}'`` asks for plain HIGGS
residual-free quantization (no predictors; lower quality).
"""

from __future__ import annotations

import json
import os
import threading

import torch

from . import compat
from .artifact import ArtifactError, default_artifact_dir, load_artifact
from .codec import head_dim_supported
from .reference import AquaKVCache, AquaKVConfig
from .rope import Rope, UnsupportedModel
from .serving import TorchServingPath
from .window import ExactTokens

_STATES: dict[str, "ServingState"] = {}
_LOCK = threading.Lock()


def _logger():
    from vllm.logger import init_logger

    return init_logger("vllm.aquakv")


# the --additional-config keys aquakv reads (README's options table)
OPTIONS = ("aquakv_artifact", "aquakv_no_predictor", "aquakv_kernels", "aquakv_window", "aquakv_fused_ring_step",
           "aquakv_flash_prefill", "aquakv_int8_scores", "aquakv_cuda_decode", "aquakv_decode_graphs",
           "aquakv_overlap_write", "aquakv_ring_beside", "aquakv_fused_window_prefill")


def _additional(vllm_config) -> dict:
    """vLLM's --additional-config; an ``aquakv_`` key aquakv does not read is refused (a typo would otherwise leave
    the default silently in place), and so is a switch that is not a JSON boolean (the string "false" would read as
    on) or null (its default: null keys are dropped here, so every reader's default applies)."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    extra = extra if isinstance(extra, dict) else {}
    unknown = sorted(k for k in extra if str(k).startswith("aquakv_") and k not in OPTIONS)
    if unknown:
        raise UnsupportedModel(f"unknown aquakv option(s) in --additional-config: {', '.join(unknown)}; aquakv reads "
                               f"{', '.join(OPTIONS)} (README: Options)")
    for key in OPTIONS:
        value = extra.get(key)
        wanted = str if key == "aquakv_artifact" else bool
        if value is not None and not isinstance(value, wanted):
            kind = "a string" if wanted is str else "true or false"
            raise UnsupportedModel(f"{key} in --additional-config must be JSON {kind} (or null for its default), "
                                   f"got {value!r}")
    return {k: v for k, v in extra.items() if not (k in OPTIONS and v is None)}


def _switch(extra: dict, key: str, applies: bool, needs: str) -> bool:
    """Whether the switch ``key`` (default on) is on: where it cannot apply it is off, and a user who set it to true
    there stops the start (ignoring it would hide that it is off)."""
    if extra.get(key) is True and not applies:
        raise UnsupportedModel(f"{key} true needs {needs}, which this server does not have; drop it (README: Options)")
    return bool(applies and extra.get(key, True))


class ServingState:
    """The loaded artifact, the torch serving path and the model facts it was checked against."""

    def __init__(self, vllm_config):
        model_cfg = vllm_config.model_config
        self.model_dir = model_cfg.model
        extra = _additional(vllm_config)
        if not os.path.isdir(self.model_dir):
            raise UnsupportedModel(f"aquakv serves local model folders; {self.model_dir!r} is not a folder")
        with open(os.path.join(self.model_dir, "config.json")) as f:
            hf = json.load(f)
        text_cfg = model_cfg.hf_text_config
        num_layers = text_cfg.num_hidden_layers
        num_kv_heads = model_cfg.get_total_num_kv_heads()
        head_dim = model_cfg.get_head_size()
        art = extra.get("aquakv_artifact") or os.environ.get("AQUAKV_ARTIFACT") or default_artifact_dir(self.model_dir)
        if extra.get("aquakv_no_predictor"):
            # keys quantized as vLLM hands them (post-RoPE): any RoPE variant, and the fused kernels on CUDA
            cfg = AquaKVConfig(key_rope="post", key_predictor="none", value_predictor="none", layer0_grid="d2n16")
            self.cache, self.source = AquaKVCache(cfg, num_layers, num_kv_heads, head_dim), "no predictor (opt-in)"
        else:
            if not os.path.exists(os.path.join(art, "manifest.json")):
                raise ArtifactError(
                    f"no aquakv artifact at {art}. Calibrate this model first:\n    aquakv-calibrate {self.model_dir}\n"
                    "or name one with --additional-config '{\"aquakv_artifact\": \"/path/to/aquakv\"}' (or "
                    "$AQUAKV_ARTIFACT), or serve "
                    "without predictors (lower quality) with --additional-config '{\"aquakv_no_predictor\": true}'")
            self.cache, _ = load_artifact(art, self.model_dir)
            self.source = art
        c = self.cache
        # pre-RoPE keys are un-rotated on write and rotated on read; post-RoPE ones are stored as vLLM hands them
        self.rope = Rope(hf.get("text_config", hf), head_dim) if c.config.key_rope == "pre" else None
        if (c.num_layers, c.num_kv_heads, c.head_dim) != (num_layers, num_kv_heads, head_dim):
            raise ArtifactError(f"artifact {art} is for {c.num_layers} layers x {c.num_kv_heads} KV heads x head_dim "
                                f"{c.head_dim}; the model has {num_layers} x {num_kv_heads} x {head_dim}: "
                                f"aquakv-calibrate {self.model_dir}")
        self.shard_note = ""
        tp = vllm_config.parallel_config.tensor_parallel_size
        if tp > 1:  # this rank serves its KV heads with its slice of a head-local artifact
            if c.shard_granularity() != "head":
                raise UnsupportedModel(
                    f"--tensor-parallel-size {tp} needs a shard-local aquakv artifact (predictors that read only their "
                    f"own KV head); {self.source} has {sorted({p.structure for p in c.predictors.values()})}. "
                    f"Calibrate one with\n    aquakv-calibrate {self.model_dir} --key-predictor per_head "
                    "--value-predictor per_head\nor serve with --tensor-parallel-size 1")
            rank = compat.tensor_parallel_rank()
            first, count = rank_kv_heads(num_kv_heads, tp, rank)
            self.cache = c = c.shard(first, count)
            self.shard_note = f"; tensor-parallel rank {rank} of {tp}: KV heads {first}..{first + count - 1} of " \
                              f"{num_kv_heads}"
            num_kv_heads = count
        device = getattr(getattr(vllm_config, "device_config", None), "device", None) or "cpu"
        c.to(device)
        if self.rope is not None:
            self.rope.inv_freq = self.rope.inv_freq.to(device)
        self.path = TorchServingPath(c, self.rope)
        # what bounds the torch path's per-step scratch on CUDA (``torch_path_memory_refusal``)
        self.max_num_seqs, self.max_model_len = vllm_config.scheduler_config.max_num_seqs, model_cfg.max_model_len
        self.cache_config = vllm_config.cache_config
        on_cuda = str(device).startswith("cuda")
        self.kernel_note = "torch attention path (aquakv_kernels false)" if on_cuda else "torch attention path (CPU)"
        self.model_dtype = model_cfg.dtype if isinstance(model_cfg.dtype, torch.dtype) else torch.bfloat16
        self.window_note = "every token is stored as codes (no 16-bit sinks/window)"
        fused = None  # with aquakv_kernels: every layer's fused-kernel constants, or why not all layers fit
        if extra.get("aquakv_kernels", on_cuda):
            if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
                raise UnsupportedModel("aquakv_kernels on CPU runs the Triton kernels in the interpreter (for tests): "
                                       "set TRITON_INTERPRET=1, or drop aquakv_kernels")
            from .kernels.attention import fused_layers_or_reason

            fused = fused_layers_or_reason(c, self.path.layouts)
        window = extra.get("aquakv_window")
        if window is None:  # default: on, unless it would move a fused-kernel artifact to the slow torch path
            window = not (on_cuda and isinstance(fused, dict) and _has_value_predictor(fused))
            if not window:
                self.window_note += ("; 16-bit sinks/window off by default: the fused kernels do not combine them "
                                     "with a value predictor (calibrate with --value-predictor none, or force "
                                     "--additional-config '{\"aquakv_window\": true}': torch path, slow)")
        if window and c.config.num_sink_tokens + c.config.window > 0:
            rows = vllm_config.scheduler_config.max_num_seqs
            # allocated now, while vLLM sizes the KV cache, so that its memory profile sees the ring
            self.path.exact = ExactTokens(c.config.num_sink_tokens, c.config.window, rows, num_layers, num_kv_heads,
                                          head_dim, self.model_dtype, device)
            # the step's ring bookkeeping in one Triton launch (kernels/window_step.py): on by default on CUDA, where
            # it took p50 TPOT from 3.47 to 3.34 ms (H200) and 4.10 to 4.02 (H100) against ~50 small torch kernels
            self.path.exact.fused_begin = bool(extra.get("aquakv_fused_ring_step", on_cuda))
            if self.path.exact.fused_begin and not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
                raise UnsupportedModel("aquakv_fused_ring_step runs a Triton kernel: CUDA only (or TRITON_INTERPRET=1 "
                                       "for tests); drop it")
            ring = self.path.exact.nbytes
            bookkeeping = ""  # named only where there is a choice (CUDA)
            if self.path.exact.fused_begin:
                bookkeeping = "; its bookkeeping in one Triton launch per step"
            elif on_cuda:
                bookkeeping = "; its bookkeeping as torch ops: aquakv_fused_ring_step false"
            self.window_note = (f"16-bit sinks {c.config.num_sink_tokens} + window {c.config.window} per request "
                                f"(ring of {rows} rows: {ring / 2 ** 20:.0f} MiB, outside the paged cache{bookkeeping})")
            total = torch.cuda.get_device_properties(device).total_memory if on_cuda else None
            warning = ring_budget_warning(ring, rows, vllm_config.cache_config, total)
            if warning:
                _logger().warning(warning)
        if fused is not None:
            self._enable_fused_kernel(fused, num_layers, text_cfg.num_attention_heads // tp, num_kv_heads,
                                      vllm_config.cache_config.block_size, on_cuda,
                                      extra.get("aquakv_flash_prefill", True), extra.get("aquakv_int8_scores", False),
                                      extra.get("aquakv_cuda_decode"))
        elif extra.get("aquakv_int8_scores"):
            raise UnsupportedModel("aquakv_int8_scores is an option of the fused Triton kernels (CUDA): drop it")
        if extra.get("aquakv_cuda_decode") and not on_cuda:
            raise UnsupportedModel("aquakv_cuda_decode runs a CUDA kernel (kernels/decode_codes.cu): drop it off CUDA")
        if not self.path.fused:
            if fused is not None:  # aquakv_kernels on, but the fused kernels cannot serve this artifact
                self.kernel_note += "; " + self.path.use_residual_kernel()
            if on_cuda:
                self._torch_path_attention()
        fused_on_cuda = bool(on_cuda and self.path.fused)
        fused_needs = "CUDA and the fused kernels (a post-RoPE artifact, aquakv_kernels not false)"
        has_window = self.path.exact is not None and self.path.exact.window > 0
        # (aquakv_flash_prefill took effect in _enable_fused_kernel: here only its refusal)
        _switch(extra, "aquakv_flash_prefill", fused_on_cuda and self.path.flash is not None,
                fused_needs + " and a FlashAttention this vLLM build can run for the model's dtype (16-bit)")
        # decode-only steps in vLLM's FULL CUDA graphs (AquaKVMetadataBuilder.get_cudagraph_support): the fused
        # kernels' decode path has no host sync and sizes everything by the batch alone; the torch path syncs.
        # Checked on the H200: tests/test_kernels.py::test_decode_step_replays_in_a_cuda_graph (the step itself) and
        # plugin_smoke.py --decode-graphs (greedy tokens and prompt logprobs equal to PIECEWISE inside vLLM)
        self.decode_graphs = _switch(extra, "aquakv_decode_graphs", fused_on_cuda, fused_needs)
        # decode steps with the 16-bit window: each layer's cache write on a second stream beside its attention
        self.path.overlap_write = _switch(extra, "aquakv_overlap_write", fused_on_cuda and has_window,
                                          fused_needs + " with the 16-bit window")
        if fused_on_cuda:
            self.kernel_note += ("; decode-only steps in FULL CUDA graphs" if self.decode_graphs else
                                 "; attention eager between PIECEWISE CUDA graphs (aquakv_decode_graphs false)")
        if self.path.overlap_write:
            self.kernel_note += "; decode cache writes beside attention on a second CUDA stream (aquakv_overlap_write)"
        # decode steps with the window whose codes launch does not fill the GPU: the ring's pass beside it
        # (kernels/attention.py launch_choice; false: after it, the same arithmetic)
        self.path.ring_beside = _switch(extra, "aquakv_ring_beside", fused_on_cuda and self.path.exact is not None,
                                        fused_needs + " with 16-bit sinks/window")
        if self.path.ring_beside:
            self.kernel_note += ("; small decode steps read the 16-bit ring beside their codes launch on a second "
                                 "CUDA stream (aquakv_ring_beside)")
        # prefills with the window: its attention and the LSE merge in one Triton launch (kernels/reconstruct.py
        # window_attention_merge) instead of FlashAttention's sliding-window call + vLLM's merge kernel
        self.path.fused_window_prefill = _switch(
            extra, "aquakv_fused_window_prefill", fused_on_cuda and self.path.flash is not None and has_window,
            fused_needs + ", FlashAttention prefill (aquakv_flash_prefill) and the 16-bit window")
        if self.path.fused_window_prefill:
            from .kernels.attention import compiled_variants
            from .kernels.reconstruct import warm_up_window_merge

            warm_up_window_merge(text_cfg.num_attention_heads // tp, num_kv_heads, head_dim, self.path.exact.sinks,
                                 self.path.exact.window, self.model_dtype, device)
            self.compiled_at_startup = compiled_variants()
            self.kernel_note += ("; prefills read the 16-bit window and merge it in one Triton launch "
                                 "(aquakv_fused_window_prefill)")
        self._log()

    def _torch_path_attention(self) -> None:
        """CUDA without the fused kernels (e.g. the pre-RoPE quality default): each step reconstructs every request's
        context (its codes through the Triton residual kernel unless ``aquakv_kernels`` is false), then attends
        through vLLM's FlashAttention where this build has it for a 16-bit model. Refused where those contexts
        could outgrow the GPU memory vLLM leaves (``torch_path_memory_refusal``)."""
        found = self._use_flash_attention()
        self.kernel_note += ("; attention over the reconstructed K/V through FlashAttention" if found else
                             f"; attention in float32 torch ({self._no_flash_reason(found)})")
        per_token = torch_path_bytes_per_token(self.path, self.model_dtype if found else torch.float32)
        device = self.cache.signs.device
        refusal = torch_path_memory_refusal(per_token, self.max_num_seqs, self.max_model_len, self.cache_config,
                                            torch.cuda.get_device_properties(device).total_memory, self.source,
                                            self.model_dir)
        if refusal:
            raise UnsupportedModel(refusal)
        _logger().warning(
            "aquakv: %s serves on this GPU through the torch path (%s), which rebuilds every cached token of every "
            "layer at each step: its attention and cache write take 66-91x FlashAttention's time over a bf16 "
            "cache (Llama-3.2-3B shape on an H200, benchmarks/results/torch_path_step_h200.md). For GPU serving, "
            "calibrate the fused kernels' mode: aquakv-calibrate %s --preset speed --out DIR, then --additional-config "
            "'{\"aquakv_artifact\": \"DIR\"}'", self.source, self.kernel_note, self.model_dir)

    def _use_flash_attention(self) -> bool | None:
        """Give the path vLLM's FlashAttention (and its merge of partials) for attention over reconstructed K/V:
        whether this build has it for the head size, None for a model that is not 16-bit (FlashAttention refuses
        float32 at the first call, found on the H200, 2026-12-02)."""
        if self.model_dtype not in (torch.float16, torch.bfloat16):
            return None
        self.path.flash = compat.flash_attention(self.cache.head_dim)
        self.path.merge = compat.merge_attention_states()
        return self.path.flash is not None

    def _no_flash_reason(self, found: bool | None) -> str:
        """Why ``_use_flash_attention`` found no FlashAttention (its result ``found``)."""
        if found is None:
            return f"FlashAttention takes 16-bit models, this one is {str(self.model_dtype).replace('torch.', '')}"
        return "no FlashAttention in this vLLM build for this head size"

    def _enable_cuda_decode(self, fused: dict, num_q_heads: int, num_kv_heads: int, block_size: int, exact,
                            asked: bool) -> str:
        """Compile the CUDA decode codes loop (``kernels/cuda_decode.py``) for every layer that can take it and turn
        it on; returns what the startup log says.  Unless ``asked`` (``aquakv_cuda_decode`` true), only on sm_90,
        where it was tested.  A compile failure refuses the server when ``asked``, else the Triton loop serves and a
        warning says why."""
        from .kernels import cuda_decode
        from .kernels.attention import AttentionPlan

        major, minor = torch.cuda.get_device_capability()
        if not asked and major != 9:  # (tested and measured on the H100 / H200 only)
            return (f"decode codes loop in Triton (the CUDA loop is tested on sm_90 only; this GPU is "
                    f"sm_{major}{minor}: --additional-config '{{\"aquakv_cuda_decode\": true}}' asks for it)")
        refusals = {layer: cuda_decode.layer_refusal(f, num_q_heads // num_kv_heads, block_size, self.model_dtype)
                    for layer, f in fused.items()}
        takers = [layer for layer, r in refusals.items() if r is None]
        if not takers:
            return f"decode codes loop in Triton ({next(iter(refusals.values()))})"
        window = None if exact is None else (exact.sinks, exact.window)
        for layer in takers:
            stride_token = self.path.slot_bytes(layer)  # (vLLM's cache views keep each slot whole)
            config = cuda_decode.decode_config(fused[layer], num_q_heads, num_kv_heads, block_size, stride_token,
                                               self.model_dtype, window, AttentionPlan.cuda_fused)
            try:
                cuda_decode.compiled(config)
            except Exception as e:  # NVRTC missing or failing: say so, never serve a half-built path
                failed = f"the CUDA decode loop (kernels/decode_codes.cu) did not compile with NVRTC: {e}"
                if asked:
                    raise UnsupportedModel(f"{failed}. Serve with --additional-config "
                                           "'{\"aquakv_cuda_decode\": false}' for the Triton loop") from e
                _logger().warning("aquakv: %s; decode codes run in the Triton loop (~11%% lower output throughput "
                                  "on an H100; --additional-config '{\"aquakv_cuda_decode\": false}' asks for it)",
                                  failed)
                return "decode codes loop in Triton (the CUDA loop did not compile: see the warning above)"
        if AttentionPlan.cuda_fused:  # the one launch's block counters, before any capture
            cuda_decode.counters(torch.cuda.current_device())
        self.path.cuda_decode = True
        return (f"decode codes loop in CUDA on {len(takers)} of {len(fused)} layers"
                + ("" if len(takers) == len(fused) else
                   f" (the others: {next(r for r in refusals.values() if r)})"))

    def _enable_fused_kernel(self, fused: dict | str, num_layers: int, num_q_heads: int, num_kv_heads: int,
                             block_size: int, compile_now: bool, flash_prefill: bool = True,
                             int8_scores: bool = False, cuda_decode: bool | None = None) -> None:
        """Serve all layers with the fused Triton attention kernel (kernels/attention.py) if every layer can take
        it, else all with the torch path; the startup log says which and why.  On CUDA, compile the kernel's
        variants now rather than during the first requests.  ``cuda_decode`` (``aquakv_cuda_decode``): the CUDA
        decode codes loop; None, the default, takes it on sm_90 GPUs where it compiles."""
        import time

        from .kernels.attention import compiled_variants, warm_up

        exact = self.path.exact
        if exact is not None and not isinstance(fused, str) and _has_value_predictor(fused):
            fused = "16-bit sinks/window (aquakv_window) with a value predictor (calibrate with --value-predictor none)"
        if isinstance(fused, str):
            if int8_scores:
                raise UnsupportedModel(f"aquakv_int8_scores needs the fused Triton kernels, which cannot serve {fused}: "
                                       "drop aquakv_int8_scores")
            self.kernel_note = f"torch attention path (slow): the fused Triton kernel cannot serve {fused}"
            return
        from .kernels.attention import int8_scores_refusal

        self.path.fused.update(fused)
        self.kernel_note = f"fused Triton attention on all {num_layers} layers"
        if int8_scores and cuda_decode:
            raise UnsupportedModel("aquakv_int8_scores and aquakv_cuda_decode true exclude each other (int8 scores run "
                                   "in the Triton kernel): drop one")
        if int8_scores:
            refusal = next((r for r in map(int8_scores_refusal, fused.values()) if r), None)
            if refusal:
                raise UnsupportedModel(f"aquakv_int8_scores: {refusal}; drop aquakv_int8_scores (or calibrate with "
                                       "--preset speed)")
            self.path.int8_scores = True
            self.kernel_note += "; decode scores on int8 tensor cores (aquakv_int8_scores: queries rounded to int8)"
        if compile_now and cuda_decode is not False and not int8_scores:  # u1n4 decode codes: kernels/decode_codes.cu
            self.kernel_note += "; " + self._enable_cuda_decode(fused, num_q_heads, num_kv_heads, block_size, exact,
                                                                asked=bool(cuda_decode))
        if compile_now and flash_prefill:  # prefill: reconstruction + vLLM's FlashAttention (window: 2 calls)
            found = self._use_flash_attention()
            self.kernel_note += ("; prefill through reconstructed K/V + FlashAttention" if found else
                                 f"; prefill in the fused kernel too ({self._no_flash_reason(found)})")
        if compile_now:
            t0 = time.time()
            variants = warm_up(fused, [self.path.slot_bytes(l) for l in range(num_layers)], num_q_heads, num_kv_heads,
                               block_size, self.model_dtype, None if exact is None else (exact.sinks, exact.window),
                               int8_scores)
            if self.path.flash is not None:
                from .kernels.reconstruct import warm_up as warm_up_reconstruct

                warm_up_reconstruct(fused, [self.path.slot_bytes(l) for l in range(num_layers)], num_kv_heads,
                                    block_size, self.model_dtype)
            self.kernel_note += f" ({variants} layer variants compiled in {time.time() - t0:.1f} s)"
            self.compiled_at_startup = compiled_variants()

    def _log(self) -> None:
        bits = self.cache.bits(4096)
        slots = sorted({self.path.slot_bytes(l) for l in range(self.cache.num_layers)})
        dtype = str(self.model_dtype).replace("torch.", "")
        vs_bf16 = "" if self.model_dtype.itemsize == 2 else f" ({self.path.capacity_ratio(2):.2f}x vs bf16)"
        _logger().info(
            "aquakv: %s; %.3f bits/value (codes + scales), slot %s bytes per (token, KV head) vs %d in %s: "
            "%.2fx the tokens of a %s cache at equal memory%s; %s; %s%s",
            self.source, bits["bits_per_value"], "/".join(map(str, slots)), 2 * self.cache.head_dim *
            self.model_dtype.itemsize, dtype, self.path.capacity_ratio(self.model_dtype.itemsize), dtype,
            vs_bf16, self.window_note, self.kernel_note, self.shard_note)


RING_SHARE_WARNING = 0.10  # the share of vLLM's memory budget above which the window's ring is worth a warning


def ring_budget_warning(ring_bytes: int, rows: int, cache_config, device_memory: int | None) -> str | None:
    """A warning when the 16-bit window's ring (``ring_bytes`` for ``rows`` = --max-num-seqs batch rows) takes more
    than ``RING_SHARE_WARNING`` of the memory vLLM sizes its KV cache from: the KV space where one is set
    (``kv_cache_memory_bytes``, on CPU ``VLLM_CPU_KVCACHE_SPACE``), else --gpu-memory-utilization x
    ``device_memory`` (bytes; None on CPU: nothing to compare with). None where the ring is a small share."""
    if cache_config.kv_cache_memory_bytes:
        budget = cache_config.kv_cache_memory_bytes
        what = f"the {budget / 2 ** 30:.2f} GiB KV cache space (kv_cache_memory_bytes / VLLM_CPU_KVCACHE_SPACE)"
    elif device_memory:
        budget = cache_config.gpu_memory_utilization * device_memory
        what = (f"the {budget / 2 ** 30:.1f} GiB vLLM may use (--gpu-memory-utilization "
                f"{cache_config.gpu_memory_utilization} of {device_memory / 2 ** 30:.0f} GiB)")
    else:
        return None
    if ring_bytes <= RING_SHARE_WARNING * budget:
        return None
    return (f"aquakv: the 16-bit sinks/window ring takes {ring_bytes / 2 ** 30:.2f} GiB ({rows} rows, one per "
            f"--max-num-seqs, {ring_bytes / (rows + 1) / 2 ** 20:.1f} MiB each), {ring_bytes / budget:.0%} of {what}, "
            "memory the paged KV cache does not get. Set --max-num-seqs to the number of requests you run at once, "
            "or serve every token from codes with --additional-config '{\"aquakv_window\": false}' (lower quality)")


# the torch path reconstructs its contexts in slices (TorchServingPath.attend: 2 ** 26 values on CUDA), each slice's
# decode holding a few float32 temporaries of that size at once; budgeted as this many
TORCH_PATH_SLICE_TEMPORARIES = 8
# the share of the memory vLLM leaves that the path may plan on: the rest for the caching allocator's fragmentation
# (every step allocates context-sized tensors of another size) and the step's other temporaries
TORCH_PATH_HEADROOM = 0.8
INDEX_BYTES_PER_TOKEN = 48  # ContextRows' int64 block, offset, position and row of each context token, + slack


def torch_path_bytes_per_token(path, rows_dtype: torch.dtype) -> int:
    """Bytes the torch path holds per context token during a step, beyond vLLM's memory profile: the float32
    reconstructions the cross-layer chain keeps for later layers (at its peak layer: the earlier layers' streams it
    still reads, plus those of its own it keeps that find no buffer of a stream it reads last to take over), the
    step's K and V rows in ``rows_dtype`` (what FlashAttention reads), and the rows' indices."""
    c = path.cache

    def streams_held(layer: int) -> int:
        earlier = [last for (_, l), last in path.last_use.items() if l < layer <= last]
        kept = sum(1 for (_, l), last in path.last_use.items() if l == layer and last > l)
        return len(earlier) + max(0, kept - earlier.count(layer))

    peak = max(map(streams_held, range(c.num_layers)))
    return c.num_kv_heads * c.head_dim * (4 * peak + 2 * rows_dtype.itemsize) + INDEX_BYTES_PER_TOKEN


def torch_path_memory_refusal(bytes_per_token: int, max_num_seqs: int, max_model_len: int, cache_config,
                              device_memory: int, source: str, model_dir: str = "MODEL") -> str | None:
    """Why the torch path cannot serve on this GPU with these limits, or None. Each step it reconstructs every
    running request's whole context (``bytes_per_token`` each, ``torch_path_bytes_per_token``), up to --max-num-seqs
    x --max-model-len tokens, in memory vLLM's KV-cache sizing does not see: only what --gpu-memory-utilization
    leaves of ``device_memory``. Where that could run out, the server would die mid-request (most likely what
    happened on the H100 at --max-num-seqs 256, --max-model-len 8.5k, 0.9: the server exited with 35 of 64 requests
    unanswered, serve_h100_8192_256_all_formats.md), so it is refused at startup with the limits that fit. With an
    explicit ``kv_cache_memory_bytes`` the memory left over is not known here: None."""
    if cache_config.kv_cache_memory_bytes:
        return None
    util = cache_config.gpu_memory_utilization
    slice_bytes = TORCH_PATH_SLICE_TEMPORARIES * 4 * 2 ** 26
    budget = TORCH_PATH_HEADROOM * (1 - util) * device_memory - slice_bytes
    need = max_num_seqs * max_model_len * bytes_per_token
    if need <= budget:
        return None
    fits = int(max(budget, 0) // (max_model_len * bytes_per_token))
    gib = 2 ** 30
    return (f"aquakv: {source} serves on this GPU through the torch path, which reconstructs every running request's "
            f"whole context at each step, {bytes_per_token / 1024:.1f} KiB per token outside the memory vLLM sizes "
            f"its KV cache from: up to {need / gib:.1f} GiB at --max-num-seqs {max_num_seqs} x --max-model-len "
            f"{max_model_len}, but --gpu-memory-utilization {util} leaves {(1 - util) * device_memory / gib:.1f} GiB "
            f"of {device_memory / gib:.0f} GiB, of which it plans on {TORCH_PATH_HEADROOM:.0%} less "
            f"{slice_bytes / gib:.1f} GiB for the reconstruction's slices, "
            "so the server could run out of memory mid-request. "
            + (f"Serve at most --max-num-seqs {fits} at this --max-model-len, or " if fits else "")
            + "lower --max-model-len or --gpu-memory-utilization, or (faster by far on a GPU) calibrate the fused "
            f"kernels' mode: aquakv-calibrate {model_dir} --preset speed --out DIR")


def _has_value_predictor(fused: dict) -> bool:
    """Whether any fused layer predicts values (the fused kernels then serve no 16-bit sinks/window)."""
    return any(f.v_bias is not None or f.v_weight is not None for f in fused.values())


def rank_kv_heads(total: int, tp: int, rank: int) -> tuple[int, int]:
    """(first KV head, count) of tensor-parallel ``rank`` of ``tp``, as vLLM's QKVParallelLinear splits them: an
    equal share each, or one replicated head per rank when there are fewer heads than ranks."""
    if total >= tp:
        if total % tp:
            raise UnsupportedModel(f"{total} KV heads do not split over --tensor-parallel-size {tp}")
        return rank * (total // tp), total // tp
    return rank // (tp // total), 1


def serving_state(vllm_config) -> ServingState:
    """The process-wide ServingState for this model (built once)."""
    key = str(vllm_config.model_config.model)
    with _LOCK:
        if key not in _STATES:
            check_engine_config(vllm_config)
            # vLLM builds the model under its default device and dtype (e.g. cuda, bfloat16); the artifact is
            # loaded and checked on the CPU in float32 and moved to the serving device explicitly
            dtype = torch.get_default_dtype()
            torch.set_default_dtype(torch.float32)
            try:
                with torch.device("cpu"):
                    _STATES[key] = ServingState(vllm_config)
            finally:
                torch.set_default_dtype(dtype)
        return _STATES[key]


def check_engine_config(vllm_config) -> None:
    """Refuse engine settings the backend cannot serve correctly."""
    par = vllm_config.parallel_config
    if par.pipeline_parallel_size > 1:  # tensor parallelism is checked against the artifact (ServingState)
        raise UnsupportedModel("aquakv does not support pipeline parallelism (its predictors read earlier layers, "
                               "which live on another stage); serve with --pipeline-parallel-size 1")
    if getattr(vllm_config, "speculative_config", None) is not None:
        raise UnsupportedModel("aquakv does not support speculative decoding; remove --speculative-config")
    text = vllm_config.model_config.hf_text_config
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        raise UnsupportedModel("aquakv does not support sliding-window attention models")


def check_selection(selected_backend, sel) -> None:
    """Refusals at backend selection time: another --attention-backend, MLA, sinks, head sizes, dtypes."""
    if selected_backend is not None and getattr(selected_backend, "name", None) not in ("AQUAKV", "CUSTOM"):
        raise UnsupportedModel(f"--kv-cache-dtype aquakv uses its own attention backend; remove --attention-backend "
                               f"{selected_backend.name}")
    if getattr(sel, "use_mla", False) or getattr(sel, "use_sparse", False):
        raise UnsupportedModel("aquakv does not support MLA / sparse attention models")
    if getattr(sel, "has_sink", False):
        raise UnsupportedModel("aquakv does not support models with learned attention sinks")
    head = getattr(sel, "head_size", None)
    if head is not None and not head_dim_supported(head):
        raise UnsupportedModel(f"aquakv needs head_dim to be a power of two in [16, 512]; this model has {head}")
    dtype = getattr(sel, "dtype", None)
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise UnsupportedModel(f"aquakv serves float16/bfloat16/float32 models, not {dtype}")


def refuse_impl_features(alibi_slopes, sliding_window, logits_soft_cap, attn_type, decoder, kv_sharing_target_layer_name,
                         extra: dict) -> None:
    """Refuse per-layer attention features the aquakv Impl does not implement."""
    for name, value in (("ALiBi", alibi_slopes), ("sliding window", sliding_window), ("logits soft cap", logits_soft_cap),
                        ("KV sharing across layers", kv_sharing_target_layer_name), ("learned sinks", extra.get("sinks"))):
        if value is not None:
            raise UnsupportedModel(f"aquakv does not support {name} attention layers, which this model has; serve it "
                                   "with another --kv-cache-dtype (e.g. auto or fp8)")
    if attn_type != decoder:
        raise UnsupportedModel(f"aquakv supports decoder self-attention only, not {attn_type}; serve this model with "
                               "another --kv-cache-dtype (e.g. auto or fp8)")


def slot_bytes_for_layer(attention_layer, vllm_config) -> int:
    """Bytes per (token, KV head) of an aquakv layer's page (called when vLLM sizes the KV cache)."""
    from .compat import layer_index

    return serving_state(vllm_config).path.slot_bytes(layer_index(attention_layer.layer_name))
