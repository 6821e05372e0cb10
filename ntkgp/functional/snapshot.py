"""A frozen snapshot of a module: the selected parameters as one flat vector θ0, the rest copied, and conversions.

The functional network (:class:`~ntkgp.functional.FunctionalNetwork`) is built on this part: what the network's
tensors are, how they convert (``.to``, ``.double()``, ``.cuda()``, as ``nn.Module`` and ``torch.Tensor`` do
it), how θ maps back to named parameters. The parts above it (the frozen-prefix cache, the cached linearisations,
shards, checked batching) each keep what they learnt in :meth:`Snapshot._reset_checks`, which a conversion calls.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..inputs import Inputs, call_arguments
from ..validation import check_eval_mode, check_finite, check_finite_tensors, check_precision, check_tensor
from .attention import differentiable_attention
from .parameters import select_parameters

__all__ = ["Snapshot"]


class Snapshot:
    """The tensors of ``module`` at the time of the call: θ0 (p,) of the selected parameters, the frozen parameters
    (copied, or shared and version-checked with ``copy_frozen=False``) and the buffers (copied)."""

    def __init__(self, module: nn.Module, params: Sequence[str] | str | None, copy_frozen: bool):
        if not isinstance(module, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(module).__name__}")
        check_eval_mode(module)
        self.module = module
        self.names = select_parameters(module, params)
        named = dict(module.named_parameters())
        buffers = dict(module.named_buffers())
        check_finite_tensors({n: named[n] for n in self.names}, "parameter")
        check_finite_tensors({n: t for n, t in named.items() if n not in self.names}, "frozen parameter")
        check_finite_tensors(buffers, "buffer")
        check_precision(named[self.names[0]].dtype, "the network's parameters")
        _warn_zero_adapters(named, self.names)
        self.shapes = [named[n].shape for n in self.names]
        self.numels = [named[n].numel() for n in self.names]
        self.theta0 = torch.cat([named[n].detach().reshape(-1) for n in self.names])
        frozen = {n: t.detach() for n, t in named.items() if n not in self.names}
        self.frozen = {n: t.clone() for n, t in frozen.items()} if copy_frozen else frozen
        self._shared_versions = None if copy_frozen else {n: t._version for n, t in frozen.items()}
        self.buffers = {n: t.detach().clone() for n, t in buffers.items()}
        self.constant_entries = _padding_rows(module, self.names, self.numels)

    def _without_constants(self, tangents: Tensor) -> Tensor:
        """Tangents (k, p) with the :attr:`constant_entries` zeroed: forward mode then agrees with autograd's reverse
        mode, which gives an embedding's padding row no gradient."""
        if not self.constant_entries:
            return tangents
        index = torch.tensor(self.constant_entries, device=tangents.device)
        return tangents.index_fill(-1, index, 0.0)

    def _reset_checks(self) -> None:
        """Forget what was learnt about the products (after a conversion: other kernels may run); each part above
        extends this."""

    @property
    def num_params(self) -> int:
        """p, the number of selected parameters."""
        return self.theta0.numel()

    @property
    def dtype(self) -> torch.dtype:
        return self.theta0.dtype

    @property
    def device(self) -> torch.device:
        return self.theta0.device

    # --- conversions, as nn.Module and torch.Tensor do them ------------------------------------------
    def _apply(self, fn: Callable[[Tensor], Tensor]) -> Any:
        """Apply ``fn`` to every tensor of the snapshot, in place (what ``nn.Module.to`` does); returns self.

        When ``fn`` returns every tensor itself (a conversion to what it already is) nothing is reset."""
        theta0 = fn(self.theta0)
        frozen = {n: fn(t) for n, t in self.frozen.items()}
        buffers = {n: fn(t) for n, t in self.buffers.items()}
        old = [self.theta0, *self.frozen.values(), *self.buffers.values()]
        if all(a is b for a, b in zip(old, [theta0, *frozen.values(), *buffers.values()])):
            return self
        self.theta0, self.frozen, self.buffers = theta0, frozen, buffers
        self._shared_versions = None  # converted copies are no longer shared with the module
        self._reset_checks()
        return self

    def to(self, *args: Any, **kwargs: Any) -> Any:
        """A converted copy, like ``Tensor.to`` / ``nn.Module.to``: floating tensors to the dtype, all to the
        device; self when nothing changes."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None:
            check_precision(dtype, "dtype")
        if (device is None or torch.device(device) == self.device) and (dtype is None or dtype == self.dtype):
            return self

        def convert(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None, non_blocking=non_blocking)

        return copy.copy(self)._apply(convert)

    def double(self) -> Any:
        return self.to(torch.float64)

    def float(self) -> Any:
        return self.to(torch.float32)

    def cpu(self) -> Any:
        return self.to("cpu")

    def cuda(self, device: int | str | torch.device | None = None) -> Any:
        return self.to(f"cuda:{device}" if isinstance(device, int) else device or "cuda")

    def clone(self) -> Any:
        """A copy with its own tensors."""
        return copy.copy(self)._apply(torch.clone)

    def _at(self, theta: Tensor) -> Any:
        """A shallow copy holding θ0 = ``theta`` (checked)."""
        check_tensor(theta, "theta", f"({self.num_params},)")
        if theta.shape != self.theta0.shape or theta.dtype != self.dtype or theta.device != self.device:
            raise ValueError(
                f"theta must be a ({self.num_params},) {self.dtype} tensor on {self.device} (the selected "
                f"parameters, flat), got {tuple(theta.shape)} {theta.dtype} on {theta.device}"
            )
        moved = copy.copy(self)
        moved.theta0 = check_finite(theta.detach().clone(), "theta", "the weights diverged: lower the learning rate")
        return moved

    # --- the tensors by name ---------------------------------------------------------------------------
    def _check_state(self) -> None:
        """Raise if the module left eval mode or a shared frozen parameter changed since the snapshot."""
        check_eval_mode(self.module)
        if self._shared_versions is not None:
            changed = [n for n, t in self.frozen.items() if t._version != self._shared_versions[n]]
            if changed:
                raise RuntimeError(
                    f"the frozen parameter(s) {changed[:5]} of the network were changed in place after "
                    "this linearisation was built with copy_frozen=False; rebuild it (or use the "
                    "default copy_frozen=True)"
                )

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Flat (p,) vector to a name -> tensor dict of the selected parameters."""
        check_tensor(theta, "theta", f"({self.num_params},)")
        if theta.shape != (self.num_params,):
            raise ValueError(
                f"theta must have shape ({self.num_params},) (the selected parameters, flat), got {tuple(theta.shape)}"
            )
        return {n: t.view(s) for n, t, s in zip(self.names, theta.split(self.numels), self.shapes)}

    def _values(self, part: nn.Module, theta: Tensor | None) -> dict[str, Tensor]:
        """The snapshot's tensors that ``part`` (the module or a graph module of its split) holds, by name."""
        values = {**self.frozen, **self.buffers, **({} if theta is None else self.unflatten(theta))}
        if part is self.module:
            return values
        names = [n for n, _ in part.named_parameters(remove_duplicate=False)]
        names += [n for n, _ in part.named_buffers(remove_duplicate=False)]
        return {n: values[n] for n in names if n in values}

    def _run(self, part: nn.Module, theta: Tensor | None, x: Inputs) -> Any:
        """``part`` (the module or a graph module of its split) called on x with the snapshot's tensors (θ = ``theta``;
        None: the frozen ones only), attention differentiable (:mod:`~ntkgp.functional.attention`); its raw output."""
        args, kwargs = call_arguments(x)
        with differentiable_attention():
            return functional_call(part, self._values(part, theta), args, kwargs)


def _padding_rows(module: nn.Module, selected: list[str], numels: list[int]) -> list[int]:
    """Positions in θ of the padding rows of selected ``nn.Embedding`` weights (``padding_idx``): autograd gives them no
    gradient, so the linearisation holds them constant (JVPs zero their tangents, as VJPs do)."""
    offsets = dict(zip(selected, [sum(numels[:i]) for i in range(len(numels))]))
    positions: list[int] = []
    for name, m in module.named_modules():
        weight = f"{name}.weight" if name else "weight"
        if isinstance(m, nn.Embedding) and m.padding_idx is not None and weight in offsets:
            start = offsets[weight] + m.padding_idx * m.embedding_dim
            positions.extend(range(start, start + m.embedding_dim))
    return positions


_LORA_A = re.compile(r"(.*)\.lora_A\.([^.]+)\.weight$")


def _warn_zero_adapters(named: Mapping[str, Tensor], selected: list[str]) -> None:
    """Warn when selected LoRA ``lora_A`` matrices multiply a ``lora_B`` that is zero (peft's initialisation): the
    Jacobian in A is then identically zero at θ0, and the kernel ignores those adapters."""
    dead = []
    for name in selected:
        match = _LORA_A.match(name)
        partner = f"{match.group(1)}.lora_B.{match.group(2)}.weight" if match else None
        if partner is not None and partner in named and not bool(named[partner].detach().any()):
            dead.append(name)
    if dead:
        warnings.warn(
            f"{len(dead)} selected LoRA matrices lora_A ({dead[0]}, …) multiply a lora_B that is all zeros "
            "(peft's initialisation): the network's Jacobian in them is identically zero at these weights, so the "
            "kernel ignores them and only lora_B counts. Train the adapters first, build them with "
            "LoraConfig(init_lora_weights=False) (a random lora_B), or select only the lora_B matrices",
            UserWarning,
            stacklevel=4,
        )
