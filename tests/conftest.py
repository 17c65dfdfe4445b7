"""Test setup: run Triton kernels through the interpreter on CPU-only machines.

TRITON_INTERPRET must be set before triton is first imported, which is why it happens here, at collection.
On a machine with a GPU (or with RTO_FAST_TEST_NATIVE=1) the kernels run natively instead.
"""

import os

import pytest
import torch

NATIVE = os.environ.get("RTO_FAST_TEST_NATIVE", "0") == "1" or torch.cuda.is_available()
if not NATIVE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests choose backends explicitly; a value inherited from the shell must not change what they test.
os.environ.pop("RTO_FAST_BACKEND", None)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def backend(request, monkeypatch):
    """Force a backend for one test: parametrize with indirect=True and values 'triton' or 'torch'."""
    name = request.param
    if name == "torch" and DEVICE == "cuda":
        pytest.skip("the torch CPU path is exercised with CPU tensors")
    monkeypatch.setenv("RTO_FAST_BACKEND", name)
    return name


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
