"""What to change when a run runs out of device memory: the phase it ran out in, and the settings that shrink it.

`rto_fast.train` catches `torch.OutOfMemoryError` and prints `describe(error, stage, config)`: one line with the stage,
the phase (from the `rto_fast.profiling.phase` ranges the error passed through: "train > policy_backward") and
torch's own first line, then the settings that lower that phase's memory with their current values.
"""

from __future__ import annotations

TRAINING = ("forward", "backward", "prepare")
RL_GENERATION = ("generate", "prefill", "sample", "decode_forward")
RL_SCORING = ("score", "policy_logprobs", "reference_logprobs", "dpo_logprobs", "critic_values", "reward_model_scores",
              "rewards_gae")
RL_TRAINING = ("train", "policy_forward", "policy_loss", "policy_backward", "critic_forward", "critic_loss",
               "critic_backward")


def _settings(config, stage: str, phases: list[str]) -> list[str]:
    """`key=value` of the settings that lower the memory of the innermost known phase of `stage`."""
    model, rl = config.model, config.rl
    innermost = phases[0] if phases else ""
    keep = [f"model.gradient_checkpointing={str(model.gradient_checkpointing).lower()}",
            f"model.fused_output_layer={str(model.fused_output_layer).lower()}"]
    if innermost == "optimizer_step":
        return [f"model.bf16_optimizer={model.bf16_optimizer} (stochastic_rounding: 8 bytes per trained parameter)",
                "runtime.deepspeed with zero_optimization.offload_optimizer"]
    if innermost in RL_GENERATION:
        return [f"rl.generation_batch_size={rl.generation_batch_size}", f"rl.max_new_tokens={rl.max_new_tokens}",
                f"rl.offload_frozen_models={str(rl.offload_frozen_models).lower()}"]
    if innermost in RL_SCORING:
        return [f"rl.micro_batch_tokens={rl.micro_batch_tokens}",
                f"rl.offload_frozen_models={str(rl.offload_frozen_models).lower()}",
                f"model.fused_output_layer={str(model.fused_output_layer).lower()}"]
    if innermost in RL_TRAINING:
        return [f"rl.micro_batch_tokens={rl.micro_batch_tokens}", *keep,
                f"rl.offload_frozen_models={str(rl.offload_frozen_models).lower()}"]
    section = getattr(config, stage, None)
    if innermost in TRAINING and section is not None and hasattr(section, "micro_batch_tokens"):
        extra = ([f"dpo.precompute_ref_logprobs={str(config.dpo.precompute_ref_logprobs).lower()}"]
                 if stage == "dpo" else [])
        return [f"{stage}.micro_batch_tokens={section.micro_batch_tokens}", *keep, *extra]
    return [f"model.bf16_optimizer={model.bf16_optimizer}", *keep, "runtime.deepspeed (ZeRO partitions and offload)"]


def describe(error: BaseException, stage: str, config) -> str:
    """The message for an out-of-memory `error` raised in `stage`."""
    phases = list(getattr(error, "rto_fast_phases", []))
    where = " > ".join(reversed(phases)) or "outside the timed phases (loading models, evaluation)"
    first_line = (str(error).strip().splitlines() or [""])[0]
    return (f"out of device memory in stage {stage}, phase {where} ({first_line}). The last checkpoint is kept: "
            f"rerun to resume. Settings that lower this phase's memory: {'; '.join(_settings(config, stage, phases))}")
