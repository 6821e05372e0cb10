"""SVI against the exact Gaussian posterior of a small linearised regression problem (float64).

The mean-field optimum has the exact posterior mean and s_j² = 1/P_jj (P the exact precision); SVI's
mean must come within 10 % of it (stochastic optimisation), and the exact ELBO must never exceed the
exact log marginal likelihood.
"""

import pytest
import torch
from conftest import dense_jacobian, make_case, rel_err
from torch.utils.data import DataLoader, TensorDataset

from ntkgp import SVI, Laplace

DELTA, NOISE = 1.0, 0.1


def regression_problem():
    model, x, _ = make_case("mlp_c1", n=20)
    with torch.no_grad():
        y = (model(x) + 0.3 * torch.randn(20, 1)).squeeze(-1)
    return model, x, y


def test_svi_approaches_the_exact_posterior_and_stays_below_the_evidence():
    model, x, y = regression_problem()
    exact = Laplace(model, "regression", prior_precision=DELTA, noise=NOISE).fit(x, y)
    lml = float(exact.log_marginal_likelihood())
    theta0 = exact.network.theta0
    j = dense_jacobian(model, x)
    precision_diag = (j * j).sum(0) / NOISE + DELTA

    optimum = SVI(model, "regression", prior_precision=DELTA, noise=NOISE)
    with torch.no_grad():
        optimum.loc.copy_(exact.mean - theta0)
        optimum.raw_scale.copy_(torch.log(torch.expm1(precision_diag.rsqrt())))
    best = float(optimum.elbo(x, y))
    assert best < lml

    svi = SVI(model, "regression", prior_precision=DELTA, noise=NOISE)
    generator = torch.Generator().manual_seed(0)
    values = [float(svi.elbo(x, y))]
    for _ in range(4):
        svi.fit(x, y, epochs=250, lr=3e-2, num_samples=16, progress=False, generator=generator)
        values.append(float(svi.elbo(x, y)))
    assert all(v <= lml for v in values)
    assert values[-1] > values[0] and abs(values[-1] - best) < 0.05 * abs(best)
    assert rel_err(svi.mean - theta0, exact.mean - theta0) < 0.1
    assert len(svi.history) == 1000

    xs = torch.randn(5, 3)
    pred, js = svi.predict(xs), dense_jacobian(model, xs)
    assert pred.mean.shape == pred.variance.shape == (5,)
    with torch.no_grad():
        assert rel_err(pred.mean, model(xs).squeeze(-1) + js @ svi.loc) < 1e-10
    assert rel_err(pred.variance, js.square() @ svi.scale.detach().square()) < 1e-10


def test_svi_classification_with_a_dataloader():
    model, x, _ = make_case("mlp_c3", n=24)
    y = (x @ torch.randn(3, 3, generator=torch.Generator().manual_seed(2))).argmax(-1)  # a learnable rule
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3))
    svi = SVI(model, "classification", prior_precision=DELTA).fit(
        loader, epochs=60, lr=5e-2, num_samples=4, progress=False
    )
    assert svi.history[-1] > svi.history[0]
    mean, cov = svi.latent(x)
    j = dense_jacobian(model, x).reshape(24, 3, -1)
    with torch.no_grad():
        assert rel_err(mean, model(x) + (j @ svi.loc)) < 1e-10
    assert rel_err(cov, (j * svi.scale.detach().square()) @ j.mT) < 1e-10
    probs = svi.predict(x, num_samples=50)
    assert probs.shape == (24, 3) and torch.allclose(probs.sum(-1), torch.ones(24))
    map_accuracy = Laplace(model, "classification", prior_precision=DELTA).fit(x, y).predict(x).argmax(-1) == y
    assert (probs.argmax(-1) == y).double().mean() >= map_accuracy.double().mean() - 0.1


def test_svi_bad_input():
    model, x, _ = make_case("mlp_c3", n=6)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match="likelihood must be one of"):
        SVI(model, "ordinal")
    with pytest.raises(ValueError, match="prior_precision must be"):
        SVI(model, "classification", prior_precision=-1.0)
    with pytest.raises(ValueError, match="init_scale must be"):
        SVI(model, "classification", init_scale=0.0)
    with pytest.raises(TypeError, match="integer class indices"):
        SVI(model, "classification").fit(x, y.double(), epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        SVI(model, "classification").fit(x, y - 1, epochs=1, progress=False)
    with pytest.raises(ValueError, match="num_classes = 4 but the network has 3 outputs"):
        SVI(model, "classification", num_classes=4).fit(x, y, epochs=1, progress=False)
    with pytest.raises(ValueError, match="give train_y"):
        SVI(model, "classification").fit(x, epochs=1, progress=False)
    with pytest.raises(ValueError, match="(epochs|num_samples) must be an integer >= 1"):
        SVI(model, "classification").fit(x, y, epochs=0, progress=False)
    with pytest.raises(ValueError, match=r"train_y has shape \(6,\) but the network has 3 output"):
        SVI(model, "regression").fit(x, y.double(), epochs=1, progress=False)
