"""TurboQuant attention backend for vLLM: Backend / MetadataBuilder / Impl over packed uint8 pages.

Token path: do_kv_cache_update -> kernels.store.store_kv (new K/V -> packed pages), then forward:
decode-sized queries -> kernels.decode.paged_attention (context read from the pages in-kernel, this
step's tokens exact); prefill/extend chunks -> vllm.prefill (context dequantised once, FlashAttention);
with sink_tokens / recent_tokens, kernels.sinks.write_sinks / kernels.recent.write_recent last (each sequence's
first / newest tokens kept exact beside the pages).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import triton
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.kv_cache_interface import AttentionSpec

from turboquant_vllm.codec import KVCodec, shared_codec
from turboquant_vllm.config import TQConfigError, check_head_dim
from turboquant_vllm.kernels.decode import paged_attention
from turboquant_vllm.kernels.decode_tiles import MAX_SPLITS, choose_split_grid, decode_step_stores, fp8_value_tiles
from turboquant_vllm.kernels.pdl import pdl_launch
from turboquant_vllm.kernels.recent import RecentTable, recent_entries, write_recent
from turboquant_vllm.kernels.sinks import SinkTable, table_entries, write_sinks
from turboquant_vllm.kernels.store import store_kv
from turboquant_vllm.kernels.workspace import AttentionWorkspace
from turboquant_vllm.key_offset import KeyOffset, layer_key_offset
from turboquant_vllm.layout import PageLayout
from turboquant_vllm.vllm.prefill import PrefillPlan, plan_prefill, prefill_attention
from turboquant_vllm.vllm.spec import current_tq_config
from turboquant_vllm.vllm.warmup import warm_up_kernels

# Split-K is for small decode batches (at most decode_tiles.MAX_SPLITS); larger batches fill the GPU with one split.
MAX_SPLIT_TOKENS = 256  # query tokens the split workspace holds; bigger batches run unsplit
CPU_NUM_SMS = 16  # only the CPU test path (Triton interpreter) has no SM count


def _max_num_seqs() -> int:
    """The scheduler's sequence limit in the vLLM config being built (vLLM's default outside one)."""
    from vllm.config import get_current_vllm_config_or_none

    scheduler = getattr(get_current_vllm_config_or_none(), "scheduler_config", None)
    return getattr(scheduler, "max_num_seqs", None) or 256


def packed_pages(kv_cache: torch.Tensor) -> torch.Tensor:
    """A layer's cache as the kernels take it, uint8 [num_blocks, block_size, bytes_per_token].

    vLLM before 0.29 allocates it in get_kv_cache_shape's shape; later releases hand each layer a
    [num_blocks, heads, block_size, bytes] view built from the spec, whose one head slot
    (TQ4FullAttentionSpec.num_head_slots) is the whole packed row.
    """
    if kv_cache.dim() == 3:
        return kv_cache
    if kv_cache.dim() != 4 or kv_cache.shape[1] != 1:
        raise ValueError(f"TurboQuant cache view must be [blocks, 1, block_size, bytes], got {tuple(kv_cache.shape)}")
    return kv_cache.squeeze(1)


class TQ4AttentionBackend(AttentionBackend):
    """Packed TurboQuant KV cache: (num_blocks, block_size, bytes_per_token) uint8."""

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]
    forward_includes_kv_cache_update: bool = False  # vLLM calls do_kv_cache_update first

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # must name an AttentionBackendEnum member

    @staticmethod
    def get_impl_cls() -> type[TQ4AttentionImpl]:
        return TQ4AttentionImpl

    @staticmethod
    def get_builder_cls() -> type[TQ4MetadataBuilder]:
        return TQ4MetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec: AttentionSpec | None = None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]  # vLLM >= 0.31 passes the layer's spec; any page of 16-token multiples will do

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, cache_dtype_str: str = "auto"
    ) -> tuple[int, ...]:
        """(num_blocks, block_size, bytes_per_token): block_size tokens per page, laid out by layout.py."""
        config = current_tq_config()
        return (num_blocks, block_size, PageLayout.from_config(config, num_kv_heads, head_size).bytes_per_token)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
        """Identity layout: raising makes vLLM fall back to the logical shape (as for FlashMLA)."""
        raise NotImplementedError

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple:
        """vLLM >= 0.29 builds each layer's cache view from the spec instead of get_kv_cache_shape (older vLLM
        never asks). The kernels need a layer's pages in one contiguous run: the layer-major layouts, which with the
        spec's single head slot all put the same bytes in the same places."""
        from vllm.v1.kv_cache_layout import KVCacheLayout

        return tuple(layout for layout in KVCacheLayout if layout.is_layer_compact)

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        try:
            check_head_dim(head_size)
        except TQConfigError:
            return False
        return True

    @classmethod
    def supports_kv_connector(cls) -> bool:
        return False

    @classmethod
    def supports_combination(
        cls,
        head_size,
        dtype,
        kv_cache_dtype,
        block_size,
        use_mla,
        has_sink,
        use_sparse,
        use_mm_prefix,
        device_capability,
    ) -> str | None:
        """Explain refusals in words a user can act on (vLLM adds its generic reasons too)."""
        if kv_cache_dtype not in (None, "auto"):
            return (
                f"--kv-cache-dtype {kv_cache_dtype} cannot be combined with the TurboQuant CUSTOM backend, "
                "which compresses the cache itself: leave --kv-cache-dtype at auto"
            )
        if use_mla:
            return "MLA models (compressed latent KV) are not supported by the TurboQuant CUSTOM backend"
        try:
            check_head_dim(head_size)
            current_tq_config().check_head_dim(head_size)
        except TQConfigError as err:
            return str(err)
        return None


@dataclass
class TQ4Metadata:
    """Per-step attention inputs, shared by all layers of the group.

    Sequence s owns queries [query_start_loc[s], query_start_loc[s+1]) and seq_lens[s]
    tokens in all; its first seq_lens[s] - q_len tokens are cached context. The first
    num_decodes sequences (num_decode_tokens query rows) go to the paged kernel, the rest
    (if any) to the dense prefill path described by `prefill`.
    """

    num_actual_tokens: int
    max_query_len: int
    query_start_loc: torch.Tensor  # int32 [num_reqs + 1]
    seq_lens: torch.Tensor  # int32 [num_reqs]
    block_table: torch.Tensor  # int32 [num_reqs, max_blocks]
    slot_mapping: torch.Tensor  # int64 [num_tokens], -1 = padding
    num_decodes: int
    num_decode_tokens: int
    num_splits: int
    split_slots: int  # paged_attention's: the live sequences of a padded (CUDA-graph) batch split finer
    workspace: AttentionWorkspace | None
    prefill: PrefillPlan | None
    # Leading tokens whose K/V paged_attention stores (decode_tiles.decode_step_stores: in the attention launch, or
    # with programmatic dependent launch right after it) instead of do_kv_cache_update's store launch. Either way a
    # token gets store_kv's quantisation: byte for byte that of its one-token programs (up to SMALL_BATCH_TOKENS),
    # within fp32 summation order of its multi-token ones. A token stored twice (do_kv_cache_update without a
    # forward context to consult) keeps the bytes of paged_attention's store.
    fused_store_tokens: int = 0


class TQ4MetadataBuilder(AttentionMetadataBuilder[TQ4Metadata]):
    """Chooses the split count on the CPU and owns the split-K workspace (allocated once)."""

    # One kernel serves any query length, so uniform decode (incl. spec-decode) batches capture in FULL graphs.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1, supports_spec_as_decode=True)
        num_heads = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)
        self.num_kv_heads = kv_cache_spec.num_kv_heads
        self.head_size = kv_cache_spec.head_size
        on_gpu = device.type == "cuda"
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else CPU_NUM_SMS
        self.pdl = pdl_launch(device)
        self.workspace = AttentionWorkspace.allocate(
            MAX_SPLIT_TOKENS, num_heads, kv_cache_spec.head_size, MAX_SPLITS, device
        )
        config = current_tq_config()
        self.sink_tokens = config.sink_tokens
        self.recent_tokens = config.recent_tokens
        codec = shared_codec(config, self.num_kv_heads, self.head_size, device)
        self.fp8_values = fp8_value_tiles(codec, device)  # its decode tile's own split count
        if on_gpu:  # compile now rather than inside a request (the CPU interpreter has nothing to compile)
            max_blocks = triton.cdiv(vllm_config.model_config.max_model_len, kv_cache_spec.block_size)  # vLLM's table
            warm_up_kernels(codec, num_heads, vllm_config.model_config.dtype, kv_cache_spec.block_size,
                            config.key_offsets is not None, self.workspace, max_blocks,
                            config.sink_tokens, config.recent_tokens)  # fmt: skip

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> TQ4Metadata:
        cam = common_attn_metadata
        num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(
            cam, decode_threshold=self.reorder_batch_threshold
        )
        # Every decode-part query is at most reorder_batch_threshold long; big decode batches need no splits.
        decode_q_len = cam.max_query_len if num_prefills == 0 else self.reorder_batch_threshold
        num_splits, split_slots = 1, 0
        if num_decode_tokens <= MAX_SPLIT_TOKENS:  # a CUDA graph's padding rows count in num_decodes
            num_splits, split_slots = choose_split_grid(num_decodes, self.num_kv_heads, MAX_SPLITS, self.num_sms,
                                                        self.head_size, self.fp8_values)  # fmt: skip
        # Pure decode steps only: a mixed step's separate store would start at an odd slot_mapping offset (an int64
        # view 8 bytes in), which Triton compiles a variant of its store kernel for, during inference.
        fused_store = num_decodes > 0 and num_prefills == 0 and decode_step_stores(self.head_size, num_splits, self.pdl,
                                                                                   self.recent_tokens > 0)  # fmt: skip
        prefill = None
        if num_prefills:
            # vLLM's host copy is exact for prefill rows; without it (older vLLM) read the device tensor.
            seq_lens_host = getattr(cam, "seq_lens_cpu_upper_bound", None)
            prefill = plan_prefill(cam.query_start_loc_cpu, cam.seq_lens if seq_lens_host is None else seq_lens_host,
                                   cam.block_table_tensor, self.kv_cache_spec.block_size, num_decodes,
                                   cam.num_reqs, self.sink_tokens, self.recent_tokens)  # fmt: skip
        return TQ4Metadata(
            num_actual_tokens=cam.num_actual_tokens,
            max_query_len=min(cam.max_query_len, decode_q_len),
            query_start_loc=cam.query_start_loc,
            seq_lens=cam.seq_lens,
            block_table=cam.block_table_tensor,
            slot_mapping=cam.slot_mapping,
            num_decodes=num_decodes,
            num_decode_tokens=num_decode_tokens,
            num_splits=num_splits,
            split_slots=split_slots,
            workspace=self.workspace if num_splits > 1 else None,
            prefill=prefill,
            fused_store_tokens=num_decode_tokens if fused_store else 0,
        )


def _stale(table: SinkTable | RecentTable | None, like: torch.Tensor) -> bool:
    """Whether an exact table is missing or not on like's device and dtype."""
    return table is None or (table.kv.device, table.kv.dtype) != (like.device, like.dtype)


class TQ4AttentionImpl(AttentionImpl[TQ4Metadata]):
    """compress -> store (do_kv_cache_update); attention over pages + exact new tokens (forward)."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **extra: object,
    ) -> None:
        refusals = {
            "ALiBi": alibi_slopes is not None,
            "sliding-window attention": sliding_window is not None,
            "logits soft-capping": bool(logits_soft_cap),
            "attention sinks": extra.get("sinks") is not None,
            f"{attn_type} attention (only decoder self-attention)": attn_type != AttentionType.DECODER,
            "cross-layer KV sharing": kv_sharing_target_layer_name is not None,
            f"kv_cache_dtype={kv_cache_dtype}": kv_cache_dtype != "auto",
        }
        unsupported = [name for name, hit in refusals.items() if hit]
        if unsupported:
            raise TQConfigError(
                f"the TurboQuant CUSTOM backend does not support {', '.join(unsupported)}; "
                "serve this model without --attention-backend CUSTOM"
            )
        self.config = current_tq_config()
        self.config.check_head_dim(head_size)
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        if num_heads % self.num_kv_heads:
            raise TQConfigError(f"num_heads={num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self._key_offset: KeyOffset | None = None
        max_num_seqs = _max_num_seqs()
        self._sink_entries = table_entries(max_num_seqs)
        self._recent_entries = recent_entries(max_num_seqs, self.config.recent_tokens)
        self._sinks: SinkTable | None = None
        self._recent: RecentTable | None = None
        # vLLM builds the model on its device: the tables count as model memory
        self.exact_tables(torch.empty(0, dtype=torch.get_default_dtype(), device=torch.get_default_device()))

    def codec(self, device: torch.device) -> KVCodec:
        return shared_codec(self.config, self.num_kv_heads, self.head_size, device)

    def key_offset(self, layer: AttentionLayer, codec: KVCodec) -> KeyOffset | None:
        """This layer's calibrated key offset on the device (config.key_offsets), built on first use.

        The first use is an uncaptured step (vLLM warms up before capturing CUDA graphs); building it
        inside a capture would record a host-to-device copy, so that is refused.
        """
        if self.config.key_offsets is None:
            return None
        if self._key_offset is None:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("TurboQuant key offsets must be loaded before CUDA graph capture")
            name = getattr(layer, "layer_name", None) or ""
            offset = layer_key_offset(self.config.key_offsets, name, self.num_kv_heads, self.head_size)
            self._key_offset = KeyOffset.build(offset, codec.rotation)
        return self._key_offset

    def exact_tables(self, like: torch.Tensor) -> tuple[SinkTable | None, RecentTable | None]:
        """This layer's exact-sink and recent-token tables (config.sink_tokens, config.recent_tokens; None where
        off) on the device and in the dtype of `like`.

        vLLM constructs the layers under its device and dtype, so the tables are allocated then and their memory is
        counted before the KV cache is sized; elsewhere (tests) on first use. Their addresses must not change once
        CUDA graphs are captured."""
        config, heads, dim = self.config, self.num_kv_heads, self.head_size
        if (config.sink_tokens and _stale(self._sinks, like)) or (config.recent_tokens and _stale(self._recent, like)):
            if like.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("TurboQuant exact tables must be allocated before CUDA graph capture")
            if config.sink_tokens:
                self._sinks = SinkTable.allocate(self._sink_entries, config.sink_tokens, heads, dim, like.dtype,
                                                 like.device)  # fmt: skip
            if config.recent_tokens:
                self._recent = RecentTable.allocate(self._recent_entries, config.recent_tokens, heads, dim,
                                                    like.dtype, like.device)  # fmt: skip
        return self._sinks, self._recent

    def do_kv_cache_update(
        self,
        layer: AttentionLayer,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Quantise this step's K/V into their slots (slot -1 = padding, skipped by the kernel).

        Args:
            key, value: [num_tokens, num_kv_heads, head_size].
            kv_cache: uint8 [num_blocks, block_size, bytes_per_token] (a 4-D view from vLLM >= 0.29, packed_pages).
            slot_mapping: int64 [num_tokens].
        """
        kv_cache = packed_pages(kv_cache)
        codec = self.codec(kv_cache.device)
        n = self._tokens_stored_by_forward(layer)
        if n:
            key, value, slot_mapping = key[n:], value[n:], slot_mapping[n:]
        store_kv(codec, key, value, kv_cache, slot_mapping, self.key_offset(layer, codec))

    @staticmethod
    def _tokens_stored_by_forward(layer: AttentionLayer | None) -> int:
        """Leading tokens of this step whose K/V forward's decode launch stores (TQ4Metadata.fused_store_tokens)."""
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if layer is None or not is_forward_context_available():
            return 0
        md = get_forward_context().attn_metadata  # None in vLLM's dummy runs; a list: [0] is the base model's
        md = (md[0] if isinstance(md, list) else md or {}).get(layer.layer_name)
        return md.fused_store_tokens if isinstance(md, TQ4Metadata) else 0

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: TQ4Metadata,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention for this step's queries: decodes in one paged-kernel launch (two with split-K),
        prefill/extend chunks through vllm.prefill (dequantise context, a FlashAttention call per run of requests).

        Args:
            query: [num_tokens, num_heads, head_size]; key/value: [num_tokens, num_kv_heads, head_size].
            output: [num_tokens, num_heads, head_size], written in place.
        """
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantisation is not supported by the TurboQuant backend")
        sinks, recent = self.exact_tables(query)
        if attn_metadata is None:  # profiling run: no cache bound yet
            return output.fill_(0)
        md = attn_metadata
        kv_cache = packed_pages(kv_cache)
        codec = self.codec(kv_cache.device)
        key_offset = self.key_offset(layer, codec)
        wrote_recent = False
        if md.num_decodes:
            n = md.num_decode_tokens
            wrote_recent = paged_attention(
                codec, query[:n], key[:n], value[:n], kv_cache,
                block_table=md.block_table,
                seq_lens=md.seq_lens,
                query_start_loc=md.query_start_loc[: md.num_decodes + 1],
                scale=self.scale,
                out=output[:n],
                max_query_len=md.max_query_len,
                num_splits=md.num_splits,
                split_slots=md.split_slots,
                workspace=md.workspace,
                key_offset=key_offset,
                store_slots=md.slot_mapping[: md.fused_store_tokens] if md.fused_store_tokens else None,
                sinks=sinks,
                recent=recent,
                write_recent=md.prefill is None,
            )  # fmt: skip
        if md.prefill is not None:
            prefill_attention(codec, md.prefill, query, key, value, kv_cache, self.scale, output, key_offset, sinks,
                              recent)  # fmt: skip
        # after every read of this step (sinks.py, recent.py)
        if sinks is not None:
            write_sinks(sinks, codec.rotation, key, value, md.block_table, md.seq_lens, md.query_start_loc)
        if recent is not None and not wrote_recent:
            write_recent(recent, codec.rotation, key, value, md.block_table, md.seq_lens, md.query_start_loc,
                         kv_cache.shape[1])  # fmt: skip
        return output
