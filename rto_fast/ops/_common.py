"""Backend choice and input checks shared by every op in `rto_fast.ops`.

Backends (DESIGN.md): CUDA tensors run the Triton kernels, CPU tensors run a vectorized torch (or C++) path,
and `RTO_FAST_BACKEND=triton|torch|reference` forces one. With `TRITON_INTERPRET=1` set before triton is
imported, the forced `triton` backend runs the kernels on CPU tensors through Triton's interpreter.
"""

from __future__ import annotations

import math
import os

import torch

BACKENDS = ("triton", "torch", "reference")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def backend_for(tensor: torch.Tensor) -> str:
    """The backend an op runs on for inputs living where `tensor` lives."""
    forced = os.environ.get("RTO_FAST_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"RTO_FAST_BACKEND: unknown backend {forced!r}; expected one of {BACKENDS}")
        return forced
    return "triton" if tensor.is_cuda else "torch"


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_tensor(name: str, tensor, *, dtypes=None, ndim=None, device=None) -> None:
    """Raise TypeError / ValueError naming `name` when `tensor` is not a tensor of the expected kind."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if dtypes is not None and tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name}: dtype {str(tensor.dtype).replace('torch.', '')} is not supported; "
                         f"expected one of {allowed}")
    if ndim is not None and tensor.dim() not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(tensor.shape)}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name}: on {tensor.device}, but the other inputs are on {device}")


def check_devices(*named_tensors) -> None:
    """Every tensor on the device of the first one, `(name, tensor)` pairs in argument order; None and non-tensors
    are skipped (their own checks name them). The error names the tensor that differs, not the first input."""
    present = [(name, tensor) for name, tensor in named_tensors if isinstance(tensor, torch.Tensor)]
    if not present:
        return
    first_name, first = present[0]
    for name, tensor in present[1:]:
        if tensor.device != first.device:
            raise ValueError(f"{name}: on {tensor.device}, but {first_name} is on {first.device}; every tensor "
                             f"argument must be on one device")


def check_number(name: str, value, allow_none: bool = False) -> None:
    """A Python int or float (not a bool, not a tensor), or None where allowed."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")


def check_range(name: str, value, low=None, high=None, *, allow_none: bool = False, low_open: bool = False) -> None:
    """A number inside [low, high] (or (low, high] with low_open); NaN, inf beyond a bound, or None where not
    allowed raise an error that names the argument and its range. A missing bound only excludes NaN and inf."""
    check_number(name, value, allow_none=allow_none)
    if value is None:
        return
    above_low = low is None or (value > low if low_open else value >= low)
    below_high = high is None or value <= high
    if not (above_low and below_high and math.isfinite(value)):
        left = "(" if low_open or low is None else "["
        allowed = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}" + \
            (")" if high is None else "]")
        if low is None and high is None:
            allowed = "finite"
        raise ValueError(f"{name}: must be {'in ' if allowed != 'finite' else ''}{allowed}, got {value}")


def check_mask(mask) -> None:
    """A response mask: a bool tensor with at least one dimension."""
    check_tensor("mask", mask)
    if mask.dtype != torch.bool:
        raise ValueError(f"mask: expected dtype bool, got {str(mask.dtype).replace('torch.', '')}")
    if mask.dim() < 1:
        raise ValueError("mask: expected at least one dimension, got a 0-d tensor")


def check_same_shape(name: str, tensor: torch.Tensor, expected_shape, expected_name: str) -> None:
    if tuple(tensor.shape) != tuple(expected_shape):
        raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not match {expected_name} "
                         f"shape {tuple(expected_shape)}")


LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


def check_labels(labels: torch.Tensor, vocab_size: int, ignore_index, *, name: str = "labels",
                 item: str = "label") -> None:
    """Labels must be integer and inside [0, vocab_size) unless equal to ignore_index (None: no label is ignored),
    compared in int64 (a uint8 or int16 comparison with vocab_size or ignore_index would wrap around).

    This costs one small reduction over the labels (N integers, not N x V) and one host sync; it is what keeps
    every kernel from reading out of bounds.
    """
    if labels.dtype not in LABEL_DTYPES:
        raise ValueError(f"{name}: expected an integer dtype, got {str(labels.dtype).replace('torch.', '')}")
    if labels.numel() == 0:
        return
    labels = labels.long()
    bad = (labels < 0) | (labels >= vocab_size)
    if ignore_index is not None:
        bad &= labels != ignore_index
    if bool(bad.any()):
        position = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
        ignored = f" and is not ignore_index={ignore_index}" if ignore_index is not None else ""
        raise ValueError(f"{name}: {item} {int(labels[position])} at position {position} is outside "
                         f"[0, {vocab_size}){ignored}")


def check_cu_seqlens(cu_seqlens, total: int, device) -> None:
    """cu_seqlens: int32, 1-D, starts at 0, never decreases, ends at the number of packed positions."""
    check_tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32,), ndim=1, device=device)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected at least 2 entries (0 and N), got {cu_seqlens.numel()}")
    # One read back from the device for all three checks.
    decreasing = (cu_seqlens[1:] < cu_seqlens[:-1]).any().to(cu_seqlens.dtype)
    first, last, decreasing = torch.stack([cu_seqlens[0], cu_seqlens[-1], decreasing]).tolist()
    if first != 0:
        raise ValueError(f"cu_seqlens: must start at 0, starts at {first}")
    if last != total:
        raise ValueError(f"cu_seqlens: must end at the number of packed positions {total}, ends at {last}")
    if decreasing:
        raise ValueError("cu_seqlens: must be non-decreasing")


def check_packed_layout(name: str, tensor: torch.Tensor, cu_seqlens) -> None:
    """With cu_seqlens, tensors must be a packed (N,) or (1, N) stream."""
    if cu_seqlens is not None and not (tensor.dim() == 1 or (tensor.dim() == 2 and tensor.shape[0] == 1)):
        raise ValueError(f"{name}: with cu_seqlens expected a packed (N,) or (1, N) stream, "
                         f"got shape {tuple(tensor.shape)}")


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name}: contains NaN or inf")
