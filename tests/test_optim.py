"""rto_fast.trainer.optim: the fused AdamW every non-DeepSpeed stage uses, and float32 master weights for bf16 models (without
them AdamW's updates at RL learning rates are rounded away)."""

import io

import pytest
import torch

from rto_fast.trainer import optim
from rto_fast.trainer.config import BF16_OPTIMIZERS
from rto_fast.trainer.config_file import load_config
from rto_fast.trainer.optim import (MasterWeightAdamW, NonFiniteGradients, NonFiniteSteps, StochasticRoundingAdamW,
                            stochastic_round_)

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


def test_adamw_follows_bf16_optimizer_for_bf16_parameters_only():
    settings = stage_settings()
    bf16 = [torch.nn.Parameter(torch.randn(4, 3).bfloat16())]
    assert type(optim.adamw(bf16, 1e-5, settings)) is MasterWeightAdamW
    assert type(optim.adamw(bf16, 1e-5, settings, "stochastic_rounding")) is StochasticRoundingAdamW
    pure = optim.adamw(bf16, 1e-5, settings, "pure")
    assert type(pure) is torch.optim.AdamW and pure.param_groups[0]["params"][0] is bf16[0]
    for choice in BF16_OPTIMIZERS:
        assert type(optim.adamw([torch.nn.Parameter(torch.randn(3))], 1e-5, settings, choice)) is torch.optim.AdamW
    with pytest.raises(ValueError, match="bf16_optimizer"):
        optim.adamw(bf16, 1e-5, settings, "kahan")


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
    """The failure the masters (and stochastic rounding) fix, measured on the same weights, steps and a steady
    training signal (each entry's gradient keeps its sign): at an RL learning rate float64 AdamW moves the entries of
    a std-0.02 bf16 matrix by one to several of their spacings in 40 steps. Pure bf16 AdamW rounds nearly every step
    away; with masters the bf16 weights show the whole displacement, give or take the last rounding."""
    lr, steps = 5e-6, 40
    generator = torch.Generator().manual_seed(5)
    signal = torch.randn(96, 80, generator=generator, dtype=torch.float64)
    results = {}
    makers = {"masters": MasterWeightAdamW, "stochastic": StochasticRoundingAdamW, "pure": torch.optim.AdamW}
    for name, make in makers.items():
        weights = bf16_model_weights(1)
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
    assert results["pure"][0] < 0.2 and results["masters"][0] > 0.8 and results["stochastic"][0] > 0.6, results
    assert 0.9 < results["masters"][1] < 1.1 and results["pure"][1] < 0.5, results
    # Stochastic rounding: the whole displacement on average, give or take its rounding noise.
    assert 0.8 < results["stochastic"][1] < 1.2, results


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


@pytest.mark.parametrize("make, extra_state", [(MasterWeightAdamW, "master_weights"),
                                               (StochasticRoundingAdamW, "generators")])
def test_bf16_optimizers_resume_from_their_state_dict_bit_for_bit(make, extra_state):
    """A run saved after 3 steps and resumed into a fresh model (built from the saved bf16 weights) and optimizer
    ends bitwise where the uninterrupted run ends: the state carries the float32 masters (not only their rounding),
    or the stochastic rounding's generators (a fresh optimizer seeded otherwise continues the same draws)."""
    def run(weights, optimizer, steps):
        for step in steps:
            for weight, grad in zip(weights, gradients(weights, step)):
                weight.grad = grad
            optimizer.step()
            optimizer.zero_grad()

    options = dict(lr=5e-6, betas=BETAS, weight_decay=0.01)
    extra = {"seed": 11} if make is StochasticRoundingAdamW else {}
    weights = bf16_model_weights(3)
    optimizer = make(weights, **options, **extra)
    run(weights, optimizer, range(3))
    saved_weights = [weight.detach().clone() for weight in weights]
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    run(weights, optimizer, range(3, 7))

    resumed = [torch.nn.Parameter(weight.clone()) for weight in saved_weights]
    resumed_optimizer = make(resumed, **options, **({"seed": 999} if extra else {}))
    buffer.seek(0)
    resumed_optimizer.load_state_dict(torch.load(buffer, weights_only=True))
    run(resumed, resumed_optimizer, range(3, 7))
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(weights, resumed))
    if make is MasterWeightAdamW:
        for a, b in zip(optimizer.param_groups[0]["params"], resumed_optimizer.param_groups[0]["params"]):
            assert torch.equal(a.detach(), b.detach())
    plain = torch.optim.AdamW(bf16_model_weights(3), lr=5e-6)
    with pytest.raises(ValueError, match=extra_state):
        make(bf16_model_weights(3), lr=5e-6).load_state_dict(plain.state_dict())


def test_master_weights_refuse_what_they_cannot_train():
    with pytest.raises(ValueError, match="no parameters"):
        MasterWeightAdamW([], lr=1e-3)
    with pytest.raises(TypeError, match="parameter groups"):
        MasterWeightAdamW([{"params": bf16_model_weights(0)}], lr=1e-3)
    with pytest.raises(ValueError, match=r"params\[1\]"):
        MasterWeightAdamW([torch.nn.Parameter(torch.randn(2)), torch.zeros(3, dtype=torch.long)], lr=1e-3)
    with pytest.raises(ValueError, match=r"params\[0\].*float16"):
        StochasticRoundingAdamW([torch.nn.Parameter(torch.randn(3).half())], lr=1e-3)


# ------------------------------------------------------------------------------------------------ stochastic rounding

def bf16_neighbours(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and just above (in magnitude) each float32 value: truncation, and one step up."""
    truncated = (values.view(torch.int32) & -(1 << 16)).view(torch.float32)
    above = ((values.view(torch.int32) & -(1 << 16)) + (1 << 16)).view(torch.float32)
    return truncated, torch.where(truncated == values, truncated, above)


def test_stochastic_rounding_picks_a_neighbour_and_is_exact_on_average():
    generator = torch.Generator().manual_seed(0)
    scales = 10.0 ** torch.randint(-6, 4, (2000,), generator=generator)
    values = torch.cat([torch.randn(2000, generator=generator) * scales,
                        torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e38, float("inf"), float("-inf")])])
    below, above = bf16_neighbours(values)
    draws = torch.empty(400, values.numel(), dtype=torch.bfloat16)
    rounding = torch.Generator().manual_seed(1)
    for draw in draws:
        stochastic_round_(draw, values, rounding)
    draws = draws.float()
    assert bool(((draws == below) | (draws == above)).all())
    representable = below == above  # already bf16 values (0, 1, -2.5, inf) never move
    assert representable[-7:].tolist() == [True, True, True, True, False, True, True]
    assert bool((draws[:, representable] == values[representable]).all())
    nan = torch.empty(1, dtype=torch.bfloat16)
    stochastic_round_(nan, torch.tensor([float("nan")]), rounding)
    assert bool(nan.isnan().all())
    # Unbiased: per entry the mean of 400 draws is within 5 standard errors of the value (in units of the spacing),
    # and over all entries together within 1% of a spacing.
    finite = torch.isfinite(values) & ~representable
    spacing = (above - below)[finite].double()
    fraction = (values[finite].double() - below[finite].double()) / spacing
    mean_fraction = (draws[:, finite].double() - below[finite].double()).mean(0) / spacing
    standard_error = (fraction * (1 - fraction) / 400).sqrt().clamp_min(1e-3)
    assert bool(((mean_fraction - fraction).abs() <= 5 * standard_error).all())
    assert abs(float((mean_fraction - fraction).mean())) < 0.01


def test_stochastic_rounding_adamw_steps_float32_weights_like_torch_adamw():
    generator = torch.Generator().manual_seed(4)
    start = [torch.randn(9, 4, generator=generator), torch.randn(4, generator=generator)]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    optimizer = StochasticRoundingAdamW(ours, lr=3e-3, betas=BETAS, weight_decay=0.01, chunk_elements=7)
    reference = torch.optim.AdamW(theirs, lr=3e-3, betas=BETAS, weight_decay=0.01)
    for step in range(5):
        for a, b, grad in zip(ours, theirs, gradients(ours, step)):
            a.grad, b.grad = grad, grad.clone()
        optimizer.step()
        reference.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_stochastic_rounding_adamw_follows_float64_adamw_on_average():
    """bf16 weights and states, lr 5e-6, 12 steps, 64 differently seeded runs (chunked): their mean weight is float64
    AdamW's (on the same bf16 gradients) within the rounding noise, while every run only holds bf16 values."""
    lr, steps, runs = 5e-6, 12, 64
    start = bf16_model_weights(6)[0].detach()
    exact = torch.nn.Parameter(start.double())
    reference = torch.optim.AdamW([exact], lr=lr, betas=BETAS, weight_decay=0.01)
    grads = [gradients([start], step)[0] for step in range(steps)]
    for grad in grads:
        exact.grad = grad.double()
        reference.step()
    finals = []
    for run in range(runs):
        weight = torch.nn.Parameter(start.clone())
        optimizer = StochasticRoundingAdamW([weight], lr=lr, betas=BETAS, weight_decay=0.01, seed=run,
                                            chunk_elements=1000)
        for grad in grads:
            weight.grad = grad
            optimizer.step()
        assert weight.dtype == torch.bfloat16 and optimizer.state[weight]["exp_avg_sq"].dtype == torch.bfloat16
        finals.append(weight.detach().double())
    finals = torch.stack(finals)
    mean = finals.mean(0)
    wanted = exact.detach() - start.double()
    shown = float(((mean - start.double()) * wanted).sum() / (wanted * wanted).sum())
    assert 0.9 < shown < 1.1, shown
    # Per entry: the runs' mean is within a few standard errors of float64 AdamW.
    standard_error = finals.std(0) / runs**0.5 + 1e-9
    assert float(((mean - exact.detach()).abs() / standard_error).quantile(0.99)) < 5


@pytest.mark.parametrize("backend", ["triton", "torch"], indirect=True)
def test_stochastic_rounding_adamw_backends_agree_on_average(backend, device, monkeypatch):
    """The Triton kernel (one pass, Philox bits) and the torch path (several passes, the optimizer's generator) each
    give AdamW's float64 result on average over seeds: per entry within a few standard errors of the float64 weight
    and second moment after 5 steps."""
    launches = []
    if backend == "triton":
        from rto_fast.kernels import adamw as kernels

        launch = kernels.stochastic_rounding_adamw_
        monkeypatch.setattr(kernels, "stochastic_rounding_adamw_",
                            lambda *args, **kwargs: (launches.append(1), launch(*args, **kwargs))[1])
    lr, steps, runs = 1e-4, 5, 24
    generator = torch.Generator().manual_seed(8)
    start = (torch.randn(37, 53, generator=generator) * 0.02).bfloat16().to(device)  # 1961 entries: a partial block
    grads = [torch.randn(37, 53, generator=generator).bfloat16().to(device) for _ in range(steps)]
    exact = torch.nn.Parameter(start.double())
    reference = torch.optim.AdamW([exact], lr=lr, betas=BETAS, weight_decay=0.1)
    for grad in grads:
        exact.grad = grad.double()
        reference.step()
    weights, second_moments = [], []
    for run in range(runs):
        weight = torch.nn.Parameter(start.clone())
        optimizer = StochasticRoundingAdamW([weight], lr=lr, betas=BETAS, weight_decay=0.1, seed=100 + run)
        for grad in grads:
            weight.grad = grad
            optimizer.step()
        weights.append(weight.detach().double())
        second_moments.append(optimizer.state[weight]["exp_avg_sq"].double())
    for draws, wanted in ((weights, exact.detach()), (second_moments, reference.state[exact]["exp_avg_sq"])):
        draws = torch.stack(draws)
        standard_error = draws.std(0) / runs**0.5
        error = (draws.mean(0) - wanted).abs()
        # Entries every run rounded the same way have no spread: there the mean must be within a spacing.
        spacing = wanted.abs() * 2.0**-7 + 1e-30
        assert bool((error <= torch.maximum(5 * standard_error, spacing)).all())
        assert float((error / (standard_error + 1e-30))[standard_error > 0].median()) < 1.5
    # Distinct seeds draw distinct bits: the runs did not all round alike.
    assert float(torch.stack(weights).std(0).gt(0).float().mean()) > 0.2
    assert len(launches) == (runs * steps if backend == "triton" else 0)


# ------------------------------------------------------------------------------------------------ non-finite steps

def test_nonfinite_steps_are_skipped_then_stop_the_run():
    guard = NonFiniteSteps("sft", limit=2)
    assert guard.allows(1.5, "step 1")
    guard.finish_unit("step 1")
    assert not guard.allows(float("nan"), "step 2")
    guard.finish_unit("step 2")
    assert guard.allows(0.3, "step 3")  # a good step restarts the count of bad ones in a row
    guard.finish_unit("step 3")
    assert not guard.allows(float("inf"), "step 4") and guard.skipped == 2
    guard.finish_unit("step 4")
    # RL: an iteration with two skipped updates (policy and critic) counts once.
    assert not guard.allows(float("nan"), "iteration 5", "policy") and not guard.allows(float("nan"), "iteration 5")
    with pytest.raises(NonFiniteGradients, match=r"sft: 2 iterations in a row, the last iteration 5.*"
                                                 r"max_nonfinite_steps=2"):
        guard.finish_unit("iteration 5", "iterations")
    # DeepSpeed's step has run when its norm is known: the first bad one stops, naming what happened.
    with pytest.raises(NonFiniteGradients, match="iteration 3: the critic's gradient norm is nan and DeepSpeed"):
        NonFiniteSteps("rto", limit=3).allows(float("nan"), "iteration 3", "critic", applied=True)
