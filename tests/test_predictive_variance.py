"""The exact variance paths (test Jacobians against directions; tangents) and the low-rank variance, against
dense float64 references; the path choice by flops and memory; K(X, X) from per-sample Jacobians."""

import pytest
import torch
from conftest import make_case, rel_err
from test_ntk_gp import NOISE, S2, dense_posterior, targets

from ntkgp import NTKGP, FunctionalNetwork
from ntkgp.gp.parameter_space import ntk_matrix
from ntkgp.gp.variance_projections import choose_path, jacobian_projections


@pytest.mark.parametrize(
    ("space", "path"),
    [
        (space, path)
        for space in ("function", "parameter")
        for path in ("jacobians", "tangents", "kernel", "auto")
        if (space, path) != ("parameter", "kernel")
    ],
)  # kernel: function space
def test_every_path_matches_the_dense_reference(case, space, path):
    _, model, x, params = case
    y, xs = targets(model, x), torch.randn(6, *x.shape[1:])
    gp = NTKGP(model, x, y, params=params, space=space, noise=NOISE, outputscale=S2, solver="cholesky")
    pred = gp.predict(xs, variance_path=path)
    mu, var, _ = dense_posterior(model, x, y, xs, params)
    assert rel_err(pred.mean.reshape(-1), mu) < 1e-10
    assert rel_err(pred.variance.reshape(-1), var) < 1e-10
    assert pred.variance_error is None and pred.rank is None


def test_paths_agree_in_float32_with_float64():
    model, x, params = make_case("cnn_batchnorm")
    y, xs = targets(model, x), torch.randn(6, *x.shape[1:])
    reference = NTKGP(model, x, y, noise=NOISE, outputscale=S2).predict(xs)
    model32 = model.float()
    gp = NTKGP(model32, x.float(), y.float(), noise=NOISE, outputscale=S2)
    for path in ("jacobians", "tangents", "kernel"):
        pred = gp.predict(xs.float(), variance_path=path)
        assert rel_err(pred.mean.double(), reference.mean) < 1e-5
        assert rel_err(pred.variance.double(), reference.variance) < 1e-4


@pytest.mark.parametrize("space", ["function", "parameter"])
def test_low_rank_variance_is_an_upper_bound_with_the_reported_error(space):
    torch.manual_seed(0)
    model, x, _ = make_case("mlp_c3", n=20)
    y, xs = targets(model, x), torch.randn(30, 3)
    gp = NTKGP(model, x, y, space=space, noise=0.05, outputscale=S2)
    exact = gp.predict(xs)
    full = gp.predict(xs, variance="low_rank", rank=10**6)
    assert rel_err(full.variance, exact.variance) < 1e-12 and full.variance_error < 1e-10
    assert rel_err(full.mean, exact.mean) < 1e-12
    for tolerance in (1e-1, 1e-2, 1e-3):
        approx = gp.predict(xs, variance="low_rank", tolerance=tolerance)
        assert 0 < approx.rank < full.rank and approx.variance_error <= tolerance
        assert rel_err(approx.mean, exact.mean) < 1e-12  # the mean is exact
        assert (approx.variance >= exact.variance - 1e-12).all()  # fewer directions explain less
        probe = ((approx.variance - exact.variance) / exact.variance)[: NTKGP.PROBES].max()
        assert abs(float(probe) - approx.variance_error) < 1e-9  # the reported error is the probe's
    small = gp.predict(xs, variance="low_rank", rank=2)
    assert small.rank == 2 and small.variance_error > approx.variance_error


def test_low_rank_rank_zero_is_the_prior_variance():
    model, x, _ = make_case("mlp_c1")
    y, xs = targets(model, x), torch.randn(4, 3)
    gp = NTKGP(model, x, y, noise=NOISE, outputscale=S2)
    pred = gp.predict(xs, variance="low_rank", tolerance=1e6)
    assert pred.rank == 0
    prior = NTKGP(model, x[:1], y[:1], noise=1e12, outputscale=S2).predict(xs).variance
    assert rel_err(pred.variance, prior) < 1e-9


def test_auto_path_follows_flops_and_memory():
    torch.manual_seed(0)
    wide_input = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(4 * 32 * 32, 2)
    ).eval()
    x = torch.randn(3, 1, 32, 32)
    net = FunctionalNetwork(wide_input, params=["0."])  # 40 parameters, 2 × 10⁵ flops forward: contract
    assert choose_path(net, x, 2, 10, "auto", 2**30) == "jacobians"
    assert choose_path(net, x, 2, 10, "auto", 100) == "tangents"  # D (40 × 10) does not fit
    mlp = torch.nn.Sequential(torch.nn.Linear(50, 400), torch.nn.Tanh(), torch.nn.Linear(400, 10)).eval()
    net = FunctionalNetwork(mlp)  # C·p = 2.4 × 10⁵ against 4 × 10⁴ forward flops: push tangents
    assert choose_path(net, torch.randn(3, 50), 10, 10, "auto", 2**30) == "tangents"
    with pytest.raises(MemoryError, match=r"Jacobian variance path.*variance_path='tangents'.*memory_budget"):
        choose_path(net, torch.randn(3, 50), 10, 10, "jacobians", 100)


def test_kernel_from_per_sample_jacobians_equals_products(case):
    _, model, x, params = case
    net = FunctionalNetwork(model, params)
    c = net.num_outputs(x)
    products = ntk_matrix(net, x, c)
    assert rel_err(ntk_matrix(net, x, c, budget=2**30), products) < 1e-12


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"variance": "approximate"}, "variance must be one of"),
        ({"variance_path": "fast"}, "variance_path must be one of"),
        ({"rank": 0}, "rank"),
        ({"tolerance": -1.0}, "tolerance"),
    ],
)
def test_bad_prediction_options(bad, match):
    model, x, _ = make_case("mlp_c1")
    gp = NTKGP(model, x, targets(model, x), noise=NOISE)
    with pytest.raises((ValueError, TypeError), match=match):
        gp.predict(x, **bad)


def test_memory_estimates_raise_before_the_work_naming_the_knob():
    model, x, _ = make_case("cnn_batchnorm")
    y, xs = targets(model, x), torch.randn(6, *x.shape[1:])
    net = FunctionalNetwork(model)
    gp = NTKGP(model, x, y, noise=NOISE, memory_budget=1000)
    with pytest.raises(MemoryError, match=r"eigendecomposition of K\(X, X\) \(14 × 14\).*solver='cg'"):
        gp.predict(xs)
    gp = NTKGP(model, x, y, noise=NOISE, memory_budget=3 * 14**2 * 8 + 1)
    with pytest.raises(MemoryError, match=r"Jacobian variance path \(230 parameters × 15 directions\)"):
        gp.predict(xs, variance_path="jacobians")
    with pytest.raises(MemoryError, match=r"per-sample Jacobian of one input \(2 outputs × 230 parameters\).*params="):
        jacobian_projections(net, xs, torch.zeros(net.num_params, 0), budget=3000)  # one input: 3680 bytes
    with pytest.raises(MemoryError, match="chunk of per-sample Jacobians.*lower jacobian_chunk_elements"):
        jacobian_projections(net, xs, torch.zeros(net.num_params, 0), budget=10_000)  # one input 3680 B, six 22080
    tangents = 3 * 32 * net.largest_activation_bytes(xs)
    gp = NTKGP(model, x, y, noise=NOISE, memory_budget=int(tangents) - 1)
    with pytest.raises(MemoryError, match="32 tangents at once over 6 inputs.*lower chunk_size"):
        gp.predict(xs, variance_path="tangents")
    assert torch.isfinite(gp.predict(xs, variance_path="jacobians").variance).all()
