"""Frozen models kept in host memory and copied to the device only while they run (`rl.offload_frozen_models`).

Usage:
    resident = HostResident(reference, torch.device("cuda"))   # weights and buffers now in pinned host memory
    with resident.on_device() as model:                         # a device copy for the length of the block
        logprobs = packed_logprobs(model, batch)
    # the device copy is freed; the host copy was never written (a frozen model needs no copy back)

An RL stage holds up to three frozen models (reference, DPO model, reward model) beside the two it trains; on one
GPU their weights are device memory that training never touches. Offloaded, each is on the device only for its
scoring pass: one host-to-device copy of its weights per use (pinned memory, asynchronous, on the stream that then
runs the model, so the copy and the forwards are ordered without a sync) and nothing to copy back.

Every parameter and buffer keeps its object (tied weights stay tied, hooks and references stay valid); only its
`.data` points at the host tensor or at the device copy. The models must not be trained and not be partitioned by
ZeRO-3 (which offloads through `offload_param` instead).
"""

from __future__ import annotations

import contextlib

import torch

# Device types where offloading saves memory: a CPU device has no other memory to offload to. Tests add "cpu" to
# run the copies for real on a machine without a GPU.
OFFLOAD_DEVICE_TYPES = ("cuda",)


def offload_saves_memory(device: torch.device) -> bool:
    return torch.device(device).type in OFFLOAD_DEVICE_TYPES


class HostResident:
    """A frozen model whose parameters and buffers live in host memory (pinned when the device is a GPU), copied
    to `device` inside `on_device()`."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        if any(parameter.requires_grad for parameter in model.parameters()):
            raise ValueError(f"{type(model).__name__}: only frozen models are kept in host memory (a trained "
                             "model's updates would be lost with its device copy)")
        self.model = model
        self.device = torch.device(device)
        self.resident = 0  # nesting depth of on_device()
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        seen: set[int] = set()
        self.tensors: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter or buffer, its host tensor)
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:  # each shared tensor once
                if id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                if tensor.device.type == "cpu":
                    host = tensor.data.pin_memory() if pin else tensor.data
                else:  # one copy, straight into pinned memory
                    host = torch.empty_like(tensor.data, device="cpu", pin_memory=pin).copy_(tensor.data)
                tensor.data = host
                self.tensors.append((tensor, host))

    @property
    def nbytes(self) -> int:
        return sum(host.numel() * host.element_size() for _, host in self.tensors)

    @contextlib.contextmanager
    def on_device(self):
        """The model with its weights on the device for the length of the block (nested blocks share one copy)."""
        if self.resident:
            self.resident += 1
            try:
                yield self.model
            finally:
                self.resident -= 1
            return
        # Copies made outside inference mode: a device copy made inside it could not become a parameter's data.
        with torch.inference_mode(False), torch.no_grad():
            for tensor, host in self.tensors:
                tensor.data = host.to(self.device, non_blocking=True, copy=True)
        self.resident = 1
        try:
            yield self.model
        finally:
            self.resident = 0
            for tensor, host in self.tensors:
                tensor.data = host  # the device copy's memory returns to the allocator (stream-ordered)


@contextlib.contextmanager
def on_device(resident: HostResident | None, model):
    """`model` itself when it is not offloaded (resident None), else its device copy for the block."""
    if resident is None:
        yield model
        return
    with resident.on_device() as device_model:
        yield device_model
