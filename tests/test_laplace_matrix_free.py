"""The matrix-free Laplace posterior (Newton-CG MAP, Lanczos posterior, SLQ evidence) against the dense one and
against dense float64 parameter-space references.

Tolerances: 1e-7 for what CG solves to 1e-12 (MAP, predictive means); 1e-5 for what comes from a Lanczos run of p
steps (covariance products, variances, samples, the Ritz evidence): it stops at the invariant subspace and loses
eigenvalues of F below about 1e-9·λ_max (seen: 60 of 131 nonzero, 59 found; the smallest 1.2e-7), whose mass then
goes to ρ, an error of order λ/δ; the stochastic evidence within 4 standard errors of Hutchinson's estimator,
computed from the dense matrix; float32 against float64 at 1e-3.
"""

import math
import warnings

import pytest
import torch
from conftest import dense_jacobian, dense_output_fisher, make_case, rel_err

from ntkgp import Laplace, Solver
from ntkgp.memory import LargestTensor

DELTA = 0.7


def exact(p: int) -> Solver:
    """Matrix-free with CG to 1e-12 and a Lanczos rank of p: equal to the dense posterior up to rounding."""
    return Solver("cg", cg_tolerance=1e-12, max_cg_iterations=2000, lanczos_rank=p)


def labels(model, x, seed=1):
    with torch.no_grad():
        logits = model(x)
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(torch.softmax(2 * logits, -1), 1, generator=g).squeeze(-1)


def pair(task, name="mlp_c3", n=20, **kwargs):
    """(dense Laplace, matrix-free Laplace, x) fitted on the same data."""
    model, x, _ = make_case(name, n=n)
    if task == "classification":
        y = labels(model, x)
    else:
        with torch.no_grad():
            y = model(x) + torch.sin(2 * x[:, :1]) + 0.1 * torch.randn(n, model(x[:1]).shape[-1])
    noise = None if task == "classification" else 0.2
    dense = Laplace(model, task, prior_precision=DELTA, noise=noise, solver="cholesky").fit(x, y)
    p = dense.network.num_params
    free = Laplace(model, task, prior_precision=DELTA, noise=noise, solver=exact(p), progress=False, **kwargs).fit(x, y)
    return dense, free, x


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_matrix_free_equals_dense(task):
    dense, free, x = pair(task)
    assert dense.dense and not free.dense
    assert rel_err(free.mean, dense.mean) < 1e-7
    v = torch.randn(dense.network.num_params, 3)
    assert rel_err(free.covariance @ v, dense.covariance @ v) < 1e-5
    x_test = torch.randn(9, *x.shape[1:])
    if task == "regression":
        a, b = free.predict(x_test), dense.predict(x_test)
        assert rel_err(a.mean, b.mean) < 1e-7 and rel_err(a.variance, b.variance) < 1e-5
    else:
        assert rel_err(free.predict(x_test, link="map"), dense.predict(x_test, link="map")) < 1e-7
        assert rel_err(free.predict(x_test), dense.predict(x_test)) < 1e-5
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        mc = free.predict(x_test, link="mc", num_samples=200, generator=g1)
        assert rel_err(mc, dense.predict(x_test, link="mc", num_samples=200, generator=g2)) < 1e-5
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert rel_err(free.sample(4, generator=g1), dense.sample(4, generator=g2)) < 1e-5
    p = dense.network.num_params
    ritz = free.log_marginal_likelihood(rank=p)
    assert abs(float(ritz - dense.log_marginal_likelihood())) < 1e-5 * abs(float(ritz))


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_stochastic_evidence_within_its_standard_error(task):
    dense, free, _ = pair(task)
    fisher = dense.fisher().to_dense()
    evals, evecs = torch.linalg.eigh(0.5 * (fisher + fisher.mT))
    log_matrix = (evecs * torch.log1p(evals.clamp_min(0) / DELTA)) @ evecs.mT  # log(I + F/δ), symmetric
    off = log_matrix.square().sum() - log_matrix.diagonal().square().sum()
    stderr = math.sqrt(2 * float(off) / Laplace.SLQ_PROBES)  # Hutchinson with Rademacher probes
    error = float(free.log_marginal_likelihood() - dense.log_marginal_likelihood())
    assert abs(error) < 4 * 0.5 * stderr + 1e-8  # the evidence has −½ log det
    assert float(free.log_marginal_likelihood()) == float(free.log_marginal_likelihood())  # same probes each call


def test_auto_goes_matrix_free_beyond_max_size_and_agrees():
    model, x, _ = make_case("mlp_c3", n=20)
    y = labels(model, x)
    la = Laplace(model, "classification", prior_precision=DELTA, max_size=30, progress=False).fit(x, y)
    dense = Laplace(model, "classification", prior_precision=DELTA).fit(x, y)
    assert not la.dense and dense.dense
    assert rel_err(la.mean, dense.mean) < 1e-6  # default CG tolerance 1e-5, Newton to convergence
    small = Laplace(model, "classification", memory_budget=1000, progress=False).fit(x, y)
    assert not small.dense  # 3 N × N float64 matrices do not fit 1000 bytes


def test_optimize_prior_precision_matrix_free_picks_the_dense_choice():
    dense, free, _ = pair("regression")
    grid = [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]
    best = dense.optimize_prior_precision(grid, progress=False)
    assert free.optimize_prior_precision(grid, progress=False) == best
    assert rel_err(free.mean, dense.mean) < 1e-7


def test_beyond_the_dense_limit_without_an_n_by_n_matrix():
    """n·C = 9,000 > 8,192: auto picks the matrix-free path, forms nothing of N² elements, and its MAP and variances
    match a dense parameter-space reference (J of 9,000 × 99 by jacrev)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).eval()
    x = torch.randn(3000, 3)
    y = labels(model, x)
    la = Laplace(
        model,
        "classification",
        prior_precision=DELTA,
        progress=False,
        solver=Solver(cg_tolerance=1e-12, max_cg_iterations=500, lanczos_rank=99),
    )
    size = 3000 * 3
    with LargestTensor() as seen:
        la.fit(x, y)
        x_test = torch.randn(50, 3)
        var = la._latent(x_test, "diag")[1]
    assert not la.dense and seen.elements < size**2 // 100, seen.shape
    j = dense_jacobian(model, x)
    with torch.no_grad():
        f0 = model(x)
    onehot = torch.nn.functional.one_hot(y, 3).double()
    d = torch.zeros(j.shape[1])
    for _ in range(30):
        f = f0 + (j @ d).reshape(-1, 3)
        h = dense_output_fisher("categorical", f)
        grad = j.T @ (torch.softmax(f, -1) - onehot).reshape(-1) + DELTA * d
        d = d - torch.linalg.solve(j.T @ h @ j + DELTA * torch.eye(j.shape[1]), grad)
    assert rel_err(la.mean - la.network.theta0, d) < 1e-7
    h = dense_output_fisher("categorical", f0 + (j @ d).reshape(-1, 3))
    sigma = torch.linalg.inv(j.T @ h @ j + DELTA * torch.eye(j.shape[1]))
    jt = dense_jacobian(model, x_test)
    assert rel_err(var.reshape(-1), torch.einsum("ip,pq,iq->i", jt, sigma, jt)) < 1e-5


def test_float32_matrix_free_agrees_with_float64_dense():
    dense, _, x = pair("classification")
    model32 = dense.network.module_copy().float()
    y = labels(dense.network.module_copy(), x)
    free = Laplace(
        model32, "classification", prior_precision=DELTA, solver=Solver("cg", lanczos_rank=200), progress=False
    ).fit(x.float(), y)
    x_test = torch.randn(9, *x.shape[1:])
    assert rel_err(free.mean.double(), dense.mean) < 1e-3
    assert rel_err(free.predict(x_test.float()).double(), dense.predict(x_test)) < 1e-3


def test_matrix_free_refuses_cholesky_on_shards_and_beyond_max_size():
    model, x, _ = make_case("mlp_c3", n=20)
    y = labels(model, x)
    with pytest.raises(ValueError, match="exceeds max_size.*solver='auto'.*solver='cg'"):
        Laplace(model, "classification", max_size=10, solver="cholesky").fit(x, y)


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_a_low_rank_posterior_warns_and_reports_its_error(task):
    """Beyond max_size the posterior was silently rank-r (probit probabilities 0.54 from exact on a 10-way head at
    N = 10,000, no warning). Now fit warns, and predict's error estimate (exact GLM variances of the first PROBES
    test inputs by CG) equals the true error of those inputs against the dense posterior (1e-5)."""
    model, x, _ = make_case("mlp_c3", n=20)
    y = labels(model, x) if task == "classification" else torch.sin(2 * x[:, :3])
    noise = None if task == "classification" else 0.2
    dense = Laplace(model, task, prior_precision=DELTA, noise=noise, solver="cholesky").fit(x, y)
    rank = Solver("cg", cg_tolerance=1e-12, lanczos_rank=4)
    with pytest.warns(RuntimeWarning, match="rank-4 Lanczos approximation"):
        low = Laplace(model, task, prior_precision=DELTA, noise=noise, solver=rank, progress=False).fit(x, y)
    x_test = torch.randn(12, *x.shape[1:])
    with pytest.warns(RuntimeWarning, match="low-rank posterior's error on 4 probe inputs"):
        ours = low.predict(x_test)
    probes = slice(0, Laplace.PROBES)
    if task == "regression":
        truth, approximate = dense.predict(x_test).variance[probes], ours.variance[probes]
        assert ours.variance_error == low.variance_error
    else:
        mean, truth = dense._latent(x_test[probes], "diag")
        approximate = low._latent(x_test[probes], "diag")[1]
        probit = lambda var: torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * var), -1)  # noqa: E731
        assert low.probability_error == pytest.approx(
            float((probit(approximate) - probit(truth)).abs().max()), rel=1e-4, abs=1e-9
        )
        assert low.probability_error > 1e-2
    expected = float((approximate - truth).abs().max() / truth.abs().max())
    assert low.variance_error == pytest.approx(expected, rel=1e-5)
    assert low.variance_error > 1e-2


def test_an_exact_rank_neither_warns_nor_estimates():
    model, x, _ = make_case("mlp_c3", n=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        free = Laplace(model, "regression", prior_precision=DELTA, noise=0.2, solver=exact(60), progress=False).fit(
            x, torch.sin(2 * x[:, :3])
        )
        pred = free.predict(torch.randn(5, 3))
    assert free.variance_error is None and pred.variance_error is None
