"""engine_steps.py on the CPU: step traces of a scripted engine (mixed steps, pure steps by batch, kernels)."""

import contextlib
from types import SimpleNamespace

import pytest


@pytest.fixture(scope="module")
def engine_steps(benchmark_script):
    return benchmark_script("engine_steps")


class ScriptedEngine:
    """Stands in for vLLM's engine: request i prefills in step i + 1, then gains a token per step."""

    def __init__(self) -> None:
        self.max_tokens: dict[str, int] = {}
        self.tokens: dict[str, int] = {}
        self.steps = 0

    def add_request(self, rid, prompt, params) -> None:
        self.max_tokens[rid] = params.max_tokens
        self.tokens[rid] = 0

    def has_unfinished_requests(self) -> bool:
        return any(self.tokens[r] < self.max_tokens[r] for r in self.tokens)

    def step(self) -> list:
        self.steps += 1
        out = []
        for i, rid in enumerate(self.tokens):
            if self.tokens[rid] < self.max_tokens[rid] and self.steps > i:
                self.tokens[rid] += 1
                out.append(SimpleNamespace(request_id=rid, outputs=[SimpleNamespace(token_ids=[0] * self.tokens[rid])]))
        return out


def test_step_trace_splits_mixed_steps_from_pure_ones_by_batch(engine_steps):
    """Two requests of 4 tokens: step 1 prefills both, step 2 still the second (the first decodes alongside), then
    two pure steps of 2 live requests and one of 1 (the first is done)."""
    llm = SimpleNamespace(llm_engine=ScriptedEngine())
    windows = []  # the run is one telemetry window (GpuTelemetry.phase)
    trace = engine_steps.trace_steps(llm, [[1, 2], [3, 4]], max_tokens=4,
                                     phase=lambda name: windows.append(name) or contextlib.nullcontext())  # fmt: skip
    assert windows == ["2x2 trace t4"]
    assert [s[1:] for s in trace["steps"]] == [[2, 0], [1, 1], [0, 2], [0, 2], [0, 1]]
    assert trace["mixed_steps"] == 2
    assert {b: v["steps"] for b, v in trace["pure_by_batch"].items()} == {1: 1, 2: 2}
    assert trace["total_ms"] >= trace["mixed_ms"] >= 0
    assert "mixed_kernels_us" not in trace


def test_step_trace_lists_the_runs_kernels_when_asked(engine_steps):
    """The profiled form: the same steps, plus the mixed steps' GPU kernels (none on a CPU-only engine); the
    profiler stops before the first pure step and a second trace can profile again."""
    llm = SimpleNamespace(llm_engine=ScriptedEngine())
    trace = engine_steps.trace_steps(llm, [[1, 2], [3, 4]], max_tokens=2, kernels=True)
    assert [s[1:] for s in trace["steps"]] == [[2, 0], [1, 1], [0, 1]]
    assert isinstance(trace["mixed_kernels_us"], list) and trace["mixed_kernels_ms"] >= 0
    again = engine_steps.trace_steps(SimpleNamespace(llm_engine=ScriptedEngine()), [[1, 2]], max_tokens=1, kernels=True)
    assert again["mixed_steps"] == 1 and "mixed_kernels_us" in again
