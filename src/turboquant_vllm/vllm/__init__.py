"""TQ4 compressed KV cache backend for vLLM (select with --attention-backend CUSTOM).

Names resolve lazily so that vLLM's plugin loader, which imports `turboquant_vllm.vllm.plugin`
in every process, pulls in no kernels unless the CUSTOM backend is actually selected.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "TQ4AttentionBackend": "turboquant_vllm.vllm.backend",
    "TQ4AttentionImpl": "turboquant_vllm.vllm.backend",
    "TQ4MetadataBuilder": "turboquant_vllm.vllm.backend",
    "TQ4FullAttentionSpec": "turboquant_vllm.vllm.spec",
    "register_tq4_backend": "turboquant_vllm.vllm.plugin",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    attr = "register" if name == "register_tq4_backend" else name
    return getattr(import_module(_EXPORTS[name]), attr)
