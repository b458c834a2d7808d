"""Where a benchmark number came from: machine, versions, date and command, stored with every result."""

from __future__ import annotations

import datetime
import platform
import shlex
from importlib import metadata


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def provenance(argv: list[str]) -> dict:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *argv]),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "gpu": gpu,
        "versions": {name: _version(name) for name in ("turboquant-vllm", "torch", "triton", "transformers", "vllm")},
    }
