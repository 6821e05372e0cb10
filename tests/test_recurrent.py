"""Recurrent networks (nn.LSTM, nn.GRU): vmap has no batching rule for aten::lstm / GRU over inputs, so per-sample
Jacobians come one input at a time, with one warning; everything against dense float64 jacrev references."""

import warnings

import pytest
import torch
from conftest import dense_jacobian, rel_err
from torch import nn

from ntkgp import NTKGP, Laplace, ntk_operator


class Regressor(nn.Module):
    """A recurrent layer over (b, T, 4) sequences and a Linear head on the last step: (b, 2)."""

    def __init__(self, cell):
        super().__init__()
        self.rnn, self.head = cell(4, 6, batch_first=True), nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


@pytest.fixture(params=[nn.LSTM, nn.GRU], ids=["lstm", "gru"])
def recurrent(request):
    torch.manual_seed(0)
    return Regressor(request.param).eval(), torch.randn(4, 5, 4), torch.randn(3, 5, 4), torch.randn(4, 2)


def test_kernel_diagonal_and_products(recurrent):
    model, x, xs, _ = recurrent
    j, js = dense_jacobian(model, x), dense_jacobian(model, xs)
    with pytest.warns(RuntimeWarning, match="no batching rule"):
        assert rel_err(ntk_operator(model, x, x).diagonal(), (j * j).sum(1)) < 1e-10
    assert rel_err(ntk_operator(model, xs, x).to_dense(), js @ j.T) < 1e-10


@pytest.mark.parametrize("space", ["function", "parameter"])
def test_ntkgp_against_dense(recurrent, space):
    model, x, xs, y = recurrent
    j, js = dense_jacobian(model, x), dense_jacobian(model, xs)
    with torch.no_grad():
        r = (y - model(x)).reshape(-1)
        cov = 0.8 * j @ j.T + 0.1 * torch.eye(len(r))
        mean = model(xs).reshape(-1) + 0.8 * js @ j.T @ torch.linalg.solve(cov, r)
        var = 0.8 * (js * js).sum(1) - 0.64 * ((js @ j.T) * torch.linalg.solve(cov, j @ js.T).T).sum(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pred = NTKGP(model, x, y, outputscale=0.8, noise=0.1, space=space).predict(xs)
    assert rel_err(pred.mean.reshape(-1), mean) < 1e-8 and rel_err(pred.variance.reshape(-1), var) < 1e-8
    assert sum("no batching rule" in str(w.message) for w in caught) == 1


def test_laplace_regression_matches_ntkgp(recurrent):
    """Laplace regression is the NTK-GP with s² = 1/δ (tests/test_laplace.py): the same on a recurrent network."""
    model, x, xs, y = recurrent
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        la = Laplace(model, "regression", prior_precision=0.7, noise=0.2).fit(x, y)
        pred = la.predict(xs)
        ref = NTKGP(model, x, y, noise=0.2, outputscale=1 / 0.7).predict(xs)
    assert rel_err(pred.mean, ref.mean) < 1e-4 and rel_err(pred.variance, ref.variance) < 1e-4
