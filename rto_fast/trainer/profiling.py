"""torch.profiler capture of one step of a stage (`runtime.profile_step`), and the named ranges the trainer marks.

Usage:
    with profiled_step(step, context, stage_dir):      # profiles only when step == runtime.profile_step
        ...one optimizer step (SFT, DPO, RM) or one iteration (RL stages)...
    with phase("score"):                                # a named range "rto_fast.score" in traces and tables
        ...

A profiled step writes, in `<stage folder>/profile/`, `step_<N>.trace.json` (a Chrome trace: open it in
https://ui.perfetto.dev or chrome://tracing; `runtime.profile_trace=false` skips it) and `step_<N>.md`: the trainer's phases (generate, score, train,
forward / backward / optimizer ranges) with their wall time, then the operators and kernels that took the most
device time (CUDA) or CPU time. Under several processes every rank writes its own files (`_rank<R>` suffix).
Profiling costs time itself (the step it records runs slower); the steps around it are not affected.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

PHASE_PREFIX = "rto_fast."
TOP_OPERATORS = 30


class _PhaseMemory:
    """While a CUDA step is profiled: per phase name, the most memory allocated at its end and the step's peak
    (the allocator's, reset when the step started) right after it, in bytes. Host-side counters: no sync."""

    def __init__(self, device: torch.device):
        self.device = device
        self.by_phase: dict[str, list[int]] = {}

    def observe(self, name: str) -> None:
        allocated = torch.cuda.memory_allocated(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        seen = self.by_phase.setdefault(name, [0, 0])
        seen[0], seen[1] = max(seen[0], allocated), max(seen[1], peak)


_phase_memory: _PhaseMemory | None = None


class phase:
    """A named range (`rto_fast.<name>`) for profiles; well under a microsecond when no profiler runs (the range is
    only opened under a profiler: a bare record_function costs ~4 us, twice per decode step)."""

    __slots__ = ("name", "_range")

    def __init__(self, name: str):
        self.name = name
        self._range = torch.profiler.record_function(PHASE_PREFIX + name) if _profiler_enabled() else None

    def __enter__(self):
        if self._range is not None:
            self._range.__enter__()
        return self

    def __exit__(self, exc_type, exc, traceback):
        if self._range is not None:
            self._range.__exit__(exc_type, exc, traceback)
        if _phase_memory is not None:
            _phase_memory.observe(self.name)
        if exc is not None and isinstance(exc, torch.OutOfMemoryError):
            # Where it ran out, innermost phase first (rto_fast.memory_advice reads it).
            exc.rto_fast_phases = [*getattr(exc, "rto_fast_phases", []), self.name]
        return False


def _profiler_enabled() -> bool:
    return torch._C._autograd._profiler_enabled()


def reset_step_peak(device: torch.device) -> None:
    """Start a step's peak-memory count (CUDA; nothing elsewhere)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def step_peak_mb(device: torch.device) -> float | None:
    """The most device memory allocated since `reset_step_peak` (MiB; None off CUDA, where no allocator counts)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


@contextlib.contextmanager
def profiled_step(step: int, context, stage_dir: Path):
    """Profile the enclosed code when `step` (1-based) is `runtime.profile_step`; otherwise do nothing."""
    wanted = context.config.runtime.profile_step
    if not wanted or step != wanted:
        yield
        return
    device = context.device
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    global _phase_memory
    _phase_memory = _PhaseMemory(device) if device.type == "cuda" else None
    try:
        with torch.profiler.profile(activities=activities) as profiler:
            yield
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the step's kernels belong to its trace
        memory = _phase_memory
    finally:
        _phase_memory = None
    dist = context.dist
    suffix = f"_rank{dist.rank}" if dist.parallel else ""
    folder = Path(stage_dir) / "profile"
    folder.mkdir(parents=True, exist_ok=True)
    summary = folder / f"step_{step}{suffix}.md"
    summary.write_text("\n".join(summary_lines(profiler, step, device, memory)) + "\n", encoding="utf-8")
    written = [summary]
    if context.config.runtime.profile_trace:
        written.append(folder / f"step_{step}{suffix}.trace.json")
        profiler.export_chrome_trace(str(written[-1]))
    logger.info("profiled step %d: %s", step, " and ".join(str(path) for path in written))


def _device_us(event, self_only: bool) -> float:
    name = "self_device_time_total" if self_only else "device_time_total"
    legacy = "self_cuda_time_total" if self_only else "cuda_time_total"
    return float(getattr(event, name, getattr(event, legacy, 0.0)) or 0.0)


def summary_lines(profiler, step: int, device: torch.device, memory: _PhaseMemory | None = None) -> list[str]:
    """Markdown: the trainer's phases (with memory on CUDA), then the top operators by self device time (CUDA) or
    self CPU time."""
    events = profiler.key_averages()
    on_device = device.type == "cuda"
    phases = sorted((event for event in events if event.key.startswith(PHASE_PREFIX)),
                    key=lambda event: -event.cpu_time_total)
    header, rule = "| range | calls | wall ms |", "|---|---|---|"
    if on_device:
        header, rule = header + " device ms inside |", rule + "---|"
    if memory is not None:
        header += " allocated MiB at its end | step peak MiB after it |"
        rule += "---|---|"
    lines = [f"# Profile of step {step} ({device.type})", "",
             "## Phases (named ranges; nested ranges are included in their parents)", "", header, rule]
    for event in phases:
        name = event.key[len(PHASE_PREFIX):]
        row = f"| {name} | {event.count} | {event.cpu_time_total / 1e3:.2f} |"
        if on_device:
            row += f" {_device_us(event, False) / 1e3:.2f} |"
        if memory is not None:
            allocated, peak = memory.by_phase.get(name, (0, 0))
            row += f" {allocated / 2**20:,.0f} | {peak / 2**20:,.0f} |"
        lines.append(row)
    if memory is not None:
        lines += ["", "Memory: the step's peak counts from the step's start (the allocator's peak is reset there); "
                      "the phase after which it first reaches its final value is where the peak happens."]
    operators = [event for event in events if not event.key.startswith(PHASE_PREFIX)]
    if on_device:
        operators = [event for event in operators if _device_us(event, True) > 0]
        total = sum(_device_us(event, True) for event in operators) or 1.0
        operators.sort(key=lambda event: -_device_us(event, True))
        lines += ["", f"## Top {TOP_OPERATORS} operators and kernels by self device time "
                      f"(all: {total / 1e3:.2f} ms)", "",
                  "| operator / kernel | calls | self device ms | share | self CPU ms |", "|---|---|---|---|---|"]
        for event in operators[:TOP_OPERATORS]:
            device_us = _device_us(event, True)
            lines.append(f"| {_cell(event.key)} | {event.count} | {device_us / 1e3:.2f} | "
                         f"{device_us / total:.1%} | {event.self_cpu_time_total / 1e3:.2f} |")
    else:
        total = sum(event.self_cpu_time_total for event in operators) or 1.0
        operators.sort(key=lambda event: -event.self_cpu_time_total)
        lines += ["", f"## Top {TOP_OPERATORS} operators by self CPU time (all: {total / 1e3:.2f} ms)", "",
                  "| operator | calls | self CPU ms | share | CPU ms with children |", "|---|---|---|---|---|"]
        for event in operators[:TOP_OPERATORS]:
            lines.append(f"| {_cell(event.key)} | {event.count} | {event.self_cpu_time_total / 1e3:.2f} | "
                         f"{event.self_cpu_time_total / total:.1%} | {event.cpu_time_total / 1e3:.2f} |")
    return lines


def _cell(name: str, width: int = 90) -> str:
    name = name.replace("|", "/").replace("\n", " ")
    return name if len(name) <= width else name[:width - 3] + "..."
