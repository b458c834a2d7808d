"""Hand-stepped engine windows for bench_engine.py: pure decode steps profiled, and every step of a run traced.

vLLM's LLM.generate times a batch as a whole; stepping its engine by hand splits that time into its steps (how
many requests prefill and decode in each), and torch.profiler lists a window's GPU kernels.
"""

from __future__ import annotations

import contextlib
import statistics
import time

KERNEL_NAME_CHARS = 120  # kernel names as kernel_rows lists them (and step_timeline matches its mark against)


def no_window(name: str) -> contextlib.AbstractContextManager:
    """The default `phase` of the windows below: marks nothing (GpuTelemetry.phase marks a telemetry window)."""
    return contextlib.nullcontext()


def exact_tokens(n: int):
    """Sampling that generates exactly n tokens, greedily: every mode and run does the same decode steps."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0)


def add_batch(engine, prompts: list[list[int]], max_tokens: int, tag: str) -> dict[str, int]:
    """Queue the prompts on a hand-stepped engine; returns each request id with the tokens it has produced (0)."""
    produced = {f"{tag}-{i}": 0 for i in range(len(prompts))}
    for rid, prompt in zip(produced, prompts, strict=True):
        engine.add_request(rid, {"prompt_token_ids": prompt}, exact_tokens(max_tokens))
    return produced


def profile_decode_steps(llm, prompts: list[list[int]], steps: int = 32, top: int = 15, phase=no_window) -> dict:
    """Pure decode steps of one batch: wall ms per step, then its GPU kernels per step (torch.profiler).

    Requests are stepped by hand until each has its first token, so every timed step decodes the whole
    batch and no prefill chunk rides along. The kernels' summed device time against the wall time says
    whether a step waits on the GPU or on the host. phase(name): a context manager around each timed window
    (GpuTelemetry.phase).
    """
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    engine = llm.llm_engine
    produced = add_batch(engine, prompts, 3 * steps + 16, "profile")
    while min(produced.values()) < 2:
        produced.update((o.request_id, len(o.outputs[0].token_ids)) for o in engine.step())

    shape = f"{len(prompts[0])}x{len(prompts)}"

    def run_steps(name: str) -> float:
        torch.cuda.synchronize()
        with phase(f"{shape} profile {name}"):
            t0 = time.perf_counter()
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) / steps * 1e3

    step_ms = run_steps("step_ms")
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        profiled_step_ms = run_steps("profiled_step_ms")
    step_ms_after = run_steps("step_ms_after")  # once more: was the first window's wall time a steady state?
    while engine.has_unfinished_requests():
        engine.step()
    kernels = kernel_rows(prof, steps)
    once = [k["name"] for k in kernels if k["calls_per_step"] == 1]  # e.g. the LM head: one a step, a step's mark
    spans = kernel_spans(prof)
    return {
        "context": len(prompts[0]),
        "seqs": len(prompts),
        "step_ms": step_ms,
        "profiled_step_ms": profiled_step_ms,
        "step_ms_after": step_ms_after,
        "kernel_ms_per_step": sum(k["us_per_step"] for k in kernels) / 1e3,
        "kernels": kernels[:top],
        "timeline": step_timeline(spans, once[0], steps // 2) if once else [],
        "launches": step_launches(spans, once[0], [k["name"] for k in kernels[:top] if k["calls_per_step"] >= 8])
        if once
        else {},
    }


def kernel_spans(prof) -> list[tuple[str, float, float]]:
    """A torch.profiler run's GPU kernels as (name, start us, end us), in start order."""
    from torch.autograd import DeviceType

    spans = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type != DeviceType.CPU]
    return sorted(spans, key=lambda span: span[1])


def mark_indices(spans: list[tuple[str, float, float]], mark: str) -> list[int]:
    """Where the once-a-step kernel `mark` runs in spans: the step boundaries."""
    return [i for i, (name, _, _) in enumerate(spans) if name[:KERNEL_NAME_CHARS] == mark]


def step_timeline(spans: list[tuple[str, float, float]], mark: str, step: int) -> list[list]:
    """One step's kernels in order, [name, start us from the step's first, device us, idle us since the one
    before]: from the kernel after the step-th `mark` (a kernel that runs once a step) through the next `mark`.
    What a per-name total hides: which layer's launch of a kernel is slow, and what ran before it."""
    marks = mark_indices(spans, mark)
    if len(marks) <= step + 1:
        return []
    window = spans[marks[step] + 1 : marks[step + 1] + 1]
    t0, prev_end = window[0][1], spans[marks[step]][2]
    rows = []
    for name, start, end in window:
        rows.append([name[:60], round(start - t0, 2), round(end - start, 2), round(start - prev_end, 2)])
        prev_end = end
    return rows


def step_launches(spans: list[tuple[str, float, float]], mark: str, names: list[str]) -> dict[str, list[list[float]]]:
    """Each named kernel's device us per launch, one list a step (every window between two `mark`s): whether the
    same layers' launches are slow in every step (where the weights or the cache lie) or different ones each step."""
    marks = mark_indices(spans, mark)
    launches: dict[str, list[list[float]]] = {name: [] for name in names}
    for first, last in zip(marks, marks[1:], strict=False):
        for row in launches.values():
            row.append([])
        for name, start, end in spans[first + 1 : last + 1]:
            if name[:KERNEL_NAME_CHARS] in launches:
                launches[name[:KERNEL_NAME_CHARS]][-1].append(round(end - start, 2))
    return launches


def kernel_rows(prof, steps: int) -> list[dict]:
    """A torch.profiler run's GPU kernels, longest first: calls and device us per step."""
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    return [{"name": e.key[:KERNEL_NAME_CHARS], "calls_per_step": e.count / steps,
             "us_per_step": e.device_time_total / steps}
            for e in sorted(events, key=lambda e: e.device_time_total, reverse=True)]  # fmt: skip


def mixed_kernels(prof, top: int) -> dict:
    """The profiled mixed steps' `top` kernels and all their kernels' summed device time."""
    rows = kernel_rows(prof, 1)
    return {"mixed_kernels_ms": sum(r["us_per_step"] for r in rows) / 1e3, "mixed_kernels_us": rows[:top]}


def trace_steps(
    llm, prompts: list[list[int]], max_tokens: int, kernels: bool = False, top: int = 60, phase=no_window
) -> dict:
    """One batch run by hand: each step's wall ms (synchronised), requests still prefilling and decoding.

    Sums split the run into its mixed steps (some prompt still prefilling) and the pure decode steps after them,
    the latter by batch size: the two-run TPOT's extra over a pure step is in one or the other. kernels: also
    profile the mixed steps (torch.profiler) and list their `top` GPU kernels' totals and the kernels' summed time,
    so two runs' tables say which kernels the mixed steps' difference is made of, and how much of it is no kernel.
    phase(name): a context manager around the run (GpuTelemetry.phase). Where the engine core runs in this
    process, `prefill_chunks` lists each step's prompt chunks as [tokens, cached context before them].
    """
    import torch

    engine = llm.llm_engine
    produced = add_batch(engine, prompts, max_tokens, f"trace{max_tokens}")
    steps = []  # [ms, prefilling, decoding] before each step
    requests = scheduler_requests(engine)
    chunks: list[list[list[int]]] = []  # per step: [tokens, context] of each prompt chunk it ran
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    sync()
    prof = None
    if kernels:
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU])
    profiling = contextlib.ExitStack()  # open while the mixed steps run
    with phase(f"{len(prompts[0])}x{len(prompts)} trace t{max_tokens}"), profiling:
        if prof is not None:
            profiling.enter_context(prof)
        while engine.has_unfinished_requests():
            live = [n for n in produced.values() if n < max_tokens]
            if not any(n == 0 for n in live):
                profiling.close()  # the mixed steps are over
            before = prompt_progress(requests)
            t0 = time.perf_counter()
            outputs = engine.step()
            sync()
            steps.append([(time.perf_counter() - t0) * 1e3, sum(n == 0 for n in live), sum(n > 0 for n in live)])
            if requests is not None:
                chunks.append(prompt_chunks(before, prompt_progress(requests)))
            produced.update((o.request_id, len(o.outputs[0].token_ids)) for o in outputs)
    mixed = [ms for ms, prefilling, _ in steps if prefilling]
    pure: dict[int, list[float]] = {}
    for ms, prefilling, decoding in steps:
        if not prefilling:
            pure.setdefault(decoding, []).append(ms)
    return {
        "total_ms": sum(ms for ms, _, _ in steps),
        "mixed_steps": len(mixed),
        "mixed_ms": sum(mixed),
        "pure_by_batch": {
            b: {"steps": len(v), "ms": sum(v), "median_ms": statistics.median(v)} for b, v in sorted(pure.items())
        },
        "steps": [[round(ms, 3), p, d] for ms, p, d in steps],
        **({"prefill_chunks": chunks} if requests is not None else {}),
        **(mixed_kernels(prof, top) if prof is not None else {}),
    }


def scheduler_requests(engine) -> dict | None:
    """The scheduler's live requests where vLLM's engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0:
    LLMEngine -> InprocClient -> EngineCore -> Scheduler), else None. vLLM internals: read, never changed."""
    core = getattr(getattr(engine, "engine_core", None), "engine_core", None)
    requests = getattr(getattr(core, "scheduler", None), "requests", None)
    return requests if isinstance(requests, dict) else None


def prompt_progress(requests: dict | None) -> dict[str, tuple[int, int]]:
    """(prompt tokens computed so far, prompt tokens) of each live request."""
    if requests is None:
        return {}
    return {rid: (min(r.num_computed_tokens, r.num_prompt_tokens), r.num_prompt_tokens)
            for rid, r in list(requests.items())}  # fmt: skip


def prompt_chunks(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[list[int]]:
    """[tokens, cached context] of the prompt chunk each request ran in a step, from its progress before and after;
    a request gone after the step (finished) had computed its whole prompt."""
    chunks = []
    for rid, (done, total) in before.items():
        end = after[rid][0] if rid in after else total
        if end > done:
            chunks.append([end - done, done])
    return chunks
