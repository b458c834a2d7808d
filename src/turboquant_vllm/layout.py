"""The one definition of a packed TurboQuant cache row: bytes, offsets and packing widths.

A cache row holds one token for all KV heads of one layer:

    [K indices, head 0..H-1 | pad | K scales (fp32) x H | V indices x H | pad | V scales (fp32) x H]

Indices are a little-endian bit stream: coordinate j of a head sits at bits [j*b, (j+1)*b),
so 8 indices of b bits fill exactly b bytes (3-bit: 8 indices in 3 bytes). Pads only round
each index region up to 4 bytes so the fp32 scales are aligned; for the usual head dims
(multiples of 32 with 4-bit, of 16 with 2-bit, ...) they are zero.
"""

from __future__ import annotations

from dataclasses import dataclass

from turboquant_vllm.config import TQConfig, check_bits, check_head_dim

SCALE_BYTES = 4  # one fp32 per token per head per tensor
ALIGN = 4


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def index_bytes(head_dim: int, bits: int) -> int:
    """Bytes of packed indices for one head vector."""
    return head_dim * bits // 8


@dataclass(frozen=True)
class PageLayout:
    """Byte layout of one token row for (num_kv_heads, head_dim, k_bits, v_bits)."""

    num_kv_heads: int
    head_dim: int
    k_bits: int
    v_bits: int

    def __post_init__(self) -> None:
        if self.num_kv_heads < 1:
            raise ValueError(f"num_kv_heads must be >= 1, got {self.num_kv_heads}")
        check_head_dim(self.head_dim)
        check_bits("k_bits", self.k_bits)
        check_bits("v_bits", self.v_bits)

    @classmethod
    def from_config(cls, config: TQConfig, num_kv_heads: int, head_dim: int) -> PageLayout:
        return cls(num_kv_heads, head_dim, config.k_bits, config.v_bits)

    @property
    def k_index_bytes(self) -> int:
        """Packed K index bytes of one head."""
        return index_bytes(self.head_dim, self.k_bits)

    @property
    def v_index_bytes(self) -> int:
        return index_bytes(self.head_dim, self.v_bits)

    @property
    def k_index_offset(self) -> int:
        return 0

    @property
    def k_scale_offset(self) -> int:
        return _round_up(self.num_kv_heads * self.k_index_bytes, ALIGN)

    @property
    def v_index_offset(self) -> int:
        return self.k_scale_offset + self.num_kv_heads * SCALE_BYTES

    @property
    def v_scale_offset(self) -> int:
        return self.v_index_offset + _round_up(self.num_kv_heads * self.v_index_bytes, ALIGN)

    @property
    def bytes_per_token(self) -> int:
        """Bytes of one cache row: one token, all KV heads, K and V."""
        return self.v_scale_offset + self.num_kv_heads * SCALE_BYTES

    @property
    def bytes_per_token_per_head(self) -> float:
        return self.bytes_per_token / self.num_kv_heads

    def kernel_constants(self) -> dict[str, int]:
        """The row geometry as the Triton kernels' constexpr keyword arguments."""
        return dict(
            HEAD_DIM=self.head_dim, K_BITS=self.k_bits, V_BITS=self.v_bits,
            K_INDEX_OFFSET=self.k_index_offset, K_INDEX_BYTES=self.k_index_bytes, K_SCALE_OFFSET=self.k_scale_offset,
            V_INDEX_OFFSET=self.v_index_offset, V_INDEX_BYTES=self.v_index_bytes, V_SCALE_OFFSET=self.v_scale_offset,
        )  # fmt: skip

    def page_bytes(self, block_size: int) -> int:
        """Bytes of one vLLM block (page) of `block_size` tokens for one layer."""
        return block_size * self.bytes_per_token

    def compression_vs(self, dtype_bytes: int = 2) -> float:
        """How many times fewer bytes than an uncompressed K+V cache of `dtype_bytes` per element."""
        return 2 * self.num_kv_heads * self.head_dim * dtype_bytes / self.bytes_per_token
