"""The GPyTorch face of the finite NTK: a Kernel whose covariance is the lazy NTKOperator, and which gives the
Fisher operator of the same network for any inputs."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import gpytorch
import torch
from linear_operator.operators import DenseLinearOperator, LinearOperator
from torch import Tensor, nn

from ..functional import FunctionalNetwork, as_functional_network
from ..inputs import Inputs, check_inputs
from ..operators.fisher_operator import FisherOperator, fisher_operator
from ..operators.ntk_operator import NTKOperator
from ..validation import as_count, check_tensor

__all__ = ["JacobianKernel"]


class JacobianKernel(gpytorch.kernels.Kernel):
    """k(x, x') = J(x) J(x')ᵀ of a network with C outputs, for use in any GPyTorch model.

    GPyTorch passes inputs as (n, d) float matrices; ``input_shape`` (default ``(d,)``) is the per-example
    shape the network expects, and inputs are reshaped to (n, *input_shape) before the network sees
    them. A network that takes something else — token ids, several tensors, a mapping (:mod:`ntkgp.inputs`) — gets
    them from ``inputs``, a function from the (n, d) float matrix to the network's inputs: ``lambda x: x.long()`` for
    token ids carried as floats, or ``ntkgp.inputs.Unpack(structure)`` for inputs flattened by
    ``ntkgp.inputs.pack`` (what :class:`~ntkgp.NTKGP` does).
    Batched inputs (..., n, d) — BoTorch's (b × q × d) candidates, batched multi-output models —
    give a dense (..., n·C, m·C) kernel from per-sample Jacobians (differentiable in the inputs); the
    Jacobians of the last unbatched input (the training inputs, which GPyTorch puts first in every batch of
    a prediction) are kept and reused, not recomputed per batch member. With C > 1 outputs the covariance is
    (n·C × n'·C), interleaved as in
    :class:`~gpytorch.distributions.MultitaskMultivariateNormal` with ``interleaved=True``.
    Wrap it in :class:`~gpytorch.kernels.ScaleKernel` for an output scale. :meth:`fisher` gives the
    (p × p) Fisher JᵀHJ of the same network and parameters on any inputs. The network is held as a
    frozen snapshot, not as a submodule: ``.train()`` on the GP never touches it, while ``.to(...)``,
    ``.double()``, ``.float()`` on the kernel or on any model holding it convert the snapshot too.

    Args:
        model: the network (eval mode), or a :class:`FunctionalNetwork`.
        params: the parameters to linearise in (names or module prefixes; default all trainable).
        input_shape: per-example input shape of the network (a sequence of sizes, or one int).
        chunk_size: vectors pushed through the network at once (default 32).
        inputs: a function from GPyTorch's (n, d) float inputs to the network's n inputs (instead of
            ``input_shape``).
    """

    has_lengthscale = False

    def __init__(
        self,
        model: nn.Module | FunctionalNetwork,
        params: Sequence[str] | str | None = None,
        input_shape: Sequence[int] | int | None = None,
        chunk_size: int | None = None,
        inputs: Callable[[Tensor], Inputs] | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.network = as_functional_network(model, params, chunk_size)
        self.input_shape = _as_shape(input_shape)
        if inputs is not None and (not callable(inputs) or self.input_shape is not None):
            raise TypeError(
                "inputs must be a function from (n, d) float inputs to the network's inputs, given instead of "
                f"input_shape; got {type(inputs).__name__} with input_shape {self.input_shape}"
            )
        self.inputs = inputs
        if self.input_shape is not None and not isinstance(model, FunctionalNetwork):
            # one forward pass on a zero input: a shape the network refuses fails here, not at the first call (a
            # FunctionalNetwork comes from NTKGP and the like, which check their inputs themselves)
            probe = torch.zeros(1, *self.input_shape, dtype=self.network.dtype, device=self.network.device)
            try:
                self.network.num_outputs(probe)
            except ValueError as err:
                raise ValueError(
                    f"input_shape {self.input_shape} does not fit the network: {err}. Pass the "
                    "per-example shape it expects, e.g. (channels, height, width) for a CNN"
                ) from None
        self._num_outputs: int | None = None
        self._memo: dict | None = None
        self._train_inputs: Tensor | None = None  # the last unbatched x1 (GPyTorch's training inputs)
        self._train_jacobians: Tensor | None = None  # its per-sample Jacobians, computed on first batched use

    def __call__(
        self,
        x1: Tensor,
        x2: Tensor | None = None,
        diag: bool = False,
        last_dim_is_batch: bool = False,
        **params: Any,
    ) -> Any:
        """GPyTorch's kernel call, after a check of the inputs' types and feature counts (GPyTorch's own errors
        for these come from deep inside it)."""
        for name, x in (("x1", x1), ("x2", x2)):
            if x is not None:
                check_tensor(x, name, "(n, d)")
                if x.dim() < 2:
                    raise ValueError(f"{name} must have shape (n, d), got {tuple(x.shape)}")
        if x2 is not None and x2.shape[-1] != x1.shape[-1]:
            raise ValueError(f"x1 has {x1.shape[-1]} features per input but x2 has {x2.shape[-1]}; they must match")
        return super().__call__(x1, x2, diag=diag, last_dim_is_batch=last_dim_is_batch, **params)

    def _apply(self, fn: Callable[[Tensor], Tensor], *args: Any, **kwargs: Any) -> Any:
        """Conversions (``.to``, ``.double()``, …) reach the network snapshot, as they reach a submodule."""
        self.network._apply(fn)
        return super()._apply(fn, *args, **kwargs)

    def _inputs(self, x: Tensor, name: str = "x") -> Inputs:
        """The network's inputs for GPyTorch's (n, d) float inputs x."""
        check_tensor(x, name, "(n, d)")
        if not x.is_floating_point():
            raise TypeError(
                f"{name} has dtype {x.dtype}: GPyTorch's inputs are (n, d) float matrices; carry token ids as floats "
                "and map them back with JacobianKernel(..., inputs=lambda x: x.long())"
            )
        check_inputs(x, self.network.dtype, name, self.network.device)
        if self.inputs is not None:
            return check_inputs(self.inputs(x), self.network.dtype, f"inputs({name})", self.network.device)
        if self.input_shape is None:
            return x
        if x.shape[-1] != math.prod(self.input_shape):
            raise ValueError(
                f"{name} has d = {x.shape[-1]} features per input but input_shape {self.input_shape} "
                f"holds {math.prod(self.input_shape)}: pass inputs (n, {math.prod(self.input_shape)}) "
                "or the matching input_shape"
            )
        return x.reshape(x.shape[0], *self.input_shape)

    def num_outputs(self, x: Tensor) -> int:
        """C, the network's output width (one forward pass on first use)."""
        if self._num_outputs is None:
            self._num_outputs = self.network.num_outputs(self._inputs(x.reshape(-1, x.shape[-1])))
        return self._num_outputs

    def num_outputs_per_input(self, x1: Tensor, x2: Tensor) -> int:
        return self.num_outputs(x1)

    def _jacobians(self, x: Tensor, name: str) -> Tensor:
        """Per-sample Jacobians (..., n, C, p) of batched inputs x (..., n, d), differentiable in x. Leading rows that
        equal the last unbatched x1 the kernel saw (GPyTorch puts the training inputs first in every batch of a
        prediction) take its Jacobians, computed once, instead of recomputing them for each batch member."""
        train = self._train_inputs
        n = 0 if train is None else train.shape[0]
        if (
            train is not None
            and n > 0
            and x.shape[-2] >= n
            and torch.equal(x[..., :n, :].detach(), train.expand(*x.shape[:-2], *train.shape))
        ):
            if self._train_jacobians is None:
                self._train_jacobians = self._jacobian_rows(train, name).detach()
            known = self._train_jacobians.expand(*x.shape[:-2], *self._train_jacobians.shape)
            rest = self._jacobian_rows(x[..., n:, :].reshape(-1, x.shape[-1]), name)
            return torch.cat([known, rest.reshape(*x.shape[:-2], x.shape[-2] - n, *known.shape[-2:])], -3)
        jac = self._jacobian_rows(x.reshape(-1, x.shape[-1]), name)
        return jac.reshape(*x.shape[:-1], *jac.shape[1:])

    def _jacobian_rows(self, rows: Tensor, name: str) -> Tensor:
        """(N, C, p) per-sample Jacobians of inputs (N, d)."""
        if rows.shape[0] == 0:
            return rows.new_zeros(0, self._num_outputs or 1, self.network.num_params)
        return torch.cat(list(self.network.jacobian_chunks(self._inputs(rows, name))))

    def _batched(self, x1: Tensor, x2: Tensor, diag: bool) -> Tensor | DenseLinearOperator:
        """The kernel of batched inputs (..., n, d) as a dense (..., n·C, m·C) matrix from per-sample Jacobians."""
        j1 = self._jacobians(x1, "x1")
        if diag:
            return (j1 * j1).sum(-1).reshape(*j1.shape[:-3], -1)
        j2 = j1 if x2 is x1 else self._jacobians(x2, "x2")
        kernel = torch.einsum("...ncp,...mdp->...ncmd", j1, j2)
        return DenseLinearOperator(kernel.reshape(*kernel.shape[:-4], kernel.shape[-4] * kernel.shape[-3], -1))

    def forward(
        self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params: Any
    ) -> Tensor | LinearOperator:
        if last_dim_is_batch:
            raise ValueError("JacobianKernel does not support last_dim_is_batch=True (deprecated in GPyTorch)")
        if x1.dim() > 2 or x2.dim() > 2:
            return self._batched(x1, x2, diag)
        if (
            self._train_inputs is None
            or self._train_inputs.shape != x1.shape
            or not torch.equal(self._train_inputs, x1.detach())
        ):
            self._train_inputs, self._train_jacobians = x1.detach().clone(), None  # Jacobians on first batched use
        a = self._inputs(x1, "x1")
        if x2.dim() == 2 and x2.shape[-1] != x1.shape[-1]:
            raise ValueError(f"x1 has {x1.shape[-1]} features per input but x2 has {x2.shape[-1]}; they must match")
        b = a if (x2 is x1 or (x2.shape == x1.shape and torch.equal(x1, x2))) else self._inputs(x2, "x2")
        op = NTKOperator.of(a, b, network=self.network, num_outputs=self.num_outputs(x1))
        if diag:
            return op._diagonal()
        if self._memo is None or x1.requires_grad or x2.requires_grad:
            return op
        key = (x1.data_ptr(), x2.data_ptr(), x1.shape, x2.shape, x1._version, x2._version)
        if key not in self._memo:
            self._memo[key] = op.to_dense()
        return DenseLinearOperator(self._memo[key])

    def fisher(
        self,
        x: Tensor,
        likelihood: str = "gaussian",
        method: str = "finite_difference",
        epsilon: float | None = None,
        at: Tensor | None = None,
    ) -> FisherOperator:
        """The (p × p) Fisher Σ_i J(x_i)ᵀ H_i J(x_i) of this kernel's network over inputs x (n, d), given as
        the kernel takes them (reshaped to ``input_shape``); ``likelihood``, ``method``, ``epsilon`` and ``at``
        as in :func:`~ntkgp.operators.fisher_operator.fisher_operator` (default: finite-difference products,
        about one gradient each)."""
        check_tensor(x, "x", "(n, d)")
        return fisher_operator(
            self.network, self._inputs(x), likelihood=likelihood, method=method, epsilon=epsilon, at=at
        )

    @contextmanager
    def memoize(self) -> Iterator[None]:
        """Within this context, dense kernel matrices are computed once per pair of input tensors.

        For hyperparameter fitting, where the inputs stay fixed and only scale and noise change.
        """
        if self._memo is not None:  # already memoizing: keep the outer cache
            yield
            return
        self._memo = {}
        try:
            yield
        finally:
            self._memo = None


def _as_shape(shape: Sequence[int] | int | None) -> tuple[int, ...] | None:
    """``input_shape`` as a tuple of positive sizes (an int is a one-dimensional shape)."""
    if shape is None:
        return None
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, Sequence) or isinstance(shape, str):
        raise TypeError(f"input_shape must be a sequence of sizes such as (1, 28, 28), got {type(shape).__name__}")
    return tuple(as_count(size, "input_shape entries") for size in shape)
