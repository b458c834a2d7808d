"""A mixed step's decode rows on a second CUDA stream, beside the prefill path (an A/B switch, off by default).

vLLM's FLASH_ATTN backend attends a mixed step's decode rows in the prefill chunk's own varlen launch, so their
page reads overlap the chunk's compute. Ours attends them in a paged-kernel launch of its own ahead of the prefill
path, which at 32K x 16 costs ~1 ms a mixed step at the prefill's power-capped clock (README, "Where 32K x 16's
TPOT goes"). On a stream of their own the decode kernels may run beside the dequantisation and FlashAttention
launches instead of ahead of them; the stream has high priority so that, as SMs free up, the decode programs are
placed before the prefill's queued ones and the short decode chain does not trail the long prefill chain.

Both paths read only pages stored before the fork (do_kv_cache_update runs first) and write disjoint rows of the
output; the decode launch's split-K workspace is its own. The main stream waits for the side stream before the
sink/recent writers and the next layer.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

ENABLED = False  # benchmarks/bench_engine.py --overlap-mixed; not yet timed in the engine


def overlaps(num_decodes: int, has_prefill: bool, device: torch.device) -> bool:
    """Whether a step's decode launch runs on the side stream: ENABLED, a CUDA step with decodes and prefill rows."""
    return ENABLED and num_decodes > 0 and has_prefill and device.type == "cuda"


@functools.cache
def _stream(device_index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=device_index, priority=-1)  # -1: the highest priority PyTorch exposes


@contextlib.contextmanager
def beside_main(use: bool, device: torch.device) -> Iterator[torch.cuda.Stream | None]:
    """Run the block on the side stream, forked from the current stream (which has already stored this step's K/V).

    Yields the side stream, or None when `use` is false or a CUDA graph is being captured (the block then runs on
    the current stream). Pass what it yields to `join` once the current stream's own work is queued.
    """
    if not use or torch.cuda.is_current_stream_capturing():
        yield None
        return
    side = _stream(device.index if device.index is not None else torch.cuda.current_device())
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        yield side


def join(side: torch.cuda.Stream | None) -> None:
    """Make the current stream wait for the side stream's work (nothing without one)."""
    if side is not None:
        torch.cuda.current_stream(side.device).wait_stream(side)
