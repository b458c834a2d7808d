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


class ChunkedEngine:
    """Stands in for vLLM's engine with its core in this process: each step runs the decodes first, then prompt
    chunks in order within a token budget; a request leaves the scheduler once it has all its tokens."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.requests: dict[str, SimpleNamespace] = {}
        self.engine_core = SimpleNamespace(
            engine_core=SimpleNamespace(scheduler=SimpleNamespace(requests=self.requests))
        )

    def add_request(self, rid, prompt, params) -> None:
        self.requests[rid] = SimpleNamespace(num_computed_tokens=0, num_prompt_tokens=len(prompt["prompt_token_ids"]),
                                             max_tokens=params.max_tokens, tokens=0)  # fmt: skip

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list:
        budget, out = self.budget, []
        for rid, r in list(self.requests.items()):
            if r.num_computed_tokens == r.num_prompt_tokens:
                budget, r.tokens = budget - 1, r.tokens + 1
                out.append(rid)
        for rid, r in self.requests.items():
            chunk = min(r.num_prompt_tokens - r.num_computed_tokens, budget)
            if rid not in out and chunk > 0:
                r.num_computed_tokens += chunk
                budget -= chunk
                if r.num_computed_tokens == r.num_prompt_tokens:
                    r.tokens = 1
                    out.append(rid)
        outputs = [SimpleNamespace(request_id=rid, outputs=[SimpleNamespace(token_ids=[0] * self.requests[rid].tokens)])
                   for rid in out]  # fmt: skip
        for rid in out:
            if self.requests[rid].tokens >= self.requests[rid].max_tokens:
                del self.requests[rid]
        return outputs


def test_step_trace_lists_each_steps_prompt_chunks(engine_steps):
    """Three 10-token prompts, 8 tokens a step: decodes take their token first, so the chunks shift and the third
    prompt's last chunk is 1 token over 9 of context. A request that finishes in a step (1-token run) still counts
    its last chunk."""
    prompts = [list(range(10))] * 3
    long = engine_steps.trace_steps(SimpleNamespace(llm_engine=ChunkedEngine(8)), prompts, max_tokens=3)
    assert long["prefill_chunks"] == [[[8, 0]], [[2, 8], [6, 0]], [[4, 6], [3, 0]], [[6, 3]], [[1, 9]], [], []]
    assert [s[1:] for s in long["steps"]] == [[3, 0], [3, 0], [2, 1], [1, 2], [1, 1], [0, 1], [0, 1]]
    short = engine_steps.trace_steps(SimpleNamespace(llm_engine=ChunkedEngine(8)), prompts, max_tokens=1)
    assert short["prefill_chunks"] == [[[8, 0]], [[2, 8], [6, 0]], [[4, 6], [4, 0]], [[6, 4]]]
    assert "prefill_chunks" not in engine_steps.trace_steps(SimpleNamespace(llm_engine=ScriptedEngine()), [[1]], 1)


def test_step_timeline_is_one_step_between_marks_with_idle_gaps(engine_steps):
    """Three steps of [qkv, attn, lm]: step 1's window starts after the first lm and ends with the second; starts
    count from its first kernel and each gap from the end of the kernel before (the mark for the first)."""
    spans = []
    t = 0.0
    for _ in range(3):
        for name, dur in (("qkv", 10.0), ("attn", 30.0), ("lm", 5.0)):
            spans.append((name, t + 1.0, t + 1.0 + dur))  # 1 us idle ahead of every kernel
            t += 1.0 + dur
    rows = engine_steps.step_timeline(spans, "lm", 1)
    assert [r[0] for r in rows] == ["qkv", "attn", "lm"]
    assert rows == [["qkv", 0.0, 10.0, 1.0], ["attn", 11.0, 30.0, 1.0], ["lm", 42.0, 5.0, 1.0]]
    assert engine_steps.step_timeline(spans, "lm", 2) == []  # no mark closes the third step's window
    assert engine_steps.step_timeline(spans, "absent", 0) == []


def test_step_launches_lists_each_steps_launches_between_marks(engine_steps):
    """Two layers of [gemm, attn] then lm, four times: three whole windows (after the first lm); the gemm of the
    second layer is slow in every step, attn is not named, launches before the first mark are left out."""
    spans = []
    t = 0.0
    for step in range(4):
        for layer in range(2):
            for name, dur in (("gemm", 10.0 + 5.0 * layer + step), ("attn", 3.0)):
                spans.append((name, t, t + dur))
                t += dur
        spans.append(("lm", t, t + 1.0))
        t += 1.0
    launches = engine_steps.step_launches(spans, "lm", ["gemm"])
    assert launches == {"gemm": [[11.0, 16.0], [12.0, 17.0], [13.0, 18.0]]}
    assert engine_steps.step_launches(spans, "absent", ["gemm"]) == {"gemm": []}


def test_kernel_spans_keep_device_events_in_start_order(engine_steps):
    from torch.autograd import DeviceType

    def event(name, device, start, end):
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end))

    events = [event("late", DeviceType.CUDA, 5.0, 6.0), event("cpu op", DeviceType.CPU, 0.0, 9.0),
              event("early", DeviceType.CUDA, 1.0, 2.0)]  # fmt: skip
    prof = SimpleNamespace(events=lambda: events)
    assert engine_steps.kernel_spans(prof) == [("early", 1.0, 2.0), ("late", 5.0, 6.0)]
