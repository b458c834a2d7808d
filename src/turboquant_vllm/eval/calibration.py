"""Key offsets for the vLLM backend: the mean post-RoPE key per layer and KV head over calibration text."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from turboquant_vllm.eval import data
from turboquant_vllm.eval.kv_capture import capture_qkv
from turboquant_vllm.key_offset import mean_key


@torch.no_grad()
def key_offsets(model: torch.nn.Module, tokens: Sequence[int], window: int = 2048) -> torch.Tensor:
    """fp32 [num_layers, num_kv_heads, head_dim], averaged over windows of `window` tokens (each window's
    first tokens, attention sinks, left out as key_offset.mean_key does)."""
    sums, count = None, 0
    for start in range(0, max(len(tokens) - 1, 1), window):
        ids = torch.tensor([list(tokens[start : start + window])])
        if ids.shape[1] == 0:
            break
        means = torch.stack([mean_key(r.key)[0, :, 0] for r in capture_qkv(model, ids)])  # [L, H, d]
        sums = means if sums is None else sums + means
        count += 1
    if sums is None:
        raise ValueError("no calibration tokens")
    return sums / count


def austen_key_offsets(model: torch.nn.Module, tokenizer, tokens: int, skip: int = 0) -> tuple[torch.Tensor, int]:
    """key_offsets over `tokens` Austen tokens after the first `skip` (e.g. the ones an evaluation scores),
    and how many tokens that was."""
    ids = data.austen_token_stream(tokenizer, skip + tokens)[skip:]
    return key_offsets(model, ids), len(ids)
