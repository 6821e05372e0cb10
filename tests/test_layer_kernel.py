"""The NTK from layer factors against dense float64 jacrev Jacobians (1e-12), in float32 against float64 (1e-5), and
its use as NTKGP's function-space variance path."""

import types
import warnings

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
    blocks = torch.stack([full[i * c : (i + 1) * c, i * c : (i + 1) * c] for i in range(5)])
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
    gp = NTKGP(model, x, torch.randn(6, 3), noise=0.1, space="function")
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


class StdConv2d(nn.Conv2d):
    """timm's weight-standardised convolution (BiT, ResNetV2): the forward standardises the weight."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / w.std((1, 2, 3), keepdim=True, unbiased=False)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


class BiTBlock(nn.Module):
    """A pre-activation BiT bottleneck: GroupNorm, ReLU, StdConv2d 1×1 / 3×3 / 1×1, a StdConv2d shortcut, a head."""

    def __init__(self):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.GroupNorm(2, 4), nn.GroupNorm(2, 4), nn.GroupNorm(2, 4)
        self.conv1, self.conv2 = StdConv2d(4, 4, 1, bias=False), StdConv2d(4, 4, 3, padding=1, bias=False)
        self.conv3, self.downsample = StdConv2d(4, 8, 1, bias=False), StdConv2d(4, 8, 1, bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        pre = torch.relu(self.norm1(x))
        h = self.conv2(torch.relu(self.norm2(self.conv1(pre))))
        h = self.conv3(torch.relu(self.norm3(h))) + self.downsample(pre)
        return self.head(h.mean((2, 3)))


def dense_gp(model, x, y, xs, scale, noise):
    """(mean, variance, evidence) of the NTK-GP from jacrev Jacobians in float64."""
    j, js = dense_jacobian(model, x), dense_jacobian(model, xs)
    with torch.no_grad():
        r = (y - model(x)).reshape(-1)
        cov = scale * j @ j.T + noise * torch.eye(len(r))
        cross = scale * js @ j.T
        mean = model(xs).reshape(-1) + cross @ torch.linalg.solve(cov, r)
        var = scale * (js * js).sum(1) - (cross * torch.linalg.solve(cov, cross.T).T).sum(1)
        evidence = torch.distributions.MultivariateNormal(torch.zeros_like(r), cov).log_prob(r)
    return mean, var, evidence


@pytest.mark.parametrize("name", ["stdconv", "bit"])
@pytest.mark.parametrize("path", ["auto", "jacobians"])
def test_weight_standardised_convolutions_are_not_factored(name, path):
    """A subclass of nn.Conv2d that standardises its weight in forward (timm's StdConv2d) is not conv(a, W) + b with
    the raw weight: it was factored as if it were (mean 15 %, variance 34 % off; a BiT block: 52 / 77 %, the evidence
    15 %). It is now left to per-sample Jacobians: exact to 1e-8."""
    torch.manual_seed(0)
    if name == "stdconv":
        model = nn.Sequential(StdConv2d(16, 64, 1), nn.Tanh(), nn.Flatten(), nn.Linear(64, 3)).eval()
        x, xs = torch.randn(3, 16, 1, 1), torch.randn(2, 16, 1, 1)
    else:
        model, x, xs = BiTBlock().eval(), torch.randn(4, 4, 5, 5), torch.randn(2, 4, 5, 5)
    y = torch.randn(x.shape[0], 3)
    kernel = LayerKernel(FunctionalNetwork(model))
    assert all(not isinstance(layer.module, StdConv2d) for layer in kernel.layers)
    mean, var, evidence = dense_gp(model, x, y, xs, 1.3, 0.1)
    gp = NTKGP(model, x, y, outputscale=1.3, noise=0.1)
    pred = gp.predict(xs, variance_path=path)
    assert rel_err(pred.mean.reshape(-1), mean) < 1e-8
    assert rel_err(pred.variance.reshape(-1), var) < 1e-8
    assert float(gp.log_marginal_likelihood().detach()) == pytest.approx(float(evidence), rel=1e-10)


def test_modules_whose_computation_is_not_the_stock_one_are_not_factored():
    """Hooks, parametrizations (weight norm), a forward replaced on the instance, a weight held by two modules."""
    torch.manual_seed(0)
    hooked, normed, patched, tied_a, plain = (nn.Linear(4, 4) for _ in range(5))
    hooked.register_forward_hook(lambda module, args, out: 2 * out)
    nn.utils.parametrizations.weight_norm(normed)
    patched.forward = types.MethodType(lambda self, x: nn.functional.linear(x, 3 * self.weight, self.bias), patched)
    tied_b = nn.Linear(4, 4)
    tied_b.weight = tied_a.weight
    model = nn.Sequential(
        hooked, nn.Tanh(), normed, nn.Tanh(), patched, nn.Tanh(), tied_a, nn.Tanh(), tied_b, nn.Tanh(), plain
    ).eval()
    kernel = LayerKernel(FunctionalNetwork(model))
    assert [layer.name for layer in kernel.layers] == ["10"]
    x = torch.randn(5, 4)
    factors = kernel.factors(x)
    assert rel_err(kernel.kernel(factors, factors), reference(model, x, x, None)) < 1e-12


def test_a_kernel_that_disagrees_with_ntk_products_falls_back_with_one_warning():
    """What the structure cannot show — a factored layer's weight also used outside its call — is caught by the check
    against NTK products on two inputs: one warning, then NTK products / per-sample Jacobians (exact)."""

    class Reused(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.head = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.head(torch.tanh(self.layer(x)) + x @ self.layer.weight.T)

    torch.manual_seed(0)
    model, x, xs, y = Reused().eval(), torch.randn(6, 3), torch.randn(3, 3), torch.randn(6, 2)
    with pytest.warns(RuntimeWarning, match="layer-factor kernel of this network disagrees"):
        gp = NTKGP(model, x, y, outputscale=0.7, noise=0.1)
        pred = gp.predict(xs)
    mean, var, _ = dense_gp(model, x, y, xs, 0.7, 0.1)
    assert rel_err(pred.mean.reshape(-1), mean) < 1e-8 and rel_err(pred.variance.reshape(-1), var) < 1e-8
    with pytest.raises(ValueError, match="agrees with NTK products"):
        gp.predict(xs, variance_path="kernel")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gp.predict(xs)  # checked once per network: no second warning
