"""leaky_relu and SqrtCovariancePooling: module swapping on torchvision architectures, the detection of functional
ReLUs, the Newton–Schulz square root against an eigendecomposition, forward-mode AD through the pooling, and a
torchvision backbone with the pooling as head through LQF."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import rel_err
from torch import nn

from ntkgp import LQF, LeakyReLU6, SqrtCovariancePooling, leaky_relu


@pytest.mark.parametrize("name,relu", [("mobilenet_v2", nn.ReLU6), ("resnet18", nn.ReLU)])
def test_leaky_relu_swaps_every_module_of_torchvision_architectures(name, relu):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=5).eval()
    before = sum(isinstance(m, relu) for m in model.modules())
    leaky = leaky_relu(model, negative_slope=0.2)
    assert before > 0 and not any(type(m) in (nn.ReLU, nn.ReLU6) for m in leaky.modules())
    kind = LeakyReLU6 if relu is nn.ReLU6 else nn.LeakyReLU
    assert sum(isinstance(m, kind) for m in leaky.modules()) == before
    assert sum(isinstance(m, relu) for m in model.modules()) == before  # the original is untouched
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), leaky.state_dict().values()))


def test_leaky_relu6_is_relu6_with_leaky_ends():
    x = torch.linspace(-3, 9, 25)
    out = LeakyReLU6(0.1)(x)
    expected = torch.where(x < 0, 0.1 * x, torch.where(x > 6, 6 + 0.1 * (x - 6), x))
    assert torch.allclose(out, expected, atol=1e-15)


class FunctionalReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.act, self.out = nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(F.relu(self.act(self.lin(x))))


def test_a_functional_relu_is_detected():
    with pytest.raises(ValueError, match=r"calls torch.nn.functional.relu in its forward"):
        leaky_relu(FunctionalReLU())
    with pytest.raises(ValueError, match="no nn.ReLU or nn.ReLU6 module"):
        leaky_relu(nn.Sequential(nn.Linear(3, 3), nn.Tanh()))
    with pytest.raises(ValueError, match=r"negative_slope must lie in \(0, 1\)"):
        leaky_relu(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), negative_slope=1.5)
    with pytest.raises(ValueError, match="probe forward pass"):
        leaky_relu(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), example_input=torch.randn(2, 5))


def dense_root(x):
    features = x.flatten(2)
    centred = features - features.mean(-1, keepdim=True)
    sigma = centred @ centred.mT / features.shape[-1]
    evals, evecs = torch.linalg.eigh(sigma)
    return (evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)) @ evecs.mT


def test_newton_schulz_square_root_against_eigendecomposition():
    torch.manual_seed(0)
    x = torch.randn(3, 6, 5, 5)
    rows, cols = torch.triu_indices(6, 6)
    reference = dense_root(x)[:, rows, cols]
    pool = SqrtCovariancePooling(6, iterations=20)
    assert pool.out_features == 21 and pool(x).shape == (3, 21)
    assert rel_err(pool(x), reference) < 1e-6
    assert rel_err(SqrtCovariancePooling(6)(x), reference) < 1e-2  # 5 steps, as iSQRT-COV: approximate


def test_jvp_through_the_pooling_against_finite_differences():
    torch.manual_seed(1)
    x, t = torch.randn(2, 6, 4, 4), torch.randn(2, 6, 4, 4)
    pool = SqrtCovariancePooling(6, reduction=3)
    _, jv = torch.func.jvp(pool, (x,), (t,))
    h = 1e-5
    assert rel_err(jv, (pool(x + h * t) - pool(x - h * t)) / (2 * h)) < 1e-7
    weight = dict(pool.named_parameters())
    _, jw = torch.func.jvp(
        lambda w: torch.func.functional_call(pool, w, (x,)),
        (weight,),
        ({k: torch.randn_like(v) for k, v in weight.items()},),
    )
    assert torch.isfinite(jw).all()


def test_reduction_initialisations():
    pool = SqrtCovariancePooling(8, reduction=3, seed=2)
    w = pool.reduce.weight.reshape(3, 8)
    assert torch.allclose(w @ w.T, torch.eye(3), atol=1e-12)  # orthonormal rows
    torch.manual_seed(0)
    maps = torch.randn(40, 8, 5, 5) * 2.0 ** torch.arange(8).reshape(1, 8, 1, 1)
    pool.init_pca(maps)
    w = pool.reduce.weight.reshape(3, 8)
    channels = maps.transpose(0, 1).flatten(1)
    evecs = torch.linalg.eigh(torch.cov(channels))[1][:, [-1, -2, -3]].T  # largest variance first
    assert torch.allclose(w.abs(), evecs.abs(), atol=1e-10)
    with pytest.raises(ValueError, match="reduction"):
        SqrtCovariancePooling(4, reduction=6)


def test_torchvision_backbone_with_pooling_head_through_lqf():
    """B-LQF: MobileNetV2's features (random weights), a 1 × 1 reduction to 6 channels, the pooled 21 features and
    a linear head; reduction and head fine-tuned, closed form against SGD's first steps and the NTK-GP."""
    torch.manual_seed(0)
    backbone = torchvision.models.mobilenet_v2().features[:8]  # 64 channels at stride 8
    model = nn.Sequential(backbone, SqrtCovariancePooling(64, reduction=6), nn.Linear(21, 3)).eval()
    x, y = torch.randn(9, 3, 32, 32), torch.tensor([0, 1, 2] * 3)
    closed = LQF(model, params=["1.", "2."], weight_decay=1.0).fit(x, y, solver="closed_form", progress=False)
    assert closed.delta.shape == (6 * 64 + 21 * 3 + 3,)
    sgd = LQF(model, params=["1.", "2."], weight_decay=1.0).fit(x, y, epochs=2, batch_size=9, progress=False)
    assert (
        sgd.objective()
        < LQF(model, params=["1.", "2."], weight_decay=1.0)
        .fit(x, y, epochs=1, lr=1e-12, batch_size=9, progress=False)
        .objective()
    )
    assert closed.predict(x[:2], variance=True).variance.shape == (2, 3)
