"""Programmatic dependent launch (Hopper and later): a decode step's small kernels start before the one ahead ends.

A kernel launched with `launch_pdl=True` may start once every program of the kernel ahead of it has called
`gdc_launch_dependents` (or exited). Until it calls `gdc_wait` it may read only what older kernels wrote, and it
must call `gdc_wait` before its programs exit, so that its completion implies its predecessor's. The paged attention
kernel never reads what this step's store writes (its new tokens come from key/value; the kernel tests poison those
slots to hold it to that), so its block-table and first page reads go out before the wait: they overlap the query
rotation and the store instead of following them. A step's chain: the store lets the next kernel start at once; the
query rotation does too, then waits for the store before it reads q; the attention reads pages, then waits; the
reduce starts once the attention's programs have left their context loops, and waits. For the same reason a pure
decode step can store its K/V after the attention instead (decode_tiles.decode_step_stores): that store launch
starts beside the attention's or the reduce's last programs and waits for them only before it exits.
"""

from __future__ import annotations

import functools

import torch

ENABLED = True  # H200 pure 4Kx16 decode step 7.25 -> 7.01 ms (engine_profile_pdl_*_h200_2026-12-01u.json)


@functools.cache
def capability(index: int) -> tuple[int, int]:
    """Compute capability of CUDA device `index`, asked once (launch decisions read it on every call)."""
    return torch.cuda.get_device_capability(index)


def pdl_launch(device: torch.device) -> bool:
    """Whether launches on `device` use programmatic dependent launch: ENABLED, CUDA, compute capability 9+."""
    return ENABLED and device.type == "cuda" and capability(device.index or 0)[0] >= 9


def pdl_option(pdl: bool) -> dict[str, bool]:
    """The launch option of a kernel launched with programmatic dependent launch (none otherwise)."""
    return {"launch_pdl": True} if pdl else {}
