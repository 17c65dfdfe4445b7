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

# The trainer uses every core unless OMP_NUM_THREADS is set; its tests run tiny models, often two workers at once
# (pytest -n 2), where two OpenMP threads each made a step up to 50x slower: one thread, in process (the one_thread
# fixture) and in the subprocesses they start.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Tests choose backends explicitly; a value inherited from the shell must not change what they test.
os.environ.pop("RTO_FAST_BACKEND", None)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's trainer runs (use with pytestmark = pytest.mark.usefixtures("one_thread");
    subprocesses get OMP_NUM_THREADS=1): tiny models gain nothing from more, and on a busy 2-core machine two
    OpenMP threads made a step up to 50x slower (measured)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def tensors_on_test_device(request):
    """For modules whose inputs come from tensor factories without a device (pytestmark = pytest.mark.usefixtures(
    "tensors_on_test_device")): with a GPU the Triton kernels run natively and need CUDA tensors, so factories
    default to the test device there, except in tests marked cpu_path."""
    if DEVICE == "cpu" or request.node.get_closest_marker("cpu_path"):
        yield
        return
    with torch.device(DEVICE):
        yield


@pytest.fixture
def backend(request, monkeypatch):
    """Force a backend for one test: parametrize with indirect=True and values 'triton' or 'torch'."""
    name = request.param
    if name == "torch" and DEVICE == "cuda":
        pytest.skip("the torch CPU path is exercised with CPU tensors")
    monkeypatch.setenv("RTO_FAST_BACKEND", name)
    return name


# Fresh random inputs every run; the seed is printed in the header so a failure can be replayed with
# RTO_FAST_TEST_SEED=<seed>.
SEED = int(os.environ.get("RTO_FAST_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def pytest_report_header(config):
    return f"rto_fast: RTO_FAST_TEST_SEED={SEED}, triton interpreter={'off' if NATIVE else 'on'}, device={DEVICE}"


@pytest.fixture(autouse=True)
def _seed(request):
    # Per-test seed derived from the run seed and the test id: tests stay independent of their order.
    torch.manual_seed((SEED + sum(map(ord, request.node.nodeid))) % 2**31)


@pytest.fixture(autouse=True)
def _package_logging():
    """The CLI (`rto_fast.train.main`, run in-process by some tests) gives the package logger its own handlers and
    stops propagation, which would hide later tests' records from caplog: restore the logger after each test."""
    import logging

    package = logging.getLogger("rto_fast")
    saved = (package.level, package.propagate, list(package.handlers))
    yield
    for handler in package.handlers:
        if handler not in saved[2]:
            handler.close()
    package.setLevel(saved[0])
    package.propagate = saved[1]
    package.handlers[:] = saved[2]
