"""rto_fast.optim: the fused AdamW every non-DeepSpeed stage uses, and float32 master weights for bf16 models (without
them AdamW's updates at RL learning rates are rounded away)."""

import io

import pytest
import torch

from rto_fast import optim
from rto_fast.config import load_config
from rto_fast.optim import MasterWeightAdamW

BETAS = (0.9, 0.95)


def stage_settings():
    settings = load_config(None).sft
    settings.weight_decay, settings.adam_beta1, settings.adam_beta2 = 0.01, *BETAS
    return settings


def test_adamw_is_fused_where_torch_has_it_and_steps_like_torch_adamw():
    """optim.adamw on float32 weights: torch's fused AdamW (no foreach temporaries) with the stage's settings, moving
    the weights as torch's default AdamW does."""
    torch.manual_seed(0)
    start = [torch.randn(7, 5), torch.randn(5)]
    fused_parameters = [torch.nn.Parameter(t.clone()) for t in start]
    plain_parameters = [torch.nn.Parameter(t.clone()) for t in start]
    fused = optim.adamw(fused_parameters, 3e-3, stage_settings())
    plain = torch.optim.AdamW(plain_parameters, lr=3e-3, weight_decay=0.01, betas=BETAS)
    assert type(fused) is torch.optim.AdamW
    assert fused.param_groups[0]["fused"] and fused.param_groups[0]["betas"] == BETAS
    for _ in range(3):
        for parameters in (fused_parameters, plain_parameters):
            for parameter in parameters:
                parameter.grad = torch.cos(parameter.detach() * 3)
        fused.step()
        plain.step()
    for a, b in zip(fused_parameters, plain_parameters):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_adamw_chooses_master_weights_for_bf16_parameters_only():
    settings = stage_settings()
    bf16 = [torch.nn.Parameter(torch.randn(4, 3).bfloat16())]
    assert type(optim.adamw(bf16, 1e-5, settings)) is MasterWeightAdamW
    pure = optim.adamw(bf16, 1e-5, settings, master_weights=False)
    assert type(pure) is torch.optim.AdamW and pure.param_groups[0]["params"][0] is bf16[0]
    assert type(optim.adamw([torch.nn.Parameter(torch.randn(3))], 1e-5, settings)) is torch.optim.AdamW


def bf16_model_weights(seed: int) -> list[torch.nn.Parameter]:
    """Weights of the sizes a layer has (typical std 0.02, a norm's ones near 1), bf16 except one float32 vector."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(96, 80, generator=generator) * 0.02).bfloat16()),
            torch.nn.Parameter(torch.randn(80, generator=generator)),  # float32: trained as it is
            torch.nn.Parameter((1 + 0.01 * torch.randn(80, generator=generator)).bfloat16()),
            torch.nn.Parameter((torch.randn(33, 7, generator=generator) * 0.02).bfloat16())]


def assert_float32_close(master, exact, steps: int) -> None:
    """Float32 masters against float64 AdamW: each step's addition rounds once at the weight's float32 spacing."""
    exact = exact.detach()
    tolerance = steps * torch.finfo(torch.float32).eps * exact.abs().max().item()
    torch.testing.assert_close(master.detach().double(), exact, atol=tolerance, rtol=0)


def gradients(weights, step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(weight.shape, generator=generator, dtype=torch.float64).to(weight.dtype) for weight in weights]


@pytest.mark.parametrize("bucket_elements", [1 << 26, 100, 8000])
def test_master_weights_step_like_float64_adamw_and_round_into_the_model(bucket_elements):
    """The masters follow AdamW computed in float64 (on the same bf16 gradients) to float32 rounding, whatever the
    bucketing of the float32 gradient copies (one bucket; a bucket per tensor; a tensor larger than a bucket next to
    smaller ones). The model's bf16 weights are the masters rounded; the float32 weight steps once per step."""
    lr = 5e-6
    weights = bf16_model_weights(0)
    start = [weight.detach().clone() for weight in weights]
    exact = [torch.nn.Parameter(weight.detach().double()) for weight in weights]
    optimizer = MasterWeightAdamW(weights, lr=lr, betas=BETAS, weight_decay=0.01, bucket_elements=bucket_elements)
    reference = torch.optim.AdamW(exact, lr=lr, betas=BETAS, weight_decay=0.01)
    masters = optimizer.param_groups[0]["params"]
    assert masters[1] is weights[1] and all(m.dtype == torch.float32 and m is not w
                                            for m, w in zip(masters, weights) if w.dtype == torch.bfloat16)
    for step in range(12):
        for weight, exact_weight, grad in zip(weights, exact, gradients(weights, step)):
            weight.grad, exact_weight.grad = grad, grad.double()
        optimizer.step()
        reference.step()
        optimizer.zero_grad()
        reference.zero_grad()
        assert all(weight.grad is None for weight in weights) and all(m.grad is None for m in masters)
    for weight, master, exact_weight, before in zip(weights, masters, exact, start):
        assert_float32_close(master, exact_weight, steps=12)
        assert torch.equal(weight.detach(), master.detach().to(weight.dtype))
        assert optimizer.state[master]["step"].item() == 12
    # At lr 5e-6 the masters moved (nearly) every entry; the bf16 matrix of std 0.02 shows a good share of it.
    assert all((master.detach().double() != before.double()).float().mean() > 0.97
               for master, before in zip(masters, start))
    moved = (weights[0].detach() != start[0]).float().mean().item()
    assert moved > 0.2, moved


def test_pure_bf16_adamw_loses_the_updates_master_weights_keep():
    """The failure the masters fix, measured on the same weights, steps and a steady training signal (each entry's
    gradient keeps its sign): at an RL learning rate float64 AdamW moves the entries of a std-0.02 bf16 matrix by one
    to several of their spacings in 40 steps. Pure bf16 AdamW rounds nearly every step away; with masters the bf16 weights show the
    whole displacement, give or take the last rounding."""
    lr, steps = 5e-6, 40
    generator = torch.Generator().manual_seed(5)
    signal = torch.randn(96, 80, generator=generator, dtype=torch.float64)
    results = {}
    for name in ("masters", "pure"):
        weights = bf16_model_weights(1)
        make = MasterWeightAdamW if name == "masters" else torch.optim.AdamW
        optimizer = make(weights, lr=lr, betas=BETAS, weight_decay=0.0)
        exact = torch.nn.Parameter(weights[0].detach().double())
        reference = torch.optim.AdamW([exact], lr=lr, betas=BETAS, weight_decay=0.0)
        start = weights[0].detach().double()
        for step in range(steps):
            for weight, grad in zip(weights, gradients(weights, step)):
                weight.grad = grad
            weights[0].grad = (signal * (1 + 0.1 * step)).to(torch.bfloat16)
            exact.grad = weights[0].grad.double()
            optimizer.step()
            reference.step()
        # How much of float64 AdamW's displacement the bf16 weights show (1: all of it).
        wanted = exact.detach() - start
        shown = ((weights[0].detach().double() - start) * wanted).sum() / (wanted * wanted).sum()
        results[name] = ((weights[0].detach().double() != start).float().mean().item(), shown.item())
    assert results["pure"][0] < 0.2 and results["masters"][0] > 0.8, results
    assert 0.9 < results["masters"][1] < 1.1 and results["pure"][1] < 0.5, results


def test_master_weights_skip_parameters_without_gradients_and_follow_the_scheduler():
    weights = bf16_model_weights(2)
    exact = [torch.nn.Parameter(weight.detach().double()) for weight in weights]
    optimizer = MasterWeightAdamW(weights, lr=1e-3, betas=BETAS, weight_decay=0.0, bucket_elements=100)
    reference = torch.optim.AdamW(exact, lr=1e-3, betas=BETAS, weight_decay=0.0)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0 / (1 + step)) for o in (optimizer, reference)]
    frozen_before = weights[2].detach().clone()
    for step in range(4):
        for index, (weight, exact_weight, grad) in enumerate(zip(weights, exact, gradients(weights, step))):
            if index != 2:  # this one never gets a gradient (a layer the loss does not reach)
                weight.grad, exact_weight.grad = grad, grad.double()
        optimizer.step()
        reference.step()
        for schedule in schedules:
            schedule.step()
    masters = optimizer.param_groups[0]["params"]
    assert torch.equal(weights[2].detach(), frozen_before) and masters[2] not in optimizer.state
    for index in (0, 1, 3):
        assert_float32_close(masters[index], exact[index], steps=4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 5)


def test_master_weights_resume_from_their_state_dict_bit_for_bit():
    """A run saved after 3 steps and resumed into a fresh model (built from the saved bf16 weights) and optimizer
    ends bitwise where the uninterrupted run ends: the state carries the float32 masters, not only their rounding."""
    def run(weights, optimizer, steps):
        for step in steps:
            for weight, grad in zip(weights, gradients(weights, step)):
                weight.grad = grad
            optimizer.step()
            optimizer.zero_grad()

    weights = bf16_model_weights(3)
    optimizer = MasterWeightAdamW(weights, lr=5e-6, betas=BETAS, weight_decay=0.01)
    run(weights, optimizer, range(3))
    saved_weights = [weight.detach().clone() for weight in weights]
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    run(weights, optimizer, range(3, 7))

    resumed = [torch.nn.Parameter(weight.clone()) for weight in saved_weights]
    resumed_optimizer = MasterWeightAdamW(resumed, lr=5e-6, betas=BETAS, weight_decay=0.01)
    buffer.seek(0)
    resumed_optimizer.load_state_dict(torch.load(buffer, weights_only=True))
    run(resumed, resumed_optimizer, range(3, 7))
    for a, b in zip(weights, resumed):
        assert torch.equal(a.detach(), b.detach())
    for a, b in zip(optimizer.param_groups[0]["params"], resumed_optimizer.param_groups[0]["params"]):
        assert torch.equal(a.detach(), b.detach())

    plain = torch.optim.AdamW(bf16_model_weights(3), lr=5e-6)
    with pytest.raises(ValueError, match="master_weights"):
        MasterWeightAdamW(bf16_model_weights(3), lr=5e-6).load_state_dict(plain.state_dict())


def test_master_weights_refuse_what_they_cannot_train():
    with pytest.raises(ValueError, match="no parameters"):
        MasterWeightAdamW([], lr=1e-3)
    with pytest.raises(TypeError, match="parameter groups"):
        MasterWeightAdamW([{"params": bf16_model_weights(0)}], lr=1e-3)
    with pytest.raises(ValueError, match=r"params\[1\]"):
        MasterWeightAdamW([torch.nn.Parameter(torch.randn(2)), torch.zeros(3, dtype=torch.long)], lr=1e-3)
