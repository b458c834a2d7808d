"""The measured KV memory: real prefills through a tiny model, checked against the packed layout's bytes."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from turboquant_vllm.eval import memory as M
from turboquant_vllm.eval import quality as Q
from turboquant_vllm.layout import PageLayout


@pytest.fixture(scope="module")
def model(tiny_llama) -> LlamaForCausalLM:
    return tiny_llama(num_key_value_heads=2, seed=3)


def test_memory_specs_drop_norm_correction_only():
    specs = Q.parse_specs("4/4,2/2", (True, False), residual=(0, 8))
    assert [(s.name, s.residual_tokens) for s in M.memory_specs(specs)] == [
        ("k4v4", 0), ("k4v4+R8", 8), ("k2v2", 0), ("k2v2+R8", 8),
    ]  # fmt: skip


@pytest.mark.parametrize("dtype,exact_bytes", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_kv_memory_matches_layout_bytes(model, dtype, exact_bytes):
    tokens = torch.randint(1, 64, (100,), generator=torch.Generator().manual_seed(0)).tolist()
    specs = Q.parse_specs("4/4,4/3,2/2", (True, False), residual=(0, 8))
    res = M.kv_memory(model.to(dtype), tokens, 32, specs)
    model.float()
    elements = 2 * 2 * 100 * 2 * 64  # layers x (K, V) x tokens x heads x head_dim
    assert res["tokens"] == 100 and res["layers"] == 2
    assert res["dynamic_cache"] == {
        "bytes": exact_bytes * elements,
        "dtype": str(dtype)[6:],
        "bf16_bytes": 2 * elements,
    }
    assert set(res["configs"]) == {"k4v4", "k4v4+R8", "k4v3", "k4v3+R8", "k2v2", "k2v2+R8"}
    for bits in ((4, 4), (4, 3), (2, 2)):
        row = res["configs"][f"k{bits[0]}v{bits[1]}"]
        per_token = PageLayout(2, 64, *bits).bytes_per_token
        assert row["bytes"] == 2 * 100 * per_token and row["bytes_per_token_per_layer"] == per_token
        assert row["ratio"] == pytest.approx(exact_bytes * elements / row["bytes"])
        assert row["ratio_vs_bf16"] == pytest.approx(2 * 64 * 2 * 2 / per_token) and row["ratio_vs_bf16"] >= 3.5
        window = res["configs"][f"k{bits[0]}v{bits[1]}+R8"]["bytes"] - row["bytes"]
        assert window == 2 * 2 * 8 * 2 * 64 * exact_bytes  # exact K and V of the 8 newest tokens


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kv_memory_on_cuda_counts_device_tensors(model):
    tokens = [1 + i % 63 for i in range(64)]
    specs = Q.parse_specs("3/3", (True,))
    want = M.kv_memory(model, tokens, 16, specs)
    got = M.kv_memory(copy.deepcopy(model).cuda(), tokens, 16, specs)
    assert got == want
