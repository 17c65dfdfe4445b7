"""The optimizer every non-DeepSpeed stage trains with: torch's AdamW, and float32 master weights for bf16 models.

Why master weights: AdamW moves a weight by about lr per step, and a bf16 weight w only changes when the step is at
least half its spacing (between |w| * 2^-9 and |w| * 2^-8). At RL learning rates (5e-7 to 5e-6) against typical
weights (|w| ~ 0.02, spacing 1.2e-4) almost every update rounds away: measured with torch's AdamW on a (1024, 1024) bf16 matrix of std 0.02, 10
steps at lr 5e-6 changed 7.5% of its entries, at 5e-7 0.9%. The model then barely trains, silently.

`MasterWeightAdamW` keeps a float32 copy of every low-precision parameter (4 bytes per parameter) and runs torch's
AdamW on the copies (float32 states, 8 bytes per parameter); after each step the model's bf16 weights are the copies
rounded. Forward and backward stay in bf16. This is DeepSpeed's bf16 scheme without ZeRO: 16 bytes per trained
parameter (bf16 weights 2 + bf16 gradients 2 + masters 4 + states 8), the same as float32 weights under bf16
autocast, but with bf16 weights for the matmuls and half the gradient memory. Under DeepSpeed its own bf16 optimizer
does this.

`StochasticRoundingAdamW` is the memory-lean alternative (8 bytes per trained parameter, as pure bf16): the update is
computed in float32 and the weight and both AdamW states are written back to bf16 with stochastic rounding, up or
down with probabilities that make the rounding exact on average. A step far below the spacing then moves the weight
by a whole spacing with a probability proportional to the step, so small updates add up in expectation instead of
vanishing (at the cost of rounding noise: after T steps of size d against spacing s, a spread of about
sqrt(T * d * s)). Both states need it too: with beta2 = 0.999, AdamW's second moment changes by 0.1% per step, below
bf16's relative spacing, and would never move under round-to-nearest.
"""

from __future__ import annotations

import logging
import math

import torch

from .. import ops
from .config import BF16_OPTIMIZERS

logger = logging.getLogger(__name__)

LOW_PRECISION = (torch.bfloat16, torch.float16)
# Float32 gradient copies are made this many elements at a time during a step (256 MiB), so the step's transient
# memory stays bounded whatever the model's size.
BUCKET_ELEMENTS = 1 << 26


def adamw(parameters, lr: float, settings, bf16_optimizer: str = "master_weights") -> torch.optim.Optimizer:
    """torch's AdamW with a stage's settings (`weight_decay`, `adam_beta1`, `adam_beta2`), fused (one kernel over all
    tensors) where torch has it for the parameters' device: the multi-tensor (foreach) version materializes
    temporaries the size of all parameters in every step, and on 2 CPU cores it took 105 ms per step for 30 M
    parameters against the fused version's 15 ms. bf16 / fp16 parameters follow `bf16_optimizer`: float32 master
    copies (`MasterWeightAdamW`), stochastic rounding (`StochasticRoundingAdamW`, bf16 only) or pure (torch's AdamW
    on the bf16 weights: round-to-nearest loses small updates)."""
    if bf16_optimizer not in BF16_OPTIMIZERS:
        raise ValueError(f"bf16_optimizer: expected one of {BF16_OPTIMIZERS}, got {bf16_optimizer!r}")
    parameters = list(parameters)
    options = dict(lr=lr, weight_decay=settings.weight_decay, betas=(settings.adam_beta1, settings.adam_beta2))
    low_precision = any(parameter.dtype in LOW_PRECISION for parameter in parameters)
    if low_precision and bf16_optimizer == "master_weights":
        return MasterWeightAdamW(parameters, **options)
    if low_precision and bf16_optimizer == "stochastic_rounding":
        # Seeded from the stage's seed (seed_everything) and the parameters' size (actor and critic draw apart),
        # without consuming the global RNG.
        seed = torch.initial_seed() + sum(parameter.numel() for parameter in parameters)
        return StochasticRoundingAdamW(parameters, seed=seed % (1 << 63), **options)
    if low_precision:
        logger.warning("model.bf16_optimizer=pure: AdamW on bf16 weights and states with round-to-nearest; a weight w "
                       "only moves when its step (about the lr, %g here) reaches half its bf16 spacing (at least "
                       "|w| * 2^-9), so most small updates are lost", lr)
    return _fused_adamw(parameters, **options)


def _fused_adamw(parameters, **options) -> torch.optim.AdamW:
    try:
        return torch.optim.AdamW(parameters, fused=True, **options)
    except (RuntimeError, ValueError):  # a device or dtype without a fused implementation
        return torch.optim.AdamW(parameters, **options)


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW over float32 master copies of the low-precision parameters in `params` (float32 ones are trained as
    they are). Backward fills the model parameters' `.grad` as usual; clip them, then `step()`; `zero_grad()` clears
    them. The optimizer's own parameters (`param_groups`, what LR schedulers change) are the masters.

    `state_dict()` carries the masters (key "master_weights"), so a resumed run continues from the float32 values and
    not from their bf16 rounding."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 bucket_elements: int = BUCKET_ELEMENTS):
        params = _parameter_list(params, type(self).__name__)
        for index, parameter in enumerate(params):
            if not parameter.is_floating_point():
                raise ValueError(f"params[{index}]: dtype {parameter.dtype} is not a floating-point dtype")
        self.model_parameters = params
        with torch.no_grad():
            # A float32 parameter is its own master; a low-precision one gets a float32 copy on its device.
            masters = [parameter if parameter.dtype not in LOW_PRECISION else
                       parameter.detach().to(torch.float32, copy=True) for parameter in params]
        self.bucket_elements = int(bucket_elements)
        super().__init__(masters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         **_fused_option(masters))

    def _pairs(self):
        return zip(self.model_parameters, self.param_groups[0]["params"])

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterWeightAdamW.step: closures are not supported")
        stepped = [(parameter, master) for parameter, master in self._pairs() if parameter.grad is not None]
        # torch's step updates every parameter that has a gradient: hold the float32 parameters' own gradients
        # aside so that each one steps in its bucket only.
        own_gradients = {id(master): master.grad for parameter, master in stepped if master is parameter}
        for parameter, master in stepped:
            if master is parameter:
                master.grad = None
        try:
            start = 0
            while start < len(stepped):
                size, stop = 0, start
                while stop < len(stepped) and (stop == start or size + stepped[stop][0].numel() <= self.bucket_elements):
                    size += stepped[stop][0].numel()
                    stop += 1
                self._step_bucket(stepped[start:stop], own_gradients)
                start = stop
        finally:
            for parameter, master in stepped:
                if master is parameter:
                    master.grad = own_gradients[id(master)]
        return None

    def _step_bucket(self, bucket, own_gradients: dict) -> None:
        """AdamW on the bucket's masters (torch's step skips parameters without a gradient, their step counts too),
        then the model's weights from them."""
        for parameter, master in bucket:
            master.grad = own_gradients[id(master)] if master is parameter else parameter.grad.to(torch.float32)
        super().step()
        low = [(parameter, master) for parameter, master in bucket if master is not parameter]
        if low:
            torch._foreach_copy_([parameter for parameter, _ in low], [master for _, master in low])
        for _, master in bucket:
            master.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for parameter in self.model_parameters:
            if parameter.grad is None:
                continue
            if set_to_none:
                parameter.grad = None
            else:
                parameter.grad.zero_()
        super().zero_grad(set_to_none)

    def state_dict(self):
        state = super().state_dict()
        state["master_weights"] = [master.detach() for _, master in self._pairs()]
        return state

    def load_state_dict(self, state_dict) -> None:
        state_dict, saved = _pop_own_state(state_dict, "master_weights", type(self).__name__)
        if len(saved) != len(self.model_parameters):
            raise ValueError(f"MasterWeightAdamW.load_state_dict: {len(saved)} saved master weights for "
                             f"{len(self.model_parameters)} parameters")
        with torch.no_grad():
            for index, ((parameter, master), value) in enumerate(zip(self._pairs(), saved)):
                if value.shape != master.shape:
                    raise ValueError(f"MasterWeightAdamW.load_state_dict: master weight {index} has shape "
                                     f"{tuple(value.shape)}, the parameter {tuple(master.shape)}")
                master.copy_(value)
                if master is not parameter:
                    parameter.copy_(master)
        super().load_state_dict(state_dict)


def _fused_option(parameters) -> dict:
    """fused=True where torch has a fused AdamW for the parameters' device (CUDA, CPU), else torch's default."""
    devices = {parameter.device.type for parameter in parameters}
    fused_devices = ("cuda", "cpu", "xpu", "mps")
    return {"fused": True} if devices <= set(fused_devices) else {}


def stochastic_round_(target: torch.Tensor, value: torch.Tensor, generator: torch.Generator) -> None:
    """Write float32 `value` into bf16 `target`, rounding each entry up or down (in magnitude) with the probabilities
    that make the result exact on average: add 16 random bits below the bf16 mantissa, then truncate. inf and NaN
    stay what they are."""
    bits = value.view(torch.int32)
    noise = torch.randint(0, 1 << 16, value.shape, device=value.device, dtype=torch.int32, generator=generator)
    # The int32 view of a negative float is -2^31 + magnitude bits: adding noise raises the magnitude, and the mask
    # keeps the sign bit, so negative values round in magnitude like positive ones.
    target.copy_((bits + noise).bitwise_and_(-(1 << 16)).view(torch.float32))


class StochasticRoundingAdamW(torch.optim.Optimizer):
    """AdamW for bf16 weights at 8 bytes per parameter (bf16 weights, gradients and states): each step computes the
    update in float32 and writes the weight and both states back with stochastic rounding (see the module
    docstring). Float32 parameters in the same list are updated the same way without rounding.

    On CUDA (or with RTO_FAST_BACKEND=triton) a contiguous bf16 parameter takes one Triton kernel per step
    (`rto_fast.kernels.adamw`), whose Philox bits are keyed by a seed drawn on the host; otherwise torch ops in
    chunks of `chunk_elements` (float32 temporaries of that size). Both draw from the optimizer's own generators
    (one per device, seeded from `seed`, their states in `state_dict()`), so a run is reproducible, a resumed one
    continues the same draws, and the trainer's sampling RNG is not touched."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 seed: int = 0, chunk_elements: int = 1 << 24):
        params = _parameter_list(params, type(self).__name__)
        for index, parameter in enumerate(params):
            if parameter.dtype not in (torch.bfloat16, torch.float32):
                raise ValueError(f"params[{index}]: dtype {parameter.dtype}; stochastic rounding trains bfloat16 "
                                 "(and float32) parameters")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed = int(seed)
        self.chunk_elements = int(chunk_elements)
        self.generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self.generators:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed + len(self.generators))
            self.generators[device] = generator
        return self.generators[device]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("StochasticRoundingAdamW.step: closures are not supported")
        for group in self.param_groups:
            lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                state = self.state[parameter]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)  # on the host: read without a sync
                    state["exp_avg"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
                state["step"] += 1
                step = int(state["step"].item())
                if self._kernel_step(parameter, state, step, lr, beta1, beta2, eps, weight_decay):
                    continue
                step_size = lr / (1 - beta1**step)
                bias_correction2 = 1 - beta2**step
                generator = self._generator(parameter.device)
                tensors = (parameter, parameter.grad, state["exp_avg"], state["exp_avg_sq"])
                for weight, grad, exp_avg, exp_avg_sq in zip(*(_chunks(t, self.chunk_elements) for t in tensors)):
                    grad = grad.float()
                    exp_avg32 = exp_avg.float().lerp_(grad, 1 - beta1)
                    exp_avg_sq32 = exp_avg_sq.float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    weight32 = weight.float()
                    if weight_decay:
                        weight32.mul_(1 - lr * weight_decay)
                    denominator = (exp_avg_sq32 / bias_correction2).sqrt_().add_(eps)
                    weight32.addcdiv_(exp_avg32, denominator, value=-step_size)
                    for target, value in ((weight, weight32), (exp_avg, exp_avg32), (exp_avg_sq, exp_avg_sq32)):
                        if target.dtype == torch.bfloat16:
                            stochastic_round_(target, value, generator)
                        else:
                            target.copy_(value)
        return None

    def _kernel_step(self, parameter, state, step: int, lr, beta1, beta2, eps, weight_decay) -> bool:
        """The step as one Triton kernel (CUDA, or forced with RTO_FAST_BACKEND=triton) for a contiguous bf16
        parameter; False when the torch path must run it. The kernel's seed comes from the optimizer's host generator
        (no device sync), so its draws are reproducible and resume with the state."""
        tensors = (parameter, parameter.grad, state["exp_avg"], state["exp_avg_sq"])
        if not ops.fused_adamw_available(*tensors):
            return False
        seed = int(torch.randint(0, 1 << 31, (1,), generator=self._generator(torch.device("cpu"))))
        ops.stochastic_rounding_adamw_(*tensors, seed=seed, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                       weight_decay=weight_decay, step=step)
        return True

    def state_dict(self):
        state = super().state_dict()
        state["generators"] = {str(device): generator.get_state() for device, generator in self.generators.items()}
        return state

    def load_state_dict(self, state_dict) -> None:
        state_dict, generators = _pop_own_state(state_dict, "generators", type(self).__name__)
        super().load_state_dict(state_dict)
        for device, generator_state in generators.items():
            self._generator(torch.device(device)).set_state(generator_state)


def _parameter_list(params, optimizer: str) -> list:
    """The parameters as a list: one group, at least one parameter."""
    params = list(params)
    if not params:
        raise ValueError(f"{optimizer}: no parameters to optimize")
    if isinstance(params[0], dict):
        raise TypeError(f"{optimizer}: takes a list of parameters (one group), not parameter groups")
    return params


def _pop_own_state(state_dict: dict, key: str, optimizer: str) -> tuple[dict, object]:
    """(torch's part of a saved optimizer state, the value under `key` that this optimizer added to it)."""
    state_dict = dict(state_dict)
    value = state_dict.pop(key, None)
    if value is None:
        raise ValueError(f"{optimizer}.load_state_dict: the state has no {key!r} (it was saved by another optimizer; "
                         "set model.bf16_optimizer as the run that saved it had it)")
    return state_dict, value


def _chunks(tensor: torch.Tensor, size: int):
    """Views of a tensor's elements, `size` at a time (a non-contiguous tensor whole)."""
    if not tensor.is_contiguous():
        return [tensor]
    flat = tensor.view(-1)
    return [flat[start:start + size] for start in range(0, flat.numel(), size)]


class NonFiniteGradients(RuntimeError):
    """Too many optimizer steps in a row had a NaN or inf gradient norm (see `NonFiniteSteps`)."""


class NonFiniteSteps:
    """Tells whether an optimizer step may apply its update: not when its gradient norm is NaN or inf (one bad batch
    must not write NaN into every weight and optimizer state, and then into every later checkpoint). Skipped updates
    are counted; `limit` bad units in a row (an optimizer step of SFT / DPO / RM, an iteration of RL: `finish_unit`)
    raise NonFiniteGradients: the data or the model is broken, and the checkpoints on disk still hold the last good
    state. `applied=True` (DeepSpeed, whose step has already run when its norm is known) stops at the first one."""

    def __init__(self, stage: str, limit: int):
        self.stage, self.limit = stage, limit
        self.in_a_row = 0  # bad units in a row
        self.skipped = 0  # skipped updates in all
        self.unit_skipped = False

    def allows(self, grad_norm: float, where: str, model: str = "model", applied: bool = False) -> bool:
        """True when the update may be applied; `where` names the step in messages ("step 12", "iteration 3")."""
        if math.isfinite(grad_norm):
            return True
        if applied:
            raise NonFiniteGradients(f"{self.stage}: {where}: the {model}'s gradient norm is {grad_norm} and DeepSpeed "
                                     "has applied the update; the checkpoints saved before it hold the last finite "
                                     "weights")
        self.skipped += 1
        self.unit_skipped = True
        logger.warning("%s: %s: the %s's gradient norm is %s; update skipped", self.stage, where, model, grad_norm)
        return False

    def finish_unit(self, where: str, unit: str = "optimizer steps") -> None:
        """End of a step (RL: iteration): one more bad one in a row if it skipped an update, else the count restarts."""
        bad, self.unit_skipped = self.unit_skipped, False
        self.in_a_row = self.in_a_row + 1 if bad else 0
        if self.in_a_row >= self.limit:
            raise NonFiniteGradients(f"{self.stage}: {self.in_a_row} {unit} in a row, the last {where}, had NaN or inf "
                                     f"gradient norms (runtime.max_nonfinite_steps={self.limit}); their updates were "
                                     "skipped, so the weights and the checkpoints hold the last finite state")
