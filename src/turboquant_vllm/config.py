"""TurboQuant KV-cache configuration, validated once at construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

SUPPORTED_BITS = (2, 3, 4)
MIN_HEAD_DIM = 32
MAX_HEAD_DIM = 512
HEAD_DIM_MULTIPLE = 8  # 8 indices of any width fill a whole number of bytes
ROTATIONS = ("haar", "hadamard")
MAX_SINK_TOKENS = 16  # every sink must sit in a sequence's first block; vLLM's blocks here hold 16 or more
MAX_RECENT_TOKENS = 64  # the attention kernel scores the window as one tile of up to this many rows
DEFAULT_SEED = 20250424  # arXiv 2504.19874: any fixed value works; every process must agree
FP8_VALUES_HEAD_DIM = 128  # the one decode tile whose fp8 P.V product was timed and measured through vLLM


class TQConfigError(ValueError):
    """A TurboQuant setting that cannot be served; raised before any cache is allocated."""


def check_bits(name: str, bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise TQConfigError(
            f"{name}={bits!r} is not supported: TurboQuant packs {SUPPORTED_BITS} bits per coordinate. "
            "Use 4 for the best quality, 3 or 2 for more compression, or fp8 KV for 8 bits."
        )


def check_token_count(name: str, count: int, maximum: int, advice: str) -> None:
    """An exact table's size: an int from 0 (off) to maximum."""
    if isinstance(count, bool) or not isinstance(count, int):
        raise TQConfigError(f"{name} must be an int, got {count!r}.")
    if not 0 <= count <= maximum:
        raise TQConfigError(f"{name}={count} is out of range: 0 (off) to {maximum}; {advice}.")


def check_head_dim(head_dim: int) -> None:
    if not (MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM) or head_dim % HEAD_DIM_MULTIPLE:
        raise TQConfigError(
            f"head_dim={head_dim} is not supported: TurboQuant needs a multiple of {HEAD_DIM_MULTIPLE} "
            f"in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}] (e.g. 64, 96, 128, 256). "
            "Serve this model with the default attention backend instead."
        )


@dataclass(frozen=True)
class TQConfig:
    """How K and V are compressed.

    Args:
        k_bits: bits per rotated coordinate of K, one of 2, 3, 4.
        v_bits: bits per rotated coordinate of V, one of 2, 3, 4.
        rotation: "haar" (dense random orthogonal, any head_dim) or "hadamard"
            (random signs + Walsh-Hadamard, power-of-two head_dim only).
        norm_correction: store ||x|| / ||dequantised unit vector|| instead of ||x||,
            so reconstructions have the right length.
        seed: seeds the rotation; all processes and ranks derive the same matrix from it.
        key_offsets: vLLM only: a file from `turboquant-vllm calibrate` for this model; keys are then
            stored relative to their layer's calibrated offset where that shortens them (docs/key-offset.md).
        sink_tokens: vLLM only: keep each sequence's first this many tokens exact in a side table beside the
            pages (attention sinks, docs/design-exact-sinks.md); 0 stores every token packed.
        recent_tokens: vLLM only: read each sequence's newest this many context tokens from an exact side table
            where it holds them (docs/design-exact-window.md), as the HF cache's residual_tokens; 0 = off.
        fp8_key_scores: vLLM only: let the paged kernel score 4-bit keys with an e4m3 tensor-core MMA where its
            tiles do (head_dim 128 on compute capability 8.9+): faster long-context decode for rounder scores
            (docs/decode-tuning.md, "Keys in fp8"). None (the default) turns it on without key_offsets,
            sink_tokens or recent_tokens (whose quality was measured with fp16 scores); True also beside them (the
            exact sinks' and window's rows keep fp16 scores); False keeps fp16 everywhere.
        fp8_values: vLLM only, 4-bit values: pages hold each coordinate's value indices together (layout.py,
            "coordinate-major values"), so the paged kernel can read them as e4m3 bytes for an fp8 P.V MMA, with
            the probabilities times the value norms rounded to e4m3, and its decode tile needs fewer registers
            (docs/decode-tuning.md, "Values in fp8"). None (the default) turns it on for 4-bit values at head_dim
            128 without key_offsets, sink_tokens or recent_tokens (whose quality was measured with fp16 value
            products); True or False decides for every head_dim.
    """

    k_bits: int = 4
    v_bits: int = 4
    rotation: Literal["haar", "hadamard"] = "haar"
    norm_correction: bool = True
    seed: int = DEFAULT_SEED
    key_offsets: str | None = None
    sink_tokens: int = 0
    recent_tokens: int = 0
    fp8_key_scores: bool | None = None
    fp8_values: bool | None = None

    def __post_init__(self) -> None:
        check_bits("k_bits", self.k_bits)
        check_bits("v_bits", self.v_bits)
        if self.rotation not in ROTATIONS:
            raise TQConfigError(f"rotation={self.rotation!r} is not one of {ROTATIONS}.")
        if not isinstance(self.norm_correction, bool):
            raise TQConfigError(f"norm_correction must be a bool, got {self.norm_correction!r}.")
        if self.fp8_key_scores is not None and not isinstance(self.fp8_key_scores, bool):
            raise TQConfigError(f"fp8_key_scores must be a bool or None (automatic), got {self.fp8_key_scores!r}.")
        if self.fp8_values is not None and not isinstance(self.fp8_values, bool):
            raise TQConfigError(f"fp8_values must be a bool or None (automatic), got {self.fp8_values!r}.")
        if self.fp8_values and self.v_bits != 4:
            raise TQConfigError(
                f"fp8_values needs v_bits=4 (its pages hold 8 tokens of a coordinate a word), got v_bits={self.v_bits}."
            )
        if not isinstance(self.seed, int) or self.seed < 0:
            raise TQConfigError(f"seed must be a non-negative int, got {self.seed!r}.")
        check_token_count("sink_tokens", self.sink_tokens, MAX_SINK_TOKENS,
                          "4 is enough for the attention sinks of Llama-family models")  # fmt: skip
        check_token_count("recent_tokens", self.recent_tokens, MAX_RECENT_TOKENS,
                          "32 keeps generation close to bf16 (docs/design-exact-window.md)")  # fmt: skip
        if self.key_offsets is not None:
            from turboquant_vllm.key_offset import load_key_offsets

            if not isinstance(self.key_offsets, str):
                raise TQConfigError(f"key_offsets must be a file path, got {self.key_offsets!r}.")
            load_key_offsets(self.key_offsets)  # a missing or malformed file fails here, at start-up

    def check_head_dim(self, head_dim: int) -> None:
        """Raise TQConfigError if this config cannot serve heads of `head_dim`."""
        check_head_dim(head_dim)
        if self.rotation == "hadamard" and head_dim & (head_dim - 1):
            raise TQConfigError(
                f"rotation='hadamard' needs a power-of-two head_dim, got {head_dim}; use rotation='haar'."
            )

    def values_coordinate_major(self, head_dim: int) -> bool:
        """Whether heads of `head_dim` keep V coordinate-major for the fp8 P.V product (fp8_values, resolved)."""
        if self.fp8_values is not None:
            return self.fp8_values
        quality_options = self.key_offsets is not None or self.sink_tokens or self.recent_tokens
        return self.v_bits == 4 and head_dim == FP8_VALUES_HEAD_DIM and not quality_options

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> TQConfig:
        """Build from a plain dict (e.g. vLLM's additional_config["turboquant"]), rejecting unknown keys."""
        values = dict(values or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise TQConfigError(f"unknown TurboQuant option(s) {unknown}; known options are {sorted(known)}.")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
