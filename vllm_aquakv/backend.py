"""The aquakv attention backend for vLLM: Backend / MetadataBuilder / Impl, as in vLLM's own triton_attn.py.

vLLM gives each aquakv layer a uint8 page [num_blocks, num_kv_heads, block_size, slot_bytes] (see
``vllm_aquakv.serving`` for the slot layout).  ``do_kv_cache_update`` encodes the step's new tokens into their
slots (undo RoPE, predict from earlier layers' reconstructions, quantize the residual); ``forward`` reconstructs
each request's context and attends.  The torch path serves on CPU; on CUDA the Triton kernels serve, and
decode-only steps run inside vLLM's FULL CUDA graphs (``get_cudagraph_support``; ``aquakv_decode_graphs`` false keeps them eager between PIECEWISE graphs).
In decode-only steps with the 16-bit window, each layer's cache write runs on a second stream beside its attention
(``kernels.cache_write.write_beside``; ``aquakv_overlap_write`` false keeps it before).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
)

from . import compat
from .codec import head_dim_supported
from .kernels.attention import AttentionPlan, WindowInputs, fused_attention, plan_attention
from .kernels.cache_write import write_beside, write_fused
from .kernels.reconstruct import (PrefillSplit, prefill_attention, prefills_need_flash, split_prefills,
                                  window_merge_block)
from .runtime import refuse_impl_features, serving_state
from .serving import StepState, TorchServingPath


@dataclass
class AquaKVMetadata:
    """Per-step metadata shared by every aquakv layer of the step."""

    num_actual_tokens: int
    query_start_loc: list[int]  # [num_reqs + 1]
    max_seq_len: int  # the longest context of the step (may be an upper bound)
    block_table: torch.Tensor  # [num_reqs, max_blocks]
    slot_mapping: torch.Tensor  # [num_actual_tokens]
    seq_lens_dev: torch.Tensor  # [num_reqs] int32 on the device: context length including this step's tokens
    query_start_loc_dev: torch.Tensor  # [num_reqs + 1] int32 on the device
    path: TorchServingPath  # the process's serving path (artifact, codecs, predictors)
    common: object = None  # vLLM's CommonAttentionMetadata (for the torch path's positions)
    plan: AttentionPlan | None = None  # the fused kernel's launch plan, made by the step's first fused layer
    split: PrefillSplit | None = None  # with ``path.flash``: the requests that take reconstruction + FlashAttention
    planned: bool = False  # plan and split are made
    decode_only: bool = False  # every request has one new token
    write_stream: torch.cuda.Stream | None = None  # a layer's cache write running beside its attention (joined there)
    _seq_lens: list[int] | None = None
    _positions: torch.Tensor | None = None

    @property
    def query_lens(self) -> list[int]:
        return [b - a for a, b in zip(self.query_start_loc[:-1], self.query_start_loc[1:])]

    @property
    def seq_lens(self) -> list[int]:
        """Context lengths on the host: vLLM's host copy where it has one (``compat.host_seq_lens``), else copied from
        the device, which waits for it (a prefill step's wait cost up to 59 ms of host time in
        serve_profile_h200_8192_256_split.md)."""
        if self._seq_lens is None:
            self._seq_lens = self.seq_lens_dev.cpu().tolist()
        return self._seq_lens

    @property
    def positions(self) -> torch.Tensor:
        """Absolute positions [num_actual_tokens] (torch path only: the fused kernels take post-RoPE keys)."""
        if self._positions is None:
            self._positions = compat.token_positions(self.common)
        return self._positions


def planned_seq_len(max_seq_len: int, max_query_len: int, decode_graphs: bool, max_model_len: int) -> int:
    """The context length a step's attention plan splits for (``plan_attention``'s split-K segments).  A decode-only
    step under FULL CUDA graphs is planned for ``max_model_len``: vLLM captures it with contexts of 1 token and
    replays it for any context, so a plan from the step's own lengths would run long contexts unsplit (a few programs
    walking the whole context).  The kernel divides each request's real context among the segments on the device."""
    if decode_graphs and max_query_len == 1:
        return max(max_seq_len, max_model_len)
    return max_seq_len


class AquaKVMetadataBuilder(AttentionMetadataBuilder[AquaKVMetadata]):
    """Builds AquaKVMetadata from vLLM's CommonAttentionMetadata once per step."""

    _cudagraph_support = AttentionCGSupport.NEVER

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        """FULL CUDA graphs for decode-only batches when the fused kernels serve (``ServingState.decode_graphs``);
        otherwise none (vLLM then captures PIECEWISE graphs around eager attention)."""
        if serving_state(vllm_config).decode_graphs:
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.state = serving_state(vllm_config)
        self.max_model_len = vllm_config.model_config.max_model_len
        if self.state.path.flash is not None:  # decodes first: the fused kernel takes them, FlashAttention the rest
            self.reorder_batch_threshold = 1

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False) -> AquaKVMetadata:
        cm = common_attn_metadata
        n = cm.num_actual_tokens
        num_reqs = cm.num_reqs
        # no host copy of device tensors here: the fused path launches without waiting for the device
        return AquaKVMetadata(
            num_actual_tokens=n,
            query_start_loc=cm.query_start_loc_cpu[: num_reqs + 1].tolist(),
            max_seq_len=planned_seq_len(int(cm.max_seq_len), cm.max_query_len, self.state.decode_graphs,
                                        self.max_model_len),
            block_table=cm.block_table_tensor,
            slot_mapping=cm.slot_mapping[:n],
            seq_lens_dev=cm.seq_lens[:num_reqs],
            _seq_lens=compat.host_seq_lens(cm),
            query_start_loc_dev=cm.query_start_loc[: num_reqs + 1],
            path=self.state.path,
            common=cm,
            decode_only=cm.max_query_len == 1,
        )


class AquaKVImpl(AttentionImpl[AquaKVMetadata]):
    """Per-layer attention: cache write and paged attention over reconstructed K/V."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads=None, alibi_slopes=None, sliding_window=None,
                 kv_cache_dtype="auto", logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, **extra_impl_args):
        refuse_impl_features(alibi_slopes=alibi_slopes, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                             attn_type=attn_type, decoder=AttentionType.DECODER,
                             kv_sharing_target_layer_name=kv_sharing_target_layer_name, extra=extra_impl_args)
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        # load the artifact while vLLM builds the model: what it allocates (the 16-bit window ring) then counts as
        # model memory when vLLM sizes the KV cache
        serving_state(compat.current_vllm_config())

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        """Encode this step's new tokens into the paged cache."""
        md = compat.current_metadata(layer.layer_name)
        if md is None:
            return
        index = compat.layer_index(layer.layer_name)
        fused = md.path.fused.get(index)
        if fused is not None:  # one Triton launch encodes the step's tokens into their slots
            exact, ring = md.path.exact, None
            if exact is not None:  # and stores their 16-bit copies into the sinks/window ring
                ring = exact.prepare_write(index, compat.step_scratch(StepState), key[:md.num_actual_tokens],
                                           md.block_table, md.seq_lens_dev, md.query_start_loc_dev, md.slot_mapping,
                                           kv_cache.shape[2])
            if md.decode_only and md.path.overlap_write:  # (overlap_write: CUDA, fused kernels, a window)
                # nothing this layer's attention reads is stored here (each decode's own token comes from its 16-bit
                # input): the write runs on a side stream beside the attention, which ``forward`` then joins
                md.write_stream = write_beside(fused, kv_cache, md.slot_mapping, key, value, ring)
            else:
                write_fused(fused, kv_cache, md.slot_mapping, key, value, ring=ring)
            return
        md.path.write(index, kv_cache, md.slot_mapping, key, value, md.positions, compat.step_scratch(StepState),
                      md.query_lens, md.block_table, md.seq_lens)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        """Attention of this step's queries over the reconstructed cache; writes ``output`` in place."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("aquakv does not produce quantized attention output (fused output quant)")
        if attn_metadata is None:  # profiling run
            return output
        md: AquaKVMetadata = attn_metadata
        n = md.num_actual_tokens
        index = compat.layer_index(layer.layer_name)
        query = query[:n].view(n, self.num_heads, self.head_size)
        fused = md.path.fused.get(index)
        if fused is not None:  # CUDA, post-RoPE artifact: scores and value sums straight from the codes
            out = output[:n].view(n, self.num_heads, self.head_size)
            if not md.planned:  # the step's first layer: who takes which kernel, and the fused kernel's launch
                qsl = md.query_start_loc
                if md.path.flash is not None and prefills_need_flash(qsl):  # the rest after the leading decodes
                    ring = md.path.exact
                    md.split = split_prefills(qsl, md.seq_lens, query.device,
                                              None if ring is None else (ring.sinks, ring.window),
                                              window_merge_block(self.num_heads // self.num_kv_heads))
                    qsl = qsl[: md.split.decode_reqs + 1]
                if len(qsl) > 1:
                    md.plan = plan_attention(qsl, md.max_seq_len, self.num_heads, self.num_kv_heads, query.device,
                                             window=md.path.exact is not None, int8_scores=md.path.int8_scores,
                                             cuda_loop=md.path.cuda_decode, ring_beside=md.path.ring_beside)
                md.planned = True
            exact = md.path.exact
            window = None if exact is None else WindowInputs(exact.k[index], exact.v[index], exact.tags, key[:n],
                                                             value[:n], exact.sinks, exact.window)
            decodes = n if md.split is None else md.split.decode_tokens
            if decodes:
                fused_attention(query[:decodes], kv_cache, md.block_table, md.seq_lens_dev, md.query_start_loc_dev,
                                md.plan, fused, self.scale, out=out[:decodes], window=window)
            if md.write_stream is not None:  # the layer's cache write, run beside the attention: join it
                torch.cuda.current_stream(query.device).wait_stream(md.write_stream)
                md.write_stream = None
            if md.split is not None:
                prefill_attention(query, kv_cache, md.block_table, md.seq_lens_dev, md.split, fused, self.scale, out,
                                  md.path.flash, window, md.path.merge, md.path.fused_window_prefill)
            return output
        out = md.path.attend(index, query, kv_cache, md.block_table, md.seq_lens, md.query_start_loc, self.scale,
                             compat.step_scratch(StepState), key[:n], value[:n])
        output[:n] = out.reshape(output[:n].shape).to(output.dtype)
        return output


class AquaKVBackend(AttentionBackend):
    """AQUA-KV paged cache: residual codes + fp16 scales per (token, KV head) slot."""

    accept_output_buffer = True
    forward_includes_kv_cache_update = False
    supported_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes = [compat.AQUAKV]

    @staticmethod
    def get_name() -> str:
        return compat.backend_enum_name()

    @staticmethod
    def get_impl_cls():
        return AquaKVImpl

    @staticmethod
    def get_builder_cls():
        return AquaKVMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str="auto"):
        """vLLM 0.26: the logical page view; the slot size follows from the layer's page bytes."""
        return (num_blocks, num_kv_heads, block_size, -1)

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_dim_supported(head_size)


for _name, _attr in {**compat.block_size_hooks(), **compat.kv_cache_layout_hooks()}.items():
    setattr(AquaKVBackend, _name, _attr)
