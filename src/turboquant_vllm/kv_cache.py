"""A transformers Cache that keeps only TurboQuant-compressed K/V between forward calls."""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from turboquant_vllm.codec import KVCodec, shared_codec
from turboquant_vllm.config import TQConfig, TQConfigError
from turboquant_vllm.key_offset import mean_key, use_offset
from turboquant_vllm.packing import pack_indices, unpack_indices
from turboquant_vllm.quantizer import MSEQuantizer, QuantizedVectors

# Vectors dequantised per block: bounds the fp32/int64 scratch of a long context to a few tens of MB.
BLOCK_VECTORS = 1 << 15


def compress(quant: MSEQuantizer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., d] float -> (packed uint8 [..., d * bits / 8], fp32 scales [...])."""
    q = quant.quantize(x)
    return pack_indices(q.indices, quant.bits), q.scales


def compress_offset(quant: MSEQuantizer, x: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """compress() of x - offset for the tokens where that shortens the vector, of x for the others.

    The sign of the fp32 scale records the choice (negative: offset removed), so the layout gains no byte.
    offset: fp32 [B, H, 1, d].
    """
    offset = offset.to(x.dtype)
    use = use_offset(x, offset)
    packed, scales = compress(quant, x - use.unsqueeze(-1) * offset)
    return packed, torch.where(use, -scales, scales)


def expand_into(
    quant: MSEQuantizer,
    packed: torch.Tensor,
    scales: torch.Tensor,
    out: torch.Tensor,
    offset: torch.Tensor | None = None,
) -> None:
    """Dequantise packed [B, H, T, nb] / scales [B, H, T] into out [B, H, T, d] (original basis, out's dtype).

    With an offset [B, H, 1, d], tokens stored by compress_offset (negative scale) get it added back.
    Works in blocks of tokens so the only full-length tensor is `out`, the one attention reads.
    """
    batch, heads, tokens = scales.shape
    step = max(1, BLOCK_VECTORS // max(batch * heads, 1))
    for start in range(0, tokens, step):
        end = min(tokens, start + step)
        indices = unpack_indices(packed[:, :, start:end], quant.bits, quant.head_dim)
        block_scales = scales[:, :, start:end]
        x = quant.dequantize(QuantizedVectors(indices, block_scales.abs()))
        if offset is not None:
            x = x + torch.signbit(block_scales).unsqueeze(-1) * offset
        out[:, :, start:end] = x


def expand(
    quant: MSEQuantizer,
    packed: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of compress (or compress_offset), in the original basis: what attention sees for cached tokens."""
    out = torch.empty(*scales.shape, quant.head_dim, dtype=dtype, device=packed.device)
    expand_into(quant, packed, scales, out, offset)
    return out


def check_model_config(model_config: Any, config: TQConfig) -> None:
    """Raise TQConfigError for a model this cache cannot serve faithfully.

    Sliding-window and chunked-attention layers are refused: this cache keeps every token (a
    compressed full layer outgrows an exact window once T > ~3.5 W), and the vLLM backend it
    mirrors serves full attention only, so quality numbers would not transfer.
    """
    cfg = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    config.check_head_dim(head_dim)
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        other = sorted(set(layer_types) - {"full_attention"})
        if other:
            raise TQConfigError(
                f"{type(cfg).__name__} has {other} layers; CompressedDynamicCache serves full-attention layers only. "
                "Use transformers' DynamicCache for this model."
            )
    elif getattr(cfg, "sliding_window", None) is not None:
        raise TQConfigError(
            f"{type(cfg).__name__} uses sliding-window attention (sliding_window={cfg.sliding_window}); "
            "CompressedDynamicCache serves full attention only. If your prompts never exceed the window, "
            "load the model with sliding_window=None."
        )
    if getattr(cfg, "attention_chunk_size", None) is not None:
        raise TQConfigError(
            f"{type(cfg).__name__} uses chunked attention; CompressedDynamicCache serves full attention."
        )


# Keys of one sequence share a large common component (SmolLM2, scratch: ~40% of their energy). Quantising k - offset
# instead of k shrinks the codebook error; attention sees the same keys because the offset is added back. A key
# farther from the offset than from 0 (the attention sink is one) is stored as is. SmolLM2 at 4/4, 256-token chunks,
# 12,544 Austen tokens on CPU (hf_eval_key_offsets_cpu_2026-11-30.json): top-1 95.9% -> 96.5%, perplexity change
# +0.35% -> +0.27%, KL 0.0056 -> 0.0036 (docs/key-offset.md). The offset is the mean of the first chunk's keys,
# or a calibrated per-layer offset (key_offsets=, what the vLLM backend uses).

# generate() decodes one token at a time, so without a window every token attends to its recent
# neighbours only through the codebook. SmolLM2 at 4/4 in 16-token chunks (hf_eval_chunk16_window_cpu_2026-11-28.json):
# KL 0.039 and 91.2% top-1 without a window, 0.0049 and 96.1% with 32 exact tokens, for ~1% more memory at 4K tokens.
DEFAULT_RESIDUAL_TOKENS = 32

# A sequence's first tokens (attention sinks) draw much of every later query's attention, so their codebook error
# reaches every score and output. SmolLM2 at 4/4 + key offset, 256-token chunks, 12,544 Austen tokens on CPU
# (hf_eval_sinks_cpu_2026-12-01.json): top-1 96.5% -> 97.2%, KL 0.0036 -> 0.0025 with the first 4 tokens exact, and
# 96.8% -> 97.7%, KL 0.0025 -> 0.0015 next to the 32-token window, for 4 tokens' K/V per sequence and layer.
DEFAULT_SINK_TOKENS = 4


class CompressedLayer(CacheLayerMixin):
    """One attention layer's cache: packed K/V indices [B, Hkv, T, d*bits/8] (uint8) and fp32 scales [B, Hkv, T].

    update() stores the new tokens compressed and returns the dequantised context followed by the
    exact new tokens, as the vLLM backend does (context from pages, current chunk exact). The
    returned full-precision tensors are the only uncompressed copy and live for one layer's attention.

    residual_tokens > 0 also keeps exact copies of the newest that many tokens (recent_k/recent_v)
    and returns them in place of their dequantised values (see DEFAULT_RESIDUAL_TOKENS); sink_tokens > 0
    does the same for the sequence's first that many tokens (sink_k/sink_v, see DEFAULT_SINK_TOKENS).
    center_keys stores keys relative to the common key component of the first chunk (key_offset.py);
    a key_offset row (calibrated, what the vLLM backend does with key_offsets) replaces that mean.
    center_keys=False without key_offset is the vLLM backend's default format.
    """

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(
        self,
        config: TQConfig,
        residual_tokens: int = DEFAULT_RESIDUAL_TOKENS,
        center_keys: bool = True,
        key_offset: torch.Tensor | None = None,
        sink_tokens: int = DEFAULT_SINK_TOKENS,
    ) -> None:
        super().__init__()
        for name, value in (("residual_tokens", residual_tokens), ("sink_tokens", sink_tokens)):
            if value < 0:
                raise TQConfigError(f"{name} must be >= 0, got {value}")
        self.config, self.residual_tokens, self.center_keys = config, residual_tokens, center_keys
        self.sink_tokens = sink_tokens
        self.fixed_offset = key_offset  # [Hkv, d], calibrated: the vLLM backend's rule instead of the first chunk
        self.codec: KVCodec | None = None
        self.k_packed = self.k_scales = self.v_packed = self.v_scales = None
        self.recent_k = self.recent_v = self.sink_k = self.sink_v = self.k_offset = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        self.config.check_head_dim(head_dim)
        if value_states.shape[-1] != head_dim:
            raise TQConfigError(
                f"key head_dim {head_dim} != value head_dim {value_states.shape[-1]}: "
                "TurboQuant shares one rotation between K and V."
            )
        self.device, self.dtype = key_states.device, key_states.dtype
        self.codec = shared_codec(self.config, heads, head_dim, key_states.device)
        lay = self.codec.layout

        def empty(*tail: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.empty(batch, heads, 0, *tail, dtype=dtype, device=self.device)

        self.k_packed, self.k_scales = empty(lay.k_index_bytes, dtype=torch.uint8), empty(dtype=torch.float32)
        self.v_packed, self.v_scales = empty(lay.v_index_bytes, dtype=torch.uint8), empty(dtype=torch.float32)
        if self.residual_tokens:
            self.recent_k, self.recent_v = key_states[:, :, :0].clone(), value_states[:, :, :0].clone()
        if self.sink_tokens:
            self.sink_k, self.sink_v = key_states[:, :, :0].clone(), value_states[:, :, :0].clone()
        if self.fixed_offset is not None:
            if self.fixed_offset.shape != (heads, head_dim):
                raise TQConfigError(f"key offset {tuple(self.fixed_offset.shape)} does not fit {heads} x {head_dim}")
            offset = self.fixed_offset.to(self.device, torch.float32)[None, :, None, :]
            self.k_offset = offset.expand(batch, -1, -1, -1).contiguous()
        else:
            self.k_offset = mean_key(key_states) if self.center_keys else None
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compress and append key/value [B, Hkv, q, d]; return [B, Hkv, past + q, d] in their dtype."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past = self.get_seq_length()
        keys, values = key_states, value_states
        if past:
            keys = self._with_context(
                self.codec.key, self.k_packed, self.k_scales, self.recent_k, key_states, self.k_offset, self.sink_k
            )
            values = self._with_context(
                self.codec.value, self.v_packed, self.v_scales, self.recent_v, value_states, sink=self.sink_v
            )
        if self.k_offset is None:
            new_k, new_ks = compress(self.codec.key, key_states)
        else:
            new_k, new_ks = compress_offset(self.codec.key, key_states, self.k_offset)
        new_v, new_vs = compress(self.codec.value, value_states)
        self.k_packed = torch.cat([self.k_packed, new_k], dim=-2)
        self.k_scales = torch.cat([self.k_scales, new_ks], dim=-1)
        self.v_packed = torch.cat([self.v_packed, new_v], dim=-2)
        self.v_scales = torch.cat([self.v_scales, new_vs], dim=-1)
        if self.sink_tokens and self.sink_k.shape[-2] < self.sink_tokens:  # holds min(past, sink_tokens) tokens
            need = self.sink_tokens - self.sink_k.shape[-2]
            self.sink_k = torch.cat([self.sink_k, key_states[:, :, :need]], dim=-2)
            self.sink_v = torch.cat([self.sink_v, value_states[:, :, :need]], dim=-2)
        if self.residual_tokens:
            r = self.residual_tokens
            self.recent_k = torch.cat([self.recent_k, key_states], dim=-2)[:, :, -r:].clone()
            self.recent_v = torch.cat([self.recent_v, value_states], dim=-2)[:, :, -r:].clone()
        return keys, values

    @staticmethod
    def _with_context(
        quant: MSEQuantizer,
        packed: torch.Tensor,
        scales: torch.Tensor,
        recent: torch.Tensor | None,
        new: torch.Tensor,
        offset: torch.Tensor | None = None,
        sink: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[dequantised context (its first tokens exact, given sink) | exact recent window, if any | exact new
        tokens] in one buffer (no cat copy)."""
        past = scales.shape[-1]
        kept = 0 if recent is None else recent.shape[-2]
        out = new.new_empty(*new.shape[:2], past + new.shape[-2], new.shape[-1])
        old = slice(0, past - kept)
        expand_into(quant, packed[:, :, old], scales[:, :, old], out[:, :, old], offset)
        if sink is not None:
            exact = min(sink.shape[-2], past - kept)
            out[:, :, :exact] = sink[:, :, :exact]
        if kept:
            out[:, :, past - kept : past] = recent
        out[:, :, past:] = new
        return out

    def dequantize(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored tokens, dequantised: K, V [B, Hkv, T, d]."""
        k = expand(self.codec.key, self.k_packed, self.k_scales, dtype, self.k_offset)
        v = expand(self.codec.value, self.v_packed, self.v_scales, dtype)
        if self.sink_k is not None:
            sinks = self.sink_k.shape[-2]
            k[:, :, :sinks], v[:, :, :sinks] = self.sink_k, self.sink_v
        return k, v

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized else self.k_scales.shape[-1]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def memory_bytes(self) -> int:
        """Bytes of the tensors this layer holds between steps."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self) -> list[torch.Tensor]:
        tensors = [self.k_packed, self.k_scales, self.v_packed, self.v_scales, self.recent_k, self.recent_v]
        tensors += [self.sink_k, self.sink_v, self.k_offset]
        return [t for t in tensors if t is not None]

    def _apply(self, fn) -> None:
        """Apply fn to each packed tensor viewed as [B, Hkv, T, ...] (scales get a trailing unit dim)."""
        if self.is_initialized:
            self.k_packed, self.v_packed = fn(self.k_packed), fn(self.v_packed)
            self.k_scales = fn(self.k_scales.unsqueeze(-1)).squeeze(-1)
            self.v_scales = fn(self.v_scales.unsqueeze(-1)).squeeze(-1)
            if self.recent_k is not None:
                self.recent_k, self.recent_v = fn(self.recent_k), fn(self.recent_v)
            if self.sink_k is not None:  # indexed from the start, like the packed tokens: crops cut them alike
                self.sink_k, self.sink_v = fn(self.sink_k), fn(self.sink_v)

    def _apply_rows(self, fn) -> None:
        """_apply plus the per-row key offset: for operations on the batch dimension."""
        self._apply(fn)
        if self.k_offset is not None:
            self.k_offset = fn(self.k_offset)

    def reset(self) -> None:
        self.k_packed = self.k_scales = self.v_packed = self.v_scales = None
        self.recent_k = self.recent_v = self.sink_k = self.sink_v = self.k_offset = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """Negative: drop that many newest tokens. Positive (the older API): keep that many tokens."""
        length = self.get_seq_length()
        keep = length + tokens_to_remove if tokens_to_remove < 0 else min(tokens_to_remove or length, length)
        if keep == length:
            return
        keep = max(keep, 0)
        recent = self.recent_k, self.recent_v
        self.recent_k = self.recent_v = None  # indexed from the end: cut separately
        self._apply(lambda t: t[:, :, :keep].clone())
        if recent[0] is not None:
            left = max(recent[0].shape[-2] - (length - keep), 0)
            self.recent_k, self.recent_v = (t[:, :, :left].clone() for t in recent)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Exact: each batch row's packed tokens are independent, so rows are gathered without requantising."""
        self._apply_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply_rows(lambda t: t[indices])

    def offload(self) -> None:
        self._apply_rows(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        self._apply_rows(lambda t: t.to(self.device, non_blocking=True))


class CompressedDynamicCache(Cache):
    """Drop-in for DynamicCache that stores K/V with TurboQuant (k_bits/v_bits from the TQConfig).

    Usage: ``model.generate(ids, past_key_values=CompressedDynamicCache(TQConfig(), model.config))``
    (``cache=`` on transformers versions that renamed the argument; see cache_kwargs()).

    Args:
        config: how K and V are compressed.
        model_config: the model's config. With it, unsupported models (head_dim, sliding-window or
            chunked layers) are refused here and layers are built up front; without it, layers are
            created on first use and only head_dim can be checked (at the first update).
        residual_tokens: also keep the newest this many tokens exact (see CompressedLayer); 0 matches
            the vLLM backend, which has no such window yet.
        sink_tokens: also keep each sequence's first this many tokens exact (see CompressedLayer); 0 matches
            the vLLM backend, which does not yet.
        center_keys: store keys relative to each sequence's common key component (see CompressedLayer);
            False matches the vLLM backend without key offsets.
        key_offsets: fp32 [num_layers, num_kv_heads, head_dim] from `turboquant-vllm calibrate`: layers use
            these fixed offsets instead of their first chunk's mean, which is what the vLLM backend does with
            key_offsets (needs model_config).
    """

    def __init__(
        self,
        config: TQConfig | None = None,
        model_config: Any = None,
        residual_tokens: int = DEFAULT_RESIDUAL_TOKENS,
        center_keys: bool = True,
        key_offsets: torch.Tensor | None = None,
        sink_tokens: int = DEFAULT_SINK_TOKENS,
    ) -> None:
        self.tq_config = config or TQConfig()
        make_layer = partial(CompressedLayer, self.tq_config, residual_tokens, center_keys, sink_tokens=sink_tokens)
        if key_offsets is not None and model_config is None:
            raise TQConfigError("key_offsets needs model_config, to build one layer per row")
        if model_config is None:
            make_layer()  # validates residual_tokens and sink_tokens now rather than at the first update
            super().__init__(layer_class_to_replicate=make_layer)
            return
        check_model_config(model_config, self.tq_config)
        text = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
        if key_offsets is not None and key_offsets.shape[0] != text.num_hidden_layers:
            raise TQConfigError(f"key_offsets has {key_offsets.shape[0]} layers, the model {text.num_hidden_layers}")
        offsets = [None] * text.num_hidden_layers if key_offsets is None else list(key_offsets)
        super().__init__(layers=[make_layer(key_offset=offsets[i]) for i in range(text.num_hidden_layers)])

    def memory_bytes(self) -> int:
        """Bytes every layer holds between steps: packed indices and scales, exact tokens, key offsets."""
        return sum(layer.memory_bytes() for layer in self.layers)

    def __repr__(self) -> str:
        cfg = self.tq_config
        return (
            f"{type(self).__name__}(k_bits={cfg.k_bits}, v_bits={cfg.v_bits}, layers={len(self.layers)}, "
            f"tokens={self.get_seq_length()}, bytes={self.memory_bytes()})"
        )


def dynamic_cache_bytes(cache: Cache) -> int:
    """Bytes held by an uncompressed DynamicCache's key/value tensors, for comparisons."""
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if isinstance(t, torch.Tensor)
    )


def cache_kwargs(model: torch.nn.Module, cache: Cache) -> dict[str, Cache]:
    """The keyword under which model.forward/generate take a cache: ``cache`` in newer transformers 5.x,
    ``past_key_values`` before (the newer versions still accept it, with a deprecation warning)."""
    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}
