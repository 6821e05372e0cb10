"""Leaky-ReLU networks for LQF: the same weights with every ReLU / ReLU6 module made leaky.

In a linearised network a ReLU that is off at θ0 blocks the gradient of everything before it for that
input: its filters never train (LQF §3.3). A leaky slope keeps them in the Jacobian. The weights are kept
as they are: a network pretrained with ReLU then runs slightly differently (no retraining is done).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..validation import as_positive_float, check_tensor

__all__ = ["LeakyReLU6", "leaky_relu"]

# functions that compute a ReLU or ReLU6 outside a module (ReLU6 is hardtanh(0, 6))
_FUNCTIONAL_RELUS = {
    F.relu: "torch.nn.functional.relu",
    F.relu_: "torch.nn.functional.relu_",
    torch.relu: "torch.relu",
    torch.relu_: "torch.relu_",
    Tensor.relu: "Tensor.relu",
    Tensor.relu_: "Tensor.relu_",
    F.relu6: "torch.nn.functional.relu6",
    F.hardtanh: "torch.nn.functional.hardtanh",
    F.hardtanh_: "torch.nn.functional.hardtanh_",
}


class LeakyReLU6(nn.Module):
    """ReLU6 with slope ``negative_slope`` below 0 and above 6: s·x + (1 − s)·clamp(x, 0, 6)."""

    def __init__(self, negative_slope: float = 0.01):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x: Tensor) -> Tensor:
        return self.negative_slope * x + (1 - self.negative_slope) * x.clamp(0, 6)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"


def leaky_relu(model: nn.Module, negative_slope: float = 0.01, example_input: Tensor | None = None) -> nn.Module:
    """A copy of ``model`` with every ``nn.ReLU`` replaced by ``nn.LeakyReLU(negative_slope)`` and every
    ``nn.ReLU6`` by :class:`LeakyReLU6`, weights and buffers kept; ``model`` is not modified.

    A ReLU called functionally in a ``forward`` (``F.relu``, ``torch.relu``, ``x.relu()``, ``F.relu6``)
    cannot be swapped: a probe forward pass of the copy on ``example_input`` (default: two random inputs
    shaped for the first Conv2d (3 channels and up, 32 × 32) or Linear layer) watches for such calls, and
    their presence is an error naming the function. Raises if no ReLU/ReLU6 module is found.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    slope = as_positive_float(negative_slope, "negative_slope")
    if slope >= 1:
        raise ValueError(f"negative_slope must lie in (0, 1), got {slope:g}")
    converted = copy.deepcopy(model)
    swapped = _swap(converted, slope)
    if not swapped:
        raise ValueError(
            "the network has no nn.ReLU or nn.ReLU6 module to make leaky (a network that calls F.relu "
            "in its forward cannot be converted by swapping modules: use nn.ReLU modules)"
        )
    x = _probe(converted) if example_input is None else example_input
    check_tensor(x, "example_input", "(b, ...) inputs of the network")
    calls = _functional_relu_calls(converted, x)
    if calls:
        raise ValueError(
            f"the network calls {', '.join(sorted(calls))} in its forward: a ReLU that is not an "
            f"nn.ReLU/nn.ReLU6 module cannot be made leaky by swapping modules ({len(swapped)} modules "
            "were swappable); replace those calls by modules, or write the leaky version yourself"
        )
    return converted


def _swap(module: nn.Module, slope: float) -> list[str]:
    """Replace ReLU/ReLU6 children in place, recursively; the names of the replaced modules."""
    swapped = []
    for name, child in module.named_children():
        if type(child) is nn.ReLU:
            setattr(module, name, nn.LeakyReLU(slope, inplace=child.inplace))
            swapped.append(name)
        elif type(child) is nn.ReLU6:
            setattr(module, name, LeakyReLU6(slope))
            swapped.append(name)
        else:
            swapped += [f"{name}.{n}" for n in _swap(child, slope)]
    return swapped


class _Watch(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: set[str] = set()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _FUNCTIONAL_RELUS:
            self.calls.add(_FUNCTIONAL_RELUS[func])
        return func(*args, **(kwargs or {}))


def _functional_relu_calls(model: nn.Module, x: Tensor) -> set[str]:
    """Names of the ReLU functions that one forward pass of ``model`` on x calls."""
    watch, training = _Watch(), model.training
    try:
        with torch.no_grad(), watch:
            model.eval()(x)
    except Exception as err:
        raise ValueError(
            f"the probe forward pass on inputs of shape {tuple(x.shape)} failed "
            f"({type(err).__name__}: {str(err).splitlines()[0]}); pass example_input=, a batch of the "
            "network's inputs"
        ) from err
    finally:
        model.train(training)
    return watch.calls


def _probe(model: nn.Module) -> Tensor:
    """Two random inputs for the first Conv2d (32 × 32) or Linear layer of ``model``."""
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    device = param.device if param is not None else None
    generator = torch.Generator().manual_seed(0)
    for layer in model.modules():
        if isinstance(layer, nn.Conv2d):
            return torch.randn(2, layer.in_channels, 32, 32, generator=generator, dtype=dtype).to(device)
        if isinstance(layer, nn.Linear):
            return torch.randn(2, layer.in_features, generator=generator, dtype=dtype).to(device)
    raise ValueError("cannot guess the network's input shape (no Conv2d or Linear layer): pass example_input=")
