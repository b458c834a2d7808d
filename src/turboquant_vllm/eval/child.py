"""Run one benchmark mode in a child process and make sure nothing of it outlives a timeout.

vLLM starts its engine core as a grandchild; killing only the child would leave that process
holding the GPU's memory, and every later mode would then fail to start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ChildResult:
    stdout: str
    stderr: str
    timed_out: bool

    def save_log(self, out: Path, tag: str) -> Path:
        """Write what the child printed next to a result file: `<out stem>_<tag>.log` (start-up, warnings)."""
        log = out.with_name(f"{out.stem}_{tag}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(self.stdout + self.stderr)
        return log


def run_child(cmd: list[str], timeout: float) -> ChildResult:
    """Run cmd in its own process group; on timeout kill the whole group and return what it printed."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the engine core, if the child left it behind
    if timed_out:
        out, err = proc.communicate()
    return ChildResult(out or "", err or "", timed_out)
