"""AdamW with fp32 master weights for parameters stored in bf16 (or fp16): mixed-precision training without casts.

Under `torch.autocast(dtype=torch.bfloat16)`, every fp32 trainable weight of an `nn.Linear` is cast to bf16 before its
GEMM, in every step, and its bf16 gradient is widened back to an fp32 `.grad` for the optimizer: two passes over every
such weight. [`MixedPrecisionAdamW`] stores those weights in bf16 instead, which is exactly what autocast would cast
them to, so the forward and the gradients are the same numbers, and keeps their fp32 values as master weights in its
state. Its step reads the bf16 gradient, updates the fp32 master weight and its moments, and writes the bf16 copy, in
one pass (`torch.compile` on CUDA, with inductor's combo kernels: the updates of many parameters share a few kernels).
of3b's training step on an H100 (8 x 255 tokens, the whole step one CUDA graph) went from 82.5 to 78.7 ms with it
(README, Benchmarks, run 22); the combo kernels took another 0.8% off on an H200 (run 41).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .decoding_kernels import inductor_has_option

__all__ = ["MixedPrecisionAdamW", "autocast_linear_parameters"]

_FLOAT32_STATE = ("master", "exp_avg", "exp_avg_sq", "step")


def autocast_linear_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable fp32 parameters that autocast casts to its lower precision wherever they are used: those of
    `nn.Linear` modules only (a weight shared with another module, e.g. an embedding matrix tied to the output layer,
    is left out: the embedding lookup would see the stored dtype). Storing these in bf16 leaves a bf16-autocast
    forward, and its gradients, unchanged."""
    owners: dict[int, tuple[nn.Parameter, bool]] = {}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            _, all_linear = owners.get(id(parameter), (parameter, True))
            owners[id(parameter)] = (parameter, all_linear and isinstance(module, nn.Linear))
    return [
        parameter
        for parameter, all_linear in owners.values()
        if all_linear and parameter.requires_grad and parameter.dtype == torch.float32
    ]


def _adamw(
    masters: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    low_precision: list[torch.Tensor | None],
    lr: torch.Tensor,
    grad_scale: torch.Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step on each master weight (the arithmetic of `torch.optim.AdamW`'s fused kernel in fp32, up to
    rounding), then its low-precision copy, where it has one, is written. Gradients are widened to fp32 and multiplied
    by `grad_scale` (gradient clipping)."""
    for i, master in enumerate(masters):
        exp_avg, exp_avg_sq, step, low = exp_avgs[i], exp_avg_sqs[i], steps[i], low_precision[i]
        grad = grads[i].float()
        if grad_scale is not None:
            grad = grad * grad_scale
        step += 1
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step).sqrt()
        master.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).add_((1 - beta2) * grad * grad)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        master.sub_(exp_avg / denom * (lr / bias_correction1))
        if low is not None:
            low.copy_(master)


class MixedPrecisionAdamW(torch.optim.Optimizer):
    """
    AdamW (decoupled weight decay, as `torch.optim.AdamW`) that keeps an fp32 master copy of every parameter stored in
    a lower precision, and updates the stored copy from it.

    Made for bf16-autocast training: pass the trainable parameters, and as `low_precision_params` those that autocast
    casts anyway ([`autocast_linear_parameters`]); at construction their fp32 values become the master weights and the
    parameters are stored in `low_precision_dtype`. The forward and backward are then unchanged (autocast would have
    made the same bf16 copies, and its gradients are bf16 numbers widened exactly), minus the casts. The fp32
    parameters among `params` are updated in place as by `torch.optim.AdamW`.

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = MixedPrecisionAdamW(params, lr=1e-4, low_precision_params=autocast_linear_parameters(model))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.clip_grad_norm_(1.0)  # instead of torch.nn.utils.clip_grad_norm_: the norm in fp32
        optimizer.step()
        optimizer.zero_grad()
        with optimizer.master_weights():  # save the fp32 values, not the bf16 copies
            model.save_pretrained("out")

    The step never syncs with the host (the step counts, the learning rate and the clipping factor live on the
    device), so it can be captured in a CUDA graph. A learning rate given as a float is copied to the device at each
    step (inside a captured graph, the value at capture); give a 0-d fp32 tensor on the parameters' device to change
    it between replays in place (`lr.fill_(new_value)`).

    Args:
        params: the parameters to train, or parameter groups (dicts with `params` and any of the options below).
        lr (`float` or `torch.Tensor`, defaults to 1e-3): learning rate.
        betas (`tuple[float, float]`, defaults to `(0.9, 0.999)`), eps (`float`, defaults to 1e-8),
        weight_decay (`float`, defaults to 1e-2): as `torch.optim.AdamW`.
        low_precision_params (iterable of `nn.Parameter`, *optional*): fp32 parameters, among `params`, to store in
            `low_precision_dtype` from now on, with fp32 master weights.
        low_precision_dtype (`torch.dtype`, defaults to `torch.bfloat16`).
        compile (`bool` or `str`, *optional*): fuse each parameter's update into one pass with `torch.compile` (a
            string: the `torch.compile` backend; default "inductor", which also groups the parameters' updates into a
            few combo kernels). Defaults to whether the parameters are on a CUDA device.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        low_precision_params: Iterable[nn.Parameter] = (),
        low_precision_dtype: torch.dtype = torch.bfloat16,
        compile: bool | str | None = None,
    ) -> None:
        if not 0.0 <= eps or not 0.0 <= weight_decay or not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"Invalid AdamW hyperparameters: betas={betas}, eps={eps}, weight_decay={weight_decay}.")
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError(f"A tensor learning rate must have one element, not shape {tuple(lr.shape)}.")
        if not isinstance(lr, torch.Tensor) and not 0.0 <= lr:  # negative or NaN
            raise ValueError(f"Invalid learning rate: {lr}.")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        ours = {id(p) for group in self.param_groups for p in group["params"]}
        for parameter in low_precision_params:
            if id(parameter) not in ours:
                raise ValueError("A parameter of `low_precision_params` is not among the optimizer's parameters.")
            if parameter.dtype != torch.float32:
                raise ValueError(
                    "`low_precision_params` must be fp32 (their values become the master weights), "
                    f"got {parameter.dtype}."
                )
            self.state[parameter]["master"] = parameter.detach().clone()
            parameter.data = parameter.data.to(low_precision_dtype)
        if compile is None:
            compile = all(p.device.type == "cuda" for group in self.param_groups for p in group["params"])
        self._update: Callable[..., None] = _adamw
        if compile:
            backend = compile if isinstance(compile, str) else "inductor"
            # a code object of its own: torch.compile caches (and counts recompilations) per code object, so that
            # each optimizer compiles for its own parameters only, however many optimizers the process makes
            update = types.FunctionType(_adamw.__code__.replace(), _adamw.__globals__, _adamw.__name__)
            # Inductor's combo kernels: the updates of many parameters (hundreds of small ones: LayerNorms, biases,
            # gates, step counts) run as a few kernels instead of one or two launches each
            combo = backend == "inductor" and inductor_has_option("combo_kernels")
            options = {"combo_kernels": True} if combo else None
            self._update = torch.compile(update, backend=backend, fullgraph=True, options=options)
        self._grad_scale: torch.Tensor | None = None
        self._lr_tensors: dict[int, torch.Tensor] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As `torch.optim.Optimizer.add_param_group` (the constructor's groups come through here too); a parameter
        already stored in low precision (bf16, fp16) gets an fp32 master weight from its current value."""
        super().add_param_group(param_group)
        for parameter in self.param_groups[-1]["params"]:
            if parameter.dtype != torch.float32 and "master" not in self.state[parameter]:
                self.state[parameter]["master"] = parameter.detach().float()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As `torch.optim.Optimizer.zero_grad`; a clipping factor from [`clip_grad_norm_`] not yet used by a step
        goes with the gradients it was computed from (a skipped step leaves nothing behind)."""
        self._grad_scale = None
        super().zero_grad(set_to_none=set_to_none)

    def _state_of(self, parameter: nn.Parameter) -> dict[str, Any]:
        state = self.state[parameter]
        if "step" not in state:
            master = state.get("master", parameter)
            state["step"] = torch.zeros((), dtype=torch.float32, device=parameter.device)
            state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
        return state

    def _with_grads(self) -> Iterator[tuple[int, dict[str, Any], list[nn.Parameter]]]:
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            for parameter in params:
                if parameter.grad.is_sparse:
                    raise RuntimeError("MixedPrecisionAdamW does not support sparse gradients.")
            if params:
                yield index, group, params

    def _lr(self, index: int, group: dict[str, Any], device: torch.device) -> torch.Tensor:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            return lr.to(device=device, dtype=torch.float32).reshape(())
        tensor = self._lr_tensors.get(index)
        if tensor is None or tensor.device != device:
            tensor = self._lr_tensors[index] = torch.empty((), dtype=torch.float32, device=device)
        return tensor.fill_(lr)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients of all parameters to a total norm of at most `max_norm`, like
        `torch.nn.utils.clip_grad_norm_` on fp32 gradients: the norm is computed in fp32 from the (exact) widened
        low-precision gradients, and the clipping factor is applied in fp32 by the next [`step`] (the bf16 gradients
        are left as they are). Returns the total norm (a 0-d fp32 tensor on the device; no host sync)."""
        grads = [p.grad for _, _, params in self._with_grads() for p in params]
        if not grads:
            return torch.zeros(())
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for grad in grads:  # one multi-tensor kernel per gradient dtype
            by_dtype.setdefault(grad.dtype, []).append(grad)
        norms = [norm for group in by_dtype.values() for norm in torch._foreach_norm(group, 2, dtype=torch.float32)]
        total = torch.linalg.vector_norm(torch.stack(norms))
        self._grad_scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        return total

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One AdamW step on every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group, params in self._with_grads():
            states = [self._state_of(p) for p in params]
            beta1, beta2 = group["betas"]
            # plain tensors (detached: the same storage), so that a compiled update guards on shapes and dtypes only
            self._update(
                [state.get("master", p).detach() for state, p in zip(states, params, strict=True)],
                [p.grad for p in params],
                [state["exp_avg"] for state in states],
                [state["exp_avg_sq"] for state in states],
                [state["step"] for state in states],
                [p.detach() if "master" in state else None for state, p in zip(states, params, strict=True)],
                self._lr(index, group, params[0].device),
                self._grad_scale,
                beta1,
                beta2,
                group["eps"],
                group["weight_decay"],
            )
        self._grad_scale = None
        return loss

    @contextlib.contextmanager
    def master_weights(self) -> Iterator[None]:
        """Within the block, the low-precision parameters hold their fp32 master weights (e.g. to save them, or to
        evaluate in fp32); afterwards their low-precision copies again."""
        swapped = []
        for group in self.param_groups:
            for parameter in group["params"]:
                master = self.state[parameter].get("master")
                if master is not None:
                    swapped.append((parameter, parameter.data))
                    parameter.data = master
        try:
            yield
        finally:
            for parameter, data in swapped:
                parameter.data = data

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As `torch.optim.Optimizer.load_state_dict`, but the master weights and moments stay fp32 (the base class
        casts every state tensor to its parameter's dtype, which would round them to bf16). A parameter stored in low
        precision whose saved state has no master weight keeps its current one."""
        masters = {
            p: self.state[p]["master"]
            for group in self.param_groups
            for p in group["params"]
            if "master" in self.state[p]
        }
        fp32_state = {
            key: {name: value for name, value in state.items() if name in _FLOAT32_STATE}
            for key, state in state_dict["state"].items()
        }
        lr_tensors = [group["lr"] if isinstance(group["lr"], torch.Tensor) else None for group in self.param_groups]
        super().load_state_dict(state_dict)
        # a tensor learning rate stays the caller's tensor (changed in place between CUDA-graph replays), with the
        # loaded value
        for group, tensor in zip(self.param_groups, lr_tensors, strict=True):
            if tensor is not None:
                tensor.copy_(torch.as_tensor(group["lr"], dtype=tensor.dtype))
                group["lr"] = tensor
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, parameter in zip(saved_ids, params, strict=True):
            for name, value in fp32_state.get(saved_id, {}).items():
                self.state[parameter][name] = value.to(device=parameter.device, dtype=torch.float32, copy=True)
        for parameter, master in masters.items():
            self.state[parameter].setdefault("master", master)
