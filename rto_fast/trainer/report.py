"""The answer a run gives: how each evaluated model scores under the judge, who wins per prompt, and whether RL helped
(the top of summary.md), and the eval stage's figure (plots/eval.png).

Usage:
    result = read_eval_result(run_dir)          # eval/win_rates.json as the eval stage wrote it, or None
    lines = answer_lines(result)                # the scores table, the win-rate matrix and the verdict (markdown)
    verdict(result)                             # "RTO beats SFT on 71% of prompts (ties count half); true reward ..."
    draw_eval_figure(result, run_dir / "plots" / "eval.png")   # bars of the scores, heatmap of the win rates

Plots are drawn with matplotlib's object interface (no pyplot: the process's matplotlib backend is left alone).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from matplotlib.figure import Figure

from .config import RL_MODES
from .layout import EVAL_DIR, WIN_RATES_JSON

# How the judges are named in sentences and table headers.
JUDGE_NAMES = {"truth": "true reward r*", "rm": "RM score", "dpo": "DPO reward"}
SHORT_JUDGE_NAMES = {"truth": "true reward", "rm": "RM score", "dpo": "DPO reward"}


def read_eval_result(run_dir: str | Path) -> dict | None:
    """The eval stage's win_rates.json of `run_dir`, or None when the stage has not run (or wrote an older format)."""
    path = Path(run_dir) / EVAL_DIR / WIN_RATES_JSON
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return result if result.get("models") and result.get("matrix") else None


def display_name(name: str) -> str:
    """Stage names as the paper writes them (sft -> SFT); model folders as given."""
    return name.upper() if name in ("sft", "dpo", *RL_MODES) else name


def _judge_stats(result: dict, name: str) -> tuple[float, float | None, int]:
    """(mean, standard deviation over prompts or None, prompts) of model `name` under the judge."""
    judge = result["judge"]
    mean = result["means"][name][judge]
    spread = result.get("stds", {}).get(name, {}).get(judge)
    return mean, spread, int(result["settings"]["num_prompts"])


def _compared(result: dict) -> tuple[str, str] | None:
    """(model, baseline) the verdict is about: the first RL model (RTO when there is one), else the last model, against
    SFT, else against the first model; None with a single model."""
    names = result["models"]
    if len(names) < 2:
        return None
    baseline = "sft" if "sft" in names else names[0]
    rl = [name for name in RL_MODES if name in names]
    others = [name for name in names if name != baseline]
    return (rl[0] if rl else others[-1]), baseline


def verdict(result: dict) -> str:
    """One sentence: does the RL model (else the last one) beat the baseline per prompt, and how the mean moved."""
    pair = _compared(result)
    judge_name = SHORT_JUDGE_NAMES.get(result["judge"], result["judge"])
    if pair is None:
        name = result["models"][0]
        return f"Only {display_name(name)} was evaluated: mean {judge_name} {_judge_stats(result, name)[0]:.2f}."
    model, baseline = pair
    names = result["models"]
    a, b = names.index(model), names.index(baseline)
    rate = result["matrix"][a][b]
    stderr = result.get("stderr", [[0.0] * len(names)] * len(names))[a][b]
    before, after = _judge_stats(result, baseline)[0], _judge_stats(result, model)[0]
    change = f"{judge_name} {before:.1f} -> {after:.1f}"
    if rate > 0.5 and after > before:
        # Two standard errors of the per-prompt win rate: closer to 50% than that is not a win worth the name.
        noise = (f", within noise (standard error {stderr:.0%}): more prompts or seeds are needed to tell"
                 if rate - 0.5 < 2 * stderr else "")
        return (f"{display_name(model)} beats {display_name(baseline)} on {rate:.0%} of prompts (ties count half)"
                f"{noise}; {change}.")
    outcome = "RL did not help here" if model in RL_MODES else "no improvement"
    return (f"{display_name(model)} does not beat {display_name(baseline)}: it wins on {rate:.0%} of prompts (ties "
            f"count half); {change}; {outcome}.")


def answer_lines(result: dict) -> list[str]:
    """Markdown: each model's score under the judge (mean, spread, standard error), the win-rate matrix, the
    verdict."""
    names, judge = result["models"], result["judge"]
    count = int(result["settings"]["num_prompts"])
    judge_name = JUDGE_NAMES.get(judge, judge)
    lines = [f"Each model samples one response to each of {count} test prompts; judge: {judge_name}.", "",
             f"| model | mean {SHORT_JUDGE_NAMES.get(judge, judge)} | sd over prompts | standard error |",
             "|---|---|---|---|"]
    for name in names:
        mean, spread, prompts = _judge_stats(result, name)
        cells = ["-", "-"] if spread is None else [f"{spread:.2f}", f"{spread / math.sqrt(max(prompts, 1)):.2f}"]
        lines.append(f"| {display_name(name)} | {mean:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "Win rate (%) of the row model against the column model, judged per prompt (ties count half):", "",
              "| model | " + " | ".join(display_name(name) for name in names) + " |", "|---|" + "---|" * len(names)]
    for a, name in enumerate(names):
        cells = ["-" if a == b else f"{100 * result['matrix'][a][b]:.1f}" for b in range(len(names))]
        lines.append(f"| {display_name(name)} | " + " | ".join(cells) + " |")
    lines += ["", f"**{verdict(result)}**"]
    return lines


def draw_eval_figure(result: dict, path: Path) -> Path:
    """plots/eval.png: each model's mean judge score with its spread (sd over prompts), and the win-rate matrix."""
    names, judge = result["models"], result["judge"]
    labels = [display_name(name) for name in names]
    stats = [_judge_stats(result, name) for name in names]
    figure = Figure(figsize=(5.0 + 1.1 * len(names), 4.0))
    bars, heat = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.2]})
    spreads = [0.0 if spread is None else spread for _, spread, _ in stats]
    bars.bar(labels, [mean for mean, _, _ in stats], yerr=spreads, capsize=5, color="tab:blue", alpha=0.8)
    bars.set_title(f"mean {SHORT_JUDGE_NAMES.get(judge, judge)} (error bar: sd over prompts)", fontsize=10)
    bars.grid(axis="y", alpha=0.3)
    matrix = [[math.nan if a == b else 100 * result["matrix"][a][b] for b in range(len(names))]
              for a in range(len(names))]
    image = heat.imshow(matrix, cmap="RdBu", vmin=0, vmax=100)
    heat.set_xticks(range(len(names)), labels)
    heat.set_yticks(range(len(names)), labels)
    for a in range(len(names)):
        for b in range(len(names)):
            if a != b:
                heat.text(b, a, f"{matrix[a][b]:.0f}", ha="center", va="center", fontsize=9,
                          color="white" if abs(matrix[a][b] - 50) > 30 else "black")  # readable on dark cells
    heat.set_title("win rate (%) of row against column", fontsize=10)
    figure.colorbar(image, ax=heat, fraction=0.046)
    figure.suptitle(verdict(result), fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


__all__ = ["read_eval_result", "answer_lines", "verdict", "draw_eval_figure", "display_name"]
