"""ntkgp.botorch.NTKGPModel against NTKGP and dense float64 formulas, and inside BoTorch's acquisition machinery."""

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

botorch = pytest.importorskip("botorch")

from botorch.acquisition import qKnowledgeGradient, qLogExpectedImprovement  # noqa: E402
from botorch.models.transforms import Standardize  # noqa: E402
from botorch.optim import optimize_acqf  # noqa: E402
from botorch.sampling import SobolQMCNormalSampler  # noqa: E402

from ntkgp import NTKGP  # noqa: E402
from ntkgp.botorch import NTKGPModel  # noqa: E402


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1)).double().eval()


def data(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g, dtype=torch.float64)
    return x, (torch.sin(3 * x[:, :1]) + x[:, 1:] ** 2)


def dense(model, x):
    """Per-sample Jacobians (m, p) and outputs (m,) of ``model`` at x (m, 2), by jacrev."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    names, shapes = list(params), [v.shape for v in params.values()]
    theta = torch.cat([v.reshape(-1) for v in params.values()])

    def f(t):
        chunks = t.split([s.numel() for s in shapes])
        return functional_call(model, {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}, (x,))[:, 0]

    return jacrev(f)(theta), f(theta)


def dense_posterior(model, x, y, xs, s2, noise):
    jt, ft = dense(model, x)
    js, fs = dense(model, xs)
    c = s2 * jt @ jt.T + noise * torch.eye(len(x), dtype=x.dtype)
    cross = s2 * js @ jt.T
    mean = fs + cross @ torch.linalg.solve(c, y[:, 0] - ft)
    cov = s2 * js @ js.T - cross @ torch.linalg.solve(c, cross.T)
    return mean, cov


def test_posterior_against_ntkgp_and_dense_for_batched_joint_inputs():
    model = net()
    x, y = data()
    m = NTKGPModel(model, x, y, outputscale=0.7, noise=0.05)
    gp = NTKGP(model, x, y[:, 0], noise=0.05, outputscale=0.7, progress=False)
    xs = torch.rand(3, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))  # b = 3, q = 4
    post = m.posterior(xs)
    assert post.mean.shape == (3, 4, 1) and post.variance.shape == (3, 4, 1)
    ref = gp.predict(xs.reshape(-1, 2))
    assert (post.mean.reshape(-1) - ref.mean).abs().max() < 1e-8
    assert (post.variance.reshape(-1) - ref.variance).abs().max() < 1e-8
    for b in range(3):
        mean, cov = dense_posterior(model, x, y, xs[b], 0.7, 0.05)
        assert (post.mean[b, :, 0] - mean).abs().max() < 1e-8
        assert (post.distribution.covariance_matrix[b] - cov).abs().max() < 1e-8
    single = m.posterior(xs[0, :1])  # q = 1, no batch
    assert single.mean.shape == (1, 1) and abs(float(single.mean[0, 0]) - float(post.mean[0, 0, 0])) < 1e-12
    noisy = m.posterior(xs, observation_noise=True)
    assert (noisy.variance - post.variance - 0.05).abs().max() < 1e-10
    for b in range(3):  # NTKGP's own posterior(x): the same joint distribution as the BoTorch model's
        for observed in (False, True):
            ours, theirs = (
                gp.posterior(xs[b], observation_noise=observed),
                m.posterior(xs[b], observation_noise=observed),
            )
            assert ours.mean.shape == theirs.mean.shape == (4, 1)
            assert (ours.mean - theirs.mean).abs().max() < 1e-8
            assert (ours.distribution.covariance_matrix - theirs.distribution.covariance_matrix).abs().max() < 1e-8


def test_learned_hyperparameters_are_ntkgps():
    model = net()
    x, y = data(12)
    m = NTKGPModel(model, x, y)
    gp = NTKGP(model, x, y[:, 0], progress=False).fit()
    assert m.outputscale == pytest.approx(float(gp.outputscale), rel=1e-6)
    assert m.noise == pytest.approx(float(gp.noise), rel=1e-6)


def test_gradient_in_x_against_finite_differences():
    model = net()
    x, y = data()
    m = NTKGPModel(model, x, y, outputscale=0.7, noise=0.05)
    xs = torch.tensor([[[0.3, 0.6], [0.8, 0.1]]], dtype=torch.float64, requires_grad=True)

    def value(z):
        post = m.posterior(z)
        return post.mean.sum() + post.distribution.covariance_matrix.sum()

    (grad,) = torch.autograd.grad(value(xs), xs)
    eps = 1e-6
    numeric = torch.zeros_like(xs)
    for idx in [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]:
        step = torch.zeros_like(xs)
        step[idx] = eps
        with torch.no_grad():
            numeric[idx] = (value(xs + step) - value(xs - step)) / (2 * eps)
    assert (grad - numeric).abs().max() < 1e-6


def test_condition_on_observations_equals_the_model_of_the_union():
    model = net()
    x, y = data(10)
    base = NTKGPModel(model, x[:7], y[:7], outputscale=0.7, noise=0.05)
    union = NTKGPModel(model, x, y, outputscale=0.7, noise=0.05)
    conditioned = base.condition_on_observations(x[7:], y[7:])
    xs = torch.rand(5, 2, dtype=torch.float64)
    a, b = conditioned.posterior(xs), union.posterior(xs)
    assert (a.mean - b.mean).abs().max() < 1e-10
    assert (a.distribution.covariance_matrix - b.distribution.covariance_matrix).abs().max() < 1e-10


def test_fantasize_shapes_and_knowledge_gradient():
    model = net()
    x, y = data()
    m = NTKGPModel(model, x, y, outputscale=0.7, noise=0.05)
    sampler = SobolQMCNormalSampler(sample_shape=torch.Size([4]))
    xs = torch.rand(3, 2, 2, dtype=torch.float64)  # b = 3, q = 2
    fantasy = m.fantasize(xs, sampler)
    assert fantasy.batch_shape == (4, 3)
    post = fantasy.posterior(torch.rand(4, 3, 5, 2, dtype=torch.float64))
    assert post.mean.shape == (4, 3, 5, 1)
    kg = qKnowledgeGradient(m, num_fantasies=4)
    value = kg(torch.rand(2, 1 + 4, 2, dtype=torch.float64))
    assert value.shape == (2,) and torch.isfinite(value).all()


def test_standardize_is_the_same_gp_in_raw_units():
    """Standardize(m=1) with (s², σ²) equals no transform with (s²·σ_y², σ²·σ_y²): the network mean is transformed
    with the targets."""
    model = net()
    x, y = data(9)
    scale = float(y.std())
    t = NTKGPModel(model, x, y, outputscale=0.5, noise=0.02, outcome_transform=Standardize(m=1)).eval()
    raw = NTKGPModel(model, x, y, outputscale=0.5 * scale**2, noise=0.02 * scale**2)
    xs = torch.rand(4, 2, dtype=torch.float64)
    a, b = t.posterior(xs), raw.posterior(xs)
    assert (a.mean - b.mean).abs().max() < 1e-10 and (a.variance - b.variance).abs().max() < 1e-10


def test_optimize_acqf_with_qlogei_returns_a_candidate_inside_the_bounds():
    model = net()
    x, y = data()
    m = NTKGPModel(model, x, y, outputscale=0.7, noise=0.05)
    acq = qLogExpectedImprovement(m, best_f=y.max())
    bounds = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    candidate, value = optimize_acqf(acq, bounds=bounds, q=2, num_restarts=2, raw_samples=16)
    assert candidate.shape == (2, 2) and ((candidate >= 0) & (candidate <= 1)).all()
    assert torch.isfinite(value)


def test_bad_input_and_import_isolation():
    model = net()
    x, y = data()
    with pytest.raises(ValueError, match="train_Y must have shape"):
        NTKGPModel(model, x, y[:, 0])
    two = nn.Sequential(nn.Linear(2, 2)).double().eval()
    with pytest.raises(ValueError, match="one output"):
        NTKGPModel(two, x, y)
    code = "import sys, ntkgp; print('botorch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_jacobian_kernel_in_singletaskgp_batched_and_with_optimize_acqf():
    """A SingleTaskGP with ScaleKernel(JacobianKernel): batched kernel calls equal the unbatched kernel, the model
    takes BoTorch's (b × q × d) candidates in optimize_acqf, and a two-output (batched) model fits."""
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from gpytorch.kernels import ScaleKernel
    from gpytorch.mlls import ExactMarginalLogLikelihood

    from ntkgp import JacobianKernel

    model = net()
    x, y = data(10)
    kernel = JacobianKernel(model)
    xs = torch.rand(3, 4, 2, dtype=torch.float64)
    batched = kernel(xs, xs).to_dense()
    for b in range(3):
        assert (batched[b] - kernel(xs[b], xs[b]).to_dense()).abs().max() < 1e-12
    assert (kernel(xs, xs, diag=True) - torch.diagonal(batched, dim1=-2, dim2=-1)).abs().max() < 1e-12
    kernel(x).to_dense()  # the training inputs, as GPyTorch sees them first
    joint = torch.cat([x.expand(3, *x.shape), xs], -2)
    cross = kernel(joint, joint).to_dense()[:, 10:, :10]
    assert (cross - kernel(xs, x.expand(3, *x.shape)).to_dense()).abs().max() < 1e-12
    assert kernel._train_jacobians is not None  # the training rows' Jacobians were reused
    gp = SingleTaskGP(x, y, covar_module=ScaleKernel(JacobianKernel(model)))
    fit_gpytorch_mll(ExactMarginalLogLikelihood(gp.likelihood, gp))
    acq = qLogExpectedImprovement(gp, best_f=y.max())
    bounds = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    candidate, _ = optimize_acqf(acq, bounds=bounds, q=2, num_restarts=2, raw_samples=16)
    assert ((candidate >= 0) & (candidate <= 1)).all()
    two = SingleTaskGP(
        x,
        torch.cat([y, -y], -1),  # batched over the outputs: the kernel sees (2, n, d) inputs
        covar_module=ScaleKernel(JacobianKernel(model), batch_shape=torch.Size([2])),
    )
    fit_gpytorch_mll(ExactMarginalLogLikelihood(two.likelihood, two))
    assert two.posterior(xs).mean.shape == (3, 4, 2)


def test_a_float32_network_works_in_botorchs_float64():
    """BoTorch runs in float64: a float32 network's snapshot is converted to train_X's dtype, so posteriors are
    float64 and equal those of the network in float64 (it used to cast X down and return float32). X or Y of another
    dtype later is a TypeError."""
    x, y = data()
    single = net().float()
    m = NTKGPModel(single, x, y, outputscale=0.7, noise=0.05)
    assert next(single.parameters()).dtype == torch.float32  # the module is untouched
    xs = torch.rand(2, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    post = m.posterior(xs)
    reference = NTKGPModel(copy.deepcopy(single).double(), x, y, outputscale=0.7, noise=0.05).posterior(xs)
    assert post.mean.dtype == torch.float64
    assert torch.allclose(post.mean, reference.mean, rtol=0, atol=1e-12)
    assert torch.allclose(post.variance, reference.variance, rtol=0, atol=1e-12)
    with pytest.raises(TypeError, match="X has dtype torch.float32 but this model works in torch.float64"):
        m.posterior(xs.float())
    with pytest.raises(TypeError, match="train_Y has dtype torch.float32"):
        NTKGPModel(net(), x, y.float(), outputscale=0.7, noise=0.05)


def test_ntkgp_refuses_targets_of_another_floating_dtype():
    x, y = data()
    with pytest.raises(
        TypeError, match="train_y has dtype torch.float64 but the network's parameters are torch.float32"
    ):
        NTKGP(net().float(), x.float(), y[:, 0], noise=0.1)


def test_a_posterior_over_many_close_candidates_is_lazy_and_samples():
    """200 points on a line have a covariance PSD only to rounding: torch's eager Cholesky (in GPyTorch's
    MultivariateNormal of a dense tensor) refused it; the posterior is lazy now and samples with GPyTorch's jitter."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)).double().eval()
    x = torch.tensor([[-1.5], [0.0], [0.6], [2.0]], dtype=torch.float64)
    m = NTKGPModel(model, x, torch.sin(3 * x), outputscale=0.5, noise=1e-3)
    grid = torch.linspace(-2, 2, 200, dtype=torch.float64).unsqueeze(-1)
    post = m.posterior(grid)
    assert post.mean.shape == post.variance.shape == (200, 1) and torch.isfinite(post.variance).all()
    assert post.rsample(torch.Size([3])).shape == (3, 200, 1)
