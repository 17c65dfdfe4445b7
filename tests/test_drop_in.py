"""Tests of rto_fast.ops.selective_log_softmax, the drop-in for TRL's `trl.trainer.utils.selective_log_softmax`.

    pytest tests/test_drop_in.py -q

TRL's own tests of its function (tests/test_utils.py, class TestSelectiveLogSoftmax: dtypes float64 / float32 /
float16 / bfloat16, index (B, T) and (B, T, K) with K = 1 and 8, V = 1024, tolerance 1e-5) run here against ours,
with one documented change for float16 / bfloat16: TRL compares with `logits.log_softmax(-1).gather` in that dtype
and asks for equality, because its CPU path is that very expression. torch's CPU log_softmax in bfloat16 / float16
rounds the row's sum and its log to that dtype before the subtraction (about 19% of bf16 results then differ from
the float32 result rounded once); ours computes in float32 and rounds once. So in half precision we assert equality
with the float32 log-softmax rounded once to the dtype (one ulp allowed where the (..., K) form's two float32 steps
land on the other side of a rounding boundary) and a maximum error against float64 no larger than TRL's.
Both backends run ('triton' through the interpreter on CPU), with fresh random inputs.
"""

from __future__ import annotations

import pytest
import torch

import rto_fast.ops as ops
from tests.utils import assert_within_budget

BACKENDS = ["triton", "torch"]
HALF = (torch.float16, torch.bfloat16)


def naive(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """TRL's definition: gather(log_softmax(logits / T)) with index (..., K), or (...) unsqueezed and squeezed."""
    single = index.dim() == logits.dim() - 1
    picked = torch.gather((logits / temperature).log_softmax(-1), -1, index.unsqueeze(-1) if single else index)
    return picked.squeeze(-1) if single else picked


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at |values| (float64), for one-rounding-step comparisons."""
    magnitude = values.double().abs().clamp(min=torch.finfo(dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude))) * torch.finfo(dtype).eps


def make_index(shape, vocab_size, k, device):
    return torch.randint(0, vocab_size, (*shape, k) if k else shape, device=device)


# ---------------------------------------------------------------------------------------------------------------
# TRL's test cases
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [None, 1, 8])  # None: TRL's test_selective_log_softmax; 1, 8: its multi_index test
def test_trl_cases(backend, device, dtype, k):
    vocab_size, batch_size, seq_len = 1024, 4, 32
    index = make_index((batch_size, seq_len), vocab_size, k, device)
    logits = torch.randn(batch_size, seq_len, vocab_size, dtype=dtype, device=device)
    actual = ops.selective_log_softmax(logits, index)
    expected = naive(logits, index)
    assert actual.shape == index.shape and actual.dtype == dtype
    if dtype not in HALF:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        return
    rounded_once = naive(logits.float(), index).to(dtype)
    steps = (actual.double() - rounded_once.double()).abs() / ulp(rounded_once, dtype)
    assert steps.max().item() <= 1.0, f"{steps.max().item()} ulps from the float32 result rounded once"
    assert (steps > 0).float().mean().item() < 0.01  # a boundary case, not a habit
    truth = naive(logits.double(), index)
    ours_error = (actual.double() - truth).abs().max().item()
    torch_error = (expected.double() - truth).abs().max().item()
    assert ours_error <= torch_error * 1.0001, f"error {ours_error:.3e} vs torch's own {dtype}: {torch_error:.3e}"


# ---------------------------------------------------------------------------------------------------------------
# Against TRL itself, and the arguments TRL's tests do not cover
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [None, 3])
def test_matches_trl(backend, device, dtype, k):
    trl_utils = pytest.importorskip("trl.trainer.utils")
    logits = (torch.randn(3, 7, 301, device=device) * 3).to(dtype)
    index = make_index((3, 7), 301, k, device)
    row_mask = torch.rand(index.shape, device=device) < 0.7
    ours = ops.selective_log_softmax(logits, index, row_mask=row_mask)
    theirs = trl_utils.selective_log_softmax(logits, index, row_mask=row_mask)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert torch.equal(ours == 0, theirs == 0) and bool((ours[~row_mask] == 0).all())
    tolerance = 1e-5 if dtype == torch.float32 else 2 * ulp(theirs, dtype).max().item()
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=0, atol=tolerance)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("k", [None, 4])
def test_temperature_row_mask_and_gradients(backend, device, dtype, k):
    temperature = 0.7
    logits = (torch.randn(5, 9, 257, device=device) * 2).to(dtype).requires_grad_()
    index = make_index((5, 9), 257, k, device)
    row_mask = (torch.rand(index.shape, device=device) < 0.8).long()  # TRL takes 0/1 integer masks too
    weights = torch.randn(index.shape, device=device, dtype=torch.float64)
    out = ops.selective_log_softmax(logits, index, temperature=temperature, row_mask=row_mask)
    (out.double() * weights).sum().backward()

    logits64 = logits.detach().double().requires_grad_()
    expected = naive(logits64, index, temperature).masked_fill(row_mask == 0, 0.0)
    (expected * weights).sum().backward()
    if dtype == torch.float64:
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(logits.grad, logits64.grad, rtol=1e-12, atol=1e-12)
        return
    plain = naive(logits.detach().float(), index, temperature).masked_fill(row_mask == 0, 0.0)
    assert_within_budget(out, expected.detach(), plain, dtype=dtype, name="selective_log_softmax")
    grad_tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(logits.grad.double(), logits64.grad, rtol=grad_tolerance, atol=grad_tolerance)
    masked_rows = (row_mask == 0).all(-1) if k else row_mask == 0
    assert bool((logits.grad[masked_rows] == 0).all()), "a masked position passed a gradient"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_narrow_index_dtypes_and_nan(backend, device):
    logits = torch.randn(2, 6, 300, device=device)
    index = torch.randint(0, 300, (2, 6), device=device)
    expected = naive(logits, index)
    for narrow in (torch.int32, torch.int16):
        torch.testing.assert_close(ops.selective_log_softmax(logits, index.to(narrow)), expected)
    logits[0, 1, 7] = float("nan")  # NaN in -> NaN out for that row, as in torch; other rows untouched
    out = ops.selective_log_softmax(logits, index)
    assert bool(out[0, 1].isnan()) and int(out.isnan().sum()) == 1
    masked = ops.selective_log_softmax(logits, index, row_mask=torch.ones_like(index).index_put_(
        (torch.tensor([0]), torch.tensor([1])), torch.tensor(0)))
    assert masked[0, 1].item() == 0.0  # row_mask replaces it by 0, as TRL's masked_fill does


def test_empty_and_one_dimensional():
    assert ops.selective_log_softmax(torch.randn(0, 5), torch.zeros(0, dtype=torch.long)).shape == (0,)
    logits = torch.randn(11)
    torch.testing.assert_close(ops.selective_log_softmax(logits, torch.tensor(4)), logits.log_softmax(-1)[4])
    torch.testing.assert_close(ops.selective_log_softmax(logits, torch.tensor([4, 2])), logits.log_softmax(-1)[[4, 2]])


def test_bad_arguments():
    logits = torch.randn(2, 3, 10)
    index = torch.randint(0, 10, (2, 3))
    for temperature in (0, -1.0):
        with pytest.raises(ValueError, match="temperature must be positive"):
            ops.selective_log_softmax(logits, index, temperature=temperature)
    with pytest.raises(ValueError, match="temperature must be finite"):
        ops.selective_log_softmax(logits, index, temperature=float("inf"))
    ignored = index.clone()
    ignored[1, 2] = -100
    with pytest.raises(ValueError, match=r"index: index -100 at position \(1, 2\) is outside \[0, 10\)"):
        ops.selective_log_softmax(logits, ignored)  # TRL raises too (gather); token_logprobs would ignore it
    with pytest.raises(ValueError, match=r"index: index 10 at position \(0, 0, 1\)"):
        ops.selective_log_softmax(logits, torch.tensor([[[0, 10]] * 3] * 2))
    with pytest.raises(ValueError, match="index: shape"):
        ops.selective_log_softmax(logits, index[:, :2])
    with pytest.raises(ValueError, match="index: expected shape"):
        ops.selective_log_softmax(logits, index.reshape(6))
    with pytest.raises(ValueError, match="row_mask: shape"):
        ops.selective_log_softmax(logits, index, row_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="index: dtype float32 is not supported"):
        ops.selective_log_softmax(logits, index.float())
    with pytest.raises(ValueError, match="logits: dtype int64 is not supported"):
        ops.selective_log_softmax(logits.long(), index)
    with pytest.raises(ValueError, match="index: .*device"):
        ops.selective_log_softmax(logits, index.to("meta"))
