"""rto_fast.trainer.profiling: the per-step peak memory the trainer logs on CUDA and the per-phase memory of a profiled
step, with CUDA's allocator counters replaced by fakes (these machines have no GPU); the profiled runs themselves are
tested in test_train.py and test_rl_loop.py.

    pytest tests/test_profiling.py -q
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from rto_fast.trainer import profiling


class FakeAllocator:
    """torch.cuda's memory counters over a scripted allocation history (bytes)."""

    def __init__(self):
        self.allocated = 0
        self.peak = 0

    def allocate(self, size):
        self.allocated += size
        self.peak = max(self.peak, self.allocated)

    def free(self, size):
        self.allocated -= size

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: self.allocated)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                            lambda device=None: setattr(self, "peak", self.allocated))


def test_step_peak_counts_from_the_reset_and_only_on_cuda(monkeypatch):
    allocator = FakeAllocator()
    allocator.install(monkeypatch)
    cuda = SimpleNamespace(type="cuda")
    allocator.allocate(5 * 2**20)
    allocator.free(4 * 2**20)  # an earlier step's peak of 5 MiB
    profiling.reset_step_peak(cuda)
    allocator.allocate(2 * 2**20)
    allocator.free(2 * 2**20)
    assert profiling.step_peak_mb(cuda) == 3.0
    assert profiling.step_peak_mb(torch.device("cpu")) is None
    profiling.reset_step_peak(torch.device("cpu"))  # nothing to reset off CUDA
    assert profiling.step_peak_mb(cuda) == 3.0


def test_phase_memory_names_the_phase_where_the_peak_happens(monkeypatch):
    allocator = FakeAllocator()
    allocator.install(monkeypatch)
    memory = profiling._PhaseMemory(SimpleNamespace(type="cuda"))
    monkeypatch.setattr(profiling, "_phase_memory", memory)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        with profiling.phase("score"):
            allocator.allocate(100 * 2**20)
            allocator.free(60 * 2**20)
        with profiling.phase("train"):
            for _ in range(2):
                with profiling.phase("policy_forward"):
                    allocator.allocate(300 * 2**20)
                with profiling.phase("policy_backward"):
                    allocator.free(300 * 2**20)
    assert memory.by_phase["score"] == [40 * 2**20, 100 * 2**20]
    assert memory.by_phase["policy_forward"] == [340 * 2**20, 340 * 2**20]
    assert memory.by_phase["policy_backward"] == [40 * 2**20, 340 * 2**20]
    lines = profiling.summary_lines(profiler, 3, torch.device("cpu"), memory)
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ")}
    assert rows["policy_forward"].endswith("| 2 | " + rows["policy_forward"].split(" | ")[2] + " | 340 | 340 |")
    assert rows["score"].endswith(" | 40 | 100 |")
    assert "allocated MiB at its end" in "\n".join(lines)


def test_phase_outside_a_profiled_step_records_no_memory():
    assert profiling._phase_memory is None
    with profiling.phase("anything") as active:
        pass
    assert active.name == "anything"


def test_run_summary_shows_each_stage_s_largest_step_peak():
    from rto_fast.trainer.run_log import summarize, summary_table

    records = [{"stage": "sft", "step": 1, "tokens_seen": 10, "elapsed_s": 1.0, "loss": 2.0, "peak_memory_mb": 900},
               {"stage": "sft", "step": 2, "tokens_seen": 20, "elapsed_s": 2.0, "loss": 1.5, "peak_memory_mb": 1200},
               {"stage": "sft", "step": 3, "tokens_seen": 30, "elapsed_s": 3.0, "loss": 1.2, "peak_memory_mb": 1100},
               {"stage": "dpo", "step": 1, "tokens_seen": 8, "elapsed_s": 1.0, "loss": 0.6}]
    rows = summarize(records)
    assert rows[0]["peak_memory_mb"] == 1200 and "peak_memory_mb" not in rows[1]
    table = summary_table(rows).splitlines()
    assert table[0].startswith("| stage | steps | tokens | time_s | tokens_per_s | peak_memory_mb | loss |")
    assert table[2].split(" | ")[5] == "1200" and table[3].split(" | ")[5] == "-"
    no_memory = summary_table(summarize(records[3:])).splitlines()[0]
    assert "peak_memory_mb" not in no_memory  # CPU runs: no column
