"""Sampling responses from a causal LM for rollouts and evaluation.

Usage:
    settings = SamplingSettings(max_new_tokens=64, temperature=1.0, top_p=1.0, top_k=0, batch_size=64)
    rollouts = generate(policy, [prompt_ids, ...], settings, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    rollouts[0].response_ids    # generated tokens up to and including the first eos (when one was generated)
    rollouts[0].finished        # True when the response ended with eos; False when cut at max_new_tokens

Prompts are grouped into left-padded batches of similar length (sorted by length, so little padding is computed) and
sampled in eval mode without autograd; the model's train/eval mode is restored afterwards. Two engines:
- "rto_fast" (default): our own decode loop over the model's forward. The KV cache is preallocated for the whole
  batch (prompt + max_new_tokens) and written in place (transformers' dynamic cache concatenates the whole cache
  every step), decode steps get a ready (B, 1, 1, L) padding mask under sdpa (no per-step mask building), only the
  last position's logits are computed, rows with the same prompt share one prefill, and finished rows leave the
  batch (the cache rows too) once they are half of it, so a batch whose responses end early stops paying for them.
  On CUDA (`cuda_graph`, default on) the decode step instead runs with fixed shapes over the whole cache and is
  captured once per batch as a CUDA graph and replayed, one launch per step (rows then stay until all are done).
  Sampling: temperature, then top-k, then top-p (the order of transformers' warpers), then one uniform draw per row
  mapped through the cumulative distribution.
  It samples exactly the distribution the settings describe: a checkpoint's generation_config (a repetition
  penalty, say) is not consulted.
- "transformers": `model.generate` (dynamic cache), or with `kv_cache="static"` transformers' static cache, which it
  compiles on CUDA; `prompt_width` then left-pads every batch to the same width so the shapes, and the compiled
  graph, repeat. Temperature, top-k and top-p are passed explicitly; other generation_config entries would apply.
Both draw from torch's global generator, so a seeded run (and a run resumed with its RNG state) samples the same
responses; the two engines do not make the same draws. `temperature=0` is greedy decoding (argmax; the engines then
agree token for token). `ban_eos=True` masks the eos token so every response has exactly `max_new_tokens` tokens
(benchmarks use it to make two trainers do the same work).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import transformers
from transformers import DynamicCache

from .attention import forward_parameters, generation_attention
from .profiling import phase

try:  # per-layer KV caches (transformers >= 4.56); older releases keep one DynamicCache object
    from transformers.cache_utils import DynamicLayer
except ImportError:
    DynamicLayer = None

ENGINES = ("rto_fast", "transformers")
logger = logging.getLogger(__name__)


@dataclass
class SamplingSettings:
    """How responses are sampled. top_k 0 and top_p 1.0 switch those filters off; temperature 0 is greedy."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 64  # prompts per decode batch
    ban_eos: bool = False
    engine: str = "rto_fast"  # or "transformers": model.generate
    cuda_graph: bool = True  # rto_fast engine on CUDA: capture the decode step once, replay it every step
    kv_cache: str = "dynamic"  # transformers engine only: "static" is its preallocated, compilable cache
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
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.kv_cache not in ("dynamic", "static"):
            raise ValueError(f"kv_cache must be dynamic or static, got {self.kv_cache!r}")
        if self.kv_cache == "static" and self.engine != "transformers":
            raise ValueError("kv_cache='static' is transformers' static cache: it needs engine='transformers' (the "
                             "rto_fast engine always preallocates its cache)")
        if self.prompt_width < 0:
            raise ValueError(f"prompt_width must be >= 0, got {self.prompt_width}")


@dataclass
class Rollout:
    """One sampled response: its tokens (eos included when generated) and whether it ended with eos."""

    prompt_ids: list[int]
    response_ids: list[int]
    finished: bool


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
                input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
                if settings.engine == "transformers":
                    output = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                            **_generate_kwargs(settings, eos_token_id, pad_token_id))
                    new_tokens = output[:, width:].tolist()
                else:
                    new_tokens = decode(model, input_ids, attention_mask, settings, eos_token_id=eos_token_id,
                                        pad_token_id=pad_token_id).tolist()
                for row, index in enumerate(chunk):
                    # Rows are padded only after their eos, so the cut removes all padding.
                    tokens, finished = cut_at_eos(new_tokens[row], None if settings.ban_eos else eos_token_id)
                    results[index] = Rollout(list(prompts[index]), tokens, finished)
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------ transformers engine

def _generate_kwargs(settings: SamplingSettings, eos_token_id: int, pad_token_id: int) -> dict:
    kwargs = dict(max_new_tokens=settings.max_new_tokens, use_cache=True, pad_token_id=pad_token_id,
                  eos_token_id=eos_token_id, return_dict_in_generate=False)
    if settings.temperature == 0:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        # top_k 0 explicitly: None would let a checkpoint's generation_config.json (top_k 20 or 50 in some) apply.
        kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    if settings.ban_eos:
        # Never sample eos and never stop early: every response is exactly max_new_tokens long.
        kwargs.update(suppress_tokens=[eos_token_id], eos_token_id=None)
    if settings.kv_cache == "static":
        kwargs.update(cache_implementation="static")
    return kwargs


# ------------------------------------------------------------------------------------------------ sampling

def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(B, V) float logits -> logits with the tokens that may not be drawn at -inf, in transformers' order:
    temperature, top-k (ties at the k-th value stay), top-p (the smallest set of most likely tokens whose
    probability reaches top_p; at least one token). temperature must be > 0. Never writes `logits`; returns it
    as it is when there is nothing to do (temperature 1, no top-k or top-p)."""
    if temperature != 1.0:
        logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_index = torch.sort(logits, dim=-1, descending=True)
        # Probability of everything ranked above each token: a token stays while that is still below top_p (the
        # most likely token has exactly 0 above it, so it always stays).
        sorted_probs = sorted_logits.softmax(dim=-1)
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop = torch.empty_like(drop_sorted).scatter_(-1, sorted_index, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


# draw_tokens: tokens per block of the two-level cumulative distribution. Large enough that the block sums are a
# short row (V / 256), small enough that the chosen block's float64 running sum is nothing.
_DRAW_BLOCK = 256


def draw_tokens(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of (B, V) logits, drawn from their softmax by inverse transform sampling: one uniform
    number per row against the cumulative distribution (torch.multinomial costs ~10x more on CPU at small B).

    The cumulative distribution is taken in two levels. Blocks of `_DRAW_BLOCK` tokens are summed in float32 and
    their running sum (float64) against a float64 uniform number picks a block; inside it, a float64 running sum of
    its tokens picks the token, with the target mapped linearly from the block's float32 sum onto its float64 sum.
    Every token's chance is then its probability to float32's relative precision (1e-7), however small it is: a
    float32 running sum over the row moves in steps of 6e-8 near 1, which rounds the chances of rare tokens to 0
    or to a step (over a 150k vocabulary up to ~0.5% of the mass moved), and a float64 running sum over the whole
    (B, V) costs a float64 copy of it (at 64 x 50304, 60% of a CPU decode step). Short rows and CUDA tensors take
    that single float64 running sum (the same tokens for the same uniform numbers, to float32 rounding)."""
    rows, vocab = logits.shape
    block = _DRAW_BLOCK
    weights = torch.softmax(logits.float(), dim=-1)
    uniform = torch.rand((rows, 1), device=logits.device, generator=generator, dtype=torch.float64)
    if vocab <= 2 * block or logits.is_cuda:
        # One float64 running sum over the row: the fewest operations for a short row, and on a GPU, where that sum
        # is one kernel over a few MB, fewer launches than the two levels' dozen small ones.
        cumulative = weights.double().cumsum(dim=-1)
        tokens = torch.searchsorted(cumulative, uniform * cumulative[:, -1:], right=True)
        return tokens.clamp_(max=vocab - 1).squeeze(-1)
    full = vocab - vocab % block
    block_sums = weights[:, :full].view(rows, -1, block).sum(-1)
    if full < vocab:  # the last, shorter block
        block_sums = torch.cat([block_sums, weights[:, full:].sum(-1, keepdim=True)], dim=1)
    cumulative = block_sums.double().cumsum(dim=-1)
    target = uniform * cumulative[:, -1:]  # scaling by the total absorbs rounding of the sum
    # right=True: the first block (then token) whose cumulative sum exceeds the target, so a zero-probability block
    # or token (equal to its predecessor's cumulative sum) is never drawn.
    chosen = torch.searchsorted(cumulative, target, right=True).clamp_(max=cumulative.shape[1] - 1)
    before = torch.where(chosen > 0, cumulative.gather(1, (chosen - 1).clamp_(min=0)), 0.0)
    columns = chosen * block + torch.arange(block, device=logits.device)
    in_block = torch.where(columns < vocab, weights.gather(1, columns.clamp(max=vocab - 1)), 0.0).double()
    running = in_block.cumsum(dim=-1)
    scaled = (target - before) * (running[:, -1:] / block_sums.double().gather(1, chosen))
    offset = torch.searchsorted(running, scaled, right=True)
    # A target that rounding puts past the block's running sum takes the block's last token with weight.
    last = torch.where(in_block > 0, torch.arange(block, device=logits.device), -1).amax(dim=-1, keepdim=True)
    return (chosen * block + torch.minimum(offset, last)).squeeze(-1)


def next_tokens(logits: torch.Tensor, settings: SamplingSettings, eos_token_id: int) -> torch.Tensor:
    """(B, V) last-position logits -> (B,) tokens under `settings` (banned eos, temperature, top-k/p; greedy at 0)."""
    logits = logits.float()
    if settings.ban_eos:
        logits[:, eos_token_id] = float("-inf")
    if settings.temperature == 0:
        return logits.argmax(dim=-1)
    if settings.temperature != 1.0:  # in place, like the eos ban: these logits are the step's own
        logits.div_(settings.temperature)
    return draw_tokens(filter_logits(logits, 1.0, settings.top_k, settings.top_p))


# ------------------------------------------------------------------------------------------------ rto_fast engine

@functools.cache
def _preallocated_layer_class():
    """A transformers cache layer that writes into a buffer sized for the whole generation and hands out views of
    the filled part (None when this transformers has no per-layer cache API)."""
    if DynamicLayer is None:
        return None

    class PreallocatedLayer(DynamicLayer):
        # A DynamicLayer whose keys/values are views [:, :, :length] of fixed buffers: every inherited query
        # (sequence length, mask sizes) reads the views and stays right.
        def __init__(self, capacity: int, zeroed: bool = False):
            super().__init__()
            self.capacity = capacity
            self.zeroed = zeroed
            self.length = 0
            # Fixed-shape decoding sets this (1,) device tensor: single-token updates then go to that column and
            # the whole buffers are returned (the mask hides the columns not written yet, which hold zeros).
            self.write_column: torch.Tensor | None = None

        def lazy_initialization(self, key_states, value_states):
            self.device = key_states.device
            batch, heads, _, key_dim = key_states.shape
            allocate = key_states.new_zeros if self.zeroed else key_states.new_empty
            self.key_buffer = allocate((batch, heads, self.capacity, key_dim))
            self.value_buffer = allocate((batch, value_states.shape[1], self.capacity, value_states.shape[-1]))
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            if self.write_column is not None and key_states.shape[-2] == 1:
                self.key_buffer.index_copy_(2, self.write_column, key_states)
                self.value_buffer.index_copy_(2, self.write_column, value_states)
                self.keys, self.values = self.key_buffer, self.value_buffer
                return self.keys, self.values
            end = self.length + key_states.shape[-2]
            if end > self.capacity:
                raise RuntimeError(f"KV cache of {self.capacity} positions is full (asked for {end})")
            self.key_buffer[:, :, self.length:end] = key_states
            self.value_buffer[:, :, self.length:end] = value_states
            self.length = end
            self.keys = self.key_buffer[:, :, :end]
            self.values = self.value_buffer[:, :, :end]
            return self.keys, self.values

        def batch_select_indices(self, indices):
            if self.is_initialized:
                self.key_buffer = self.key_buffer[indices]
                self.value_buffer = self.value_buffer[indices]
                self.keys = self.key_buffer[:, :, :self.length]
                self.values = self.value_buffer[:, :, :self.length]

    return PreallocatedLayer


def _new_cache(model, capacity: int, zeroed: bool = False):
    """transformers' DynamicCache for `model` with every plain full-attention layer swapped for a preallocated one
    (sliding-window and other special layers keep their own class); `zeroed` buffers start at 0, not garbage."""
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # an older transformers without per-config layers
        return DynamicCache()
    layer_class = _preallocated_layer_class()
    layers = getattr(cache, "layers", None)
    if layer_class is not None and layers:
        cache.layers = [layer_class(capacity, zeroed) if type(layer) is DynamicLayer else layer for layer in layers]
    return cache


def _can_drop_rows(cache) -> bool:
    """Whether every layer of `cache` can keep a subset of its batch rows (dynamic layers can; linear-attention
    states and the like may not)."""
    layers = getattr(cache, "layers", None)
    if layers is None:  # an older transformers: one DynamicCache object
        return hasattr(cache, "batch_select_indices")
    return all(isinstance(layer, DynamicLayer) for layer in layers)


def _ready_masks(model, cache) -> bool:
    """Whether decode steps may pass a prepared (B, 1, 1, L) boolean mask: transformers >= 5 returns a 4D mask as
    is, sdpa reads booleans (True = attend), and every layer attends to the whole cache (a sliding-window layer
    holds fewer positions). Otherwise decode steps pass the 2D mask and transformers builds each layer's."""
    layer_class = _preallocated_layer_class()
    return (int(transformers.__version__.split(".")[0]) >= 5
            and getattr(model.config, "_attn_implementation", None) == "sdpa"
            and not getattr(model.config, "is_encoder_decoder", False)
            and bool(getattr(cache, "layers", None))
            and all(type(layer) is layer_class for layer in cache.layers))


@torch.no_grad()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, settings: SamplingSettings, *,
           eos_token_id: int, pad_token_id: int, fixed_shapes: bool | None = None,
           share_prefill: bool = True) -> torch.Tensor:
    """The rto_fast decode loop for one left-padded batch: (B, W) prompt ids and their 0/1 mask -> (B, n) new
    tokens, n <= max_new_tokens (the longest response), rows padded with pad_token_id after their eos.

    fixed_shapes (None: on CUDA when settings.cuda_graph and the model allows it) runs every decode step on the whole
    preallocated cache with the same tensors, so that the step is captured once as a CUDA graph and replayed (one
    launch per step instead of a few hundred); rows then stay in the batch until all are done. False: steps attend to
    the filled part of the cache only and finished rows leave the batch. share_prefill: rows with the same prompt
    share one prefill forward (off only to compare in tests)."""
    batch, width = input_ids.shape
    device = input_ids.device
    steps = settings.max_new_tokens
    parameters = forward_parameters(model)
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in parameters else (
        {"num_logits_to_keep": 1} if "num_logits_to_keep" in parameters else {})
    cache_keyword = "cache" if "cache" in parameters else "past_key_values"  # renamed in transformers 5.2x

    takes_positions = "position_ids" in parameters  # models without it place tokens by the cache length

    def forward(ids, mask, positions):
        position_kwargs = {"position_ids": positions} if takes_positions else {}
        output = model(input_ids=ids, attention_mask=mask, use_cache=True, **position_kwargs,
                       **{cache_keyword: cache}, **keep_last)
        return output.logits[:, -1]

    if fixed_shapes is None:
        fixed_shapes = device.type == "cuda" and settings.cuda_graph
    cache = _new_cache(model, width + steps, zeroed=fixed_shapes)
    ready = _ready_masks(model, cache)
    fixed_shapes = fixed_shapes and ready  # needs the whole-cache mask to go to attention as it is
    # Positions count real tokens only (a left-padded row starts at 0), as transformers' generate does.
    positions = (attention_mask.cumsum(-1) - 1).clamp_(min=0)
    # Rows with the same prompt (rl.samples_per_prompt > 1 repeats each one) share one prefill: the distinct
    # prompts run, then their cache rows and last logits are repeated for every row that has them.
    with phase("prefill"):
        distinct, row_of = torch.unique(torch.cat([input_ids, attention_mask], dim=1), dim=0, return_inverse=True)
        if share_prefill and distinct.shape[0] < batch and _can_drop_rows(cache):
            ids, mask = distinct[:, :width], distinct[:, width:]
            logits = forward(ids, mask, (mask.cumsum(-1) - 1).clamp_(min=0))[row_of]
            cache.batch_select_indices(row_of)
        else:
            logits = forward(input_ids, attention_mask, positions)
    stepper = (_FixedShapeSteps if fixed_shapes else _GrowingSteps)(
        forward, cache, attention_mask, positions[:, -1:] + 1, steps, ready=ready,
        use_graph=fixed_shapes and device.type == "cuda")

    tokens = torch.full((batch, steps), pad_token_id, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)  # original row of each active row
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    stop_on_eos = not settings.ban_eos
    # Counting finished rows reads a number back from the device: on CUDA every 8 steps only, so the host keeps
    # queueing steps ahead of the GPU (rows that finish in between just produce padding a few steps longer).
    check_every = 1 if device.type == "cpu" else 8
    produced = steps
    for step in range(steps):
        with phase("sample"):
            chosen = next_tokens(logits, settings, eos_token_id)
        if stop_on_eos:
            chosen = chosen.masked_fill(finished, pad_token_id)
        tokens[rows, step] = chosen
        if stop_on_eos:
            finished |= chosen == eos_token_id
        if step == steps - 1:
            break
        if stop_on_eos and step % check_every == 0:
            done = int(finished.sum())
            if done == finished.numel():
                produced = step + 1
                break
            if stepper.can_drop_rows and done * 2 >= finished.numel():  # once finished rows are half the batch
                keep = (~finished).nonzero().squeeze(-1)
                stepper.keep_rows(keep)
                rows, finished, chosen = rows[keep], finished[keep], chosen[keep]
        with phase("decode_forward"):
            logits = stepper.step(chosen, column=width + step)
    return tokens[:, :produced]


class _GrowingSteps:
    """Decode steps on the filled part of the cache: the mask grows by one column per step; rows can leave."""

    def __init__(self, forward, cache, prompt_mask, next_position, steps, ready, use_graph=False):
        self.forward, self.cache, self.next_position = forward, cache, next_position
        width = prompt_mask.shape[1]
        self.full_mask = torch.ones((prompt_mask.shape[0], width + steps), dtype=prompt_mask.dtype,
                                    device=prompt_mask.device)
        self.full_mask[:, :width] = prompt_mask
        self.ready = self.full_mask.bool()[:, None, None, :] if ready else None
        self.can_drop_rows = _can_drop_rows(cache)

    def keep_rows(self, keep):
        self.cache.batch_select_indices(keep)
        self.next_position, self.full_mask = self.next_position[keep], self.full_mask[keep]
        self.ready = self.ready[keep] if self.ready is not None else None

    def step(self, chosen, column):
        length = column + 1
        mask = self.ready[..., :length] if self.ready is not None else self.full_mask[:, :length]
        logits = self.forward(chosen[:, None], mask, self.next_position)
        self.next_position = self.next_position + 1
        return logits


class _FixedShapeSteps:
    """Decode steps with the same input tensors every time (token, position, a (B, 1, 1, C) mask over the whole
    cache, the cache column to write), updated in place: the step is then one CUDA graph, captured at the first
    step and replayed after. The capture is checked once against an eager step; a capture that fails or disagrees
    is dropped (logged once) and the steps run eagerly on the same tensors."""

    can_drop_rows = False
    _warned = False

    def __init__(self, forward, cache, prompt_mask, next_position, steps, ready=True, use_graph=False):
        self.forward = forward
        batch, width = prompt_mask.shape
        device = prompt_mask.device
        self.mask = torch.zeros((batch, 1, 1, width + steps), dtype=torch.bool, device=device)
        self.mask[:, 0, 0, :width] = prompt_mask.bool()  # later columns turn on as their tokens are written
        self.tokens = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.positions = next_position.clone()
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        for layer in cache.layers:
            layer.write_column = self.column
        self.use_graph = use_graph
        self.graph = None
        self.graph_logits = None
        self.check_next = False

    def _eager(self):
        return self.forward(self.tokens, self.mask, self.positions)

    def step(self, chosen, column):
        self.tokens.copy_(chosen[:, None])
        self.mask[:, 0, 0, column] = True
        self.column.fill_(column)
        if self.graph is not None:
            self.graph.replay()
            logits = self.graph_logits
            if self.check_next:  # the first replay on new inputs against the eager step (same column, same values)
                self.check_next = False
                if not torch.allclose(logits.float(), self._eager().float(), rtol=1e-2, atol=1e-2):
                    self._give_up("the replayed decode step disagrees with the eager one")
                    logits = self._eager()
        elif self.use_graph:
            logits = self._capture()
        else:
            logits = self._eager()
        self.positions.add_(1)
        return logits

    def _capture(self):
        device = self.tokens.device
        with torch.cuda.device(device):  # graphs and streams belong to the current device: make it the model's
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up off the capture stream, as graphs need; also this step's logits
                eager = self._eager().clone()
            torch.cuda.current_stream(device).wait_stream(side)
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self.graph_logits = self._eager()
            except Exception as error:  # noqa: BLE001 - any capture failure falls back to eager steps
                self._give_up(f"capturing the decode step failed ({type(error).__name__}: {error})")
                return eager
        self.graph, self.check_next = graph, True
        return eager

    def _give_up(self, reason: str):
        self.use_graph, self.graph, self.graph_logits = False, None, None
        if not _FixedShapeSteps._warned:
            _FixedShapeSteps._warned = True
            logger.warning("decode runs without a CUDA graph: %s", reason)
