"""Linearisations kept for iterative solvers: one forward pass at fixed inputs, reused by every VJP and JVP.

Inside :meth:`LinearisationCache.linearised`, products at the given inputs reuse torch.func's ``vjp_fn`` and
``linearize``'s ``jvp_fn`` (a traced JVP), built once each within a memory budget measured from the tensors one
forward pass saves. A network that cannot be traced (an op without a forward rule, Python branches on its inputs'
values) keeps the ``vjp_fn`` and runs plain JVPs, after one warning.
"""

from __future__ import annotations

import builtins
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.func import linearize

from ..inputs import Inputs, inputs_at, length, requires_grad, same
from .checked_batching import BATCHING_ERRORS, CheckedBatching
from .forward_rules import missing_forward_rule, vjp_of
from .function import NetworkFunction

__all__ = ["LinearisationCache"]

#: products the cached linearisation reuses: (u -> Jᵀu, v -> J v or None, the output shape (n, C))
Linearisation = tuple[Callable, Callable | None, tuple[int, ...]]


class LinearisationCache(NetworkFunction, CheckedBatching):
    """The linearisations at the inputs of an active :meth:`linearised` context."""

    def _reset_checks(self) -> None:
        super()._reset_checks()
        self._linearisations: dict[int, tuple] = {}  # id(x) -> (x, vjp_fn, jvp_fn or None, output shape)

    def _saved_tensor_bytes(self, x: Inputs, count: int) -> list[int]:
        """Sizes of the tensors a forward pass over the first ``count`` inputs saves for its backward (in θ)."""
        sizes: list[int] = []

        def pack(t: Tensor) -> Tensor:
            sizes.append(t.numel() * t.element_size())
            return t

        theta = self.theta0.detach().requires_grad_(True)
        first = inputs_at(x, slice(0, count))
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self._head(self.features(first), first, theta)
        return sizes

    def _scaled(self, x: Inputs, measure: Callable[[list[int]], int]) -> int:
        """``measure`` of the saved tensors on one and on two inputs, extrapolated linearly to all of x."""
        n = length(x)
        one, two = measure(self._saved_tensor_bytes(x, 1)), measure(self._saved_tensor_bytes(x, min(2, n)))
        per_input = max(two - one, 0)
        return one - per_input + per_input * n

    def saved_activation_bytes(self, x: Inputs) -> int:
        """Estimated memory a linearisation at x holds: the tensors one forward pass saves for its backward, measured
        on one and on two inputs (a part that grows with n, a part that does not), for n, twice (the VJP's graph and
        the linearised JVP's)."""
        return 2 * self._scaled(x, sum)

    def largest_activation_bytes(self, x: Inputs) -> int:
        """The largest tensor a forward pass over x saves, scaled to n as above: what one tangent's JVP holds at its
        peak, about (forward mode frees the others as it goes)."""
        return self._scaled(x, lambda sizes: max(sizes, default=0))

    @contextmanager
    def linearised(self, *inputs: Inputs, budget: builtins.float | None = None) -> Iterator[bool]:
        """Within this context, VJPs and JVPs at these inputs reuse one forward pass each: torch.func's
        ``vjp_fn`` and ``linearize``'s ``jvp_fn``, built here (outside any autograd Function of
        linear_operator) for inputs whose :meth:`saved_activation_bytes` fit ``budget`` (default half of the
        device's available memory; 0 turns caching off). Yields whether every input was linearised. Meant for
        iterative solvers (CG, Lanczos), whose inputs never change between products."""
        from ..memory import default_budget

        budget = default_budget(self.device) if budget is None else budget
        added = []
        try:
            for x in inputs:
                if self._cached(x) is not None or requires_grad(x):
                    continue
                need = self.saved_activation_bytes(x)
                if need > budget:
                    continue
                budget -= need
                self._linearisations[id(x)] = (x, *self._linearise(x))
                added.append(id(x))
            yield all(self._cached(x) is not None for x in inputs)
        finally:
            for key in added:
                self._linearisations.pop(key, None)

    def _linearise(self, x: Inputs) -> Linearisation:
        """(u -> Jᵀu, v -> J v or None where the network cannot be traced, the output shape (n, C)) from one forward
        pass at x."""
        f = self._f(x)
        out, vjp_fn = vjp_of(f, self.theta0)
        jvp_fn = None
        if "linearised Jacobian-vector products" not in self._unbatched:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # torch.fx const folding inside linearize
                    _, jvp_fn = linearize(f, self.theta0)
            except BATCHING_ERRORS as err:
                if missing_forward_rule(err) is None:  # not traceable (Python branches on values): say so once
                    self._unbatchable("linearised Jacobian-vector products", err)
        return vjp_fn, jvp_fn, tuple(out.shape)

    def _cached(self, x: Inputs) -> Linearisation | None:
        """The linearisation at x, or at inputs whose tensors view the same memory the same way (GPyTorch hands
        kernels reshaped views of its training inputs), at the same version."""
        for t, *functions in self._linearisations.values():
            if same(t, x):
                return (functions[0], functions[1], functions[2])
        return None
