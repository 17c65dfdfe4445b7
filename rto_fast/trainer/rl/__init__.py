"""The RL stages RTO, PPO and DPPO: `stage` (the models and one iteration per step of the training loop), `rollout`
(sample, score, rewards, advantages) and `update` (the PPO epochs)."""

from .rollout import RolloutBatch, explained_variance, whiten
from .stage import AdaptiveKLController, RLStage, evaluate_policy

__all__ = ["RLStage", "RolloutBatch", "AdaptiveKLController", "evaluate_policy", "whiten", "explained_variance"]
