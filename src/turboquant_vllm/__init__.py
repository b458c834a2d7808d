"""TurboQuant compressed KV cache for vLLM and HF transformers."""

from turboquant_vllm.config import TQConfig, TQConfigError
from turboquant_vllm.layout import PageLayout

__all__ = ["PageLayout", "TQConfig", "TQConfigError"]
__version__ = "0.1.0"
