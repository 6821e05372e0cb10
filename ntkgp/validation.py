"""Input checks shared by the operators and the models: each failure names the problem and the fix."""

from __future__ import annotations

import torch
from torch import Tensor, nn

_TRAIN_SENSITIVE = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def check_eval_mode(module: nn.Module) -> None:
    """Raise if a module whose output depends on train/eval mode (BatchNorm, Dropout) is in train mode."""
    bad = [name or type(module).__name__ for name, m in module.named_modules()
           if m.training and isinstance(m, _TRAIN_SENSITIVE)]
    if bad:
        raise ValueError(
            f"the network has BatchNorm/Dropout modules in train mode ({', '.join(bad[:5])}); "
            "the NTK is defined for the network in eval mode: call model.eval() first"
        )


def check_inputs(x: Tensor, dtype: torch.dtype, name: str = "x") -> None:
    """Raise unless ``x`` is a finite floating tensor of shape (n, ...) with n >= 1 in ``dtype``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (n, ...), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} has dtype {x.dtype}; the network needs floating inputs: convert with {name}.to({dtype})")
    if x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but the network's parameters are {dtype}: "
                        f"convert with {name}.to({dtype}) or the network with .to({x.dtype})")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape (n, ...) with n >= 1, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf values; remove or impute them first")


def check_targets(y: Tensor, n: int, num_outputs: int, dtype: torch.dtype) -> Tensor:
    """Validate regression targets against n inputs and C outputs; return them as (n, C)."""
    if not isinstance(y, Tensor):
        raise TypeError(f"train_y must be a torch.Tensor, got {type(y).__name__}")
    if not y.is_floating_point():
        raise TypeError(f"train_y has dtype {y.dtype}; regression targets must be floating: use train_y.to({dtype})")
    expected = "(n,) or (n, 1)" if num_outputs == 1 else f"(n, {num_outputs})"
    if y.dim() == 1 and num_outputs == 1:
        y = y.unsqueeze(-1)
    if y.dim() != 2 or y.shape[-1] != num_outputs:
        raise ValueError(f"train_y has shape {tuple(y.shape)} but the network has {num_outputs} output(s): "
                         f"expected {expected}")
    if y.shape[0] != n:
        raise ValueError(f"train_x has {n} inputs but train_y has {y.shape[0]} rows; they must match")
    if not torch.isfinite(y).all():
        raise ValueError("train_y contains NaN or Inf values; remove those examples first")
    return y.to(dtype)


def check_positive(value: float | None, name: str) -> None:
    """Raise unless ``value`` is None or a finite number > 0."""
    if value is None:
        return
    v = float(value)
    if not (v > 0 and v < float("inf")):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def check_labels(y: Tensor, n: int, num_classes: int) -> Tensor:
    """Validate class labels (n,) of integer dtype in [0, num_classes); return them as torch.long."""
    if not isinstance(y, Tensor):
        raise TypeError(f"train_y must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"train_y has dtype {y.dtype}; classification targets must be integer class indices "
                        "of shape (n,): convert one-hot targets with train_y.argmax(-1), labels with train_y.long()")
    if y.dim() != 1:
        raise ValueError(f"train_y must be class indices of shape (n,), got shape {tuple(y.shape)}")
    if y.shape[0] != n:
        raise ValueError(f"train_x has {n} inputs but train_y has {y.shape[0]} labels; they must match")
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}) for a network with {num_classes} outputs, got "
                         f"values in [{low}, {high}]: relabel the classes or give the network one logit per class")
    return y.long()
