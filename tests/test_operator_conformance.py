"""linear_operator's own conformance suite on our operators, against dense float64 references.

`LinearOperatorTestCase` (square, symmetric positive definite) runs on the NTK K(X, X), the Gram JᵀJ, the
Fisher JᵀHJ (exact and finite-difference products) and the Laplace posterior covariance;
`RectangularLinearOperatorTestCase` on the cross-kernel K(X1, X2). Each case is small and well
conditioned: the suite checks linear_operator's interface (batches, indexing, solves, decompositions,
conversions, gradients in the inputs), the other test files check the Jacobian products themselves.
The suite's stochastic tests (log-determinants by stochastic Lanczos quadrature) run at a fixed seed, and
with linear_operator's fast computations on (``import botorch``, elsewhere in the suite, switches them off
for the whole process; the suite asserts that CG and Lanczos are called).
"""

import unittest

import linear_operator
import torch
from conftest import dense_jacobian, dense_output_fisher
from linear_operator.test.linear_operator_test_case import LinearOperatorTestCase, RectangularLinearOperatorTestCase
from torch import nn

from ntkgp import Laplace, fisher_operator, gram_operator, ntk_operator


class _NoHalf:
    """Half precision is not supported (docs/api.md, Errors): ``.half()`` raises a clear TypeError instead of
    linear_operator's conversion (which left the network snapshot in float64 behind a float16 operator)."""

    def test_half(self):
        with self.assertRaisesRegex(TypeError, "half precision is not supported"):
            self.create_linear_op().half()


class _Case(_NoHalf, LinearOperatorTestCase):
    """The suite for square operators (concrete cases add unittest.TestCase), with fast computations on."""

    seed = 0

    def setUp(self):
        super().setUp()
        self._fast = linear_operator.settings.fast_computations(
            covar_root_decomposition=True, log_prob=True, solves=True
        )
        self._fast.__enter__()

    def tearDown(self):
        self._fast.__exit__(None, None, None)
        super().tearDown()


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).eval()


def _tanh_layer(outputs: int = 2, seed: int = 0) -> nn.Module:
    """One tanh layer: its Gram and Fisher matrices are well conditioned (condition number about 5)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, outputs), nn.Tanh()).eval()


def _inputs(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))


class TestNTKOperator(_Case, unittest.TestCase):
    def create_linear_op(self):
        self.model = _mlp()
        return ntk_operator(self.model, _inputs(5))

    def evaluate_linear_op(self, linear_op):
        return dense_jacobian(self.model, linear_op.x1) @ dense_jacobian(self.model, linear_op.x2).T


class TestNTKCrossOperator(_NoHalf, RectangularLinearOperatorTestCase, unittest.TestCase):
    seed = 0

    def create_linear_op(self):
        self.model = _mlp()
        return ntk_operator(self.model, _inputs(5), _inputs(4, seed=2))

    def evaluate_linear_op(self, linear_op):
        return dense_jacobian(self.model, linear_op.x1) @ dense_jacobian(self.model, linear_op.x2).T


class TestGramOperator(_Case, unittest.TestCase):
    def create_linear_op(self):
        self.model = _tanh_layer()
        return gram_operator(self.model, _inputs(30))

    def evaluate_linear_op(self, linear_op):
        j = dense_jacobian(self.model, linear_op.x)
        return j.T @ j


class TestFisherOperatorExact(_Case, unittest.TestCase):
    method = "exact"

    def create_linear_op(self):
        self.model = _tanh_layer()
        return fisher_operator(self.model, _inputs(30), "heteroscedastic", method=self.method)

    def evaluate_linear_op(self, linear_op):
        """Differentiable in x, H's dependence on f(x) included."""
        j = dense_jacobian(self.model, linear_op.x)
        return j.T @ dense_output_fisher("heteroscedastic", self.model(linear_op.x)) @ j


class TestFisherOperatorFiniteDifference(TestFisherOperatorExact):
    """Forward differences are accurate to about 1e-7 here (float64): far inside the suite's tolerances."""

    method = "finite_difference"


class TestPosteriorCovariance(_Case, unittest.TestCase):
    def create_linear_op(self):
        self.model = _tanh_layer(outputs=1)
        x = _inputs(6)
        self.laplace = Laplace(
            self.model, "regression", prior_precision=0.5, noise=0.2, hessian_structure="function"
        ).fit(x, torch.randn(6))
        return self.laplace.covariance

    def evaluate_linear_op(self, linear_op):
        """(I − Jᵀ M J)/δ, differentiable in M and δ but not in the training inputs x (M was computed from them);
        the same matrix as (JᵀJ/σ² + δI)⁻¹."""
        j = dense_jacobian(self.model, linear_op.x.detach())
        dense = (torch.eye(j.shape[1]) - j.T @ linear_op.middle @ j) / linear_op.delta
        precision = j.T @ j / 0.2 + 0.5 * torch.eye(j.shape[1])
        assert torch.allclose(dense.detach(), torch.linalg.inv(precision), rtol=1e-10, atol=1e-12)
        return dense
