"""Per-layer K/V codec: the layout plus the device tensors (rotation, codebooks) kernels read."""

from __future__ import annotations

from functools import lru_cache

import torch

from turboquant_vllm.codebook import e4m3_scale
from turboquant_vllm.config import TQConfig
from turboquant_vllm.kernels.lut import LUT_BITS, fp8_tables, lut_tables
from turboquant_vllm.layout import PageLayout
from turboquant_vllm.quantizer import MSEQuantizer
from turboquant_vllm.rotation import tf32_parts


class KVCodec:
    """Everything needed to write and read one layer's packed cache.

    K and V share the rotation R [d, d]; each has its own codebook (k_bits, v_bits).
    Tensors live on `device` and are built once per layer, never per step.
    """

    def __init__(
        self,
        config: TQConfig,
        num_kv_heads: int,
        head_dim: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.config = config
        self.layout = PageLayout.from_config(config, num_kv_heads, head_dim)
        self.key = MSEQuantizer(head_dim, config.k_bits, config, device)
        self.value = MSEQuantizer(head_dim, config.v_bits, config, device)
        self.rotation = self.key.rotation  # fp32 [d, d]: rotated = x @ R.T
        # R rounded once for 16-bit un-rotation GEMMs (dequantize_kv into half outputs).
        self.rotation_half = {dt: self.rotation.to(dt) for dt in (torch.float16, torch.bfloat16)}
        # R as two tf32-exact parts for the store's "tf32_split" rotation (kernels/store.py).
        self.rotation_tf32 = tf32_parts(self.rotation)
        # The attention kernel's 16-bit operands: the tables pre-rounded, so no per-element conversion.
        self.centroids_fp16 = (self.key.centroids.half(), self.value.centroids.half())
        # Register tables for 4-bit lookups by byte permute (kernels/lut.py): K's then V's, int32 [0:8].
        tables = [lut_tables(q.centroids) if q.bits == LUT_BITS else None for q in (self.key, self.value)]
        self.lut_usable = tuple(t is not None for t in tables)
        # Keys for an fp8 score MMA (Tiles.fp8_keys, 4-bit keys) and values for an fp8 P.V MMA (TQConfig.fp8_values):
        # e4m3_scale * centroids rounded to e4m3, kept as fp16 (exact) for the gather path, and their byte tables
        # after V's in `lut` (K's int32 [8:10], V's [10:12]).
        self.key_e4m3_scale, self.key_centroids_e4m3, k_fp8 = _e4m3_codebook(self.key, self.lut_usable[0], device)
        self.value_e4m3_scale, self.value_centroids_e4m3, v_fp8 = _e4m3_codebook(self.value, self.lut_usable[1], device)
        fp16 = [t if t is not None else torch.zeros(4, dtype=torch.int32) for t in tables]
        self.lut = torch.cat([*fp16, k_fp8, v_fp8]).to(device)

    @property
    def num_kv_heads(self) -> int:
        return self.layout.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.layout.head_dim

    def new_cache(self, num_blocks: int, block_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """An empty paged cache, uint8 [num_blocks, block_size, bytes_per_token]."""
        device = device if device is not None else self.rotation.device
        return torch.zeros(num_blocks, block_size, self.layout.bytes_per_token, dtype=torch.uint8, device=device)


def _e4m3_codebook(quantizer: MSEQuantizer, usable: bool, device) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(scale, scale * centroids rounded to e4m3 as fp16, their byte tables or zeros where the 4-bit lookup is not
    usable) of one quantiser's codebook, for an fp8 MMA over its indices (kernels/lut.py)."""
    scale = e4m3_scale(quantizer.centroids.cpu().double().numpy(), quantizer.head_dim)
    centroids = (quantizer.centroids.cpu() * scale).to(torch.float8_e4m3fn).to(torch.float16).to(device)
    return scale, centroids, fp8_tables(centroids) if usable else torch.zeros(2, dtype=torch.int32)


@lru_cache(maxsize=64)
def shared_codec(config: TQConfig, num_kv_heads: int, head_dim: int, device: torch.device) -> KVCodec:
    """One read-only codec per (config, geometry, device), shared by every layer that matches."""
    return KVCodec(config, num_kv_heads, head_dim, device)
