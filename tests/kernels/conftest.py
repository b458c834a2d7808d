"""Kernel-test fixtures; `device` (CUDA, else CPU under TRITON_INTERPRET=1) comes from tests/conftest.py."""

import pytest
import torch


@pytest.fixture
def cuda() -> torch.device:
    """A CUDA device, or skip: for cases too big or too slow for the interpreter."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")
