"""gpu_telemetry.py on the CPU: reason bits against NVML's constants, window summaries, phases of a fake reader."""

from __future__ import annotations

import itertools
import time

import pytest


@pytest.fixture(scope="module")
def telemetry(benchmark_script):
    return benchmark_script("gpu_telemetry")


def test_reason_bits_are_nvmls(telemetry):
    """The hard-coded bits match pynvml's nvmlClocksEventReason* constants (the library vLLM installs)."""
    pynvml = pytest.importorskip("pynvml")
    expected = {
        "gpu_idle": pynvml.nvmlClocksEventReasonGpuIdle,
        "applications_clocks_setting": pynvml.nvmlClocksEventReasonApplicationsClocksSetting,
        "sw_power_cap": pynvml.nvmlClocksEventReasonSwPowerCap,
        "hw_slowdown": pynvml.nvmlClocksEventReasonHwSlowdown,
        "sync_boost": pynvml.nvmlClocksEventReasonSyncBoost,
        "sw_thermal_slowdown": pynvml.nvmlClocksEventReasonSwThermalSlowdown,
        "hw_thermal_slowdown": pynvml.nvmlClocksEventReasonHwThermalSlowdown,
        "hw_power_brake_slowdown": pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown,
        "display_clock_setting": pynvml.nvmlClocksEventReasonDisplayClockSetting,
    }
    assert {name: bit for bit, name in telemetry.CLOCK_EVENT_REASONS.items()} == expected
    assert telemetry.reason_names(pynvml.nvmlClocksEventReasonSwPowerCap | 0x1000) == ["sw_power_cap", "0x1000"]


def sample(telemetry, t, sm, power=500.0, reasons=0, temp=60):
    return telemetry.Sample(t_s=t, sm_mhz=sm, mem_mhz=3201, power_w=power, temp_c=temp, reasons=reasons)


def test_summary_of_a_window(telemetry):
    """Median/min/max clock, power, hottest temperature, and each reason's share of the samples."""
    rows = [sample(telemetry, 0, 1980), sample(telemetry, 1, 1755, 690.0, 0x4, temp=71),
            sample(telemetry, 2, 1800, 680.0, 0x4), sample(telemetry, 3, 1980, 400.0, 0x1)]  # fmt: skip
    s = telemetry.summarise(rows)
    assert s["samples"] == 4
    assert s["sm_mhz"] == {"median": 1890.0, "min": 1755, "max": 1980}
    assert s["power_w"] == {"median": 590.0, "max": 690.0} and s["temp_c_max"] == 71
    assert s["reasons"] == {"gpu_idle": 0.25, "sw_power_cap": 0.5}
    assert telemetry.summarise([]) == {"samples": 0}


def test_phases_collect_the_samples_taken_inside_them(telemetry):
    """A fake reader stepping its clock each read: each phase holds only its own window's samples, repeated names
    stay separate, and the series restarts its time at the phase's start."""
    clocks = itertools.count(1000, 10)

    def reader():
        return (lambda: sample(telemetry, time.perf_counter(), next(clocks))), {"name": "fake"}

    gpu = telemetry.GpuTelemetry.start(period_s=0.005, reader=reader)
    for name in ("a", "b", "a"):
        with gpu.phase(name):
            time.sleep(0.05)
        time.sleep(0.02)
    out = gpu.stop()
    assert out["gpu"] == {"name": "fake"} and [p["phase"] for p in out["phases"]] == ["a", "b", "a"]
    clocks_by_phase = [[row[1] for row in p["series"]] for p in out["phases"]]
    for p, seen in zip(out["phases"], clocks_by_phase, strict=True):
        assert p["samples"] == len(seen) >= 2
        assert seen == sorted(seen) and p["sm_mhz"]["min"] == seen[0]
        assert all(0 <= row[0] <= p["seconds"] for row in p["series"])
    assert clocks_by_phase[0][-1] < clocks_by_phase[1][0] and clocks_by_phase[1][-1] < clocks_by_phase[2][0]
    assert len(gpu.samples) > sum(map(len, clocks_by_phase))  # samples between phases belong to none


def test_off_or_unavailable_records_nothing_and_says_why(telemetry):
    """Off: phases are no-ops. A reader that fails (no driver here) leaves it off with the error named."""
    off = telemetry.GpuTelemetry.off()
    with off.phase("x"):
        pass
    assert off.stop()["phases"] == []

    def broken():
        raise RuntimeError("NVML Shared Library Not Found")

    gpu = telemetry.GpuTelemetry.start(reader=broken)
    with gpu.phase("x"):
        pass
    assert gpu.stop() == {"gpu": {"unavailable": "RuntimeError: NVML Shared Library Not Found"}, "period_s": 0.1,
                          "sample_fields": telemetry.SAMPLE_FIELDS, "phases": []}  # fmt: skip
