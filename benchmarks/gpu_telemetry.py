"""The GPU's SM clock, power and temperature, sampled in the background (NVML) while a benchmark runs.

A latency-bound kernel slows with the SM clock and a memory-bound one barely does, so two timing windows of the
same decode steps that disagree (steps right after a long prefill against steps a minute later) are explained,
or ruled out, by the clock and the throttle reasons NVML reports in each window.

    gpu = GpuTelemetry.start()           # GpuTelemetry.off() where NVML is not wanted: phases become no-ops
    with gpu.phase("32768x16 t129"):
        ...                              # the timed work
    summary = gpu.stop()                 # one entry per phase, in order, each with its samples
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

# NVML's clocks-event reason bits (nvmlClocksEventReason*), named as NVML names them.
CLOCK_EVENT_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
SAMPLE_FIELDS = ("t_s", "sm_mhz", "mem_mhz", "power_w", "temp_c", "reasons")


@dataclass(frozen=True)
class Sample:
    t_s: float  # time.perf_counter() when read
    sm_mhz: int
    mem_mhz: int
    power_w: float
    temp_c: int
    reasons: int  # bit mask of CLOCK_EVENT_REASONS


def reason_names(mask: int) -> list[str]:
    """The named reasons set in an NVML clocks-event mask; unknown bits as hex."""
    names = [name for bit, name in CLOCK_EVENT_REASONS.items() if mask & bit]
    unknown = mask & ~sum(CLOCK_EVENT_REASONS)
    return names + ([hex(unknown)] if unknown else [])


def summarise(samples: list[Sample]) -> dict:
    """A window's SM clock (median, min, max), power (median, max), hottest temperature and the reasons seen.

    `reasons` maps each reason to the share of samples it was set in: a clock held down by the power cap shows
    as sw_power_cap in most samples, a short dip as a small share.
    """
    if not samples:
        return {"samples": 0}
    sm = [s.sm_mhz for s in samples]
    power = [s.power_w for s in samples]
    seen: dict[str, int] = {}
    for s in samples:
        for name in reason_names(s.reasons):
            seen[name] = seen.get(name, 0) + 1
    return {
        "samples": len(samples),
        "sm_mhz": {"median": statistics.median(sm), "min": min(sm), "max": max(sm)},
        "mem_mhz_median": statistics.median(s.mem_mhz for s in samples),
        "power_w": {"median": round(statistics.median(power), 1), "max": round(max(power), 1)},
        "temp_c_max": max(s.temp_c for s in samples),
        "reasons": {name: round(n / len(samples), 3) for name, n in sorted(seen.items())},
    }


def nvml_reader() -> tuple[Callable[[], Sample], dict]:
    """A function reading one Sample of the GPU this process would use, and the GPU's fixed facts.

    The GPU is found by NVML index or UUID from CUDA_VISIBLE_DEVICES' first entry (index 0 without it), so the
    reader never creates a CUDA context: one would take memory from the engine being measured.
    """
    import pynvml

    pynvml.nvmlInit()
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
    handle = (pynvml.nvmlDeviceGetHandleByIndex(int(first)) if first.isdigit()
              else pynvml.nvmlDeviceGetHandleByUUID(first))  # fmt: skip
    reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or (
        pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
    )
    facts = {
        "name": pynvml.nvmlDeviceGetName(handle),
        "sm_mhz_max": pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
        "power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1e3,
    }

    def read() -> Sample:
        return Sample(
            t_s=time.perf_counter(),
            sm_mhz=pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            mem_mhz=pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            power_w=pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3,
            temp_c=pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
            reasons=int(reasons(handle)),
        )

    return read, facts


@dataclass
class GpuTelemetry:
    """Samples from a background thread, and named phases (wall-clock windows) to summarise them by."""

    read: Callable[[], Sample] | None  # None: off, phases record nothing
    period_s: float = 0.1
    facts: dict = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    phases: list[tuple[str, float, float]] = field(default_factory=list)  # (name, start, end) in perf_counter s
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @classmethod
    def off(cls) -> GpuTelemetry:
        return cls(read=None)

    @classmethod
    def start(cls, period_s: float = 0.1, reader: Callable[[], tuple[Callable[[], Sample], dict]] = nvml_reader):
        """Begin sampling every period_s; without NVML (an ImportError or an NVML error) it stays off, saying why."""
        try:
            read, facts = reader()
        except Exception as exc:  # no driver, no pynvml: the benchmark still runs, its JSON says why
            return cls(read=None, facts={"unavailable": f"{type(exc).__name__}: {exc}"})
        gpu = cls(read=read, period_s=period_s, facts=facts)
        gpu._thread = threading.Thread(target=gpu._sample, name="gpu-telemetry", daemon=True)
        gpu._thread.start()
        return gpu

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.read())
            self._stop.wait(self.period_s)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Marks a window; repeated names stay separate entries (a shape's repeats)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.read is not None:
                self.phases.append((name, start, time.perf_counter()))

    def stop(self) -> dict:
        """Ends sampling; the GPU's facts and, per phase, its summary and samples (rows of SAMPLE_FIELDS, t from
        the phase's start)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        out = {"gpu": self.facts, "period_s": self.period_s, "sample_fields": SAMPLE_FIELDS, "phases": []}
        for name, start, end in self.phases:
            inside = [s for s in self.samples if start <= s.t_s <= end]
            rows = [[round(s.t_s - start, 3), s.sm_mhz, s.mem_mhz, round(s.power_w, 1), s.temp_c, s.reasons]
                    for s in inside]  # fmt: skip
            out["phases"].append({"phase": name, "seconds": round(end - start, 3), **summarise(inside), "series": rows})
        return out
