"""Laplace against dense float64 references built from torch.func.jacrev Jacobians.

Tolerances: 1e-8 for closed-form quantities (MAP, covariance, predictive, evidence, samples), 1e-4 for the
regression agreement with NTKGP, 1e-5 for finite-difference Fisher products.
"""

import math
import warnings

import pytest
import torch
from conftest import dense_jacobian, dense_output_fisher, make_case, rel_err

from ntkgp import NTKGP, Laplace
from ntkgp.functional import FunctionalNetwork
from ntkgp.gp.parameter_space import lanczos_spectrum
from ntkgp.lanczos import rademacher_probes

DELTA = 0.7


def labels(model, x, seed=1):
    with torch.no_grad():
        logits = model(x)
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(torch.softmax(2 * logits, -1), 1, generator=g).squeeze(-1)


def dense_classification_map(j, f0, y, delta, steps=50):
    """Newton in parameter space on the dense linearised objective: Δ (p,)."""
    n, c = f0.shape
    onehot = torch.nn.functional.one_hot(y, c).double()
    d = torch.zeros(j.shape[1])
    for _ in range(steps):
        f = f0 + (j @ d).reshape(n, c)
        h = dense_output_fisher("categorical", f)
        grad = j.T @ (torch.softmax(f, -1) - onehot).reshape(-1) + delta * d
        d = d - torch.linalg.solve(j.T @ h @ j + delta * torch.eye(j.shape[1]), grad)
    return d, dense_output_fisher("categorical", f0 + (j @ d).reshape(n, c))


@pytest.mark.parametrize("name", ["mlp_c1", "mlp_c3"])
def test_regression_agrees_with_ntk_gp(name):
    model, x, _ = make_case(name, n=9)
    with torch.no_grad():
        y = model(x) + 0.3 * torch.randn(9, model(x).shape[-1])
    y = y.squeeze(-1) if y.shape[-1] == 1 else y
    xs = torch.randn(6, *x.shape[1:])
    la = Laplace(model, "regression", prior_precision=DELTA, noise=0.2).fit(x, y)
    gp = NTKGP(model, x, y, noise=0.2, outputscale=1 / DELTA, solver=None)
    pred, ref = la.predict(xs), gp.predict(xs)
    assert pred.mean.shape == ref.mean.shape
    assert rel_err(pred.mean, ref.mean) < 1e-4 and rel_err(pred.variance, ref.variance) < 1e-4
    lml = float(gp.log_marginal_likelihood().detach())
    assert abs(float(la.log_marginal_likelihood()) - lml) < 1e-4 * abs(lml)


@pytest.fixture
def classified():
    model, x, _ = make_case("cnn_batchnorm", n=7)
    y = labels(model, x)
    j = dense_jacobian(model, x)
    with torch.no_grad():
        f0 = model(x)
    d, h = dense_classification_map(j, f0, y, DELTA)
    sigma = torch.linalg.inv(j.T @ h @ j + DELTA * torch.eye(j.shape[1]))
    la = Laplace(model, "classification", prior_precision=DELTA).fit(x, y)
    return model, x, y, j, f0, d, h, sigma, la


def test_classification_map_covariance_and_evidence(classified):
    model, x, y, j, f0, d, h, sigma, la = classified
    theta0 = FunctionalNetwork(model).theta0
    assert rel_err(la.mean - theta0, d) < 1e-8
    v = torch.randn(j.shape[1], 3)
    assert rel_err(la.covariance @ v, sigma @ v) < 1e-8
    f_map = f0 + (j @ d).reshape(f0.shape)
    loglik = torch.log_softmax(f_map, -1).gather(-1, y[:, None]).sum()
    logdet = torch.logdet(torch.eye(j.shape[1]) + j.T @ h @ j / DELTA)
    assert abs(float(la.log_marginal_likelihood() - (loglik - DELTA / 2 * d @ d - logdet / 2))) < 1e-8


@pytest.mark.parametrize("hessian", ["exact", "finite_difference", "central_difference"])
def test_lanczos_log_determinant(classified, hessian):
    model, x, y, j, f0, d, h, sigma, la = classified
    la.hessian = hessian
    exact = float(la.log_marginal_likelihood())
    tol = 1e-8 if hessian == "exact" else 1e-5
    assert abs(float(la.log_marginal_likelihood(rank=j.shape[1])) - exact) < tol * abs(exact)
    fisher = j.T @ h @ j
    lam = torch.linalg.eigvalsh(fisher).flip(0)
    lower = float(la.log_marginal_likelihood(rank=3))
    assert lower < exact  # concavity of log: spreading the remaining trace over-states log det
    # the reference: 3 Lanczos steps from the same start vector, in dense algebra
    spec = lanczos_spectrum(la.fisher(), 3)
    rho = float(torch.trace(fisher) - spec.eigenvalues.sum()) / (j.shape[1] - 3)
    logdet = torch.log1p(spec.eigenvalues / DELTA).sum() + (j.shape[1] - 3) * math.log1p(rho / DELTA)
    assert abs(lower - (exact + 0.5 * float(torch.log1p(lam / DELTA).sum()) - 0.5 * float(logdet))) < tol * abs(exact)
    with pytest.raises(ValueError, match="rank must be"):
        la.log_marginal_likelihood(rank=0)


def test_classification_predictive(classified):
    model, x, y, j, f0, d, h, sigma, la = classified
    xs = torch.randn(5, *x.shape[1:])
    js = dense_jacobian(model, xs)
    with torch.no_grad():
        mu = model(xs) + (js @ d).reshape(5, -1)
    cov = js @ sigma @ js.T
    var = cov.diagonal().reshape(5, -1)
    probit = torch.softmax(mu / torch.sqrt(1 + math.pi / 8 * var), -1)
    assert rel_err(la.predict(xs), probit) < 1e-8
    assert torch.allclose(la.predict(xs).sum(-1), torch.ones(5))
    assert rel_err(la.predict(xs, link="map"), torch.softmax(mu, -1)) < 1e-10
    la._jacobian, la.network.jacobian_chunk_elements = None, 1  # too big to keep: cross-NTK products instead
    assert rel_err(la.predict(xs), probit) < 1e-8 and la._jacobian is None
    blocks = torch.stack([cov[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] for i in range(5)])
    z = torch.randn(40000, 5, 2, generator=torch.Generator().manual_seed(3))
    reference = torch.softmax(mu + (torch.linalg.cholesky(blocks) @ z.unsqueeze(-1)).squeeze(-1), -1).mean(0)
    mc = la.predict(xs, link="mc", num_samples=40000, generator=torch.Generator().manual_seed(4))
    assert (mc - reference).abs().max() < 1e-2


def test_samples_are_exact_and_lanczos_keeps_the_trace(classified):
    model, x, y, j, f0, d, h, sigma, la = classified
    p, fisher = j.shape[1], j.T @ h @ j

    def offsets(rank):
        samples = la.sample(3, rank=rank, generator=torch.Generator().manual_seed(5))
        return samples - la.mean, torch.randn(3, p, generator=torch.Generator().manual_seed(5))

    def root(matrix):
        evals, evecs = torch.linalg.eigh(matrix)
        return (evecs * evals.sqrt()) @ evecs.T

    offset, z = offsets(None)
    assert rel_err(offset, z @ root(sigma)) < 1e-8
    offset, z = offsets(p)  # Lanczos to full rank: the exact posterior
    assert rel_err(offset, z @ root(sigma)) < 1e-6
    # rank 3 < rank F = 7: top-3 Ritz values + δ, and δ + ρ elsewhere with ρ spreading the rest of tr F
    spec = lanczos_spectrum(la.fisher(), 3)
    q, lam = spec.eigenvectors, spec.eigenvalues
    rho = float(torch.trace(fisher) - lam.sum()) / (p - 3)
    assert rho > 0
    precision = q @ torch.diag(lam + DELTA) @ q.T + (DELTA + rho) * (torch.eye(p) - q @ q.T)
    assert abs(float(torch.trace(precision) - torch.trace(fisher) - p * DELTA)) < 1e-8 * float(torch.trace(precision))
    offset, z = offsets(3)
    assert rel_err(offset, z @ root(torch.linalg.inv(precision))) < 1e-6


@pytest.mark.parametrize("hessian", ["exact", "finite_difference"])
def test_stochastic_lanczos_quadrature_log_determinant(classified, hessian):
    """With more Lanczos steps than F has non-zero eigenvalues, each probe's quadrature is exact: the estimate
    is Hutchinson's with the same probes, computed densely; with 300 probes it lies within 4 standard errors
    of the exact log-determinant."""
    model, x, y, j, f0, d, h, sigma, la = classified
    la.hessian = hessian
    p, steps = j.shape[1], j.shape[0] + 2  # F = JᵀHJ has rank <= n·C = j.shape[0]
    exact = float(la.log_marginal_likelihood())
    lam, vecs = torch.linalg.eigh(j.T @ h @ j)
    log_a = vecs @ torch.diag(torch.log1p(lam.clamp_min(0) / DELTA)) @ vecs.T  # log(I + F/δ)
    fit = exact + 0.5 * float(torch.log1p(lam.clamp_min(0) / DELTA).sum())  # evidence without the log-det
    tol = 1e-8 if hessian == "exact" else 1e-5
    for probes in (1, 300):
        estimate = la.log_marginal_likelihood(rank=steps, probes=probes, generator=torch.Generator().manual_seed(5))
        z = rademacher_probes(p, probes, torch.Generator().manual_seed(5))
        hutchinson = float((z * (log_a @ z)).sum(0).mean())
        assert abs(float(estimate) - (fit - 0.5 * hutchinson)) < tol * abs(hutchinson)
    stderr = math.sqrt(2 * float(log_a.square().sum() - log_a.diagonal().square().sum()) / probes)
    assert abs(float(estimate) - exact) < 4 * 0.5 * stderr
    with pytest.raises(ValueError, match="probes needs rank"):
        la.log_marginal_likelihood(probes=3)
    with pytest.raises(ValueError, match="probes must be an integer >= 1"):
        la.log_marginal_likelihood(rank=4, probes=0)


@pytest.mark.parametrize("hessian", ["exact", "finite_difference", "central_difference"])
def test_precision_operator(classified, hessian):
    model, x, y, j, f0, d, h, sigma, la = classified
    la.hessian = hessian
    v = torch.randn(j.shape[1], 2)
    tol = 1e-10 if hessian == "exact" else 1e-5
    assert rel_err(la.precision @ v, (j.T @ h @ j + DELTA * torch.eye(j.shape[1])) @ v) < tol


def test_optimize_prior_precision_picks_the_best_evidence():
    model, x, _ = make_case("mlp_c3", n=8)
    y = labels(model, x)
    grid = torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0])
    la = Laplace(model, "classification").fit(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        best = la.optimize_prior_precision(grid)
    values = [
        float(Laplace(model, "classification", prior_precision=g).fit(x, y).log_marginal_likelihood())
        for g in grid.tolist()
    ]
    assert best == grid.tolist()[max(range(5), key=values.__getitem__)]
    assert abs(float(la.log_marginal_likelihood()) - max(values)) < 1e-8
    assert la.prior_precision == best
    # the optimum is inside this grid (no warning); grids that stop short of it on either side warn
    assert 0 < grid.tolist().index(best) < 4
    with pytest.warns(RuntimeWarning, match="highest at the largest prior precision of the grid"):
        la.optimize_prior_precision(torch.logspace(-3, math.log10(best) - 0.5, 4))
    with pytest.warns(RuntimeWarning, match="highest at the smallest prior precision of the grid"):
        la.optimize_prior_precision(torch.logspace(math.log10(best) + 0.5, 3, 4))


def test_laplace_bad_input():
    model, x, _ = make_case("mlp_c3", n=6)
    y = labels(model, x)
    with pytest.raises(ValueError, match="likelihood must be one of"):
        Laplace(model, "poisson")
    with pytest.raises(ValueError, match="hessian must be one of"):
        Laplace(model, "classification", hessian="kfac")
    with pytest.raises(ValueError, match="prior_precision must be"):
        Laplace(model, "classification", prior_precision=0)
    with pytest.raises(ValueError, match="leave it None for classification"):
        Laplace(model, "classification", noise=0.1)
    with pytest.raises(TypeError, match="integer class indices"):
        Laplace(model, "classification").fit(x, y.double())
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        Laplace(model, "classification").fit(x, y + 3)
    with pytest.raises(ValueError, match="num_classes = 5 but the network has 3 outputs"):
        Laplace(model, "classification", num_classes=5).fit(x, y)
    with pytest.raises(RuntimeError, match="fit"):
        Laplace(model, "classification").predict(x)
    with pytest.raises(ValueError, match="link must be one of"):
        Laplace(model, "classification").fit(x, y).predict(x, link="logit")
    single, xs, _ = make_case("mlp_c1", n=6)
    with pytest.raises(ValueError, match="C >= 2"):
        Laplace(single, "classification").fit(xs, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds max_size"):
        Laplace(model, "classification", max_size=10, solver="cholesky").fit(x, y)


def test_latent_predictive_is_the_outputs_gaussian_and_nn_samples_the_network():
    """pred_type="latent": mean f0 + JΔ and the C × C blocks of J Σ Jᵀ (dense formulas from autograd, regression);
    for classification its diagonal is the probit path's variance. pred_type="nn": for a network that is linear in
    its weights the sampled network's mean and variance are the latent ones up to Monte Carlo error."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double().eval()
    x, xt = torch.randn(7, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    y = torch.randn(7, 2, dtype=torch.float64)
    laplace = Laplace(model, "regression", prior_precision=2.0, noise=0.3).fit(x, y)
    mean, cov = laplace.predict(xt, pred_type="latent")
    j, js = dense_jacobian(model, x), dense_jacobian(model, xt)
    sigma = torch.linalg.inv(j.T @ j / 0.3 + 2.0 * torch.eye(j.shape[1], dtype=torch.float64))
    delta = sigma @ j.T @ (y - model(x)).reshape(-1) / 0.3
    assert rel_err(mean.reshape(-1), (model(xt).reshape(-1) + js @ delta).detach()) < 1e-10
    blocks = (js @ sigma @ js.T).reshape(4, 2, 4, 2).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    assert cov.shape == (4, 2, 2) and rel_err(cov, blocks) < 1e-10

    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    classifier = Laplace(model, "classification").fit(x, labels)
    _, cov = classifier.predict(xt, pred_type="latent")
    probit_variance = classifier._latent(xt, "diag")[1]
    assert rel_err(cov.diagonal(dim1=-2, dim2=-1), probit_variance) < 1e-10

    linear = torch.nn.Linear(3, 2).double().eval()
    laplace = Laplace(linear, "regression", prior_precision=2.0, noise=0.3).fit(x, y)
    sampled = laplace.predict(xt, pred_type="nn", num_samples=4000, generator=torch.Generator().manual_seed(0))
    latent_mean, latent_cov = laplace.predict(xt, pred_type="latent")
    variance = latent_cov.diagonal(dim1=-2, dim2=-1)
    assert ((sampled.mean - latent_mean).abs() / (variance / 4000).sqrt()).max() < 5  # 5 standard errors
    assert ((sampled.variance / variance) - 1).abs().max() < 0.15  # the variance's sampling error at 4000 draws
    with pytest.raises(ValueError, match="pred_type must be one of"):
        laplace.predict(xt, pred_type="posterior")


def test_gridsearch_picks_the_prior_precision_of_least_validation_nll():
    """method="gridsearch": the δ of the grid whose Gaussian predictive (mean, variance + σ²) has the least NLL on
    the validation pairs, against the dense regression formulas from J; a DataLoader of the same pairs gives the same
    δ; the evidence's method refuses validation data."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double().eval()
    x, xv = torch.randn(10, 2, dtype=torch.float64), torch.randn(12, 2, dtype=torch.float64)
    truth = lambda z: torch.sin(2 * z[:, :1]) + z[:, 1:]  # noqa: E731
    y, yv = truth(x) + 0.1 * torch.randn(10, 1, dtype=torch.float64), truth(xv)
    grid = torch.logspace(-3, 3, 13, dtype=torch.float64)
    laplace = Laplace(model, "regression", noise=0.05).fit(x, y)
    chosen = laplace.optimize_prior_precision(grid, progress=False, method="gridsearch", val_loader=(xv, yv))
    j, jv = dense_jacobian(model, x), dense_jacobian(model, xv)
    with torch.no_grad():
        residual, f_val = (y - model(x)).reshape(-1), model(xv).reshape(-1)
    nll = []
    for delta in grid.tolist():
        sigma = torch.linalg.inv(j.T @ j / 0.05 + delta * torch.eye(j.shape[1], dtype=torch.float64))
        mean = f_val + jv @ sigma @ j.T @ residual / 0.05
        variance = ((jv @ sigma) * jv).sum(1) + 0.05
        nll.append(float((0.5 * (torch.log(2 * math.pi * variance) + (yv.reshape(-1) - mean) ** 2 / variance)).mean()))
    assert chosen == float(grid[int(torch.tensor(nll).argmin())])
    assert laplace.prior_precision == chosen
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xv, yv), batch_size=5)
    again = Laplace(model, "regression", noise=0.05).fit(x, y)
    assert again.optimize_prior_precision(grid, progress=False, method="gridsearch", val_loader=loader) == chosen
    with pytest.raises(ValueError, match="val_loader is for method='gridsearch'"):
        again.optimize_prior_precision(grid, progress=False, val_loader=loader)
    with pytest.raises(ValueError, match="needs validation data"):
        again.optimize_prior_precision(grid, progress=False, method="gridsearch")


def test_gridsearch_for_classification_minimises_the_probit_nll():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double().eval()
    x, xv = torch.randn(9, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    y, yv = torch.randint(0, 3, (9,)), torch.randint(0, 3, (8,))
    grid = torch.logspace(-2, 2, 5, dtype=torch.float64)
    laplace = Laplace(model, "classification").fit(x, y)
    chosen = laplace.optimize_prior_precision(grid, progress=False, method="gridsearch", val_loader=(xv, yv))
    nll = {}
    for delta in grid.tolist():
        reference = Laplace(model, "classification", prior_precision=delta).fit(x, y).predict(xv)
        nll[delta] = float(-torch.log(reference[torch.arange(8), yv]).mean())
    assert chosen == min(nll, key=nll.get)


@pytest.mark.parametrize("solver", ["cholesky", "cg"])
@pytest.mark.parametrize("prior_mean", ["zero", "vector"])
def test_prior_mean_moves_the_map_the_predictive_and_the_evidence(prior_mean, solver):
    """Prior θ ~ N(μ, I/δ) on the linearised model f0 + J(θ − θ0): MAP θ0 + Σ(Jᵀr/σ² + δ(μ − θ0)), predictive mean,
    and the evidence log N(y; f0 + J(μ − θ0), JJᵀ/δ + σ²I), against dense formulas from J, on the dense and the
    matrix-free (CG) path."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).double().eval()
    x, xt = torch.randn(9, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    y = torch.randn(9, 1, dtype=torch.float64)
    theta0 = FunctionalNetwork(model).theta0
    mu = torch.zeros_like(theta0) if prior_mean == "zero" else 0.3 * torch.randn_like(theta0)
    given = "zero" if prior_mean == "zero" else mu
    delta, noise = 2.0, 0.1
    laplace = Laplace(model, "regression", prior_precision=delta, noise=noise, prior_mean=given, solver=solver)
    laplace.fit(x, y)
    j, jt = dense_jacobian(model, x), dense_jacobian(model, xt)
    with torch.no_grad():
        f0, ft = model(x).reshape(-1), model(xt).reshape(-1)
    p = j.shape[1]
    sigma = torch.linalg.inv(j.T @ j / noise + delta * torch.eye(p, dtype=torch.float64))
    step = sigma @ (j.T @ (y.reshape(-1) - f0) / noise + delta * (mu - theta0))
    tol = 1e-8 if solver == "cholesky" else 1e-6
    assert rel_err(laplace.mean, theta0 + step) < tol
    assert rel_err(laplace.prior_mean, mu) < 1e-15
    assert rel_err(laplace.predict(xt).mean.reshape(-1), ft + jt @ step) < tol
    if solver == "cholesky":
        centre = f0 + j @ (mu - theta0)
        cov = j @ j.T / delta + noise * torch.eye(9, dtype=torch.float64)
        expected = torch.distributions.MultivariateNormal(centre, cov).log_prob(y.reshape(-1))
        assert abs(float(laplace.log_marginal_likelihood()) - float(expected)) < 1e-8 * abs(float(expected))
    # post hoc: θ_MAP = θ0, the evidence log p(y | f0) − δ/2 ‖θ0 − μ‖² − ½ log det(I + F/δ)
    posthoc = Laplace(model, "regression", prior_precision=delta, noise=noise, prior_mean=given, solver=solver)
    posthoc.fit(x, y, find_map=False)
    fisher = j.T @ j / noise
    fit = torch.distributions.Normal(f0, noise**0.5).log_prob(y.reshape(-1)).sum()
    logdet = torch.logdet(torch.eye(p, dtype=torch.float64) + fisher / delta)
    expected = fit - 0.5 * delta * (theta0 - mu).square().sum() - 0.5 * logdet
    assert rel_err(posthoc.mean, theta0) < 1e-15
    if solver == "cholesky":
        assert abs(float(posthoc.log_marginal_likelihood()) - float(expected)) < 1e-8 * abs(float(expected))
    with pytest.raises(ValueError, match="prior_mean must be 'theta0', 'zero' or a"):
        Laplace(model, "regression", noise=noise, prior_mean=mu[:-1])


def test_to_converts_and_refits_a_fitted_posterior():
    """A float32 Laplace moved to float64 equals one built in float64 (1e-10): the posterior is refitted in the new
    dtype, with the same δ and prior mean; an unfitted one converts its snapshot only."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).float().double().eval()
    x, xt = torch.randn(8, 2, dtype=torch.float32).double(), torch.randn(3, 2, dtype=torch.float64)  # exact in float32
    y = torch.randint(0, 3, (8,))
    reference = Laplace(model, "classification", prior_precision=0.7, prior_mean="zero").fit(x, y).predict(xt)
    single = Laplace(model.float(), "classification", prior_precision=0.7, prior_mean="zero").fit(x.float(), y)
    model.double()
    assert single.to(torch.float64) is single and single.network.dtype == torch.float64
    assert single.prior_precision == 0.7 and single.prior_mean.dtype == torch.float64
    assert rel_err(single.predict(xt), reference) < 1e-10
    unfitted = Laplace(model, "classification").to(torch.float32)
    assert unfitted.network.dtype == torch.float32 and unfitted._train_x is None


@pytest.mark.parametrize(
    "structure, solver", [("full", "cholesky"), ("full", "cg"), ("full", "auto"), ("kron", "auto"), ("diag", "auto")]
)
@pytest.mark.filterwarnings("ignore:Laplace.predict. the:RuntimeWarning")
def test_state_dict_round_trip_restores_the_posterior(structure, solver, tmp_path):
    """A fitted posterior saved with torch.save (loaded back with weights_only=True) and loaded into a new Laplace of
    the same network predicts the same, with the same evidence and samples; a Laplace of other weights refuses it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double().eval()
    x, xt = torch.randn(20, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    kw = {"solver": solver, "hessian_structure": structure, "progress": False}
    fitted = Laplace(model, "classification", prior_precision=0.5, **kw).fit(x, y)
    assert fitted.posterior == {"cholesky": "function", "cg": "lowrank", "auto": structure}[solver]
    expected, evidence = fitted.predict(xt), float(fitted.log_marginal_likelihood())
    torch.save(fitted.state_dict(), tmp_path / "laplace.pt")
    state = torch.load(tmp_path / "laplace.pt", weights_only=True)
    loaded = Laplace(model, "classification", **kw).load_state_dict(state)
    assert loaded.prior_precision == 0.5 and torch.equal(loaded.predict(xt), expected)
    assert float(loaded.log_marginal_likelihood()) == pytest.approx(evidence, rel=1e-12)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(loaded.sample(2, generator=g1), fitted.sample(2, generator=g2))
    other = torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double().eval()
    with pytest.raises(ValueError, match="saved from another network"):
        Laplace(other, "classification").load_state_dict(state)
