"""Laplace's Hessian structures and spaces against dense float64 references built from autograd Jacobians: "full"
the same in parameter and function space, "kron" against K-FAC factors formed by hand, "diag" against the dense
diagonal, per-layer prior precisions, post-hoc prior means, the reported error of the approximate structures, and
laplace-torch's FullLaplace and DiagLaplace where the posterior is the same."""

import math
import warnings

import pytest
import torch
from conftest import dense_jacobian, dense_output_fisher, rel_err
from torch import nn

from ntkgp import NTKGP, Laplace, Solver
from ntkgp.functional import FunctionalNetwork

EXACT_CG = Solver(cg_tolerance=1e-12)  # the MAP of kron and diag is CG's (with the structure as preconditioner)


def mlp(c, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, c)).double().eval()


def data(task, n, c, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, dtype=torch.float64, generator=g)
    y = torch.randn(n, c, dtype=torch.float64, generator=g) if task == "regression" else torch.randint(0, c, (n,))
    return x, y


def dense_fisher(model, task, x, f, noise):
    """F = Jᵀ H J (p × p) at outputs f (n, C)."""
    j = dense_jacobian(model, x)
    h = dense_output_fisher("gaussian" if task == "regression" else "categorical", f)
    return j.T @ h @ j / (noise if task == "regression" else 1.0)


def reference(model, task, x, y, xt, curvature, delta, noise, find_map=True):
    """MAP step Δ (p,), f_MAP (n, C), GLM covariance blocks (m, C, C) at xt and the evidence, for the prior N(θ0, D⁻¹)
    (post hoc: N(0, D⁻¹) and Δ = 0), with F = curvature(f_MAP) (p × p)."""
    j, jt = dense_jacobian(model, x), dense_jacobian(model, xt)
    with torch.no_grad():
        f0, c = model(x), model(x).shape[-1]
    p = j.shape[1]
    d = torch.as_tensor(delta, dtype=torch.float64).expand(p)
    step = torch.zeros(p, dtype=torch.float64)
    if find_map and task == "regression":
        step = torch.linalg.solve(j.T @ j / noise + torch.diag(d), j.T @ (y - f0).reshape(-1) / noise)
    elif find_map:
        onehot = nn.functional.one_hot(y, c).double()
        for _ in range(60):
            f = f0 + (j @ step).reshape(f0.shape)
            grad = j.T @ (torch.softmax(f, -1) - onehot).reshape(-1) + d * step
            h = j.T @ dense_output_fisher("categorical", f) @ j
            step = step - torch.linalg.solve(h + torch.diag(d), grad)
    f = f0 + (j @ step).reshape(f0.shape)
    fisher = curvature(f)
    sigma = torch.linalg.inv(fisher + torch.diag(d))
    blocks = (jt @ sigma @ jt.T).reshape(len(xt), c, len(xt), c).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    theta0 = FunctionalNetwork(model).theta0
    distance = step if find_map else theta0
    if task == "regression":
        fit = torch.distributions.Normal(f, noise**0.5).log_prob(y).sum()
    else:
        fit = torch.log_softmax(f, -1).gather(-1, y[:, None]).sum()
    logdet = torch.logdet(torch.eye(p, dtype=torch.float64) + fisher / d)
    evidence = fit - 0.5 * (d * distance.square()).sum() - 0.5 * logdet
    with torch.no_grad():
        mean_t = model(xt) + (jt @ step).reshape(len(xt), c)
    return step, mean_t, blocks, evidence, sigma


def kfac_reference(model, task, x, f, noise):
    """Block-diagonal K-FAC of F (p × p, θ order) for Linear(2, 4)-Tanh-Linear(4, C), weight and bias of a layer in
    one block: A = Σ ã ãᵀ / n (ã = [a, 1]), G = Σ_i g_iᵀ H_i g_i (g_i = ∂f/∂ layer output), F_l ≈ G ⊗ A."""
    first, last = model[0], model[2]
    with torch.no_grad():
        hidden = torch.tanh(first(x))
    n, c = f.shape
    h = dense_output_fisher("gaussian" if task == "regression" else "categorical", f) / (
        noise if task == "regression" else 1.0
    )
    h = torch.stack([h[i * c : (i + 1) * c, i * c : (i + 1) * c] for i in range(n)])
    layers = [
        (x, last.weight.detach() * (1 - hidden.square())[:, None, :]),  # g (n, C, 4) for the first layer
        (hidden, torch.eye(c, dtype=torch.float64).expand(n, c, c)),
    ]
    blocks = []
    for a, g in layers:
        aug = torch.cat([a, torch.ones(n, 1, dtype=torch.float64)], 1)
        big_a = aug.T @ aug / n
        big_g = torch.einsum("ico,icd,idq->oq", g.contiguous(), h, g.contiguous())
        blocks.append(torch.kron(big_g.contiguous(), big_a.contiguous()))  # rows (o, a): weight, then bias
    # θ order: W1 (4 × 2), b1 (4), W2 (C × 4), b2 (C): map the (o, a) layout to it
    order, start = [], 0
    for d_out, d_in in ((4, 2), (c, 4)):
        for o in range(d_out):
            order += [start + o * d_in + a for a in range(d_in)] + [start + d_out * d_in + o]
        start += d_out * (d_in + 1)
    dense = torch.block_diag(*blocks)
    out = torch.zeros_like(dense)
    index = torch.tensor(order)
    out[index[:, None], index[None, :]] = dense
    return out


@pytest.mark.parametrize("task", ["regression", "classification"])
@pytest.mark.parametrize("find_map", [True, False])
def test_full_is_exact_in_either_space(task, find_map):
    """hessian_structure="full" takes parameter space when p ≤ N (p = 27 < N = 3·20), function space when N < p; both
    equal the dense posterior: MAP, GLM covariance blocks, probit probabilities, evidence and Σ itself (1e-8)."""
    c, noise, delta = 3, (0.3 if task == "regression" else None), 0.7
    model = mlp(c)
    x, y = data(task, 20, c)
    xt = data(task, 5, c, seed=2)[0]
    curvature = lambda f: dense_fisher(model, task, x, f, noise)  # noqa: E731
    step, mean_t, blocks, evidence, sigma = reference(model, task, x, y, xt, curvature, delta, noise, find_map)
    theta0 = FunctionalNetwork(model).theta0
    fits = {}
    for structure in ("full", "function"):
        la = Laplace(model, task, prior_precision=delta, noise=noise, hessian_structure=structure, progress=False)
        fits[structure] = la.fit(x, y, find_map=find_map)
    assert fits["full"].posterior == "full" and fits["function"].posterior == "function"
    for la in fits.values():
        assert rel_err(la.mean, theta0 + step) < 1e-8
        mean, cov = la.predict(xt, pred_type="latent")
        assert rel_err(mean, mean_t) < 1e-8
        assert rel_err(cov, blocks) < 1e-8
        assert abs(float(la.log_marginal_likelihood()) - float(evidence)) < 1e-8 * abs(float(evidence))
        assert rel_err(la.covariance.to_dense(), sigma) < 1e-8
        if task == "classification":
            var = blocks.diagonal(dim1=-2, dim2=-1)
            expected = torch.softmax(mean_t / torch.sqrt(1 + math.pi / 8 * var), -1)
            assert rel_err(la.predict(xt), expected) < 1e-8
    small = Laplace(model, task, prior_precision=delta, noise=noise, progress=False).fit(x[:4], y[:4])
    assert small.posterior == "function"  # N = 12 < p = 27


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_parameter_space_samples_have_the_posterior_covariance(structure):
    """θ ~ N(θ_MAP, Σ) from the structure's square root (Cholesky factor, Kronecker blocks, diagonal): the sample
    covariance of 20,000 draws is Σ to Monte Carlo error."""
    model = mlp(2)
    x, y = data("regression", 20, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = Laplace(model, "regression", noise=0.3, hessian_structure=structure, progress=False).fit(x, y)
    assert la.posterior == structure
    draws = la.sample(20000, generator=torch.Generator().manual_seed(0))
    sigma = la.covariance.to_dense()
    assert rel_err(draws.mean(0), la.mean) < 0.05
    assert rel_err(torch.cov(draws.T), sigma) < 0.05


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_kron_is_kfac_with_the_prior_added_exactly(task):
    """hessian_structure="kron": the posterior (K + δI)⁻¹ of the K-FAC K of F (curvlinops, at the MAP outputs)
    equals the one from Kronecker factors formed by hand (1e-8): covariance blocks, Σ and the evidence's exact
    log-determinant; the reported error is the true error of its variance on the probe inputs."""
    c, noise, delta = 3, (0.3 if task == "regression" else None), 0.7
    model = mlp(c)
    x, y = data(task, 20, c)
    xt = data(task, 5, c, seed=2)[0]
    curvature = lambda f: kfac_reference(model, task, x, f, noise)  # noqa: E731
    step, mean_t, blocks, evidence, sigma = reference(model, task, x, y, xt, curvature, delta, noise)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the low-rank ... error" warnings: K-FAC is an approximation
        la = Laplace(
            model, task, prior_precision=delta, noise=noise, hessian_structure="kron", progress=False, solver=EXACT_CG
        )
        la.fit(x, y)
        mean, cov = la.predict(xt, pred_type="latent")
    assert la.posterior == "kron" and la.approximate
    assert rel_err(la.mean - FunctionalNetwork(model).theta0, step) < 1e-7  # the exact MAP, by CG
    assert rel_err(mean, mean_t) < 1e-7
    assert rel_err(cov, blocks) < 1e-8
    assert rel_err(la.covariance.to_dense(), sigma) < 1e-8
    assert abs(float(la.log_marginal_likelihood()) - float(evidence)) < 1e-8 * abs(float(evidence))
    exact = reference(model, task, x, y, xt, lambda f: dense_fisher(model, task, x, f, noise), delta, noise)[2]
    true_error = (cov.diagonal(dim1=-2, dim2=-1) - exact.diagonal(dim1=-2, dim2=-1)).abs().max()
    true_error = true_error / exact.diagonal(dim1=-2, dim2=-1).abs().max()
    assert la.variance_error is not None and abs(la.variance_error - float(true_error)) < 1e-3 * float(true_error)


def test_diag_is_the_exact_diagonal():
    """hessian_structure="diag": Σ = (diag F + δI)⁻¹ with F's exact diagonal, against the dense diagonal (1e-10)."""
    model = mlp(3)
    x, y = data("classification", 20, 3)
    xt = data("classification", 5, 3, seed=2)[0]
    curvature = lambda f: torch.diag(dense_fisher(model, "classification", x, f, None).diagonal())  # noqa: E731
    _, mean_t, blocks, evidence, sigma = reference(model, "classification", x, y, xt, curvature, 0.7, None, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = Laplace(model, "classification", prior_precision=0.7, hessian_structure="diag", progress=False)
        la.fit(x, y, find_map=False)
        mean, cov = la.predict(xt, pred_type="latent")
    assert rel_err(cov, blocks) < 1e-10 and rel_err(mean, mean_t) < 1e-12
    assert rel_err(la.covariance.to_dense(), sigma) < 1e-10
    assert abs(float(la.log_marginal_likelihood()) - float(evidence)) < 1e-10 * abs(float(evidence))


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_per_layer_prior_precisions(structure):
    """One δ per parameter tensor, expanded to D: the MAP, covariance and evidence of N(θ0, D⁻¹) against the dense
    formulas with the structure's F (1e-8); kron needs equal δ on a layer's weight and bias."""
    model = mlp(2)
    x, y = data("regression", 20, 2)
    xt = data("regression", 4, 2, seed=2)[0]
    layers = torch.tensor([0.5, 0.5, 3.0, 3.0], dtype=torch.float64)  # W1, b1, W2, b2
    numels = [p.numel() for p in model.parameters()]
    d = torch.repeat_interleave(layers, torch.tensor(numels))
    curvature = {
        "full": lambda f: dense_fisher(model, "regression", x, f, 0.3),
        "kron": lambda f: kfac_reference(model, "regression", x, f, 0.3),
        "diag": lambda f: torch.diag(dense_fisher(model, "regression", x, f, 0.3).diagonal()),
    }[structure]
    step, mean_t, blocks, evidence, _ = reference(model, "regression", x, y, xt, curvature, d, 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = Laplace(
            model, "regression", prior_precision=layers, noise=0.3, hessian_structure=structure, solver=EXACT_CG
        )
        la.fit(x, y)
        mean, cov = la.predict(xt, pred_type="latent")
    assert rel_err(la.mean - FunctionalNetwork(model).theta0, step) < 1e-7
    assert rel_err(cov, blocks) < 1e-8 and rel_err(mean, mean_t) < 1e-7
    assert abs(float(la.log_marginal_likelihood()) - float(evidence)) < 1e-8 * abs(float(evidence))
    if structure == "kron":
        uneven = torch.tensor([0.5, 1.0, 3.0, 3.0], dtype=torch.float64)
        with pytest.raises(ValueError, match="one prior precision per K-FAC block"):
            Laplace(model, "regression", prior_precision=uneven, noise=0.3, hessian_structure="kron").fit(x, y)
    with pytest.raises(ValueError, match="per layer or per parameter needs a parameter-space posterior"):
        Laplace(model, "regression", prior_precision=layers, noise=0.3, hessian_structure="function").fit(x, y)
    with pytest.raises(TypeError, match="one value per selected parameter tensor"):
        Laplace(model, "regression", prior_precision=layers[:3], noise=0.3)


def test_post_hoc_default_prior_is_zero_centred_and_its_evidence_has_an_optimum():
    """find_map=False centres the prior at zero by default (laplace-torch's prior): the evidence is a proper
    function of δ with an interior optimum, which optimize_prior_precision finds; the same δ in both spaces."""
    model = mlp(3)
    x, y = data("classification", 40, 3)
    chosen = {}
    for structure in ("full", "function"):
        la = Laplace(model, "classification", hessian_structure=structure, progress=False).fit(x, y, find_map=False)
        assert rel_err(la.prior_mean, torch.zeros_like(la.prior_mean)) == 0 and rel_err(la.mean, la.network.theta0) == 0
        grid = torch.logspace(-3, 3, 25, dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "end of the grid" warning: the optimum is inside
            chosen[structure] = la.optimize_prior_precision(grid, progress=False)
        assert 1e-3 < chosen[structure] < 1e3
    assert chosen["full"] == chosen["function"]


def test_approximate_structures_say_so():
    """kron and diag report their estimated variance error at every prediction; full does not need to."""
    model = mlp(3)
    x, y = data("classification", 20, 3)
    for structure, approximate in (("full", False), ("diag", True), ("kron", True)):
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            la = Laplace(model, "classification", hessian_structure=structure, progress=False).fit(x, y)
            la.predict(x[:3])
        assert la.approximate is approximate
        assert (la.variance_error is not None) is approximate


def test_ntk_gp_space_auto_picks_the_smaller_gram():
    """NTKGP(space="auto") (the default) solves in parameter space when p ≤ N and in function space otherwise, with
    the same predictive as the other space (1e-8)."""
    model = mlp(1)
    x, y = data("regression", 30, 1)
    xt = data("regression", 5, 1, seed=2)[0]
    y = y.squeeze(-1)
    for n, space in ((30, "parameter"), (8, "function")):  # p = 17
        auto = NTKGP(model, x[:n], y[:n], noise=0.1, progress=False)
        other = NTKGP(
            model, x[:n], y[:n], noise=0.1, progress=False, space="function" if space == "parameter" else "parameter"
        )
        assert auto.space == space
        a, b = auto.predict(xt), other.predict(xt)
        assert rel_err(a.mean, b.mean) < 1e-8 and rel_err(a.variance, b.variance) < 1e-8


def test_full_and_diag_equal_laplace_torch_last_layer():
    """Post-hoc last-layer Laplace, prior N(0, I/δ), classification: probit probabilities and evidence equal to
    laplace-torch's FullLaplace and DiagLaplace (float64, curvlinops GGN) to 1e-9."""
    laplace_torch = pytest.importorskip("laplace")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4)).double().eval()
        x, xt = torch.randn(60, 3), torch.randn(7, 3)
        y = torch.randint(0, 4, (60,))
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=60)
        for structure in ("full", "diag"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                theirs = laplace_torch.Laplace(
                    model,
                    "classification",
                    subset_of_weights="last_layer",
                    hessian_structure=structure,
                    prior_precision=0.5,
                )
                theirs.fit(loader)
                ours = Laplace(
                    model,
                    "classification",
                    params="last_layer",
                    prior_precision=0.5,
                    hessian_structure=structure,
                    progress=False,
                ).fit(loader, find_map=False)
                probs = theirs(xt, pred_type="glm", link_approx="probit")
                assert rel_err(ours.predict(xt), probs) < 1e-9
            assert abs(float(theirs.log_marginal_likelihood().detach()) - float(ours.log_marginal_likelihood())) < 1e-9
    finally:
        torch.set_default_dtype(default)


@pytest.mark.parametrize("structure", ["full", "kron"])
def test_layerwise_prior_precision_is_a_coordinatewise_optimum(structure):
    """optimize_prior_precision(prior_structure="layerwise"): one δ per tensor (kron: per layer), an evidence at
    least the best one-δ evidence, and no single layer's δ on the grid does better."""
    model = mlp(2)
    x, y = data("regression", 30, 2)
    grid = torch.logspace(-2, 2, 9, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = Laplace(model, "regression", noise=0.3, hessian_structure=structure, progress=False).fit(x, y)
        scalar = la.optimize_prior_precision(grid, progress=False)
        best_scalar = float(la.log_marginal_likelihood())
        layers = la.optimize_prior_precision(grid, progress=False, prior_structure="layerwise")
    assert isinstance(scalar, float) and layers.shape == (4,)
    if structure == "kron":
        assert layers[0] == layers[1] and layers[2] == layers[3]
    best = float(la.log_marginal_likelihood())
    assert best >= best_scalar - 1e-10
    numels = torch.tensor([p.numel() for p in model.parameters()])
    for group in ([0, 1], [2, 3]) if structure == "kron" else ([0], [1], [2], [3]):
        for value in grid:
            trial = layers.clone()
            trial[group] = value
            assert la._evidence(torch.repeat_interleave(trial, numels)) <= best + 1e-10
    with pytest.raises(ValueError, match="layerwise' needs a parameter-space posterior"):
        Laplace(model, "regression", noise=0.3, hessian_structure="function").fit(x, y).optimize_prior_precision(
            grid, progress=False, prior_structure="layerwise"
        )


@pytest.mark.parametrize("params", [None, ["2."], ["0."], ["0.weight"], ["2.bias"]])
@pytest.mark.parametrize("likelihood", ["gaussian", "categorical"])
def test_dense_fisher_from_layer_factors_or_jacobians(params, likelihood):
    """FisherOperator.dense(): F = JᵀHJ (p × p) against autograd Jacobians (1e-12): from one Linear layer's factors
    (a last layer, a hidden one, weight or bias alone) or from per-sample Jacobians (the whole network)."""
    from ntkgp.operators.fisher_operator import FisherOperator, single_linear_layer

    model = mlp(3)
    x = data("regression", 11, 3)[0]
    net = FunctionalNetwork(model, params=params)
    with torch.no_grad():
        f = model(x)
    j = dense_jacobian(model, x, params=params)
    expected = j.T @ dense_output_fisher(likelihood, f) @ j
    op = FisherOperator.of(x, network=net, likelihood=likelihood, method="exact", epsilon=1.0)
    assert (single_linear_layer(net, x) is not None) is (params is not None)
    assert rel_err(op.dense(), expected) < 1e-12


def test_kron_blocks_as_laplace_torch_forms_them_equal_kron_laplace():
    """With laplace-torch's blocks (a layer's weight and bias apart), the K-FAC structure equals laplace-torch's
    KronLaplace on a last layer, post hoc: log det(K + δI) and the GLM covariances J Σ Jᵀ (float64, 1e-9)."""
    laplace_torch = pytest.importorskip("laplace")
    from ntkgp.lqf.kfac import KFACPreconditioner
    from ntkgp.posteriors.hessian_structures import KronStructure

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4)).double().eval()
        x, xt, y = torch.randn(60, 3), torch.randn(7, 3), torch.randint(0, 4, (60,))
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=60)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = laplace_torch.Laplace(
                model, "classification", subset_of_weights="last_layer", hessian_structure="kron", prior_precision=0.5
            )
            theirs.fit(loader)
        net = FunctionalNetwork(model, params="last_layer")
        kfac = KFACPreconditioner(net, x, 1.0, "cross_entropy", separate_weight_and_bias=True)
        ours = KronStructure.of(kfac, 1.0, net.num_params)
        logdet = float(ours.logdet(0.5)) + net.num_params * math.log(0.5)
        assert abs(logdet - float(theirs.log_det_posterior_precision)) < 1e-9 * abs(logdet)
        jac = torch.cat(list(net.jacobian_chunks(xt)))  # (m, C, p)
        w = ours.root(0.5, jac.reshape(-1, net.num_params).mT, transpose=True).reshape(net.num_params, 7, 4)
        assert rel_err(torch.einsum("pbc,pbd->bcd", w, w), theirs.functional_variance(jac)) < 1e-9
    finally:
        torch.set_default_dtype(default)


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
@pytest.mark.parametrize("params", ["last_layer", ["2.weight"], ["2.bias"], ["0."]])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_one_linear_layer_predictive_from_its_factors(params, structure):
    """With one Linear layer selected, the GLM covariance comes from the layer's factors, g_i V_i g_iᵀ with
    V_i[o, q] = ã_iᵀ Σ_{oq} ã_i from Σ (full), the Kronecker eigenpairs (kron) or the diagonal; it equals J Σ Jᵀ from
    autograd Jacobians and Σ by solves (1e-10): a last layer, a weight or a bias alone, a hidden layer."""
    model = mlp(3)
    x, y = data("classification", 30, 3)
    xt = data("classification", 20, 3, seed=2)[0]
    la = Laplace(model, "classification", params=params, hessian_structure=structure, progress=False).fit(x, y)
    assert la.posterior == structure
    used = []
    original = type(la)._spread_linear_layer
    type(la)._spread_linear_layer = lambda self, *args: used.append(1) or original(self, *args)
    try:
        _, cov = la.predict(xt, pred_type="latent")
    finally:
        type(la)._spread_linear_layer = original
    assert used  # the factored path was taken
    names = ["2."] if params == "last_layer" else params
    jt = dense_jacobian(model, xt, params=names)
    expected = (jt @ la.covariance.to_dense() @ jt.T).reshape(20, 3, 20, 3).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    assert rel_err(cov, expected) < 1e-10


def test_probes_zero_skips_the_error_estimate():
    """Laplace.PROBES = 0 on an instance: an approximate posterior predicts without the estimate (variance_error
    None), the same probabilities."""
    model = mlp(3)
    x, y = data("classification", 20, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = Laplace(model, "classification", hessian_structure="diag", progress=False).fit(x, y)
        expected = la.predict(x[:5])
    la._update(la.prior_precision)
    la.PROBES = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rel_err(la.predict(x[:5]), expected) < 1e-8 and la.variance_error is None
