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
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

LOW_PRECISION = (torch.bfloat16, torch.float16)
# Float32 gradient copies are made this many elements at a time during a step (256 MiB), so the step's transient
# memory stays bounded whatever the model's size.
BUCKET_ELEMENTS = 1 << 26


def adamw(parameters, lr: float, settings, master_weights: bool = True) -> torch.optim.Optimizer:
    """torch's AdamW with a stage's settings (`weight_decay`, `adam_beta1`, `adam_beta2`), fused (one kernel over all
    tensors) where torch has it for the parameters' device: the multi-tensor (foreach) version materializes
    temporaries the size of all parameters in every step, and on 2 CPU cores it took 105 ms per step for 30 M
    parameters against the fused version's 15 ms. With `master_weights` (the default) bf16 / fp16 parameters are
    trained through float32 master copies (`MasterWeightAdamW`); without, their AdamW states and updates are bf16."""
    parameters = list(parameters)
    options = dict(lr=lr, weight_decay=settings.weight_decay, betas=(settings.adam_beta1, settings.adam_beta2))
    low_precision = any(parameter.dtype in LOW_PRECISION for parameter in parameters)
    if low_precision and master_weights:
        return MasterWeightAdamW(parameters, **options)
    if low_precision:
        logger.warning("model.master_weights=false: pure bf16 AdamW; a weight w only moves when its step (about the "
                       "lr, %g here) reaches half its bf16 spacing (at least |w| * 2^-9), so most small updates are lost", lr)
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
        params = list(params)
        if not params:
            raise ValueError("MasterWeightAdamW: no parameters to optimize")
        if isinstance(params[0], dict):
            raise TypeError("MasterWeightAdamW: takes a list of parameters (one group), not parameter groups")
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
        state_dict = dict(state_dict)
        saved = state_dict.pop("master_weights", None)
        if saved is None:
            raise ValueError("MasterWeightAdamW.load_state_dict: the state has no 'master_weights' (it was saved by "
                             "another optimizer; set model.master_weights as the run that saved it had it)")
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
