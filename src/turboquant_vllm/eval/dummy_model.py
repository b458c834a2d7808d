"""Config-only Llama checkpoints for vLLM's load_format="dummy": real shapes, random weights, no download."""

from __future__ import annotations

import json
from pathlib import Path

LLAMA_8B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=14336,
    vocab_size=128256,
)


def write_llama_config(path: str | Path, max_position_embeddings: int = 131072, **shape: int) -> Path:
    """Write config.json of a LlamaForCausalLM with the given shape (defaults: Llama-3.1-8B)."""
    shape = {**LLAMA_8B, **shape}
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": max_position_embeddings,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **shape,
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path
