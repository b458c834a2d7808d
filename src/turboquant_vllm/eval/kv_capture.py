"""Capture post-RoPE queries, keys and values of every attention layer of an HF model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

RECORDER = "turboquant_record"


@dataclass
class LayerQKV:
    """One layer's tensors for one batch, fp32 on CPU: q [B, Hq, T, d], k/v [B, Hkv, T, d]."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scale: float


_records: list[LayerQKV] | None = None


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    if _records is not None:
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        _records.append(LayerQKV(query.float().cpu(), key.float().cpu(), value.float().cpu(), float(scale)))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(RECORDER, _recording_attention)


@torch.no_grad()
def capture_qkv(model, input_ids: torch.Tensor) -> list[LayerQKV]:
    """Run one forward pass and return each attention layer's q/k/v in layer order.

    Args:
        model: an HF causal LM (any attention implementation; switched temporarily).
        input_ids: [B, T].
    """
    global _records
    previous = model.config._attn_implementation
    model.set_attn_implementation(RECORDER)
    _records = []
    try:
        model(input_ids=input_ids.to(model.device), use_cache=False)
        return _records
    finally:
        _records = None
        model.set_attn_implementation(previous)


def capture_austen_smollm2(tokens: int, windows: int) -> list[LayerQKV]:
    """capture_qkv of SmolLM2-135M (fp32) over `windows` consecutive Austen windows of `tokens` tokens each."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from turboquant_vllm.eval.data import austen_token_stream, smollm2_hf_dir

    model_dir = smollm2_hf_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(austen_token_stream(tokenizer, tokens * windows)).view(windows, tokens)
    return capture_qkv(model, ids)
