"""(being written)"""


def gae(*args, **kwargs):
    raise NotImplementedError


def ppo_loss(*args, **kwargs):
    raise NotImplementedError


def gae_ppo_loss(*args, **kwargs):
    raise NotImplementedError
