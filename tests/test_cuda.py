"""The operators and NTKGP on a CUDA device against the float64 CPU references (skipped without a GPU).

Tolerances: 1e-10 for operator products in float64 on the GPU, 1e-6 for GP predictions.
"""

import copy

import pytest
import torch
from conftest import dense_jacobian, make_case, rel_err

from ntkgp import NTKGP, SVI, Laplace, fisher_operator, gram_operator, ntk_operator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def test_ntk_and_gram_products_on_cuda(case):
    _, model, x, params = case
    j = dense_jacobian(model, x, params)
    model_gpu, x_gpu = model.to(CUDA), x.to(CUDA)
    op = ntk_operator(model_gpu, x_gpu, params=params, chunk_size=3)
    v = torch.randn(op.shape[-1], 4)
    assert op.device.type == "cuda"
    assert rel_err((op @ v.to(CUDA)).cpu(), j @ (j.T @ v)) < 1e-10
    assert rel_err(op.diagonal().cpu(), (j * j).sum(-1)) < 1e-10
    gram = gram_operator(model_gpu, x_gpu, params=params)
    w = torch.randn(j.shape[1], 2)
    assert rel_err((gram @ w.to(CUDA)).cpu(), j.T @ (j @ w)) < 1e-10


@pytest.mark.parametrize("method", ["finite_difference", "central_difference"])
def test_fisher_finite_difference_on_cuda(method):
    model, x, _ = make_case("mlp_c3")
    exact = fisher_operator(model, x, "categorical", method="exact")
    v = torch.randn(exact.shape[-1], 3)
    reference = exact @ v
    fd = fisher_operator(model.to(CUDA), x.to(CUDA), "categorical", method=method)
    assert rel_err((fd @ v.to(CUDA)).cpu(), reference) < 1e-5
    assert rel_err((fd @ v[:, 0].to(CUDA)).cpu(), reference[:, 0]) < 1e-5


@pytest.mark.parametrize("space", ["function", "parameter"])
def test_ntk_gp_on_cuda_matches_cpu(space):
    model, x, _ = make_case("mlp_c1", n=12)
    y = torch.sin(x.sum(-1))
    xs = torch.randn(6, 3)
    cpu = NTKGP(model, x, y, space=space, noise=0.1, outputscale=0.5).predict(xs)
    gpu = NTKGP(model.to(CUDA), x.to(CUDA), y.to(CUDA), space=space, noise=0.1, outputscale=0.5).predict(xs.to(CUDA))
    assert gpu.mean.device.type == "cuda"
    assert rel_err(gpu.mean.cpu(), cpu.mean) < 1e-6
    assert rel_err(gpu.variance.cpu(), cpu.variance) < 1e-6


def test_laplace_and_svi_on_cuda_match_cpu():
    model, x, _ = make_case("mlp_c3", n=10)
    y = torch.arange(10) % 3
    xs = torch.randn(4, 3)
    cpu = Laplace(model, "classification", prior_precision=0.5).fit(x, y)
    model_gpu = copy.deepcopy(model).to(CUDA)
    gpu = Laplace(model_gpu, "classification", prior_precision=0.5).fit(x.to(CUDA), y.to(CUDA))
    assert rel_err(gpu.predict(xs.to(CUDA)).cpu(), cpu.predict(xs)) < 1e-8
    assert rel_err(gpu.mean.cpu(), cpu.mean) < 1e-8
    assert gpu.sample(2).device.type == "cuda"
    generator = torch.Generator().manual_seed(0)  # a CPU generator drives the CUDA run
    assert gpu.sample(2, generator=generator).device.type == "cuda"
    assert gpu.predict(xs.to(CUDA), link="mc", num_samples=5, generator=generator).device.type == "cuda"
    svi = SVI(model_gpu, "classification").fit(x.to(CUDA), y.to(CUDA), epochs=3, progress=False, generator=generator)
    assert svi.predict(xs.to(CUDA), num_samples=5, generator=generator).device.type == "cuda"


@pytest.mark.parametrize("space", ["function", "parameter"])
def test_conversion_to_cuda_moves_the_snapshot(space):
    """`.to(device)` on an NTKGP built on the CPU, and `.cuda()` on an operator, move the network snapshot too."""
    model, x, _ = make_case("cnn_batchnorm")
    y, xs = torch.randn(x.shape[0], 2), torch.randn(3, *x.shape[1:])
    gp = NTKGP(model, x, y, space=space, noise=0.1, outputscale=0.5)
    cpu = gp.predict(xs)
    gpu = gp.to(CUDA).predict(xs.to(CUDA))
    assert gp.network.device.type == "cuda" and gpu.mean.device.type == "cuda"
    assert rel_err(gpu.mean.cpu(), cpu.mean) < 1e-8 and rel_err(gpu.variance.cpu(), cpu.variance) < 1e-8
    op = ntk_operator(model, x)
    assert rel_err(op.cuda().to_dense().cpu(), op.to_dense()) < 1e-10


def test_lqf_on_cuda():
    """LQF's closed form, leave-one-out and one K-FAC SGD epoch on the GPU against the CPU (float64)."""
    from ntkgp import LQF

    model, x, _ = make_case("mlp_c3", n=12)
    y = torch.arange(12) % 3
    cpu = LQF(copy.deepcopy(model), weight_decay=0.5).fit(x, y, solver="closed_form", progress=False)
    gpu = LQF(copy.deepcopy(model).to(CUDA), weight_decay=0.5).fit(
        x.to(CUDA), y.to(CUDA), solver="closed_form", progress=False
    )
    assert rel_err(gpu.delta.cpu(), cpu.delta) < 1e-8
    assert rel_err(gpu.leave_one_out().cpu(), cpu.leave_one_out()) < 1e-8
    sgd_cpu = LQF(copy.deepcopy(model), weight_decay=0.5).fit(x, y, epochs=1, batch_size=12, progress=False)
    sgd_gpu = LQF(copy.deepcopy(model).to(CUDA), weight_decay=0.5).fit(
        x.to(CUDA), y.to(CUDA), epochs=1, batch_size=12, progress=False
    )
    assert rel_err(sgd_gpu.delta.cpu(), sgd_cpu.delta) < 1e-8
