"""Without CUDA, Triton kernels run in its CPU interpreter, which must be chosen before triton is imported."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seeded_torch() -> None:
    """Tests that draw from torch's global generator see the same numbers whatever runs before them."""
    torch.manual_seed(0)


@pytest.fixture
def device() -> torch.device:
    """The device kernels run on; CPU means TRITON_INTERPRET=1."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def tiny_llama():
    """Factory of a 2-layer random Llama (head_dim 64, vocab 64): the real HF code path at test speed."""

    def make(num_key_value_heads: int = 1, seed: int = 0):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=64, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=num_key_value_heads, head_dim=64, max_position_embeddings=256, pad_token_id=0,
        )  # fmt: skip
        return LlamaForCausalLM(config).eval()

    return make


@pytest.fixture(scope="session")
def benchmark_script():
    """Loader of a script in benchmarks/ (not a package) as a module, for CPU tests of its pure parts."""

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
        return module

    return load
