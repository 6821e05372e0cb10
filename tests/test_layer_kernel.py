"""The NTK from layer factors against dense float64 jacrev Jacobians (1e-12), in float32 against float64 (1e-5), and
its use as NTKGP's function-space variance path."""

import pytest
import torch
from conftest import CASES, dense_jacobian, make_case, rel_err
from torch import nn

from ntkgp import NTKGP, FunctionalNetwork
from ntkgp.operators.layer_kernel import LayerKernel


def reference(model, x1, x2, params):
    j1, j2 = dense_jacobian(model, x1, params), dense_jacobian(model, x2, params)
    return j1 @ j2.T


class Tokens(nn.Module):
    """A Linear on (b, T, d) inputs (S = T positions), a padded dilated convolution with bias, a shared-free head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=2, dilation=2, stride=2)
        self.mix = nn.Linear(3, 4)
        self.head = nn.Linear(16, 2, bias=False)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(2).mT  # (b, 4 tokens, 3)
        return self.head(torch.tanh(self.mix(h)).flatten(1))


@pytest.mark.parametrize("name", sorted(CASES) + ["tokens"])
def test_kernel_and_diagonal_blocks_match_jacrev(name):
    if name == "tokens":
        torch.manual_seed(0)
        model, x, params = Tokens().eval(), torch.randn(5, 2, 4, 4), None
    else:
        model, x, params = make_case(name, n=5)
    net = FunctionalNetwork(model, params)
    kernel = LayerKernel(net)
    assert kernel.layers
    first, second = kernel.factors(x[:3]), kernel.factors(x)
    assert rel_err(kernel.kernel(first, second), reference(model, x[:3], x, params)) < 1e-12
    assert rel_err(kernel.kernel(first, second, block_elements=1), reference(model, x[:3], x, params)) < 1e-12
    full = reference(model, x, x, params)
    c = full.shape[0] // 5
    blocks = torch.stack([full[i * c:(i + 1) * c, i * c:(i + 1) * c] for i in range(5)])
    assert rel_err(kernel.diagonal_blocks(second), blocks) < 1e-12


def test_float32_matches_float64():
    model, x, params = make_case("residual_layernorm", n=5)
    expected = reference(model, x, x, params)
    net = FunctionalNetwork(model.float(), params)
    kernel = LayerKernel(net)
    factors = kernel.factors(x.float())
    assert rel_err(kernel.kernel(factors, factors).double(), expected) < 1e-5


def test_a_shared_layer_is_refused_and_ntkgp_falls_back():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(3, 3)

        def forward(self, x):
            return self.layer(torch.tanh(self.layer(x)))

    torch.manual_seed(0)
    model, x = Shared().eval(), torch.randn(6, 3)
    with pytest.raises(NotImplementedError, match="more than once"):
        LayerKernel(FunctionalNetwork(model)).factors(x)
    gp = NTKGP(model, x, torch.randn(6, 3), noise=0.1)
    assert gp.predict(x[:2]).variance.shape == (2, 3)  # auto: per-sample Jacobians instead
    with pytest.raises(ValueError, match="variance_path='kernel' needs function space"):
        gp.predict(x[:2], variance_path="kernel")


def test_kernel_path_is_refused_where_it_does_not_apply():
    model, x, _ = make_case("mlp_c3", n=6)
    y = torch.randn(6, 3)
    with pytest.raises(ValueError, match="variance_path='kernel' is for function space"):
        NTKGP(model, x, y, space="parameter", noise=0.1).predict(x[:2], variance_path="kernel")
    gp = NTKGP(model, x, y, noise=0.1)
    xs = x[:2].clone().requires_grad_(True)
    with pytest.raises(ValueError, match="not differentiable in x"):
        gp.predict(xs, variance_path="kernel")
    gp.predict(xs).mean.sum().backward()  # auto takes a path whose mean is differentiable in x
    assert xs.grad is not None
