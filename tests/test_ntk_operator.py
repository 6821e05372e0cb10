"""The NTK and Gram operators against dense float64 Jacobians (tolerance 1e-10, relative)."""

import pytest
import torch
from conftest import dense_jacobian, make_case, rel_err

from ntkgp import gram_operator, ntk_operator

TOL = 1e-10


def test_ntk_products_dense_and_transpose(case):
    _, model, x, params = case
    x2 = torch.randn(5, *x.shape[1:])
    j1, j2 = dense_jacobian(model, x, params), dense_jacobian(model, x2, params)
    k = ntk_operator(model, x, x2, params=params)
    assert k.shape == (j1.shape[0], j2.shape[0])
    v = torch.randn(j2.shape[0], 4)
    assert rel_err(k @ v, j1 @ (j2.T @ v)) < TOL
    assert rel_err(k.matmul(v[:, 0]), j1 @ (j2.T @ v[:, 0])) < TOL
    w = torch.randn(j1.shape[0], 3)
    assert rel_err(k.mT @ w, j2 @ (j1.T @ w)) < TOL
    assert rel_err(k._t_matmul(w), j2 @ (j1.T @ w)) < TOL
    assert rel_err(k.to_dense(), j1 @ j2.T) < TOL


def test_ntk_diagonal_and_indexing(case):
    _, model, x, params = case
    j = dense_jacobian(model, x, params)
    dense = j @ j.T
    k = ntk_operator(model, x, params=params)
    assert rel_err(k.diagonal(), dense.diagonal()) < TOL
    rows = torch.tensor([0, 3, 3, len(dense) - 1])
    cols = torch.tensor([1, 0, 2, len(dense) - 2])
    assert rel_err(k[rows, cols], dense[rows, cols]) < TOL
    assert rel_err(k[2:5, 1:].to_dense(), dense[2:5, 1:]) < TOL
    c = dense.shape[0] // x.shape[0]
    sub = k[c : 3 * c, : 2 * c]
    assert type(sub).__name__ == "NTKOperator"
    assert rel_err(sub.to_dense(), dense[c : 3 * c, : 2 * c]) < TOL


def test_ntk_cross_diagonal():
    model, x, _ = make_case("mlp_c3")
    x2 = torch.randn_like(x)
    j1, j2 = dense_jacobian(model, x), dense_jacobian(model, x2)
    assert rel_err(ntk_operator(model, x, x2).diagonal(), (j1 * j2).sum(-1)) < TOL


def test_gram_operator(case):
    _, model, x, params = case
    j = dense_jacobian(model, x, params)
    g = gram_operator(model, x, params=params)
    dense = j.T @ j
    v = torch.randn(dense.shape[0], 3)
    assert rel_err(g @ v, dense @ v) < TOL
    assert rel_err(g.diagonal(), dense.diagonal()) < TOL
    assert rel_err(g.to_dense(), dense) < TOL
    rows, cols = torch.tensor([0, 5, 5, 2]), torch.tensor([1, 3, 0, 2])
    assert rel_err(g[rows, cols], dense[rows, cols]) < TOL


def test_chunk_size_does_not_change_products():
    model, x, _ = make_case("mlp_c3", n=9)
    j = dense_jacobian(model, x)
    v = torch.randn(j.shape[0], 7)
    for chunk in (1, 2, 64):
        assert rel_err(ntk_operator(model, x, chunk_size=chunk) @ v, j @ (j.T @ v)) < TOL


def test_gradient_through_operator_wrt_inputs():
    model, x, _ = make_case("mlp_c1")
    v = torch.randn(x.shape[0])
    xr = x.clone().requires_grad_()
    got = torch.autograd.grad((ntk_operator(model, xr) @ v).sum(), xr)[0]
    xr2 = x.clone().requires_grad_()
    j = dense_jacobian(model, xr2)
    ref = torch.autograd.grad((j @ (j.T @ v)).sum(), xr2)[0]
    assert rel_err(got, ref) < 1e-9


@pytest.mark.parametrize("chunk", [1, 3])
def test_double_vjp_fallback_matches_reference(chunk):
    """grid_sample has no forward rule in torch 2.13/2.14: the double-VJP fallback must be exact."""
    import torch.nn.functional as F
    from torch import nn

    class Warp(nn.Module):
        def __init__(self):
            super().__init__()
            self.offset = nn.Linear(2, 2)
            self.head = nn.Linear(9, 2)

        def forward(self, x):
            base = torch.zeros(x.shape[0], 3, 3, 2, dtype=x.dtype)
            return self.head(F.grid_sample(x, self.offset(base), align_corners=False).flatten(1))

    torch.manual_seed(1)
    model, x = Warp(), torch.randn(4, 1, 5, 5)
    j = dense_jacobian(model, x)
    k = ntk_operator(model, x, chunk_size=chunk)
    v = torch.randn(j.shape[0], 2)
    assert rel_err(k @ v, j @ (j.T @ v)) < TOL


class _RBFNet(torch.nn.Module):
    """Distances to learned centres through torch.cdist: its backward has a wrong batching rule under vmap on
    torch 2.13/2.14 (vmapped VJPs 20–70 % off, jacrev 58 % off) and it has no forward-mode rule."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)
        self.centres = torch.nn.Parameter(torch.randn(5, 4))
        self.head = torch.nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.exp(-(torch.cdist(self.lin(x), self.centres) ** 2)))


def rowwise_jacobian(model, x):
    """J (n·C, p) by plain autograd, one output at a time: the reference where jacrev (vmap) is unreliable."""
    from ntkgp.functional import FunctionalNetwork

    net = FunctionalNetwork(model)
    theta = net.theta0.clone().requires_grad_()
    out = net(x, theta)
    return torch.stack(
        [
            torch.autograd.grad(out[i, c], theta, retain_graph=True)[0]
            for i in range(out.shape[0])
            for c in range(out.shape[1])
        ]
    )


def test_batched_products_are_checked_against_one_vector_products():
    """The batched (vmap) VJP of a cdist network is wrong; the first batched product notices (against one-vector
    products), warns and computes one vector at a time: the NTK, its diagonal and an NTKGP then match the
    row-by-row float64 reference. Before: 10.7 % (chunk_size 2) and 18.7 % (default) off."""
    from ntkgp import NTKGP, Laplace

    torch.manual_seed(0)
    model, x, xs = _RBFNet().eval(), torch.randn(6, 3), torch.randn(4, 3)
    j, js = rowwise_jacobian(model, x), rowwise_jacobian(model, xs)
    with pytest.warns(RuntimeWarning, match="batched \\(vmap\\) vector-Jacobian products .* disagree"):
        k = ntk_operator(model, x)
        dense = k.to_dense()
    assert rel_err(dense, j @ j.T) < TOL
    with pytest.warns(RuntimeWarning, match="per-sample Jacobians .* disagree"):
        assert rel_err(ntk_operator(model, x).diagonal(), (j * j).sum(-1)) < TOL
    y = torch.randn(6, 2)
    with pytest.warns(RuntimeWarning, match="disagree"):
        pred = NTKGP(model, x, y, noise=0.1, outputscale=1.0).predict(xs)
    cov = j @ j.T + 0.1 * torch.eye(12)
    with torch.no_grad():
        mu = model(xs).reshape(-1) + js @ j.T @ torch.linalg.solve(cov, y.reshape(-1) - model(x).reshape(-1))
    assert rel_err(pred.mean.reshape(-1), mu) < 1e-8
    with pytest.warns(RuntimeWarning, match="disagree"):
        la = Laplace(model, "regression", noise=0.1).fit(x, y)
        reg = la.predict(xs)
    with torch.no_grad():
        mu = model(xs).reshape(-1) + js @ j.T @ torch.linalg.solve(
            j @ j.T + 0.1 * torch.eye(12), y.reshape(-1) - model(x).reshape(-1)
        )
    assert rel_err(reg.mean.reshape(-1), mu) < 1e-8
