"""Sampling responses from a causal LM for rollouts and evaluation.

Usage:
    settings = SamplingSettings(max_new_tokens=64, temperature=1.0, top_p=1.0, top_k=0, batch_size=64)
    rollouts = generate(policy, [prompt_ids, ...], settings, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    rollouts[0].response_ids    # generated tokens up to and including the first eos (when one was generated)
    rollouts[0].finished        # True when the response ended with eos; False when cut at max_new_tokens

Generation runs `model.generate` (KV cache on, whatever the model's config says) on left-padded batches of prompts
of similar length (sorted by length, so little padding is computed), in eval mode, without autograd; the model's
train/eval mode is restored afterwards. Sampling draws from torch's global generator, so a seeded run (and a run
resumed with its RNG state) samples the same responses. `temperature=0` is greedy decoding. `ban_eos=True` masks the
eos token so every response has exactly `max_new_tokens` tokens (benchmarks use it to make two trainers do the same
work). `kv_cache="static"` preallocates the cache (transformers' static cache, which it compiles on CUDA); with
`prompt_width` every batch is left-padded to the same width so that the shapes, and any compiled graph, repeat.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import generation_attention


@dataclass
class SamplingSettings:
    """How responses are sampled. top_k 0 and top_p 1.0 switch those filters off; temperature 0 is greedy."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 64  # prompts per generate call
    ban_eos: bool = False
    kv_cache: str = "dynamic"  # or "static": a preallocated cache
    prompt_width: int = 0  # left-pad every batch's prompts to at least this many tokens (fixed shapes)

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {self.batch_size}")
        if self.kv_cache not in ("dynamic", "static"):
            raise ValueError(f"kv_cache must be dynamic or static, got {self.kv_cache!r}")
        if self.prompt_width < 0:
            raise ValueError(f"prompt_width must be >= 0, got {self.prompt_width}")


@dataclass
class Rollout:
    """One sampled response: its tokens (eos included when generated) and whether it ended with eos."""

    prompt_ids: list[int]
    response_ids: list[int]
    finished: bool


def _generate_kwargs(settings: SamplingSettings, eos_token_id: int, pad_token_id: int) -> dict:
    kwargs = dict(max_new_tokens=settings.max_new_tokens, use_cache=True, pad_token_id=pad_token_id,
                  eos_token_id=eos_token_id, return_dict_in_generate=False)
    if settings.temperature == 0:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p,
                      top_k=settings.top_k if settings.top_k > 0 else None)
    if settings.ban_eos:
        # Never sample eos and never stop early: every response is exactly max_new_tokens long.
        kwargs.update(suppress_tokens=[eos_token_id], eos_token_id=None)
    if settings.kv_cache == "static":
        kwargs.update(cache_implementation="static")
    return kwargs


def cut_at_eos(tokens: list[int], eos_token_id: int | None) -> tuple[list[int], bool]:
    """(tokens up to and including the first eos, whether there was one)."""
    if eos_token_id is not None and eos_token_id in tokens:
        end = tokens.index(eos_token_id)
        return tokens[:end + 1], True
    return tokens, False


@torch.no_grad()
def generate(model, prompts: list[list[int]], settings: SamplingSettings, *, eos_token_id: int,
             pad_token_id: int) -> list[Rollout]:
    """One Rollout per prompt (token-id lists), in the order given. See the module docstring."""
    if not prompts:
        return []
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {index} is empty")
    device = next(model.parameters()).device
    kwargs = _generate_kwargs(settings, eos_token_id, pad_token_id)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Rollout | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        with generation_attention(model):  # switched once for all batches
            for start in range(0, len(order), settings.batch_size):
                chunk = order[start:start + settings.batch_size]
                width = max(settings.prompt_width, *(len(prompts[i]) for i in chunk))
                input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
                attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, index in enumerate(chunk):
                    prompt = prompts[index]
                    input_ids[row, width - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
                    attention_mask[row, width - len(prompt):] = 1
                output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                        **kwargs)
                new_tokens = output[:, width:].tolist()
                for row, index in enumerate(chunk):
                    # generate pads a row only after its eos, so the cut removes all padding.
                    tokens, finished = cut_at_eos(new_tokens[row], None if settings.ban_eos else eos_token_id)
                    results[index] = Rollout(list(prompts[index]), tokens, finished)
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]
