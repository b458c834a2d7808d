"""Prefill and extend chunks: dense attention over the dequantised context plus this chunk's exact K/V.

A chunk of q tokens over c cached tokens does O(q * c) work; reading the packed pages once per
chunk and handing bf16 K/V to FlashAttention keeps that work on the tensor cores. Decode-sized
queries stay on the paged kernel, which reads the pages without the round trip through HBM.
The pages hold K/V in the rotated basis: a chunk much shorter than its context attends there
(its queries, new K/V and output rotated) instead of un-rotating the whole context.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from turboquant_vllm.codec import KVCodec
from turboquant_vllm.kernels.dequant import dequantize_kv
from turboquant_vllm.kernels.recent import RecentTable, substitute_recent
from turboquant_vllm.kernels.sinks import SinkTable, substitute_sinks
from turboquant_vllm.key_offset import KeyOffset


@dataclass
class PrefillRun:
    """Consecutive prefill requests that all have cached context, or all have none: one FlashAttention call.

    Request i owns query rows [q_lo + cu_q[i], q_lo + cu_q[i+1]) of the step. With context, it owns rows
    [cu_k[i], cu_k[i+1]) of a packed [context | new] K/V buffer: first its cached context (read through `slots`),
    then its new tokens. Without, its keys are its own query rows of the step's K/V (cu_k == cu_q, no buffer).
    """

    q_lo: int  # first query row of the run in the step
    num_tokens: int  # query rows of the run
    total_k: int  # rows of the packed K/V buffer (num_tokens without context)
    max_q: int
    max_k: int
    has_context: bool
    cu_q_host: list[int]
    cu_k_host: list[int]
    cu_q: torch.Tensor  # int32 [P + 1]
    cu_k: torch.Tensor  # int32 [P + 1]
    slots: torch.Tensor | None = None  # int64 [total_k], cache slot of each buffer row, -1 for new-token rows
    new_rows: torch.Tensor | None = None  # int64 [num_tokens], buffer row of each query token
    # Context rows at positions below sink_tokens (kernels/sinks.py): buffer row, position, the sequence's first block
    sink_rows: torch.Tensor | None = None
    sink_pos: torch.Tensor | None = None
    sink_first_block: torch.Tensor | None = None
    # Context rows among the newest recent_tokens (kernels/recent.py): buffer row and slot
    recent_rows: torch.Tensor | None = None
    recent_slots: torch.Tensor | None = None

    @property
    def context_rows(self) -> int:
        return self.total_k - self.num_tokens


@dataclass
class PrefillPlan:
    """A step's prefill requests as runs (vLLM's order): chunks that continue a prompt read their context, new
    prompts attend straight over the step's K/V, so a short chunk over a long context never copies the rows of
    a long new prompt beside it."""

    runs: list[PrefillRun]

    @property
    def has_context(self) -> bool:
        return any(run.has_context for run in self.runs)


def _plan_run(q_lens: np.ndarray, ctx: np.ndarray, q_lo: int, first: int, block_table: torch.Tensor,
              block_size: int, sink_tokens: int, recent_tokens: int) -> PrefillRun:  # fmt: skip
    """One run of requests first, first + 1, ... (block_table rows) with q_lens query rows over ctx cached tokens."""
    device = block_table.device
    k_lens = ctx + q_lens
    cu_q = np.concatenate([[0], np.cumsum(q_lens)])
    cu_k = np.concatenate([[0], np.cumsum(k_lens)])
    run = PrefillRun(
        q_lo=q_lo,
        num_tokens=int(cu_q[-1]),
        total_k=int(cu_k[-1]),
        max_q=int(q_lens.max()),
        max_k=int(k_lens.max()),
        has_context=bool(ctx.any()),
        cu_q_host=cu_q.tolist(),
        cu_k_host=cu_k.tolist(),
        cu_q=torch.from_numpy(cu_q.astype(np.int32)).to(device),
        cu_k=torch.from_numpy(cu_k.astype(np.int32)).to(device),
    )
    if not run.has_context:
        return run
    req = np.repeat(np.arange(len(k_lens)), k_lens)  # request of each buffer row
    pos = np.arange(cu_k[-1]) - cu_k[req]  # position inside its sequence
    is_ctx = pos < ctx[req]
    req_t = torch.from_numpy(req + first).to(device)
    pos_t = torch.from_numpy(pos).to(device)
    block = block_table[req_t, pos_t // block_size].long()
    run.slots = torch.where(torch.from_numpy(is_ctx).to(device), block * block_size + pos_t % block_size, -1)
    run.new_rows = torch.from_numpy(np.flatnonzero(~is_ctx)).to(device)
    if sink_tokens:
        is_sink = is_ctx & (pos < sink_tokens)
        run.sink_rows = torch.from_numpy(np.flatnonzero(is_sink)).to(device)
        run.sink_pos = torch.from_numpy(pos[is_sink]).to(device)
        run.sink_first_block = block_table[torch.from_numpy(req[is_sink] + first).to(device), 0].long()
    if recent_tokens:
        run.recent_rows = torch.from_numpy(np.flatnonzero(is_ctx & (pos >= ctx[req] - recent_tokens))).to(device)
        run.recent_slots = run.slots[run.recent_rows]
    return run


def plan_prefill(
    query_start_loc_cpu: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    block_size: int,
    first: int,
    num_reqs: int,
    sink_tokens: int = 0,
    recent_tokens: int = 0,
) -> PrefillPlan:
    """Plan requests [first, num_reqs) of a step (vLLM orders decodes first).

    seq_lens may live on the host (no sync) or the device (one sync); only rows [first, num_reqs) are read.
    sink_tokens: also list the context rows the exact sinks may replace (kernels/sinks.py).
    recent_tokens: also list the context rows the exact recent tokens may replace (kernels/recent.py).
    """
    qsl = query_start_loc_cpu[first : num_reqs + 1].numpy().astype(np.int64)
    q_lens = np.diff(qsl)
    ctx = seq_lens[first:num_reqs].cpu().numpy().astype(np.int64) - q_lens
    with_ctx = ctx > 0
    edges = [0, *(np.flatnonzero(with_ctx[1:] != with_ctx[:-1]) + 1).tolist(), len(q_lens)]
    return PrefillPlan([
        _plan_run(q_lens[a:b], ctx[a:b], int(qsl[a]), first + a, block_table, block_size, sink_tokens,
                  recent_tokens)
        for a, b in zip(edges[:-1], edges[1:], strict=True)
    ])  # fmt: skip


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


def _sdpa(q, k, v, run: PrefillRun, scale: float, out: torch.Tensor) -> None:
    """Torch path (CPU, fp32): per request, causal with the queries aligned to the end of the keys."""
    group = q.shape[1] // k.shape[1]
    for i in range(len(run.cu_q_host) - 1):
        q0, q1 = run.cu_q_host[i], run.cu_q_host[i + 1]
        k0, k1 = run.cu_k_host[i], run.cu_k_host[i + 1]
        qi = q[q0:q1].transpose(0, 1).float()
        ki = k[k0:k1].repeat_interleave(group, 1).transpose(0, 1).float()
        vi = v[k0:k1].repeat_interleave(group, 1).transpose(0, 1).float()
        mask = torch.arange(k1 - k0, device=q.device)[None, :] <= torch.arange(q1 - q0, device=q.device)[:, None] + (
            k1 - k0 - (q1 - q0)
        )
        o = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale)
        out[q0:q1] = o.transpose(0, 1).to(out.dtype)


def _attend(q, k, v, run: PrefillRun, scale: float, out: torch.Tensor) -> None:
    """Causal attention of the run's queries over its keys (FlashAttention where vLLM has it, else torch)."""
    fa = _flash_attn(q.shape[-1]) if q.is_cuda and q.dtype != torch.float32 else None
    if fa is None:
        _sdpa(q, k, v, run, scale, out)
        return
    flash_attn_varlen_func, fa_version = fa
    flash_attn_varlen_func(
        q=q, k=k, v=v, max_seqlen_q=run.max_q, cu_seqlens_q=run.cu_q, max_seqlen_k=run.max_k,
        cu_seqlens_k=run.cu_k, softmax_scale=scale, causal=True, out=out,
        fa_version=fa_version,
    )  # fmt: skip


def _times(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x [n, heads, d] @ m [d, d], in x's dtype."""
    return (x.reshape(-1, x.shape[-1]) @ m).view(x.shape)


def attends_rotated(num_tokens: int, context_rows: int, num_heads: int, num_kv_heads: int) -> bool:
    """Whether a run attends in the rotated basis: rotating its queries, new K/V and output (per query row,
    num_heads + num_kv_heads head rows) costs less than un-rotating its context (num_kv_heads head rows each).
    Scores and the softmax are the same in either basis, R being orthogonal."""
    return num_tokens * (num_heads + num_kv_heads) < context_rows * num_kv_heads


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
    recent: RecentTable | None = None,
) -> None:
    """Causal attention of the planned prefill rows of query/key/value; writes the same rows of out.

    sinks: exact first tokens (kernels/sinks.py) put over the dequantised context where the table holds them
    (the plan must list their rows: plan_prefill's sink_tokens); recent likewise for the newest context tokens
    (plan_prefill's recent_tokens), at every position it holds.
    """
    for run in plan.runs:
        rows = slice(run.q_lo, run.q_lo + run.num_tokens)
        q, k_new, v_new, o = query[rows], key[rows], value[rows], out[rows]
        if not run.has_context:
            _attend(q, k_new, v_new, run, scale, o)
            continue
        rotated = attends_rotated(run.num_tokens, run.context_rows, q.shape[1], k_new.shape[1])
        k = torch.empty(run.total_k, *k_new.shape[1:], dtype=q.dtype, device=q.device)
        v = torch.empty_like(k)
        dequantize_kv(codec, cache, run.slots, rotated=rotated, out_k=k, out_v=v, key_offset=key_offset)
        if sinks is not None:
            assert run.sink_rows is not None, "plan_prefill was not asked for the sink rows"
            substitute_sinks(sinks, None if rotated else codec.rotation, run.sink_first_block, run.sink_pos,
                             run.sink_rows, k, v)  # fmt: skip
        if recent is not None:
            assert run.recent_rows is not None, "plan_prefill was not asked for the recent rows"
            substitute_recent(recent, None if rotated else codec.rotation, run.recent_slots, run.recent_rows, k, v)
        k_new, v_new = k_new.to(k.dtype), v_new.to(v.dtype)
        if rotated:  # stored rows are x @ R.T
            r = codec.rotation_half.get(q.dtype, codec.rotation)
            q, k_new, v_new = _times(q, r.T), _times(k_new, r.T), _times(v_new, r.T)
        k.index_copy_(0, run.new_rows, k_new)
        v.index_copy_(0, run.new_rows, v_new)
        if rotated:
            o_rot = torch.empty_like(q)
            _attend(q, k, v, run, scale, o_rot)
            o.copy_(_times(o_rot, r))
        else:
            _attend(q, k, v, run, scale, o)
