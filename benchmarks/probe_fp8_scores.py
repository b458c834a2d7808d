"""How much of fp8 key scoring's error is the queries' rounding, on real SmolLM2-135M tensors (CPU).

`Tiles.fp8_keys` scores e4m3 keys (alpha * centroids, codec.key_e4m3_scale) against queries rounded to e4m3. This
replays that arithmetic in fp32 torch on captured post-RoPE q/k/v of Austen text, with 4-bit TurboQuant keys and
values, and compares attention outputs with exact fp32 attention for four ways of scoring:

- `fp16`: today's default (fp32 here; the fp16 codebook's rounding is far below the quantiser's);
- `k8_q8`: what fp8_keys does (keys and queries in e4m3);
- `k8_q32`: keys in e4m3, queries exact (the keys' share of the cost);
- `k8_q8x2`: keys in e4m3, queries as two e4m3 halves q = hi + lo (`Tiles.fp8_query_halves`: a second fp8 MMA);
- `k8_q8x2_v8`: k8_q8x2 with an fp8 P.V product too (benchmarks/probe_warp_softmax.py's cta_fp8_kv_fragment): the
  value centroids in e4m3 (the keys' scaling), and P times each value norm rounded to e4m3 as a decode kernel's
  online softmax leaves it (each 64-token tile's P relative to the running max, rescaled once in fp32);
- `k8_q8x2_v8x2`: the same with P as two e4m3 halves (its rounding and the remainder's; a second MMA).

Writes benchmarks/results/probe_fp8_scores_<date>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import date
from pathlib import Path

import torch

from turboquant_vllm.codebook import e4m3_scale
from turboquant_vllm.config import TQConfig
from turboquant_vllm.eval.kv_capture import LayerQKV, capture_austen_smollm2
from turboquant_vllm.eval.provenance import provenance
from turboquant_vllm.kernels.reference import e4m3_values
from turboquant_vllm.quantizer import MSEQuantizer

RESULTS = Path(__file__).parent / "results"
LOG2E = math.log2(math.e)
FORMS = ("fp16", "k8_q8", "k8_q32", "k8_q8x2", "k8_q8x2_v8", "k8_q8x2_v8x2")
TILE = 64  # tokens a decode tile: P is rounded relative to the running max of the tiles so far


def scored_queries(q_rot: torch.Tensor, form: str) -> torch.Tensor:
    """The rotated queries in log2 units as the score MMA sees them."""
    if form in ("fp16", "k8_q32"):
        return q_rot
    hi = e4m3_values(q_rot)
    return hi if form == "k8_q8" else hi + e4m3_values(q_rot - hi)


def fp8_value_product(scores: torch.Tensor, indices: torch.Tensor, norms: torch.Tensor, centroids: torch.Tensor,
                      halves: bool) -> torch.Tensor:  # fmt: skip
    """softmax(scores) @ (centroids[indices] * norms) with P times the norms in e4m3, as an fp8 P.V MMA gets it.

    scores [.., queries, keys] in log2 units, -inf where masked; indices [.., keys, dim] and norms [.., keys] of the
    (already GQA-repeated) values; centroids the value codebook as the MMA reads it. Tile T's P is taken relative to
    the running max m_T (the max over tiles <= T), rounded, and scaled by 2^(m_T - m) in fp32, as the online
    softmax does; the normaliser sums exact exponentials."""
    keys = scores.shape[-1]
    tiles = -(-keys // TILE)
    padded = torch.nn.functional.pad(scores, (0, tiles * TILE - keys), value=float("-inf"))
    running = padded.unflatten(-1, (tiles, TILE)).amax(-1).cummax(-1).values  # [.., queries, tiles]
    final = running[..., -1:]
    per_key = running.repeat_interleave(TILE, -1)[..., :keys]
    p = torch.exp2(scores - per_key) * norms.unsqueeze(-2)
    p8 = e4m3_values(p)
    if halves:
        p8 = p8 + e4m3_values(p - p8)
    out = (p8 * torch.exp2(per_key - final)) @ centroids[indices.long()]
    return out / torch.exp2(scores - final).sum(-1, keepdim=True)


def form_output(
    layer: LayerQKV, form: str, k_quant: MSEQuantizer, v_quant: MSEQuantizer, centroids_e4m3: torch.Tensor
) -> torch.Tensor:
    """Causal attention over 4-bit keys and values, scored as `form` does, in the rotated basis; the e4m3 forms take
    the codebook centroids_e4m3 (rounded as KVCodec rounds the keys', divided by its scale again) for the keys and,
    in the _v8 forms, the values (both 4-bit codebooks of one head_dim are the same)."""
    q, k, v = layer.query, layer.key, layer.value
    group = q.shape[1] // k.shape[1]
    qk_scale = layer.scale * LOG2E  # the kernel scores in log2 units and rounds q after this scaling
    kq = k_quant.quantize(k)
    centroids = k_quant.centroids if form == "fp16" else centroids_e4m3
    k_rot = centroids[kq.indices.long()] * kq.scales.unsqueeze(-1)
    vq = v_quant.quantize(v)
    q_rot = scored_queries(k_quant.rotate(q) * qk_scale, form.removesuffix("_v8").removesuffix("_v8x2"))
    scores = q_rot @ k_rot.repeat_interleave(group, 1).transpose(-1, -2)  # log2 units
    causal = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    if "_v8" in form:
        indices, norms = vq.indices.repeat_interleave(group, 1), vq.scales.repeat_interleave(group, 1)
        return v_quant.unrotate(fp8_value_product(scores, indices, norms, centroids_e4m3, form.endswith("x2")))
    probs = (scores / LOG2E).softmax(-1)
    return v_quant.unrotate(probs @ v_quant.dequantize_rotated(vq).repeat_interleave(group, 1))


def exact_output(layer: LayerQKV) -> torch.Tensor:
    q, k, v = layer.query, layer.key, layer.value
    group = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), is_causal=True, scale=layer.scale
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per window")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / f"probe_fp8_scores_{date.today()}.json")
    args = parser.parse_args()

    layers = capture_austen_smollm2(args.tokens, args.windows)
    head_dim = layers[0].key.shape[-1]
    config = TQConfig()
    k_quant, v_quant = MSEQuantizer(head_dim, 4, config), MSEQuantizer(head_dim, 4, config)
    alpha = e4m3_scale(k_quant.centroids.double().numpy(), head_dim)
    centroids_e4m3 = e4m3_values(k_quant.centroids * alpha) / alpha
    assert torch.equal(k_quant.centroids, v_quant.centroids), "4-bit keys and values share one codebook"

    errors = {form: 0.0 for form in FORMS}
    for layer in layers:
        exact = exact_output(layer)
        for form in FORMS:
            err = form_output(layer, form, k_quant, v_quant, centroids_e4m3) - exact
            errors[form] += float(err.pow(2).sum() / exact.pow(2).sum()) / len(layers)
    extra = {form: errors[form] / errors["fp16"] - 1.0 for form in FORMS}
    result = {
        "what": "attention-output relative MSE against exact fp32, 4/4 TurboQuant, mean over layers",
        "model": "SmolLM2-135M",
        "head_dim": head_dim,
        "tokens": args.tokens,
        "windows": args.windows,
        "attn_rel_mse": errors,
        "added_over_fp16": extra,
        "provenance": provenance(sys.argv),
    }
    for form in FORMS:
        print(f"{form:8s} attn rel MSE {errors[form]:.5f}  (+{100 * extra[form]:.2f}% over fp16)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
