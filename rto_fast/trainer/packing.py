"""Packed micro-batches: sequences of different lengths in one `(1, N)` stream under a token budget, no padding.

Usage:
    sequences = [TokenizedSequence(input_ids=[...], label_mask=[...]), ...]   # or dicts with the same keys
    batches = build_micro_batches(sequences, max_tokens=4096)                  # list[PackedBatch]
    per_rank = build_rank_micro_batches(sequences, max_tokens=4096, num_ranks=2)   # equal counts per rank
    output = rto_fast.attention.packed_forward(model, batches[0])
    logprobs = rto_fast.ops.token_logprobs(output.logits, batches[0].labels)    # (1, N), 0 where labels = -100
    per_sequence = sequence_sums(logprobs, batches[0])                         # (S,), in packed order

Conventions (DESIGN.md "Traps"):
- `labels[t]` is the token at t+1 of the SAME sequence when `label_mask[t+1]` is True, else -100; each sequence's
  last position is -100, so no label ever crosses a sequence boundary.
- `response_mask = labels != -100`: aligned with labels and log-probs (True where the next token is trained on),
  which is the mask the `rto_fast.ops` functions take together with `cu_seqlens`.
- `position_ids` restart at 0 for every sequence; `cu_seqlens` (int32, S+1) are the sequence boundaries.
- `sequence_index[s]` is the position in the caller's list of the s-th packed sequence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass
class TokenizedSequence:
    """One sequence: token ids and, per token, whether it is trained on (True on response tokens).
    label_mask None: every token after the first is trained on."""

    input_ids: Sequence[int]
    label_mask: Sequence[bool] | None = None


@dataclass
class PackedBatch:
    """Sequences packed into one stream. N = total tokens, S = number of sequences."""

    input_ids: torch.Tensor  # (1, N) int64
    position_ids: torch.Tensor  # (1, N) int64, 0 at each sequence start
    cu_seqlens: torch.Tensor  # (S+1,) int32, sequence boundaries
    labels: torch.Tensor  # (1, N) int64, next token of the same sequence or -100
    response_mask: torch.Tensor  # (1, N) bool, labels != -100
    sequence_index: torch.Tensor  # (S,) int64, index in the caller's list of each packed sequence
    max_seqlen: int  # longest sequence, as flash-style attention wants it
    # (K,) int64, the positions with a label (response_mask's nonzero), found on the host when packing: selecting
    # them on a GPU then needs no device-to-host sync.
    label_positions: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_sequences(self) -> int:
        return self.sequence_index.numel()

    @property
    def seqlens(self) -> torch.Tensor:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        moved = {}
        for item in fields(self):
            value = getattr(self, item.name)
            moved[item.name] = value.to(device, non_blocking=non_blocking) if torch.is_tensor(value) else value
        return PackedBatch(**moved)


# ------------------------------------------------------------------------------------------------ planning

def _check_lengths(lengths: Sequence[int], max_tokens: int) -> np.ndarray:
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if lengths.size and lengths.min() <= 0:
        index = int(np.argmin(lengths))
        raise ValueError(f"sequence {index} has length {int(lengths[index])}; every sequence needs a token")
    too_long = np.flatnonzero(lengths > max_tokens)
    if too_long.size:
        index = int(too_long[0])
        raise ValueError(f"sequence {index} has {int(lengths[index])} tokens, more than the micro-batch budget "
                         f"max_tokens={max_tokens} ({too_long.size} sequence(s) too long); truncate the data to at "
                         "most the budget or raise it")
    return lengths


def first_fit_decreasing(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Bins of sequence indices, each with at most `max_tokens` tokens: first-fit-decreasing.

    Plain Python (with numpy for the first-fit scan): it runs once per batch over at most thousands of lengths,
    where it takes milliseconds, next to seconds of model compute. Ties keep the input order, so the plan is
    deterministic. Bins come in the order they were opened; indices inside a bin in decreasing length."""
    lengths = _check_lengths(lengths, max_tokens)
    order = np.argsort(-lengths, kind="stable")
    remaining = np.empty(len(lengths), dtype=np.int64)  # free tokens per open bin
    bins: list[list[int]] = []
    for index in order.tolist():
        length = lengths[index]
        fits = np.flatnonzero(remaining[: len(bins)] >= length)
        if fits.size:
            target = int(fits[0])
            bins[target].append(index)
            remaining[target] -= length
        else:
            remaining[len(bins)] = max_tokens - length
            bins.append([index])
    return bins


def _split_largest_bin(bins: list[list[int]], lengths: np.ndarray) -> bool:
    """Split the bin with the most tokens among those holding 2+ sequences into two halves of near-equal tokens."""
    candidates = [b for b in range(len(bins)) if len(bins[b]) > 1]
    if not candidates:
        return False
    target = max(candidates, key=lambda b: int(lengths[bins[b]].sum()))
    first, second, first_tokens, second_tokens = [], [], 0, 0
    for index in sorted(bins[target], key=lambda i: -lengths[i]):
        if first_tokens <= second_tokens:
            first.append(index)
            first_tokens += int(lengths[index])
        else:
            second.append(index)
            second_tokens += int(lengths[index])
    bins[target:target + 1] = [first, second]
    return True


def balance_across_ranks(bins: list[list[int]], lengths: Sequence[int], num_ranks: int,
                         max_tokens: int | None = None) -> list[list[list[int]]]:
    """Deal bins to `num_ranks` data-parallel ranks: every rank gets the same number of micro-batches (so all take
    the same number of forward/backward steps) and near-equal tokens.

    Bins are split (never merged, so the budget still holds) until their count is a multiple of num_ranks; then
    the longest-processing-time rule deals them, largest first, to the rank with the fewest tokens among those
    that still have room; last, single sequences move or swap between the heaviest and lightest ranks while that
    narrows the gap, keeping every bin within `max_tokens` (default: the fullest bin's tokens)."""
    if num_ranks <= 0:
        raise ValueError(f"num_ranks must be positive, got {num_ranks}")
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    bins = [list(b) for b in bins]
    num_sequences = sum(len(b) for b in bins)
    if num_sequences < num_ranks:
        raise ValueError(f"{num_sequences} sequence(s) cannot give each of {num_ranks} ranks a micro-batch")
    while len(bins) % num_ranks or len(bins) < num_ranks:
        if not _split_largest_bin(bins, lengths):
            raise ValueError(f"{num_sequences} sequences that each fill a micro-batch cannot be dealt evenly to "
                             f"{num_ranks} ranks; use a multiple of {num_ranks} sequences or a larger budget")
    per_rank = len(bins) // num_ranks
    bin_tokens = [int(lengths[b].sum()) for b in bins]
    ranks: list[list[list[int]]] = [[] for _ in range(num_ranks)]
    rank_tokens = [0] * num_ranks
    for b in sorted(range(len(bins)), key=lambda b: -bin_tokens[b]):
        open_ranks = [r for r in range(num_ranks) if len(ranks[r]) < per_rank]
        rank = min(open_ranks, key=lambda r: rank_tokens[r])
        ranks[rank].append(bins[b])
        rank_tokens[rank] += bin_tokens[b]
    if num_ranks > 1:
        _even_out(ranks, lengths, max(bin_tokens) if max_tokens is None else max_tokens)
    return [[sorted(b, key=lambda i: -lengths[i]) for b in rank] for rank in ranks]


def _even_out(ranks: list[list[list[int]]], lengths: np.ndarray, max_tokens: int, max_rounds: int = 200) -> None:
    """Move or swap single sequences from the heaviest rank to the lightest while that narrows their gap and
    every bin stays within `max_tokens` (and non-empty). Whole-bin dealing alone leaves gaps of up to ~15%."""
    for _ in range(max_rounds):
        totals = [sum(int(lengths[b].sum()) for b in rank) for rank in ranks]
        heavy, light = int(np.argmax(totals)), int(np.argmin(totals))
        gap = totals[heavy] - totals[light]
        if gap <= 1:
            return
        # Candidates on the heavy side: (bin, slot, length); a bin's only sequence stays.
        heavy_items = [(b, slot, int(lengths[i])) for b, items in enumerate(ranks[heavy]) for slot, i in
                       enumerate(items)]
        heavy_len = np.array([item[2] for item in heavy_items], dtype=np.int64)
        heavy_movable = np.array([len(ranks[heavy][item[0]]) > 1 for item in heavy_items])
        light_free = np.array([max_tokens - int(lengths[b].sum()) for b in ranks[light]], dtype=np.int64)
        light_items = [(b, slot, int(lengths[i])) for b, items in enumerate(ranks[light]) for slot, i in
                       enumerate(items)]
        light_len = np.array([item[2] for item in light_items], dtype=np.int64)
        light_room = light_free[[item[0] for item in light_items]]

        best_gap, action = gap, None
        # Move one sequence: the new gap is |gap - 2 * length|.
        fits = heavy_movable & (heavy_len <= light_free.max()) & (heavy_len < gap)
        if fits.any():
            scores = np.where(fits, np.abs(gap - 2 * heavy_len), gap)
            k = int(np.argmin(scores))
            if scores[k] < best_gap:
                best_gap, action = int(scores[k]), ("move", k)
        # Swap two sequences: the heavy one is longer by delta, which the light bin must have room for.
        delta = heavy_len[:, None] - light_len[None, :]
        valid = (delta > 0) & (delta < gap) & (delta <= light_room[None, :])
        if valid.any():
            scores = np.where(valid, np.abs(gap - 2 * delta), gap)
            k = int(np.argmin(scores))
            if scores.flat[k] < best_gap:
                best_gap, action = int(scores.flat[k]), ("swap", divmod(k, len(light_items)))
        if action is None:
            return
        if action[0] == "move":
            b, slot, length = heavy_items[action[1]]
            index = ranks[heavy][b].pop(slot)
            target = int(np.flatnonzero(light_free >= length)[0])
            ranks[light][target].append(index)
        else:
            h, l = action[1]
            hb, hslot, _ = heavy_items[h]
            lb, lslot, _ = light_items[l]
            ranks[heavy][hb][hslot], ranks[light][lb][lslot] = ranks[light][lb][lslot], ranks[heavy][hb][hslot]


# ------------------------------------------------------------------------------------------------ packing

def _fields_of(sequence, position: int) -> tuple[Sequence[int], Sequence[bool] | None]:
    if isinstance(sequence, Mapping):
        if "input_ids" not in sequence:
            raise ValueError(f"sequence {position} has no 'input_ids'")
        return sequence["input_ids"], sequence.get("label_mask")
    return sequence.input_ids, sequence.label_mask


def pack(sequences: Sequence, indices: Sequence[int] | None = None) -> PackedBatch:
    """Pack `sequences[i] for i in indices` (default: all, in order) into one PackedBatch."""
    if indices is None:
        indices = range(len(sequences))
    indices = list(indices)
    if not indices:
        raise ValueError("cannot pack an empty list of sequences")
    ids_parts, mask_parts, lengths = [], [], []
    for index in indices:
        input_ids, label_mask = _fields_of(sequences[index], index)
        input_ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
        if input_ids.numel() == 0:
            raise ValueError(f"sequence {index} is empty")
        if label_mask is None:
            label_mask = torch.ones(input_ids.numel(), dtype=torch.bool)
        else:
            label_mask = torch.as_tensor(label_mask, dtype=torch.bool).reshape(-1)
            if label_mask.numel() != input_ids.numel():
                raise ValueError(f"sequence {index}: label_mask has {label_mask.numel()} entries for "
                                 f"{input_ids.numel()} tokens")
        ids_parts.append(input_ids)
        mask_parts.append(label_mask)
        lengths.append(input_ids.numel())

    input_ids = torch.cat(ids_parts)
    label_mask = torch.cat(mask_parts)
    seqlens = torch.tensor(lengths, dtype=torch.long)
    ends = seqlens.cumsum(0)
    starts = ends - seqlens
    total = int(ends[-1])
    # Shift within each sequence: position t takes token t+1; a sequence's last position has no next token.
    next_ids = torch.cat([input_ids[1:], input_ids.new_zeros(1)])
    next_trained = torch.cat([label_mask[1:], label_mask.new_zeros(1)])
    next_trained[ends - 1] = False
    labels = torch.where(next_trained, next_ids, torch.full_like(next_ids, IGNORE_INDEX))
    position_ids = torch.arange(total) - torch.repeat_interleave(starts, seqlens)
    cu_seqlens = torch.cat([ends.new_zeros(1), ends]).to(torch.int32)
    return PackedBatch(
        input_ids=input_ids[None],
        position_ids=position_ids[None],
        cu_seqlens=cu_seqlens,
        labels=labels[None],
        response_mask=next_trained[None],
        sequence_index=torch.tensor(indices, dtype=torch.long),
        max_seqlen=int(seqlens.max()),
        label_positions=next_trained.nonzero().squeeze(1),
    )


def _lengths_of(sequences: Sequence) -> list[int]:
    return [len(_fields_of(sequence, position)[0]) for position, sequence in enumerate(sequences)]


def build_micro_batches(sequences: Sequence, max_tokens: int) -> list[PackedBatch]:
    """First-fit-decreasing packing of `sequences` into PackedBatches of at most `max_tokens` tokens each."""
    return [pack(sequences, b) for b in first_fit_decreasing(_lengths_of(sequences), max_tokens)]


def build_rank_micro_batches(sequences: Sequence, max_tokens: int, num_ranks: int) -> list[list[PackedBatch]]:
    """Per data-parallel rank, its PackedBatches: equal counts on every rank, near-equal tokens."""
    lengths = _lengths_of(sequences)
    ranks = balance_across_ranks(first_fit_decreasing(lengths, max_tokens), lengths, num_ranks, max_tokens)
    return [[pack(sequences, b) for b in rank_bins] for rank_bins in ranks]


# ------------------------------------------------------------------------------------------------ unpacking

def sequence_ids(batch: PackedBatch) -> torch.Tensor:
    """(N,) int64: for every packed token, which packed sequence (0..S-1) it belongs to."""
    seqlens = batch.seqlens
    return torch.repeat_interleave(torch.arange(seqlens.numel(), device=seqlens.device), seqlens)


def unpack(values: torch.Tensor, batch: PackedBatch) -> list[torch.Tensor]:
    """Split per-token `values` ((1, N, ...) or (N, ...)) into one tensor per sequence, in packed order."""
    if values.dim() >= 2 and values.shape[0] == 1 and values.shape[1] == batch.num_tokens:
        values = values[0]
    if values.shape[0] != batch.num_tokens:
        raise ValueError(f"values have {values.shape[0]} positions, the batch has {batch.num_tokens} tokens")
    return list(torch.split(values, batch.seqlens.tolist(), dim=0))


def sequence_sums(values: torch.Tensor, batch: PackedBatch, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(S,) float32 sum of per-token `values` ((1, N) or (N,)) over each sequence, counting only `mask` (default:
    `batch.response_mask`). Sequence log-probs for DPO: `sequence_sums(token_logprobs, batch)`."""
    values = values.reshape(-1)
    if values.numel() != batch.num_tokens:
        raise ValueError(f"values have {values.numel()} positions, the batch has {batch.num_tokens} tokens")
    mask = (batch.response_mask if mask is None else mask).reshape(-1).to(values.device)
    segments = sequence_ids(batch).to(values.device)
    masked = torch.where(mask, values.float(), torch.zeros((), dtype=torch.float32, device=values.device))
    return torch.zeros(batch.num_sequences, dtype=torch.float32, device=values.device).index_add(0, segments, masked)


def to_input_order(batches: Sequence[PackedBatch], per_batch_values: Sequence[torch.Tensor],
                   num_sequences: int | None = None) -> torch.Tensor:
    """Gather per-sequence values ((S_b, ...) per batch, packed order) into one tensor in the caller's input order.
    Positions no batch covers (another rank's sequences) are NaN for float values, else 0."""
    if len(batches) != len(per_batch_values):
        raise ValueError(f"{len(batches)} batches but {len(per_batch_values)} value tensors")
    if num_sequences is None:
        num_sequences = 1 + max(int(batch.sequence_index.max()) for batch in batches)
    first = per_batch_values[0]
    fill = float("nan") if first.is_floating_point() else 0
    out = torch.full((num_sequences, *first.shape[1:]), fill, dtype=first.dtype, device=first.device)
    for batch, values in zip(batches, per_batch_values):
        if values.shape[0] != batch.num_sequences:
            raise ValueError(f"values for a batch of {batch.num_sequences} sequences have {values.shape[0]} rows")
        out[batch.sequence_index.to(values.device)] = values
    return out
