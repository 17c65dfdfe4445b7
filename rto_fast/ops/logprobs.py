"""(being written)"""


def token_logprobs(*args, **kwargs):
    raise NotImplementedError


def linear_token_logprobs(*args, **kwargs):
    raise NotImplementedError
