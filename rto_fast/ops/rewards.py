"""(being written)"""


def token_rewards(*args, **kwargs):
    raise NotImplementedError


def token_rewards_from_logits(*args, **kwargs):
    raise NotImplementedError
