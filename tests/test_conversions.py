"""Conversions as GPyTorch and linear_operator users make them: `.double()`, `.to(dtype)`, `.type(dtype)` on an NTKGP,
on a GPyTorch model holding the kernel, on the kernel itself and on the operators convert the network snapshot
too. Reference: the same objects built from the float64 network, to 1e-10 (relative)."""

import copy

import gpytorch
import pytest
import torch
from conftest import make_case, rel_err

from ntkgp import NTKGP, JacobianKernel, fisher_operator, gram_operator, ntk_operator

TOL = 1e-10


@pytest.fixture
def float32_case():
    model, x, _ = make_case("cnn_batchnorm")
    model32 = copy.deepcopy(model).float()
    model64 = copy.deepcopy(model32).double()  # the same (float32-rounded) weights in float64
    return model32, model64, x.float(), torch.randn(x.shape[0], 2).float(), torch.randn(4, *x.shape[1:]).float()


class _UserGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, model, input_shape):
        likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2, rank=0, has_task_noise=False)
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.MultitaskMean(gpytorch.means.ConstantMean(), num_tasks=2)
        self.covar_module = gpytorch.kernels.ScaleKernel(JacobianKernel(model, input_shape=input_shape))

    def forward(self, x):
        return gpytorch.distributions.MultitaskMultivariateNormal(
            self.mean_module(x), self.covar_module(x), interleaved=True
        )


@pytest.mark.parametrize("convert", [lambda m: m.double(), lambda m: m.to(torch.float64)])
def test_gpytorch_model_holding_the_kernel(float32_case, convert):
    model32, model64, x, y, xs = float32_case
    shape = x.shape[1:]
    gp = convert(_UserGP(x.flatten(1), y, model32, shape))
    gp64 = _UserGP(x.double().flatten(1), y.double(), model64, shape)
    gp64.load_state_dict(gp.state_dict())
    assert gp.covar_module.base_kernel.network.dtype == torch.float64
    gp.eval(), gp64.eval()
    with gpytorch.settings.fast_computations(False, False, False):
        got, want = gp.likelihood(gp(xs.double().flatten(1))), gp64.likelihood(gp64(xs.double().flatten(1)))
        assert rel_err(got.mean, want.mean) < TOL and rel_err(got.variance, want.variance) < TOL


@pytest.mark.parametrize("space", ["function", "parameter"])
def test_ntkgp(float32_case, space):
    model32, model64, x, y, xs = float32_case
    gp = NTKGP(model32, x, y, space=space, noise=0.05, outputscale=0.7)
    gp.predict(xs)  # caches built in float32 are dropped by the conversion
    gp = gp.double()
    ref = NTKGP(model64, x.double(), y.double(), space=space, noise=0.05, outputscale=0.7)
    ref.load_state_dict(gp.state_dict())  # the float32-rounded hyperparameters
    got, want = gp.predict(xs.double()), ref.predict(xs.double())
    assert got.mean.dtype == torch.float64
    assert rel_err(got.mean, want.mean) < TOL and rel_err(got.variance, want.variance) < TOL
    assert abs(float(gp.log_marginal_likelihood()) - float(ref.log_marginal_likelihood())) < 1e-10
    back = gp.float().predict(xs)
    assert back.mean.dtype == torch.float32


def test_kernel_alone(float32_case):
    model32, model64, x, _, _ = float32_case
    kernel = JacobianKernel(model32, input_shape=x.shape[1:]).double()
    want = JacobianKernel(model64, input_shape=x.shape[1:])
    flat = x.double().flatten(1)
    assert rel_err(kernel(flat).to_dense(), want(flat).to_dense()) < TOL


@pytest.mark.parametrize(
    "convert", [lambda op: op.double(), lambda op: op.to(torch.float64), lambda op: op.type(torch.float64)]
)
@pytest.mark.parametrize(
    "build",
    [
        lambda m, x: ntk_operator(m, x),
        lambda m, x: gram_operator(m, x),
        lambda m, x: fisher_operator(m, x, "categorical", method="exact"),
    ],
)
def test_operators(float32_case, convert, build):
    model32, model64, x, _, _ = float32_case
    op = convert(build(model32, x))
    assert op.dtype == torch.float64 and op.network.dtype == torch.float64
    assert rel_err(op.to_dense(), build(model64, x.double()).to_dense()) < TOL
    assert build(model32, x).network.dtype == torch.float32  # the original is untouched
