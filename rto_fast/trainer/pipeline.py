"""How the stages feed each other: which model each stage starts from and writes, and what each needs. The CLI's
preflight, the stages themselves, the RL stages and the eval stage all ask here, so every rule is written once.

Usage:
    wiring = Wiring.of(context)                 # during a run: finished stages, explicit model.* paths, run folder
    wiring.start("dpo")                         # the model the dpo stage starts from (the SFT model)
    wiring.output("rm")                         # the reward model's folder, or None
    wiring.rl_models("rto")                     # policy, reference, dpo, reward, critic (PipelineError if missing)
    Wiring(config, run_dir, planned=True).check()   # preflight: every listed stage finds its inputs

The rules:
- a stage's output is the explicit model.* path when one is set (model.sft_path, dpo_path, reward_path), else the
  folder this run (or an earlier run in the same folder) wrote, `<stage>/model`; with `planned` (before anything
  runs) a stage the config lists counts as if it had written its folder;
- sft starts from model.name_or_path; every later stage from the SFT model (model.name_or_path without one);
- the references of DPO and RL are model.ref_path, else the stage's starting model; the eval stage's and the
  diagnostics' reference is model.ref_path, else the SFT model;
- rto and dppo need the DPO model (rto with rl.true_reward dense does not); a stage uses the reward model's score
  when rl.reward_model says so, by default ppo only (not with rl.true_reward sparse); pairs samples from the SFT
  model;
- the critic starts from model.critic_path, else the reward model (rl.critic_init rm, or auto when there is one),
  else the policy's starting model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..tasks import get_task
from .config import RL_MODES, Config
from .layout import MODEL_DIR

# Which explicit model.* path stands for a stage's output.
EXPLICIT_PATHS = {"sft": "sft_path", "dpo": "dpo_path", "rm": "reward_path"}


class PipelineError(ValueError):
    """A stage whose input model no stage, explicit path or earlier run provides; the message names both."""


def uses_reward_model(config: Config, mode: str) -> bool:
    """Whether RL stage `mode` adds the reward model's score at the last token (rl.reward_model; null: ppo only)."""
    rl = config.rl
    if rl.reward_model is not None:
        return rl.reward_model
    return mode == "ppo" and rl.true_reward != "sparse"


def needs_dpo_model(config: Config, mode: str) -> bool:
    """Whether RL stage `mode` needs the DPO model for its reward (rto and dppo, unless the dense oracle)."""
    return mode in ("rto", "dppo") and not (mode == "rto" and config.rl.true_reward == "dense")


def prompt_data_config(config: Config):
    """The data settings RL and eval prompts come from: rl.prompts (format 'prompt') when set, else data.* read as
    prompts (a bundled task's prompt split when data.source names one)."""
    if config.rl.prompts is not None:
        return dataclasses.replace(config.data, source=config.rl.prompts, format="prompt", data_dir=None)
    if get_task(config.data.source) is not None:
        return dataclasses.replace(config.data, format="prompt")
    return config.data


@dataclass
class Wiring:
    """The stage graph of one run folder. `outputs`: folders of the stages finished in this process; `planned`:
    count the stages the config lists as finished (preflight, before any runs)."""

    config: Config
    run_dir: Path
    outputs: dict = field(default_factory=dict)
    planned: bool = False

    @classmethod
    def of(cls, context) -> "Wiring":
        return cls(context.config, Path(context.run_dir), context.outputs)

    def output(self, name: str) -> Path | None:
        """The folder stage `name`'s output is in, or None when there is none (see the module docstring)."""
        explicit = EXPLICIT_PATHS.get(name)
        if explicit and getattr(self.config.model, explicit):
            return Path(getattr(self.config.model, explicit))
        if name in self.outputs:
            return Path(self.outputs[name])
        folder = self.run_dir / name / MODEL_DIR
        if folder.is_dir() or (self.planned and name in self.config.stages):
            return folder
        return None

    def start(self, name: str) -> str:
        """The model stage `name` starts from."""
        if name == "sft":
            return self.config.model.name_or_path
        sft = self.output("sft")
        return str(sft) if sft is not None else self.config.model.name_or_path

    def reference(self, name: str) -> str:
        """The frozen reference of the dpo stage or of an RL stage."""
        return self.config.model.ref_path or self.start(name)

    def judge_reference(self) -> Path | None:
        """The reference of the DPO judge (eval, diagnostics): model.ref_path, else the SFT model."""
        ref = self.config.model.ref_path
        return Path(ref) if ref else self.output("sft")

    def rl_models(self, mode: str) -> dict[str, str | None]:
        """policy, reference, dpo, reward (None when not there) and critic of RL stage `mode`; PipelineError naming
        what is missing."""
        policy = self.start(mode)
        dpo, reward = self.output("dpo"), self.output("rm")
        if needs_dpo_model(self.config, mode) and dpo is None:
            raise PipelineError(f"stage {mode} needs the DPO model: list the dpo stage before it or set "
                                "model.dpo_path")
        if uses_reward_model(self.config, mode) and reward is None:
            raise PipelineError(f"stage {mode} uses a reward model's score (rl.reward_model): list the rm stage "
                                "before it or set model.reward_path")
        critic = self.config.model.critic_path
        if critic is None:
            choice = self.config.rl.critic_init
            if choice == "rm" and reward is None:
                raise PipelineError("rl.critic_init: rm, but there is no reward model (rm stage or "
                                    "model.reward_path)")
            critic = str(reward) if choice == "rm" or (choice == "auto" and reward is not None) else policy
        return {"policy": policy, "reference": self.reference(mode), "dpo": None if dpo is None else str(dpo),
                "reward": None if reward is None else str(reward), "critic": str(critic)}

    def check(self) -> None:
        """Every listed stage finds its inputs (use with planned=True before a run); PipelineError if not."""
        if "pairs" in self.config.stages and self.output("sft") is None:
            raise PipelineError("stage pairs samples from the SFT model: list the sft stage before it or set "
                                "model.sft_path")
        for mode in (stage for stage in self.config.stages if stage in RL_MODES):
            self.rl_models(mode)
        if "eval" in self.config.stages and self.config.eval.models is not None:
            # A stage name the run never trains would only be skipped at the end, after all the training.
            for name in self.config.eval.models:
                if name in ("sft", "dpo", *RL_MODES) and self.output(name) is None:
                    raise PipelineError(f"eval.models: {name!r} is not trained by this config (stages "
                                        f"{', '.join(self.config.stages)}) and {self.run_dir / name / MODEL_DIR} "
                                        "does not exist: list only models the run has, or leave eval.models null")


__all__ = ["Wiring", "PipelineError", "uses_reward_model", "needs_dpo_model", "prompt_data_config",
           "EXPLICIT_PATHS"]
