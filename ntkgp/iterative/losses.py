"""The losses of the iterative-linearisation trainer and of damped Gauss-Newton, applied to network outputs.

``"cross_entropy"``: the mean softmax cross-entropy over the batch (the softmax is not linearised: it is applied
to the linearised logits, as the paper does); targets are class labels (b,). ``"mse"``: the mean over the batch of
½‖f − y‖², targets (b, C) (or (b,) for one output). A callable ``loss(outputs (b, C), targets) -> scalar`` is used
as given; it must depend on the outputs (checked at its first use).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LOSSES", "as_loss", "check_loss_value", "squared_error"]


def squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean over the batch of ½‖f − y‖²; outputs (b, C), targets (b, C) or (b,) when C = 1."""
    return 0.5 * (outputs - targets.reshape(outputs.shape)).pow(2).sum(-1).mean()


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "cross_entropy": nn.functional.cross_entropy,
    "mse": squared_error,
}


def as_loss(loss: str | Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """``loss`` as a function (outputs, targets) -> scalar: a name of :data:`LOSSES` or a callable of two arguments."""
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)} or a callable loss(outputs, targets), got {loss!r}")
        return LOSSES[loss]
    if not callable(loss):
        raise TypeError(
            f"loss must be one of {sorted(LOSSES)} or a callable loss(outputs, targets), got {type(loss).__name__}"
        )
    try:
        inspect.signature(loss).bind(None, None)
    except TypeError as err:
        raise TypeError(
            f"loss must take (outputs, targets) and return a scalar; {loss!r} cannot be called with two "
            f"arguments: {err}"
        ) from err
    except ValueError:  # a builtin without a signature: checked at its first use
        pass
    return loss


def check_loss_value(value: Any, outputs: Tensor) -> Tensor:
    """``value`` (a loss of ``outputs``) if it is a finite scalar tensor that depends on ``outputs``, else raise."""
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"loss(outputs, targets) must return a scalar tensor, got {shape}")
    if outputs.requires_grad and not value.requires_grad:
        raise ValueError(
            "loss(outputs, targets) does not depend on the outputs (its value has no gradient in them): "
            "the loss must be computed from the outputs it is given, e.g. "
            "lambda f, y: torch.nn.functional.cross_entropy(f, y)"
        )
    if not torch.isfinite(value):
        raise FloatingPointError(
            f"the loss is {float(value)}: the training diverged (lower the learning rate) or the targets are not finite"
        )
    return value.reshape(())
