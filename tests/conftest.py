"""Shared float64 fixtures: small networks of every kind we support, and the dense Jacobian reference."""

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from ntkgp.functional import FunctionalNetwork

torch.set_default_dtype(torch.float64)
# CI sets NTKGP_DATA=../shared/data; the same default for a local run from the repository root
os.environ.setdefault("NTKGP_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(width, width), nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        return self.norm(x + self.lin2(torch.tanh(self.lin1(x))))


def _mlp(outputs):
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, outputs))


def _cnn():
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(36, 2),
    )


def _resnet():
    return nn.Sequential(nn.Linear(3, 6), ResidualBlock(6), ResidualBlock(6), nn.Linear(6, 2))


def _warm_batchnorm(model, x):
    """Give BatchNorm non-trivial running statistics, then switch to eval mode."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x + torch.randn_like(x))
    return model.eval()


# name -> (model builder, input shape per example, params selection)
CASES = {
    "mlp_c1": (lambda: _mlp(1), (3,), None),
    "mlp_c3": (lambda: _mlp(3), (3,), None),
    "cnn_batchnorm": (_cnn, (1, 9, 9), None),
    "residual_layernorm": (_resnet, (3,), None),
    "mlp_subset": (lambda: _mlp(2), (3,), ["2.", "4.weight"]),
}


def make_case(name, n=7, seed=0):
    """(model, x of shape (n, ...), params) for a named case, float64, eval mode."""
    torch.manual_seed(seed)
    build, shape, params = CASES[name]
    model = build()
    x = torch.randn(n, *shape)
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        _warm_batchnorm(model, x)
    return model.eval(), x, params


def dense_jacobian(model, x, params=None):
    """J(x) of shape (n·C, p), rows interleaved, by torch.func.jacrev through the whole network: the reference."""
    net = FunctionalNetwork(model, params, frozen_prefix=False)
    jac = torch.func.jacrev(lambda theta: net(x, theta))(net.theta0)
    return jac.reshape(-1, net.num_params)


def dense_output_fisher(likelihood, f):
    """Block-diagonal H (n·C × n·C) of the likelihood at outputs f (n, C)."""
    blocks = []
    for row in f:
        if likelihood == "gaussian":
            blocks.append(torch.eye(len(row)))
        elif likelihood == "categorical":
            pi = torch.softmax(row, -1)
            blocks.append(torch.diag(pi) - torch.outer(pi, pi))
        else:
            d = len(row) // 2
            blocks.append(torch.diag(torch.cat([torch.exp(-row[d:]), torch.full((d,), 0.5)])))
    return torch.block_diag(*blocks)


@pytest.fixture(params=list(CASES))
def case(request):
    return (request.param, *make_case(request.param))


def rel_err(a, b):
    return float(((a - b).norm() / b.norm().clamp_min(1e-300)).detach())


class DictModel(nn.Module):
    """Keyword inputs of mixed dtypes: features, token ids and a boolean mask that rides along."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 3)
        self.features = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, features: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        tokens = (self.embed(ids) * keep.unsqueeze(-1)).sum(1)
        return self.head(torch.tanh(self.features(features) + tokens))
