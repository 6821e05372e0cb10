"""Input checks shared by the functional layer, the operators and the models.

Every failure names the argument, says what is wrong and what to do. Numbers are accepted as Python
or NumPy scalars or one-element tensors; strings, None (where not allowed) and multi-element tensors
are rejected with a ``TypeError``, out-of-range values with a ``ValueError``. Non-finite values that
arise inside a computation (a network's outputs, a Jacobian product, a finite-difference step) raise
a ``FloatingPointError`` that says where they arose.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn

from .inputs import magnitude

_TRAIN_SENSITIVE = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def check_eval_mode(module: nn.Module, why: str = "the NTK is defined for the network in eval mode") -> None:
    """Raise if a module whose output depends on train/eval mode (BatchNorm, Dropout) is in train mode; ``why``
    says in the message why eval mode is needed."""
    bad = [
        name or type(module).__name__
        for name, m in module.named_modules()
        if m.training and isinstance(m, _TRAIN_SENSITIVE)
    ]
    if bad:
        raise ValueError(
            f"the network has BatchNorm/Dropout modules in train mode ({', '.join(bad[:5])}); {why}: "
            "call model.eval() first"
        )


def _scalar(value: Any, name: str, kind: str) -> Any:
    """``value`` as a Python number if it is one (a bool is not), or a one-element tensor / NumPy scalar."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise TypeError(f"{name} must be a single number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    elif hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "size", 2) == 1:  # NumPy scalar
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__} {value!r}")
    return value


@overload
def as_positive_float(value: Any, name: str, allow_none: Literal[False] = False) -> float: ...


@overload
def as_positive_float(value: Any, name: str, allow_none: bool) -> float | None: ...


def as_positive_float(value: Any, name: str, allow_none: bool = False) -> float | None:
    """``value`` as a finite float > 0 (None passes through when ``allow_none``)."""
    if value is None and allow_none:
        return None
    v = float(_scalar(value, name, "a finite number > 0"))
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return v


def as_nonnegative_float(value: Any, name: str) -> float:
    """``value`` as a finite float >= 0."""
    v = float(_scalar(value, name, "a finite number >= 0"))
    if not (v >= 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return v


def as_count(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (integral floats such as 4.0 are refused: they hide mistakes)."""
    v = _scalar(value, name, f"an integer >= {minimum}")
    if not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {type(v).__name__} {value!r}")
    if v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v}")
    return int(v)


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_generator(generator: Any) -> torch.Generator | None:
    """``generator`` if it is a torch.Generator or None (a seed is not: pass torch.Generator().manual_seed(seed))."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__} {generator!r}: "
            "pass torch.Generator().manual_seed(seed)"
        )
    return generator


def check_precision(dtype: torch.dtype, name: str) -> None:
    """Raise a TypeError for half precision (float16, bfloat16): its 3 significant digits cannot resolve a kernel's
    spectrum or its evidence (a float16 fit ended in a non-finite evidence)."""
    if dtype.is_floating_point and torch.finfo(dtype).eps > torch.finfo(torch.float32).eps:
        raise TypeError(
            f"{name} are {dtype}: half precision is not supported (its 3 significant digits cannot resolve "
            "the kernel or the evidence); convert the network and the data with .float() or .double()"
        )


def check_tensor(value: Any, name: str, shape: str) -> Tensor:
    """Raise a TypeError naming ``name`` unless ``value`` is a tensor (lists and arrays are not converted:
    the dtype would be a guess)."""
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape {shape}, got {type(value).__name__}: convert it "
            f"with torch.as_tensor({name}, dtype=...)"
        )
    return value


def check_targets(y: Any, n: int, num_outputs: int, dtype: torch.dtype) -> Tensor:
    """Validate regression targets against n inputs and C outputs; return them as (n, C)."""
    check_tensor(y, "train_y", "(n,) or (n, C)")
    if not y.is_floating_point():
        raise TypeError(f"train_y has dtype {y.dtype}; regression targets must be floating: use train_y.to({dtype})")
    if y.dtype != dtype:
        raise TypeError(
            f"train_y has dtype {y.dtype} but the network's parameters are {dtype}: convert with "
            f"train_y.to({dtype}) (and the inputs), or the network with .to({y.dtype})"
        )
    expected = "(n,) or (n, 1)" if num_outputs == 1 else f"(n, {num_outputs})"
    if y.dim() == 1 and num_outputs == 1:
        y = y.unsqueeze(-1)
    if y.dim() != 2 or y.shape[-1] != num_outputs:
        raise ValueError(
            f"train_y has shape {tuple(y.shape)} but the network has {num_outputs} output(s): expected {expected}"
        )
    if y.shape[0] != n:
        raise ValueError(f"train_x has {n} inputs but train_y has {y.shape[0]} rows; they must match")
    if not torch.isfinite(y).all():
        raise ValueError("train_y contains NaN or Inf values; remove those examples first")
    return y


def check_labels(y: Any, n: int, num_classes: int) -> Tensor:
    """Validate class labels (n,) of integer dtype in [0, num_classes); return them as torch.long."""
    check_tensor(y, "train_y", "(n,) of class indices")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(
            f"train_y has dtype {y.dtype}; classification targets must be integer class indices "
            "of shape (n,): convert one-hot targets with train_y.argmax(-1), labels with train_y.long()"
        )
    if y.dim() != 1:
        raise ValueError(f"train_y must be class indices of shape (n,), got shape {tuple(y.shape)}")
    if y.shape[0] != n:
        raise ValueError(f"train_x has {n} inputs but train_y has {y.shape[0]} labels; they must match")
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}) for a network with {num_classes} outputs, got "
            f"values in [{low}, {high}]: relabel the classes or give the network one logit per class"
        )
    return y.long()


def in_transform() -> bool:
    """Whether a torch.func transform (vmap, grad, jvp, …) is active: data-dependent checks cannot run there."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def check_finite(t: Tensor, what: str, hint: str) -> Tensor:
    """Raise a FloatingPointError saying that ``what`` has NaN/Inf entries, and ``hint``; return ``t``.

    Skipped inside a torch.func transform (a data-dependent check cannot run there); the result is
    checked once it leaves the transform. A finite sum proves every entry finite in one read of ``t`` (27×
    faster than ``isfinite`` on an 18M-entry float32 tensor on the CPU); only a non-finite sum (NaN or Inf somewhere,
    or an overflow of the sum itself) looks at the entries.
    """
    if in_transform() or (t.is_floating_point() and bool(torch.isfinite(t.detach().sum()))):
        return t
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise FloatingPointError(f"{what} is not finite ({bad} of {t.numel()} entries NaN or Inf); {hint}")
    return t


def check_prediction(x: Any, **parts: Tensor | None) -> None:
    """Raise a FloatingPointError if a predictive quantity (name -> tensor) at inputs x is not finite."""
    for name, t in parts.items():
        if t is not None:
            check_finite(
                t,
                f"the predictive {name} at x",
                f"the network's Jacobian at these inputs is too large for "
                f"{t.dtype} (|x| up to {magnitude(x):.3g}): rescale or normalise the inputs",
            )


def check_finite_tensors(tensors: dict[str, Tensor], kind: str) -> None:
    """Raise naming the first floating tensor of ``tensors`` (name -> tensor) with NaN or Inf entries."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(
                f"the network's {kind} {name!r} has {bad} NaN or Inf entries of {t.numel()}: the "
                "linearisation would be NaN everywhere; load finite weights (or reset that module)"
            )


def check_not_sharded(network: Any, x: Any, what: str) -> None:
    """Raise if x is a shard of inputs across processes (``network.shard``) for a method that needs them all."""
    if network.is_sharded(x):
        raise NotImplementedError(
            f"{what} needs all its training inputs on one process, but train_x is a shard "
            "(network.shard; docs/distributed.md): pass the whole training set, or use what "
            "runs on shards: the operators, NTKGP(space='parameter'), Laplace (matrix-free) "
            "and LQF"
        )
