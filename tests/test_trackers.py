"""runtime.report_to: TensorBoard and Weights & Biases (offline) receive what metrics.jsonl records, per stage and
step; a resumed run continues the same wandb run; an unknown tracker or a missing package fails before any model
loads.

    pytest tests/test_trackers.py -q
"""

from __future__ import annotations

import math
import sys
import types

import pytest

from rto_fast.trainer import trackers as trackers_module
from rto_fast.trainer.run_log import read_metrics
from rto_fast.trainer.cli import main

BASE = ["stages=[sft]", "runtime.device=cpu", "runtime.progress_bar=false", "runtime.seed=3",
        "data.max_train_samples=32", "data.max_eval_samples=8", "data.max_prompt_length=32",
        "data.max_response_length=32", "sft.batch_size=8", "sft.micro_batch_tokens=1024", "sft.eval_every=2"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(run_dir, *overrides):
    assert main([*BASE, f"runtime.output_dir={run_dir}", *overrides]) == 0
    return [record for record in read_metrics(run_dir / "metrics.jsonl") if record["stage"] == "sft"]


def test_tensorboard_gets_every_number_of_every_record(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    records = _train(run_dir, "sft.max_steps=3", "runtime.report_to=[tensorboard]")
    events = EventAccumulator(str(run_dir / "tensorboard" / "sft"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"sft/loss", "sft/lr", "sft/tokens_per_s", "sft/eval_loss", "sft/grad_norm"} <= tags
    losses = {event.step: event.value for event in events.Scalars("sft/loss")}
    assert sorted(losses) == [1, 2, 3]
    for record in records:
        if "loss" in record:
            assert math.isclose(losses[record["step"]], record["loss"], rel_tol=1e-6)  # stored as float32
    assert [event.step for event in events.Scalars("sft/eval_loss")] == [2, 3]


def test_tensorboard_hides_what_a_resumed_stage_logs_again(tmp_path):
    """Steps logged after the checkpoint by a killed run are logged again by the resumed run: TensorBoard shows the
    resumed run's values only (purge_step), as metrics.jsonl does."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rto_fast.trainer.trackers import Trackers

    first = Trackers(["tensorboard"], tmp_path, "run", {}, "p")
    for step in (1, 2, 3):
        first.log({"stage": "sft", "step": step, "loss": float(step)})
    first.close()  # killed after step 3; the checkpoint holds step 1
    resumed = Trackers(["tensorboard"], tmp_path, "run", {}, "p")
    for step in (2, 3, 4):
        resumed.log({"stage": "sft", "step": step, "loss": 10.0 * step})
    resumed.log({"stage": "dpo", "step": 1, "loss": 0.7})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard" / "sft"))
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("sft/loss")] == [(1, 1.0), (2, 20.0), (3, 30.0),
                                                                                   (4, 40.0)]
    dpo = EventAccumulator(str(tmp_path / "tensorboard" / "dpo"))
    dpo.Reload()
    assert [event.step for event in dpo.Scalars("dpo/loss")] == [1]


class FakeRun:
    def __init__(self, **kwargs):
        self.init = kwargs
        self.defined, self.logged, self.finished = [], [], False

    def define_metric(self, name, step_metric=None):
        self.defined.append((name, step_metric))

    def log(self, values):
        self.logged.append(values)

    def finish(self):
        self.finished = True


def test_wandb_charts_each_stage_against_its_own_step(tmp_path, monkeypatch):
    runs = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: runs.append(FakeRun(**kwargs)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(trackers_module, "check_trackers", lambda names: None)
    run_dir = tmp_path / "run"
    records = _train(run_dir, "sft.max_steps=2", "runtime.report_to=[wandb]", "runtime.run_name=tiny-sft",
                     "runtime.wandb_project=rto-tests")
    run = runs[0]
    run_id = run.init["id"]
    assert run.init["project"] == "rto-tests" and run.init["name"] == "tiny-sft" and len(run_id) == 8
    assert run.init["resume"] == "allow" and run.init["config"]["sft"]["max_steps"] == 2
    assert ("sft/*", "sft/step") in run.defined and run.finished
    assert [values["sft/step"] for values in run.logged] == [record["step"] for record in records]
    assert run.logged[0]["sft/loss"] == pytest.approx(records[0]["loss"])
    assert all(isinstance(value, (int, float)) for values in run.logged for value in values.values())
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    # A second launch into the same folder (resuming; here the stage is already finished) continues the same run.
    _train(run_dir, "sft.max_steps=2", "runtime.report_to=[wandb]")
    assert runs[1].init["id"] == run_id and runs[1].finished


def test_wandb_offline_run_and_resume(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    _train(run_dir, "sft.max_steps=2", "runtime.report_to=[wandb]")
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    _train(run_dir, "sft.max_steps=2", "runtime.report_to=[wandb]")
    offline_runs = sorted(path.name for path in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(name.endswith(run_id) for name in offline_runs)


def test_unknown_tracker_and_missing_package_fail_before_training(tmp_path, capsys, monkeypatch):
    assert main([*BASE, f"runtime.output_dir={tmp_path / 'a'}", "runtime.report_to=[mlflow]"]) == 2
    assert "runtime.report_to: unknown tracker 'mlflow'" in capsys.readouterr().err
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "wandb"
                        else real_find_spec(name, *args))
    assert main([*BASE, f"runtime.output_dir={tmp_path / 'b'}", "runtime.report_to=[wandb]"]) == 2
    assert "runtime.report_to: wandb needs the wandb package (pip install wandb)" in capsys.readouterr().err
    assert not (tmp_path / "b" / "metrics.jsonl").exists()
