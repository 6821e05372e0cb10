"""Cached linearisations (FunctionalNetwork.linearised): identical products with one forward pass, a memory bound,
and the solvers that use them."""

import torch
from conftest import make_case, rel_err

from ntkgp import LQF, NTKGP, FunctionalNetwork, gram_operator, ntk_operator


def counted(module):
    calls = [0]
    module.register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_products_are_identical_and_reuse_one_forward_pass(case):
    _, model, x, params = case
    net = FunctionalNetwork(model, params, frozen_prefix=False)
    v = torch.randn(net.num_params, 3)
    u = torch.randn(x.shape[0] * net.num_outputs(x), 3)
    plain = (gram_operator(net, x)._matmul(v), ntk_operator(net, x)._matmul(u))
    last = [m for m in model.modules() if not list(m.children())][-1]
    calls = counted(last)
    gram, ntk = gram_operator(net, x), ntk_operator(net, x)
    with net.linearised(x) as cached:
        assert cached
        built = calls[0]
        products = (gram._matmul(v), ntk._matmul(u))
        products = (gram @ v, ntk @ u)  # inside linear_operator's autograd Function
        assert calls[0] == built  # no forward pass per product
    assert rel_err(products[0], plain[0]) < 1e-12 and rel_err(products[1], plain[1]) < 1e-12
    assert net._linearisations == {}


def test_budget_turns_caching_off_and_the_estimate_grows_with_n():
    model, x, _ = make_case("cnn_batchnorm", n=8)
    net = FunctionalNetwork(model)
    small, large = net.saved_activation_bytes(x[:2]), net.saved_activation_bytes(x)
    assert 0 < small < large
    with net.linearised(x, budget=small) as cached:
        assert not cached and net._linearisations == {}
    with net.linearised(x, budget=large) as cached:
        assert cached


def test_gpytorch_views_of_the_training_inputs_hit_the_cache():
    """The CG path of NTKGP (GPyTorch reshapes its training inputs) and parameter-space Lanczos and CG give the
    same numbers with and without the cache."""
    model, x, _ = make_case("mlp_c3", n=12)
    y = torch.randn(12, 3)
    xs = torch.randn(4, 3)
    for space in ("function", "parameter"):
        cached = NTKGP(model, x, y, space=space, noise=0.1, solver="cg").predict(xs)
        plain = NTKGP(model, x, y, space=space, noise=0.1, solver="cg", cache_linearisation=False).predict(xs)
        # (LOVE's Lanczos amplifies differences in the last digits of the products)
        assert rel_err(cached.mean, plain.mean) < 1e-8 and rel_err(cached.variance, plain.variance) < 1e-6
    counts, calls = [], counted(model[4])
    for cache in (True, False):
        net = FunctionalNetwork(model)
        gp = NTKGP(net, x, y, noise=0.1, solver="cg", cache_linearisation=cache)
        before = calls[0]
        gp.predict(xs)  # CG and LOVE on the lazy kernel
        counts.append(calls[0] - before)
    # the cross-covariances at the joint (train, test) inputs GPyTorch concatenates are not cached
    assert 2 * counts[0] < counts[1]


def test_lqf_parameter_space_closed_form_is_unchanged():
    model, x, _ = make_case("mlp_c3", n=10)
    y = torch.randint(0, 3, (10,))
    a = LQF(model, weight_decay=0.5).fit(x, y, solver="closed_form", progress=False).solve("parameter")
    b = LQF(model, weight_decay=0.5).fit(x, y, solver="closed_form", progress=False).solve("function")
    assert rel_err(a.delta, b.delta) < 1e-8
