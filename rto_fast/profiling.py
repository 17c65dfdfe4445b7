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


def phase(name: str):
    """A named range (`rto_fast.<name>`) for profiles; costs about a microsecond when no profiler runs."""
    return torch.profiler.record_function(PHASE_PREFIX + name)


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
    with torch.profiler.profile(activities=activities) as profiler:
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the step's kernels belong to its trace
    dist = context.dist
    suffix = f"_rank{dist.rank}" if dist.parallel else ""
    folder = Path(stage_dir) / "profile"
    folder.mkdir(parents=True, exist_ok=True)
    summary = folder / f"step_{step}{suffix}.md"
    summary.write_text("\n".join(summary_lines(profiler, step, device)) + "\n", encoding="utf-8")
    written = [summary]
    if context.config.runtime.profile_trace:
        written.append(folder / f"step_{step}{suffix}.trace.json")
        profiler.export_chrome_trace(str(written[-1]))
    logger.info("profiled step %d: %s", step, " and ".join(str(path) for path in written))


def _device_us(event, self_only: bool) -> float:
    name = "self_device_time_total" if self_only else "device_time_total"
    legacy = "self_cuda_time_total" if self_only else "cuda_time_total"
    return float(getattr(event, name, getattr(event, legacy, 0.0)) or 0.0)


def summary_lines(profiler, step: int, device: torch.device) -> list[str]:
    """Markdown: the trainer's phases, then the top operators by self device time (CUDA) or self CPU time."""
    events = profiler.key_averages()
    on_device = device.type == "cuda"
    phases = sorted((event for event in events if event.key.startswith(PHASE_PREFIX)),
                    key=lambda event: -event.cpu_time_total)
    lines = [f"# Profile of step {step} ({device.type})", "",
             "## Phases (named ranges; nested ranges are included in their parents)", "",
             "| range | calls | wall ms |" + (" device ms inside |" if on_device else ""),
             "|---|---|---|" + ("---|" if on_device else "")]
    for event in phases:
        row = f"| {event.key[len(PHASE_PREFIX):]} | {event.count} | {event.cpu_time_total / 1e3:.2f} |"
        lines.append(row + (f" {_device_us(event, False) / 1e3:.2f} |" if on_device else ""))
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
