"""Prefill and extend chunks: dense attention over the dequantised context plus this chunk's exact K/V.

A chunk of q tokens over c cached tokens does O(q * c) work; reading the packed pages once per
chunk and handing bf16 K/V to FlashAttention keeps that work on the tensor cores. Decode-sized
queries stay on the paged kernel, which reads the pages without the round trip through HBM.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from turboquant_vllm.codec import KVCodec
from turboquant_vllm.kernels.dequant import dequantize_kv
from turboquant_vllm.kernels.sinks import SinkTable, substitute_sinks
from turboquant_vllm.key_offset import KeyOffset


@dataclass
class PrefillPlan:
    """Where each prefill request's rows go in one packed [context | new] K/V buffer.

    Request i owns query rows [q_lo + cu_q[i], q_lo + cu_q[i+1]) of the step and buffer rows
    [cu_k[i], cu_k[i+1]): first its cached context (read through `slots`), then its new tokens.
    """

    q_lo: int  # first query row of the prefill part of the batch
    num_tokens: int  # query rows of the prefill part
    total_k: int  # rows of the packed K/V buffer
    max_q: int
    max_k: int
    has_context: bool  # False: every request starts at position 0 (no dequantisation needed)
    cu_q_host: list[int]
    cu_k_host: list[int]
    cu_q: torch.Tensor  # int32 [P + 1]
    cu_k: torch.Tensor  # int32 [P + 1]
    slots: torch.Tensor  # int64 [total_k], cache slot of each buffer row, -1 for new-token rows
    new_rows: torch.Tensor  # int64 [num_tokens], buffer row of each prefill query token
    # Context rows at positions below sink_tokens (kernels/sinks.py): buffer row, position, the sequence's first block
    sink_rows: torch.Tensor | None = None
    sink_pos: torch.Tensor | None = None
    sink_first_block: torch.Tensor | None = None


def plan_prefill(
    query_start_loc_cpu: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    block_size: int,
    first: int,
    num_reqs: int,
    sink_tokens: int = 0,
) -> PrefillPlan:
    """Plan requests [first, num_reqs) of a step (vLLM orders decodes first).

    seq_lens may live on the host (no sync) or the device (one sync); only rows [first, num_reqs) are read.
    sink_tokens: also list the context rows the exact sinks may replace (kernels/sinks.py).
    """
    qsl = query_start_loc_cpu[first : num_reqs + 1].numpy().astype(np.int64)
    q_lens = np.diff(qsl)
    ctx = seq_lens[first:num_reqs].cpu().numpy().astype(np.int64) - q_lens
    k_lens = ctx + q_lens
    cu_q = np.concatenate([[0], np.cumsum(q_lens)])
    cu_k = np.concatenate([[0], np.cumsum(k_lens)])
    req = np.repeat(np.arange(len(k_lens)), k_lens)  # request of each buffer row
    pos = np.arange(cu_k[-1]) - cu_k[req]  # position inside its sequence
    is_ctx = pos < ctx[req]
    device = block_table.device
    req_t = torch.from_numpy(req + first).to(device)
    pos_t = torch.from_numpy(pos).to(device)
    block = block_table[req_t, pos_t // block_size].long()
    slots = torch.where(torch.from_numpy(is_ctx).to(device), block * block_size + pos_t % block_size, -1)
    new_rows = torch.from_numpy(np.flatnonzero(~is_ctx)).to(device)
    sinks = {}
    if sink_tokens:
        is_sink = is_ctx & (pos < sink_tokens)
        sink_req = torch.from_numpy(req[is_sink] + first).to(device)
        sinks = dict(sink_rows=torch.from_numpy(np.flatnonzero(is_sink)).to(device),
                     sink_pos=torch.from_numpy(pos[is_sink]).to(device),
                     sink_first_block=block_table[sink_req, 0].long())  # fmt: skip
    return PrefillPlan(
        q_lo=int(qsl[0]),
        num_tokens=int(cu_q[-1]),
        total_k=int(cu_k[-1]),
        max_q=int(q_lens.max()),
        max_k=int(k_lens.max()),
        has_context=bool(ctx.any()),
        cu_q_host=cu_q.tolist(),
        cu_k_host=cu_k.tolist(),
        cu_q=torch.from_numpy(cu_q.astype(np.int32)).to(device),
        cu_k=torch.from_numpy(cu_k.astype(np.int32)).to(device),
        slots=slots,
        new_rows=new_rows,
        **sinks,
    )


@cache
def _flash_attn(head_dim: int):
    """vLLM's FlashAttention varlen function and its version for head_dim, or None where it is not built."""
    try:
        from vllm.v1.attention.backends.fa_utils import (
            flash_attn_varlen_func,
            get_flash_attn_version,
            is_flash_attn_varlen_func_available,
        )
    except ImportError:
        return None
    if not is_flash_attn_varlen_func_available():
        return None
    return flash_attn_varlen_func, get_flash_attn_version(head_size=head_dim)


def _sdpa(q, k, v, plan: PrefillPlan, scale: float, out: torch.Tensor) -> None:
    """Torch path (CPU, fp32): per request, causal with the queries aligned to the end of the keys."""
    group = q.shape[1] // k.shape[1]
    for i in range(len(plan.cu_q_host) - 1):
        q0, q1 = plan.cu_q_host[i], plan.cu_q_host[i + 1]
        k0, k1 = plan.cu_k_host[i], plan.cu_k_host[i + 1]
        qi = q[q0:q1].transpose(0, 1).float()
        ki = k[k0:k1].repeat_interleave(group, 1).transpose(0, 1).float()
        vi = v[k0:k1].repeat_interleave(group, 1).transpose(0, 1).float()
        mask = torch.arange(k1 - k0, device=q.device)[None, :] <= torch.arange(q1 - q0, device=q.device)[:, None] + (
            k1 - k0 - (q1 - q0)
        )
        o = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale)
        out[q0:q1] = o.transpose(0, 1).to(out.dtype)


def prefill_attention(
    codec: KVCodec,
    plan: PrefillPlan,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    key_offset: KeyOffset | None = None,
    sinks: SinkTable | None = None,
) -> None:
    """Causal attention of the planned prefill rows of query/key/value; writes the same rows of out.

    sinks: exact first tokens (kernels/sinks.py) put over the dequantised context where the table holds them
    (the plan must list their rows: plan_prefill's sink_tokens).
    """
    rows = slice(plan.q_lo, plan.q_lo + plan.num_tokens)
    q, k_new, v_new, o = query[rows], key[rows], value[rows], out[rows]
    if plan.has_context:
        k = torch.empty(plan.total_k, *k_new.shape[1:], dtype=query.dtype, device=query.device)
        v = torch.empty_like(k)
        dequantize_kv(codec, cache, plan.slots, rotated=False, out_k=k, out_v=v, key_offset=key_offset)
        if sinks is not None:
            assert plan.sink_rows is not None, "plan_prefill was not asked for the sink rows"
            substitute_sinks(sinks, codec.rotation, plan.sink_first_block, plan.sink_pos, plan.sink_rows, k, v)
        k.index_copy_(0, plan.new_rows, k_new.to(k.dtype))
        v.index_copy_(0, plan.new_rows, v_new.to(v.dtype))
    else:
        k, v = k_new, v_new
    fa = _flash_attn(query.shape[-1]) if query.is_cuda and query.dtype != torch.float32 else None
    if fa is None:
        _sdpa(q, k, v, plan, scale, o)
        return
    flash_attn_varlen_func, fa_version = fa
    flash_attn_varlen_func(
        q=q, k=k, v=v, max_seqlen_q=plan.max_q, cu_seqlens_q=plan.cu_q, max_seqlen_k=plan.max_k,
        cu_seqlens_k=plan.cu_k, softmax_scale=scale, causal=True, out=o,
        fa_version=fa_version,
    )  # fmt: skip
