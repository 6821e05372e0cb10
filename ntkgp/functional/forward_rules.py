"""Ops without a forward-mode (JVP) rule: recognising the error, and naming the module that called the op."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, cast

from torch import Tensor, nn
from torch.func import vjp

__all__ = ["calling_module", "missing_forward_rule", "vjp_of"]

_NO_FORWARD_AD = re.compile(
    r"forward AD with (\S+) that does not support it|no forward AD formula for (\S+)"
    r"|derivative for (\S+) is not implemented",
    re.IGNORECASE,
)


def missing_forward_rule(err: Exception) -> str | None:
    """The op named in a 'no forward-mode rule' error, or None if ``err`` is something else."""
    match = _NO_FORWARD_AD.search(str(err))
    if match:
        return next(g for g in match.groups() if g)
    if "implement the jvp function for custom autograd.Function" in str(err):
        return "a custom autograd.Function with no jvp"
    return None


def vjp_of(f: Callable[[Tensor], Tensor], primal: Tensor) -> tuple[Tensor, Callable[[Tensor], tuple[Tensor, ...]]]:
    """``torch.func.vjp`` of a function with no auxiliary output (its stubs type the result as a triple)."""
    out, vjp_fn = cast(tuple[Tensor, Callable[[Tensor], tuple[Tensor, ...]]], vjp(f, primal))
    return out, vjp_fn


def calling_module(module: nn.Module, run: Callable[[], Any]) -> str | None:
    """The innermost submodule of ``module`` that was running when ``run()`` raised, as "name (Type)"; None if it did
    not raise or raised outside every submodule. Forward hooks track the modules entered and left."""
    stack: list[str] = []
    handles = []

    def enter(label: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            stack.append(label)

        return hook

    def leave(*_: Any) -> None:  # returns None: a forward hook's return value would replace the module's output
        if stack:
            stack.pop()

    for name, m in module.named_modules():
        handles.append(m.register_forward_pre_hook(enter(f"{name or 'the network'} ({type(m).__name__})")))
        handles.append(m.register_forward_hook(leave))
    try:
        run()
    except Exception:  # noqa: BLE001 — any failure: what matters is where it happened
        return stack[-1] if stack else None
    finally:
        for handle in handles:
            handle.remove()
    return None
