"""Keys stored relative to a common component (docs/key-offset.md): the rule every path shares.

A key k is quantised as k - offset where that vector is shorter than k, else as k; the sign of its
fp32 scale records the choice (norms are never negative), so the page layout gains no byte and
dequantisation adds the offset back to the negative-scale tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from turboquant_vllm.config import TQConfigError

KEY_OFFSET_SKIP = 4  # the first tokens (attention sinks, far from the rest) stay out of every mean
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def use_offset(x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Which vectors x [..., d] are stored relative to offset (broadcastable to x): bool [...]."""
    return (x - offset).norm(dim=-1) < x.norm(dim=-1)


def mean_key(key_states: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of key_states [..., T, d] without the first KEY_OFFSET_SKIP tokens: fp32 [..., 1, d]."""
    tokens = key_states.shape[-2]
    ref = key_states[..., KEY_OFFSET_SKIP:, :] if tokens > 2 * KEY_OFFSET_SKIP else key_states
    return ref.float().mean(dim=-2, keepdim=True)


@dataclass(frozen=True)
class KeyOffset:
    """One layer's shared key offset on the device, in both bases the kernels read.

    original: fp32 [num_kv_heads, head_dim]; rotated: original @ R.T (the codec's rotated basis).
    """

    original: torch.Tensor
    rotated: torch.Tensor

    @classmethod
    def build(cls, offset: torch.Tensor, rotation: torch.Tensor) -> KeyOffset:
        original = offset.to(rotation.device, torch.float32).contiguous()
        return cls(original, (original @ rotation.T).contiguous())


def check_key_offset(
    key_offset: KeyOffset | None, num_kv_heads: int, head_dim: int, device: torch.device, rotated: bool = False
) -> torch.Tensor | None:
    """The offset tensor a kernel reads (original or rotated basis), checked against the layer; None passes."""
    if key_offset is None:
        return None
    offset = key_offset.rotated if rotated else key_offset.original
    assert offset.shape == (num_kv_heads, head_dim) and offset.dtype == torch.float32 and offset.is_contiguous(), (
        f"key offset must be contiguous fp32 [{num_kv_heads}, {head_dim}], got {offset.dtype} {tuple(offset.shape)}"
    )
    assert offset.device == device, f"key offset is on {offset.device}, the cache on {device}"
    return offset


def save_key_offsets(path: str | Path, offsets: torch.Tensor, **info: object) -> None:
    """Write a calibration file: fp32 [num_layers, num_kv_heads, head_dim] plus provenance."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key_offset": offsets.float().cpu().contiguous(), **info}, Path(path))


@lru_cache(maxsize=8)
def load_key_offsets(path: str) -> torch.Tensor:
    """The [num_layers, num_kv_heads, head_dim] offsets of a calibration file (read once per process)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as err:
        raise TQConfigError(f"cannot read key offsets from {path!r}: {err}") from err
    offsets = payload.get("key_offset") if isinstance(payload, dict) else None
    if not isinstance(offsets, torch.Tensor) or offsets.dim() != 3:
        raise TQConfigError(f"{path!r} is not a key-offset file (expected key_offset [layers, kv_heads, head_dim])")
    return offsets


def layer_key_offset(path: str, layer_name: str, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """The calibrated offset [num_kv_heads, head_dim] of the layer called `layer_name` (``...layers.<i>...``)."""
    offsets = load_key_offsets(path)
    match = _LAYER_INDEX.search(layer_name)
    if match is None:
        raise TQConfigError(f"cannot tell the layer index of {layer_name!r} to pick its key offset")
    index = int(match.group(1))
    if index >= offsets.shape[0] or offsets.shape[1:] != (num_kv_heads, head_dim):
        raise TQConfigError(
            f"key offsets in {path!r} are {tuple(offsets.shape)} (layers, kv_heads, head_dim); layer {index} "
            f"needs {num_kv_heads} x {head_dim}: calibrate for this model"
        )
    return offsets[index]
