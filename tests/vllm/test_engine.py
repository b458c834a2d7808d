"""Real vLLM engines on a GPU: the CUSTOM backend runs, refuses bad settings, and leaves other runs alone."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROBE = Path(__file__).with_name("engine_probe.py")
SMALL = dict(
    hidden_size=1024,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=128,
    intermediate_size=2048,
    vocab_size=32000,
)


def probe(spec: dict, env: dict | None = None, timeout: int = 150) -> dict:
    full_env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(PROBE), json.dumps(spec)], capture_output=True, text=True, timeout=timeout, env=full_env
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    if not lines:
        return {"ok": False, "error": proc.stderr[-4000:]}
    result = json.loads(lines[-1][6:])
    if not result["ok"]:
        result["error"] += "\n" + proc.stderr[-4000:]
    return result


def test_installed_plugin_leaves_flash_attn_runs_unchanged():
    spec = dict(shape=SMALL, attention_backend="FLASH_ATTN", max_model_len=2048, enforce_eager=True)
    with_plugin = probe(dict(spec))
    without = probe(dict(spec), env={"VLLM_PLUGINS": "none"})
    assert with_plugin["ok"] and without["ok"], (with_plugin, without)
    assert with_plugin["num_gpu_blocks"] == without["num_gpu_blocks"]
    assert with_plugin["tokens"] == without["tokens"]


@pytest.mark.parametrize(
    ("head_dim", "heads", "kv_heads", "enforce_eager"),
    [(64, 8, 2, True), (128, 8, 8, False), (256, 4, 1, True)],  # GQA / MHA with CUDA graphs / MQA
)
def test_custom_backend_generates(head_dim, heads, kv_heads, enforce_eager):
    shape = {**SMALL, "head_dim": head_dim, "num_attention_heads": heads, "num_key_value_heads": kv_heads}
    custom = probe(dict(shape=shape, attention_backend="CUSTOM", max_model_len=2048, enforce_eager=enforce_eager))
    assert custom["ok"], custom.get("error")
    assert all(len(t) == 24 for t in custom["tokens"])
    if head_dim == 128:
        bf16 = probe(dict(shape=shape, attention_backend="FLASH_ATTN", max_model_len=2048, enforce_eager=True))
        # Same memory budget: the packed cache holds 3.76x the tokens of bf16 at d=128, 4/4.
        assert custom["num_gpu_blocks"] > 3.5 * bf16["num_gpu_blocks"], (custom, bf16)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"additional_config": {"turboquant": {"k_bits": 5}}}, "k_bits=5"),
        ({"additional_config": {"turboquant": {"sink_tokens": 17}}}, "sink_tokens=17"),
        ({"additional_config": {"turboquant": {"recent_tokens": 65}}}, "recent_tokens=65"),
        ({"kv_cache_dtype": "fp8"}, "kv-cache-dtype fp8"),
        ({"shape": {**SMALL, "head_dim": 100}}, "head_dim=100"),
    ],
)
def test_bad_settings_fail_at_start_up(extra, needle):
    spec = {**dict(shape=SMALL, attention_backend="CUSTOM", max_model_len=2048, enforce_eager=True), **extra}
    result = probe(spec)
    assert not result["ok"] and needle in result["error"], result["error"][-2000:]


def test_custom_backend_with_key_offsets_under_cuda_graphs(tmp_path):
    """A calibrated key-offset file is accepted at start-up and read by every layer, CUDA graphs on."""
    from turboquant_vllm.key_offset import save_key_offsets

    path = tmp_path / "offsets.pt"
    save_key_offsets(path, torch.randn(SMALL["num_hidden_layers"], SMALL["num_key_value_heads"], SMALL["head_dim"]))
    spec = dict(shape=SMALL, attention_backend="CUSTOM", max_model_len=2048, enforce_eager=False,
                additional_config={"turboquant": {"key_offsets": str(path)}})  # fmt: skip
    result = probe(spec)
    assert result["ok"], result.get("error")
    assert all(len(t) == 24 for t in result["tokens"])
    wrong = tmp_path / "wrong.pt"
    save_key_offsets(wrong, torch.zeros(1, SMALL["num_key_value_heads"], SMALL["head_dim"]))  # one layer only
    bad = probe({**spec, "additional_config": {"turboquant": {"key_offsets": str(wrong)}}})
    assert not bad["ok"] and "calibrate for this model" in bad["error"], bad["error"][-2000:]


@pytest.mark.parametrize("setting", [{"sink_tokens": 4}, {"recent_tokens": 32}], ids=["sinks", "recent"])
def test_custom_backend_with_exact_tables_under_cuda_graphs(setting):
    """Exact sinks or recent tokens with prompts of 1-3 tokens (their exact rows arrive in captured decode steps) and
    longer ones: the same tokens as eager mode, and vLLM's memory profile counts the tables (as many fewer blocks
    as they take)."""
    prompts = [[1 + (i * 37 + j * 11) % 500 for j in range(n)] for i, n in enumerate((1, 2, 3, 40, 70))]
    spec = dict(shape=SMALL, attention_backend="CUSTOM", max_model_len=2048, prompts=prompts,
                additional_config={"turboquant": setting})  # fmt: skip
    graphs, eager = probe({**spec, "enforce_eager": False}), probe({**spec, "enforce_eager": True})
    plain = probe({**spec, "enforce_eager": True, "additional_config": {}})
    assert graphs["ok"] and eager["ok"] and plain["ok"], (graphs.get("error"), eager.get("error"), plain.get("error"))
    assert all(len(t) == 24 for t in graphs["tokens"])
    assert graphs["tokens"] == eager["tokens"]
    from turboquant_vllm.config import TQConfig
    from turboquant_vllm.kernels.recent import SEGMENT, recent_entries
    from turboquant_vllm.kernels.sinks import table_entries
    from turboquant_vllm.layout import PageLayout

    layers, kv_heads, head_dim = SMALL["num_hidden_layers"], SMALL["num_key_value_heads"], SMALL["head_dim"]
    if "sink_tokens" in setting:  # vLLM's default max_num_seqs: 256
        rows = table_entries(256) * setting["sink_tokens"]
    else:
        rows = recent_entries(256, setting["recent_tokens"]) * SEGMENT
    table_bytes = layers * rows * 2 * kv_heads * head_dim * 2  # K and V rows in bf16
    page_bytes = layers * plain["block_size"] * PageLayout.from_config(TQConfig(), kv_heads, head_dim).bytes_per_token
    assert plain["num_gpu_blocks"] - eager["num_gpu_blocks"] >= 0.9 * table_bytes / page_bytes, (plain, eager)
