"""Pack b-bit indices into bytes and back (torch), as a little-endian bit stream.

Coordinate j occupies bits [j*b, (j+1)*b) of the stream, so a group of 8 indices fills
exactly b bytes. Triton kernels read the same format; see layout.py.
"""

from __future__ import annotations

import torch

from turboquant_vllm.config import check_bits

GROUP = 8  # indices per group; a group of b-bit indices is exactly b bytes


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer indices in [0, 2^bits) into uint8.

    Args:
        indices: integer tensor [..., d], d a multiple of 8.
        bits: 2, 3 or 4.
    Returns:
        uint8 tensor [..., d * bits / 8].
    """
    check_bits("bits", bits)
    d = indices.shape[-1]
    if d % GROUP:
        raise ValueError(f"last dimension {d} is not a multiple of {GROUP}")
    groups = indices.to(torch.int64).reshape(*indices.shape[:-1], d // GROUP, GROUP)
    shifts = torch.arange(GROUP, device=indices.device, dtype=torch.int64) * bits
    words = (groups << shifts).sum(-1)  # [..., d/8], each < 2^(8*bits)
    byte_shifts = torch.arange(bits, device=indices.device, dtype=torch.int64) * 8
    packed = (words.unsqueeze(-1) >> byte_shifts) & 0xFF
    return packed.reshape(*indices.shape[:-1], d * bits // 8).to(torch.uint8)


def unpack_indices(packed: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """Inverse of pack_indices: uint8 [..., head_dim * bits / 8] -> uint8 indices [..., head_dim].

    Scratch stays narrow (uint8 for 2 and 4 bits, int32 words for 3) because the HF cache
    unpacks whole contexts with it.
    """
    check_bits("bits", bits)
    if packed.shape[-1] * 8 != head_dim * bits:
        raise ValueError(f"{packed.shape[-1]} bytes cannot hold {head_dim} indices of {bits} bits")
    mask = (1 << bits) - 1
    if 8 % bits == 0:  # whole indices per byte, lowest bits first
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed.unsqueeze(-1) >> shifts) & mask).reshape(*packed.shape[:-1], head_dim)
    groups = packed.reshape(*packed.shape[:-1], head_dim // GROUP, bits).to(torch.int32)
    byte_shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int32, device=packed.device)
    words = (groups << byte_shifts).sum(-1, dtype=torch.int32)  # < 2^24 for 3 bits
    shifts = torch.arange(0, GROUP * bits, bits, dtype=torch.int32, device=packed.device)
    return ((words.unsqueeze(-1) >> shifts) & mask).to(torch.uint8).reshape(*packed.shape[:-1], head_dim)
