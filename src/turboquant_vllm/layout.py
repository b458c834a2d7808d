"""The one definition of the packed TurboQuant cache: bytes per token, and where each byte sits in a page.

vLLM allocates one page per block of `block_size` tokens and layer, shaped (block_size, bytes_per_token).
Inside a page the bytes are grouped by KV head, then by field, then by token:

    page   = [run of head 0 | run of head 1 | ... | run of head H-1]
    run    = [K indices x block_size | K scales x block_size | V indices x block_size | V scales x block_size]

so a kernel that serves one KV head reads one contiguous run per page: its index bytes, then its scales,
with no byte of another head in any sector it touches. Token t's field f lies at
`run + f_offset + t * f_width`, except V indices when `v_coordinate_major` (TQConfig.fp8_values, 4-bit
values): then the V index field goes coordinate by coordinate, each coordinate's block_size indices one
little-endian nibble stream (coordinate j of token t: nibble t of the block_size // 2 bytes at
`run + v_offset + j * block_size // 2`), so one 32-bit word holds 8 tokens of a coordinate and the 4 bytes an
e4m3 lookup makes of half a word are 4 consecutive tokens, the run an fp8 P.V MMA contracts over.
Indices are a little-endian bit stream: coordinate j of a vector sits at
bits [j*b, (j+1)*b), so 8 indices of b bits fill exactly b bytes (3-bit: 8 indices in 3 bytes); scales
are fp32. Block sizes are multiples of 4, which keeps every field 4-byte aligned (16-byte aligned for the
multiples of 16 that vLLM uses).
"""

from __future__ import annotations

from dataclasses import dataclass

from turboquant_vllm.config import TQConfig, check_bits, check_head_dim

SCALE_BYTES = 4  # one fp32 per token per head per tensor
BLOCK_SIZE_MULTIPLE = 4


def index_bytes(head_dim: int, bits: int) -> int:
    """Bytes of packed indices for one head vector."""
    return head_dim * bits // 8


def check_block_size(block_size: int) -> None:
    if block_size < 1 or block_size % BLOCK_SIZE_MULTIPLE:
        raise ValueError(f"block_size must be a positive multiple of {BLOCK_SIZE_MULTIPLE}, got {block_size}")


@dataclass(frozen=True)
class PageFields:
    """Byte offsets of the four fields inside one head's run of a page, and the run's length."""

    k_index: int
    k_scale: int
    v_index: int
    v_scale: int
    run_bytes: int


@dataclass(frozen=True)
class PageLayout:
    """Byte layout of the cache for (num_kv_heads, head_dim, k_bits, v_bits)."""

    num_kv_heads: int
    head_dim: int
    k_bits: int
    v_bits: int
    v_coordinate_major: bool = False

    def __post_init__(self) -> None:
        if self.num_kv_heads < 1:
            raise ValueError(f"num_kv_heads must be >= 1, got {self.num_kv_heads}")
        check_head_dim(self.head_dim)
        check_bits("k_bits", self.k_bits)
        check_bits("v_bits", self.v_bits)
        if self.v_coordinate_major and self.v_bits != 4:
            raise ValueError(f"coordinate-major values need v_bits=4, got {self.v_bits}")

    @classmethod
    def from_config(cls, config: TQConfig, num_kv_heads: int, head_dim: int) -> PageLayout:
        return cls(num_kv_heads, head_dim, config.k_bits, config.v_bits, config.values_coordinate_major(head_dim))

    @property
    def k_index_bytes(self) -> int:
        """Packed K index bytes of one head vector."""
        return index_bytes(self.head_dim, self.k_bits)

    @property
    def v_index_bytes(self) -> int:
        return index_bytes(self.head_dim, self.v_bits)

    @property
    def head_bytes_per_token(self) -> int:
        """Bytes one token costs one KV head: K and V indices plus their two scales."""
        return self.k_index_bytes + self.v_index_bytes + 2 * SCALE_BYTES

    @property
    def bytes_per_token(self) -> int:
        """Bytes of one token for all KV heads, K and V: a page holds block_size of these."""
        return self.num_kv_heads * self.head_bytes_per_token

    @property
    def bytes_per_token_per_head(self) -> float:
        return self.bytes_per_token / self.num_kv_heads

    def fields(self, block_size: int) -> PageFields:
        """Where each field of one head starts inside that head's run of a `block_size`-token page."""
        check_block_size(block_size)
        if self.v_coordinate_major and block_size % 8:
            raise ValueError(f"coordinate-major values need a block_size that is a multiple of 8, got {block_size}")
        k_scale = block_size * self.k_index_bytes
        v_index = k_scale + block_size * SCALE_BYTES
        v_scale = v_index + block_size * self.v_index_bytes
        return PageFields(0, k_scale, v_index, v_scale, block_size * self.head_bytes_per_token)

    def kernel_constants(self, block_size: int) -> dict[str, int]:
        """The page geometry as the Triton kernels' constexpr keyword arguments (kernels/page.py)."""
        f = self.fields(block_size)
        return dict(
            HEAD_DIM=self.head_dim, K_BITS=self.k_bits, V_BITS=self.v_bits, BLOCK_SIZE=block_size,
            PAGE_BYTES=self.page_bytes(block_size), RUN_BYTES=f.run_bytes,
            K_INDEX_OFFSET=f.k_index, K_INDEX_BYTES=self.k_index_bytes, K_SCALE_OFFSET=f.k_scale,
            V_INDEX_OFFSET=f.v_index, V_INDEX_BYTES=self.v_index_bytes, V_SCALE_OFFSET=f.v_scale,
            V_COORD=self.v_coordinate_major,
        )  # fmt: skip

    def index_alignment(self, block_size: int, max_align: int = 16) -> int:
        """Bytes (a power of two up to max_align) that every token's index words start on, for pages at
        max_align-aligned addresses: lets the attention kernel read them with vector loads."""
        f = self.fields(block_size)
        starts = (self.page_bytes(block_size), f.run_bytes, f.v_index, self.k_index_bytes, self.v_index_bytes)
        align = max_align
        while any(x % align for x in starts):
            align //= 2
        return align

    def page_bytes(self, block_size: int) -> int:
        """Bytes of one vLLM block (page) of `block_size` tokens for one layer."""
        return block_size * self.bytes_per_token

    def compression_vs(self, dtype_bytes: int = 2) -> float:
        """How many times fewer bytes than an uncompressed K+V cache of `dtype_bytes` per element."""
        return 2 * self.num_kv_heads * self.head_dim * dtype_bytes / self.bytes_per_token
