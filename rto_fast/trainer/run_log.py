"""What a run records: metrics.jsonl (one JSON object per step), a progress bar, PNG plots and a summary table.

Usage:
    log = MetricsLog(run_dir / "metrics.jsonl")
    log.truncate(stage="sft", after_step=10)            # on resume: drop records the checkpoint does not cover
    log.write({"stage": "sft", "step": 11, "loss": 1.2})
    bar = ProgressBar(total=100, initial=10, desc="sft", enabled=True)
    bar.update(step=11, tokens=2048, loss=1.2)          # shows step, ETA, tokens/s and the loss
    bar.close()
    plots = write_plots(run_dir)                        # run_dir/plots/<stage>.png from metrics.jsonl, plots/eval.png
    text = write_summary(run_dir, plots)                # run_dir/summary.md: the answer, the plots, one row per stage

Plots are drawn with matplotlib's object interface (no pyplot: the process's matplotlib backend is left alone).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

from matplotlib.figure import Figure
from tqdm.auto import tqdm

from .config import RL_MODES
from .layout import EVAL_DIR
from .report import answer_lines, draw_eval_figure, read_eval_result

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.md"
PLOTS_DIR = "plots"
# Per stage, the curves worth a panel each: (train key, eval key or None, title).
STAGE_PANELS = {
    "sft": [("loss", "eval_loss", "NLL per response token"), ("lr", None, "learning rate")],
    "dpo": [("loss", "eval_loss", "DPO loss"), ("reward_margin", "eval_reward_margin", "implicit reward margin"),
            ("reward_accuracy", "eval_reward_accuracy", "reward accuracy"), ("lr", None, "learning rate")],
    "rm": [("loss", "eval_loss", "Bradley-Terry loss"), ("accuracy", "eval_accuracy", "accuracy"),
           ("lr", None, "learning rate")],
}
# The RL stages (rto, ppo, dppo) share their panels; x is the iteration.
RL_PANELS = [("true_reward", "eval_true_reward", "true reward r* (bundled task)"),
             ("dpo_reward", "eval_dpo_reward", "DPO implicit reward"), ("rm_score", "eval_rm_score", "RM score"),
             ("kl", None, "KL(policy || ref) per response"), ("response_length", "eval_length", "response length"),
             ("vf_loss", None, "value loss"), ("clipfrac", None, "clip fraction")]
STAGE_PANELS.update({mode: RL_PANELS for mode in RL_MODES})
# Columns of the summary table, when a stage has them.
SUMMARY_KEYS = ("loss", "eval_loss", "eval_reward_margin", "eval_reward_accuracy", "eval_accuracy", "kl",
                "eval_dpo_reward", "eval_true_reward")


def _json_value(value):
    if hasattr(value, "item"):  # torch / numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN / inf
    return value


class MetricsLog:
    """Append-only metrics.jsonl; each write is flushed and fsynced so a killed run keeps what it logged. `trackers`
    (rto_fast.trackers.Trackers) also receive every record."""

    def __init__(self, path: str | os.PathLike, trackers=None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.trackers = trackers

    def write(self, record: dict) -> None:
        line = json.dumps({key: _json_value(value) for key, value in record.items()})
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if self.trackers is not None:
            self.trackers.log(record)

    def close(self) -> None:
        """Close the trackers (metrics.jsonl needs nothing)."""
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None

    def read(self) -> list[dict]:
        return read_metrics(self.path)

    def truncate(self, stage: str, after_step: int) -> None:
        """Drop `stage` records past `after_step` (a resumed run writes them again), rewriting the file atomically."""
        if not self.path.exists():
            return
        kept = [record for record in self.read()
                if not (record.get("stage") == stage and record.get("step", 0) > after_step)]
        temp = self.path.with_name(self.path.name + ".tmp")
        with open(temp, "w", encoding="utf-8") as handle:
            for record in kept:
                handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, self.path)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a metrics.jsonl; a torn last line (a kill during a write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").split("\n"):  # not splitlines: \x85, \u2028 may sit in strings
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class ProgressBar:
    """tqdm bar over optimizer steps: step/total, ETA, tokens per second and the latest loss."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", enabled: bool = True):
        self._bar = None
        self._tokens = 0
        self._start = time.perf_counter()
        if enabled:
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def update(self, step: int, tokens: int, **values) -> None:
        self._tokens += tokens
        if self._bar is None:
            return
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        postfix = {"tok/s": f"{self._tokens / elapsed:,.0f}"}
        postfix.update({key: f"{value:.4g}" for key, value in values.items() if value is not None})
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ------------------------------------------------------------------------------------------------ end of run

def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _plot_eval(axis, stage: str, points: list[tuple]) -> None:
    """Eval points over the train curve; an RL stage's evaluation at iteration 0 (the policy before any update: the SFT
    model) is also drawn across the panel as the baseline RL has to beat."""
    if not points:
        return
    axis.plot(*zip(*points), "o-", label="eval", markersize=4)
    start = [value for step, value in points if step == 0]
    if stage in RL_MODES and start:
        axis.axhline(start[0], color="gray", linestyle="--", linewidth=1, label="SFT (iteration 0)")


def write_plots(run_dir: str | os.PathLike) -> list[Path]:
    """One PNG per stage (a panel per main curve, eval points over the train curve), and plots/eval.png from the eval
    stage's win rates; returns the files written."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / METRICS_FILE)
    written = []
    result = read_eval_result(run_dir)
    if result is not None:
        written.append(draw_eval_figure(result, run_dir / PLOTS_DIR / f"{EVAL_DIR}.png"))
    stages = list(dict.fromkeys(record.get("stage") for record in records if record.get("stage")))
    for stage in stages:
        stage_records = [record for record in records if record.get("stage") == stage]
        panels = [panel for panel in STAGE_PANELS.get(stage, [("loss", "eval_loss", "loss")])
                  if any(_finite(record.get(panel[0])) for record in stage_records)]
        if not panels:
            continue
        columns = min(4, len(panels))
        rows = math.ceil(len(panels) / columns)
        figure = Figure(figsize=(4.2 * columns, 3.4 * rows))
        axes = figure.subplots(rows, columns, squeeze=False)
        for axis in axes.flat[len(panels):]:
            axis.set_visible(False)
        for axis, (train_key, eval_key, title) in zip(axes.flat, panels):
            points = [(r["step"], r[train_key]) for r in stage_records if _finite(r.get(train_key))]
            if points:
                axis.plot(*zip(*points), label="train", linewidth=1.2)
            if eval_key is not None:
                _plot_eval(axis, stage, [(r["step"], r[eval_key]) for r in stage_records if _finite(r.get(eval_key))])
            axis.set_title(title)
            axis.set_xlabel("iteration" if stage in RL_MODES else "optimizer step")
            axis.grid(alpha=0.3)
            if eval_key is not None:
                axis.legend()
        figure.suptitle(f"{stage} ({run_dir.name})")
        figure.tight_layout()
        path = run_dir / PLOTS_DIR / f"{stage}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
        written.append(path)
    return written


def _format(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summarize(records: list[dict]) -> list[dict]:
    """Per stage: steps, tokens, wall time, tokens/s, the largest step peak of CUDA memory (when logged), the last
    train loss and the last value of each eval metric."""
    rows = []
    for stage in dict.fromkeys(record.get("stage") for record in records if record.get("stage")):
        if stage == EVAL_DIR:  # no steps or tokens: the summary's answer section reports the eval stage
            continue
        stage_records = [record for record in records if record.get("stage") == stage]
        last = stage_records[-1]
        row = {"stage": stage, "steps": last.get("step"), "tokens": last.get("tokens_seen"),
               "time_s": last.get("elapsed_s")}
        if _finite(row["tokens"]) and _finite(row["time_s"]) and row["time_s"] > 0:
            row["tokens_per_s"] = row["tokens"] / row["time_s"]
        for key in SUMMARY_KEYS:
            values = [record[key] for record in stage_records if _finite(record.get(key))]
            if values:
                row[key] = values[-1]
        peaks = [record["peak_memory_mb"] for record in stage_records if _finite(record.get("peak_memory_mb"))]
        if peaks:  # CUDA runs: the stage's largest step peak
            row["peak_memory_mb"] = max(peaks)
        rows.append(row)
    return rows


def summary_table(rows: list[dict]) -> str:
    """A markdown table with one row per stage."""
    columns = ["stage", "steps", "tokens", "time_s", "tokens_per_s"]
    columns += [key for key in ("peak_memory_mb", *SUMMARY_KEYS) if any(key in row for row in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_format(row.get(column)) for column in columns) + " |")
    return "\n".join(lines)


def write_summary(run_dir: str | os.PathLike, plots: list[Path] | tuple = ()) -> str:
    """run_dir/summary.md: the answer (each evaluated model's judge score, the win-rate matrix, the verdict) when the
    eval stage ran, links to `plots`, then the per-stage table; returns the text."""
    run_dir = Path(run_dir)
    lines = [f"# Summary of {run_dir.name}", ""]
    result = read_eval_result(run_dir)
    if result is not None:
        lines += answer_lines(result) + [""]
    if plots:
        lines += ["Plots: " + ", ".join(f"[{Path(path).name}]({Path(path).relative_to(run_dir).as_posix()})"
                                        for path in plots), ""]
    lines += ["Stages:", "", summary_table(summarize(read_metrics(run_dir / METRICS_FILE)))]
    text = "\n".join(lines) + "\n"
    (run_dir / SUMMARY_FILE).write_text(text, encoding="utf-8")
    return text
