"""Reconstruction, inner-product and attention-output errors of compressed K/V on captured tensors."""

from __future__ import annotations

from collections.abc import Callable

import torch

from turboquant_vllm.config import TQConfig
from turboquant_vllm.eval.kv_capture import LayerQKV
from turboquant_vllm.qjl import ProdQuantizer
from turboquant_vllm.quantizer import MSEQuantizer


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 causal attention with GQA: q [B, Hq, T, d], k/v [B, Hkv, T, d] -> [B, Hq, T, d]."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def roundtrip_mse(x: torch.Tensor, bits: int, config: TQConfig) -> torch.Tensor:
    quant = MSEQuantizer(x.shape[-1], bits, config)
    return quant.dequantize(quant.quantize(x))


def roundtrip_prod(x: torch.Tensor, bits: int, config: TQConfig) -> torch.Tensor:
    mse_config = TQConfig(rotation=config.rotation, norm_correction=False, seed=config.seed)
    quant = ProdQuantizer(x.shape[-1], bits, mse_config)
    return quant.dequantize(*quant.quantize(x))


def _rel(err: torch.Tensor, ref: torch.Tensor) -> float:
    return float(err.pow(2).sum() / ref.pow(2).sum())


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


def layer_errors(layer: LayerQKV, k_hat: torch.Tensor, v_hat: torch.Tensor) -> dict[str, float]:
    """Errors of one layer with K replaced by k_hat and V by v_hat (either may be exact).

    relative MSE = ||x_hat - x||^2 / ||x||^2; inner-product error = the same ratio for q.k scores;
    attention cosine = mean cosine of attention outputs against exact fp32 attention.
    """
    q, k, v = layer.query, layer.key, layer.value
    group = q.shape[1] // k.shape[1]
    scores = q @ k.repeat_interleave(group, 1).transpose(-1, -2)
    scores_hat = q @ k_hat.repeat_interleave(group, 1).transpose(-1, -2)
    exact = causal_attention(q, k, v, layer.scale)
    approx = causal_attention(q, k_hat, v_hat, layer.scale)
    return {
        "k_rel_mse": _rel(k_hat - k, k),
        "v_rel_mse": _rel(v_hat - v, v),
        "ip_rel_err": _rel(scores_hat - scores, scores),
        "attn_cosine": _cosine(approx, exact),
        "attn_rel_err": _rel(approx - exact, exact),
    }


def model_errors(
    layers: list[LayerQKV], k_bits: int | None, v_bits: int | None, config: TQConfig, method: str = "mse"
) -> dict[str, float]:
    """Mean of layer_errors over layers; None bits keeps that tensor exact."""
    roundtrip = roundtrip_mse if method == "mse" else roundtrip_prod

    def replace(layer: LayerQKV) -> tuple[torch.Tensor, torch.Tensor]:
        k_hat = layer.key if k_bits is None else roundtrip(layer.key, k_bits, config)
        v_hat = layer.value if v_bits is None else roundtrip(layer.value, v_bits, config)
        return k_hat, v_hat

    return _mean_errors(layers, replace)


def value_offset_errors(layers: list[LayerQKV], v_bits: int, config: TQConfig) -> dict[str, float]:
    """model_errors with V quantised relative to each KV head's mean value (added back after dequantisation),
    the value-side twin of the key offset: the output shifts by exactly the offset, since softmax weights sum to 1.
    """

    def replace(layer: LayerQKV) -> tuple[torch.Tensor, torch.Tensor]:
        offset = layer.value.mean(dim=(0, 2), keepdim=True)
        return layer.key, roundtrip_mse(layer.value - offset, v_bits, config) + offset

    return _mean_errors(layers, replace)


def _mean_errors(
    layers: list[LayerQKV], replace: Callable[[LayerQKV], tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, float]:
    """Mean over layers of layer_errors with K/V replaced by replace(layer) = (k_hat, v_hat)."""
    totals: dict[str, float] = {}
    for layer in layers:
        for name, val in layer_errors(layer, *replace(layer)).items():
            totals[name] = totals.get(name, 0.0) + val / len(layers)
    return totals
