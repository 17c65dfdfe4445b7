"""Frozen models kept in host memory (rto_fast.trainer.offload; the RL stage's `rl.offload_frozen_models` is tested in
test_rl_loop.py).

- HostResident: inside `on_device()` every parameter and buffer is a device copy (a CPU copy here), which carries
  the values; tied weights stay one tensor, hooks keep working, nested blocks share the copy; outside it they are
  the untouched host tensors; a trained model is refused;
- on a GPU (skipped here): the frozen models' weights leave the device memory and scoring gives the same results.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from rto_fast.trainer import offload
from tests.utils import storage_pointers


def tied_gpt2():
    config = GPT2Config(vocab_size=61, n_embd=16, n_layer=2, n_head=2, n_positions=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)


def test_on_device_swaps_every_parameter_and_buffer_and_back():
    """CPU to CPU here (a copy, as a GPU gets one); the swap itself is `.data` assignment, which CUDA and CPU
    tensors allow between each other."""
    model = tied_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    resident = offload.HostResident(model, torch.device("cpu"))
    host = storage_pointers(model)
    assert resident.nbytes == sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    with resident.on_device() as inside:
        assert inside is model
        copies = storage_pointers(model)
        assert not set(copies) & set(host)  # every parameter and buffer is a copy
        assert model.lm_head.weight is model.transformer.wte.weight  # still one tensor
        with resident.on_device():  # nested: the same copy, not a second one
            assert storage_pointers(model) == copies
        assert storage_pointers(model) == copies
    assert storage_pointers(model) == host
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_on_device_copies_carry_the_values_and_leave_the_host_copy_alone():
    model = tied_gpt2()
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    resident = offload.HostResident(model, torch.device("cpu"))
    host = storage_pointers(model)
    calls = []
    model.transformer.h[0].register_forward_hook(lambda *args: calls.append(1))  # hooks survive the swap
    with torch.inference_mode(), resident.on_device() as inside:
        copies = storage_pointers(inside)
        assert not set(copies) & set(host)
        logits = inside(input_ids=ids).logits
    assert torch.equal(logits, expected) and calls == [1]
    assert storage_pointers(model) == host


def test_a_trained_model_is_refused():
    model = tied_gpt2().requires_grad_(True)
    with pytest.raises(ValueError, match="only frozen models"):
        offload.HostResident(model, torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_offloaded_weights_leave_gpu_memory_and_score_the_same():
    model = tied_gpt2().cuda()
    ids = torch.randint(0, 61, (2, 9), device="cuda")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    resident = offload.HostResident(model, torch.device("cuda"))
    weights = resident.nbytes
    assert torch.cuda.memory_allocated() <= before - weights + 4096
    assert all(tensor.is_pinned() for tensor in model.parameters())
    with torch.no_grad(), resident.on_device() as inside:
        torch.testing.assert_close(inside(input_ids=ids).logits, expected, atol=0, rtol=0)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before - weights + 4096
