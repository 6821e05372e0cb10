"""The Fisher operator against dense float64 references J and H (exact: 1e-10; finite differences: 1e-5)."""

import pytest
import torch
from conftest import dense_jacobian, dense_output_fisher, make_case, rel_err
from torch import nn

from ntkgp import fisher_operator


def dense_fisher(model, x, likelihood, params=None):
    j = dense_jacobian(model, x, params)
    with torch.no_grad():
        f = model(x).reshape(x.shape[0], -1)
    return j.T @ dense_output_fisher(likelihood, f) @ j


CASES = [
    ("mlp_c3", "gaussian"),
    ("mlp_c3", "categorical"),
    ("cnn_batchnorm", "categorical"),
    ("residual_layernorm", "heteroscedastic"),
    ("mlp_subset", "heteroscedastic"),
    ("mlp_c1", "gaussian"),
]


@pytest.mark.parametrize("name,likelihood", CASES)
def test_exact_products_diagonal_and_entries(name, likelihood):
    model, x, params = make_case(name)
    dense = dense_fisher(model, x, likelihood, params)
    op = fisher_operator(model, x, likelihood, method="exact", params=params)
    v = torch.randn(dense.shape[0], 3)
    assert rel_err(op @ v, dense @ v) < 1e-10
    assert rel_err(op.matmul(v[:, 0]), dense @ v[:, 0]) < 1e-10
    assert rel_err(op.diagonal(), dense.diagonal()) < 1e-10
    rows, cols = torch.tensor([0, 4, 4, 1]), torch.tensor([2, 0, 3, 1])
    assert rel_err(op[rows, cols], dense[rows, cols]) < 1e-10


@pytest.mark.parametrize("method", ["finite_difference", "central_difference"])
@pytest.mark.parametrize("name,likelihood", CASES)
def test_finite_difference_products(name, likelihood, method):
    model, x, params = make_case(name)
    dense = dense_fisher(model, x, likelihood, params)
    v = torch.randn(dense.shape[0], 5)
    v[:, 1] *= 1e3  # the product is rescaled by ‖v‖: the step stays ε along v/‖v‖
    op = fisher_operator(model, x, likelihood, method=method, params=params)
    assert rel_err(op @ v, dense @ v) < 1e-5
    assert rel_err(op.matmul(v[:, 2]), dense @ v[:, 2]) < 1e-5
    assert rel_err(fisher_operator(model, x, likelihood, method, epsilon=1e-7, params=params) @ v, dense @ v) < 1e-5
    assert torch.equal(op @ torch.zeros(dense.shape[0]), torch.zeros(dense.shape[0]))


@pytest.mark.parametrize("method", ["finite_difference", "central_difference"])
def test_single_vector_and_transformed_products_agree(method):
    """One vector goes through plain autograd, several through torch.func.grad under vmap, and a product
    inside a user's torch.func.vmap falls back to torch.func.grad: all three agree to the rounding of the
    difference quotient (float64 eps / ε ≈ 1e-8 here; batched convolutions sum in another order)."""
    model, x, _ = make_case("cnn_batchnorm")
    op = fisher_operator(model, x, "categorical", method=method)
    v = torch.randn(op.shape[-1], 3)
    batched = op @ v
    assert rel_err(op @ v[:, 0], batched[:, 0]) < 1e-6
    # (linear_operator's `@` is an autograd.Function that torch.func cannot transform: call _matmul)
    transformed = torch.func.vmap(lambda u: op._matmul(u.unsqueeze(-1)).squeeze(-1), in_dims=1, out_dims=1)(v)
    assert rel_err(transformed, batched) < 1e-6


@pytest.mark.parametrize("method,per_product", [("finite_difference", 1), ("central_difference", 2), ("exact", 2)])
def test_forward_passes_per_product(method, per_product):
    """f(x; θ0) is computed once, when the operator is built: a finite-difference product through `@` (which
    rebuilds the operator inside linear_operator's Matmul) then runs one forward pass per gradient, no more."""
    model, x, _ = make_case("mlp_c3")
    calls = []
    model[0].register_forward_hook(lambda *args: calls.append(1))
    op = fisher_operator(model, x, "categorical", method=method)
    built = len(calls)
    for _ in range(3):
        op @ torch.randn(op.shape[-1])
    assert len(calls) - built == 3 * per_product


@pytest.mark.parametrize("likelihood", ["gaussian", "categorical"])
def test_truncation_error_orders(likelihood):
    """float64, ε large enough that truncation dominates: halving ε halves the forward error and quarters
    the central one (fitted log-log slopes within 0.15 of 1 and 2), and central beats forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).double().eval()
    x = torch.randn(20, 4, dtype=torch.float64)
    v = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64)
    exact = fisher_operator(model, x, likelihood, method="exact") @ v
    epsilons = torch.tensor([4e-2, 2e-2, 1e-2, 5e-3], dtype=torch.float64)
    for method, order in (("finite_difference", 1), ("central_difference", 2)):
        errors = torch.tensor(
            [rel_err(fisher_operator(model, x, likelihood, method, epsilon=float(e)) @ v, exact) for e in epsilons]
        )
        slope = torch.diff(errors.log()).mean() / torch.diff(epsilons.log()).mean()
        assert abs(float(slope) - order) < 0.15, (method, errors)
        assert errors.max() < (2e-2 if order == 1 else 1e-3), (method, errors)


def test_finite_difference_accuracy_in_float32():
    """The target: relative error < 1e-2 for ε in [1e-4, 1e-2] in float32 (here a random CNN)."""
    torch.manual_seed(0)
    model = (
        nn.Sequential(
            nn.Conv2d(1, 8, 3),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(8 * 6 * 6, 10),
        )
        .float()
        .eval()
    )
    x = torch.randn(32, 1, 16, 16, dtype=torch.float32)
    v = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=torch.float32)
    for likelihood in ("gaussian", "categorical"):
        exact = fisher_operator(model, x, likelihood, method="exact") @ v
        for eps in (1e-4, 1e-3, 1e-2, None):
            approx = fisher_operator(model, x, likelihood, epsilon=eps) @ v
            assert rel_err(approx.double(), exact.double()) < 1e-2, (likelihood, eps)


def test_bad_fisher_input():
    model, x, _ = make_case("mlp_c1")
    with pytest.raises(ValueError, match="unknown likelihood 'poisson'"):
        fisher_operator(model, x, "poisson")
    with pytest.raises(ValueError, match="categorical likelihood needs a network with C >= 2"):
        fisher_operator(model, x, "categorical")
    with pytest.raises(ValueError, match="heteroscedastic Gaussian needs outputs .* even width"):
        fisher_operator(model, x, "heteroscedastic")
    for eps in (0.0, -1e-3):
        with pytest.raises(ValueError, match="epsilon must be a finite number > 0"):
            fisher_operator(model, x, epsilon=eps)
    with pytest.raises(ValueError, match="method must be one of"):
        fisher_operator(model, x, method="autograd")


@pytest.mark.parametrize("name", ["gaussian", "categorical", "heteroscedastic"])
def test_likelihood_pieces_are_consistent(name):
    """kl_gradient is ∇_g kl, and the Hessian of kl at g = f is the output Fisher H(f)."""
    from ntkgp.likelihoods import get_likelihood

    lik = get_likelihood(name)
    f, g = torch.randn(3, 4), torch.randn(3, 4, requires_grad=True)
    assert rel_err(lik.kl_gradient(f, g), torch.autograd.grad(lik.kl(f, g), g)[0]) < 1e-12
    hessian = torch.autograd.functional.hessian(lambda h: lik.kl(f, h), f.clone()).reshape(12, 12)
    u = torch.randn(3, 4)
    assert rel_err(lik.fisher(f, u).reshape(-1), hessian @ u.reshape(-1)) < 1e-10
    assert abs(float(lik.kl(f, f))) < 1e-12


def test_jacobian_kernel_gives_the_fisher_of_its_network():
    """One object for both: kernel.fisher(x) is the Fisher of the kernel's own network and parameter
    selection, with the kernel's (n, d) input convention (reshaped to input_shape)."""
    from ntkgp import JacobianKernel

    model, x, _ = make_case("cnn_batchnorm")
    kernel = JacobianKernel(model, params=["3.", "7."], input_shape=(1, 9, 9))
    dense = dense_fisher(model, x, "categorical", ["3.", "7."])
    v = torch.randn(dense.shape[0], 2)
    flat = x.reshape(len(x), -1)
    assert rel_err(kernel.fisher(flat, "categorical", method="exact") @ v, dense @ v) < 1e-10
    assert rel_err(kernel.fisher(flat, "categorical") @ v, dense @ v) < 1e-5
    with pytest.raises(ValueError, match="input_shape"):
        kernel.fisher(flat[:, :-1])
