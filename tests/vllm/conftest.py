"""vLLM tests need vLLM importable (the `vllm` extra); skip the folder cleanly without it."""

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install turboquant-vllm[vllm])")
