"""Iterative linearisation and damped Gauss-Newton against plain training and dense float64 formulas."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from ntkgp import (
    DampedGaussNewton,
    FixedPeriod,
    IterativeLinearisation,
    KernelDistanceThreshold,
    LossPlateau,
    gauss_newton_step,
    kernel_distance,
)
from ntkgp.iterative.kernel_distance import probe_kernel


def mlp(seed=0, outputs=3, inputs=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, outputs)).eval()


def data(n=12, seed=1, classes=3, inputs=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, inputs, generator=g), torch.randint(0, classes, (n,), generator=g)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def dense_jacobian(model, x, theta):
    """J (n·C, p) at the flat parameters θ, by jacrev, and f(x; θ) (n, C)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def f(t):
        params = dict(zip(names, [c.view(s) for c, s in zip(t.split([math.prod(s) for s in shapes]), shapes)]))
        return functional_call(model, params, (x,))

    return jacrev(f)(theta).reshape(-1, theta.numel()), f(theta)


@pytest.mark.parametrize(
    "make",
    [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), lambda p: torch.optim.Adam(p, 1e-2)],
    ids=["sgd-momentum", "adam"],
)
def test_period_one_is_plain_training_step_for_step(make):
    """K = 1 reproduces plain training with the same optimizer and minibatch order: θ equal to 1e-10 after 20 steps."""
    x, y = data(16)
    plain, ours = mlp(), mlp()
    plain_opt, our_opt = make(plain.parameters()), make(ours.parameters())
    trainer = IterativeLinearisation(ours, our_opt, period=1)
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        rows = torch.randperm(16, generator=g)[:5]
        plain_opt.zero_grad()
        nn.functional.cross_entropy(plain(x[rows]), y[rows]).backward()
        plain_opt.step()
        trainer.step(x[rows], y[rows])
    assert (flat(plain) - flat(ours)).abs().max() < 1e-10
    assert (flat(plain) - flat(mlp())).abs().max() > 1e-2  # it trained
    assert trainer.feature_updates == 20


def test_period_infinite_trains_the_linearised_network_at_theta0():
    """K = ∞: the Jacobian stays at θ0 whatever the weights do; equals Adam on the dense f0 + J0(θ − θ0)."""
    x, y = data(10)
    model = mlp()
    theta0 = flat(model)
    jac, f0 = dense_jacobian(model, x, theta0)
    theta = theta0.clone().requires_grad_(True)
    reference = torch.optim.Adam([theta], lr=0.05)
    trainer = IterativeLinearisation(model, torch.optim.Adam(model.parameters(), lr=0.05), period=math.inf)
    for _ in range(30):
        reference.zero_grad()
        nn.functional.cross_entropy(f0 + (jac @ (theta - theta0)).reshape(f0.shape), y).backward()
        reference.step()
        trainer.step(x, y)
    assert trainer.feature_updates == 0 and torch.equal(trainer.network.theta0, theta0)
    assert (flat(model) - theta.detach()).abs().max() < 1e-10
    assert (flat(model) - theta0).abs().max() > 0.1


def test_proxy_gradient_is_dense_jacobian_transpose_times_loss_gradient():
    """∇θ L(f_lin) = J(θ_s)ᵀ ∇_f L at a θ away from θ_s, and f_lin itself is f(θ_s) + J(θ_s)(θ − θ_s)."""
    x, y = data(9)
    model = mlp()
    trainer = IterativeLinearisation(model, torch.optim.SGD(model.parameters(), lr=0.5), period=5)
    trainer.step(x, y)  # θ ≠ θ_s = θ0 now
    theta_s, theta = trainer.network.theta0, flat(model)
    jac, fs = dense_jacobian(model, x, theta_s)
    dense_f = fs + (jac @ (theta - theta_s)).reshape(fs.shape)
    out = trainer.proxy(x)
    assert (out - dense_f).abs().max() < 1e-12
    f = dense_f.clone().requires_grad_(True)
    (grad_f,) = torch.autograd.grad(nn.functional.cross_entropy(f, y), f)
    model.zero_grad()
    nn.functional.cross_entropy(out, y).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert (grad - jac.T @ grad_f.reshape(-1)).abs().max() < 1e-12


def test_fixed_period_counts_feature_updates_and_fit_resumes(tmp_path):
    """Period 4 over 10 full-batch steps: 2 feature updates (after steps 4 and 8); a run stopped at step 6 and resumed
    from its checkpoint ends where an uninterrupted one does; evaluations hold both models' metrics."""
    x, y = data(20)
    test = data(8, seed=5)

    def run(steps, path):
        model = mlp()
        trainer = IterativeLinearisation(model, torch.optim.Adam(model.parameters(), lr=0.02), period=4, probe=x[:3])
        trainer.fit((x, y), steps, batch_size=7, test=test, eval_every=3, seed=2, checkpoint=path, progress=False)
        return trainer, model

    whole, whole_model = run(10, tmp_path / "a.pt")
    assert whole.feature_updates == 2 and whole.history.relinearised_at == [4, 8]
    steps = [e["step"] for e in whole.history.evaluations]
    assert steps == [0, 3, 4, 6, 8, 9, 10]
    last = whole.history.evaluations[-1]
    assert {"train_network_accuracy", "test_proxy_loss", "kernel_distance"} <= set(last)
    assert 0 < last["kernel_distance"] < 1
    run(6, tmp_path / "b.pt")
    resumed, resumed_model = run(10, tmp_path / "b.pt")
    assert (flat(resumed_model) - flat(whole_model)).abs().max() < 1e-12
    assert resumed.history.proxy_loss == pytest.approx(whole.history.proxy_loss, abs=1e-12)


def test_adaptive_policies():
    """LossPlateau re-linearises once the proxy stops improving; KernelDistanceThreshold when the kernel moved."""
    x, y = data(20)
    model = mlp()
    trainer = IterativeLinearisation(
        model, torch.optim.SGD(model.parameters(), lr=1.0), relinearise=LossPlateau(patience=3, tolerance=1e-2)
    )
    for _ in range(60):
        trainer.step(x, y)
    assert 1 <= trainer.feature_updates < 60
    model = mlp()
    trainer = IterativeLinearisation(
        model,
        torch.optim.SGD(model.parameters(), lr=1.0),
        probe=x[:4],
        relinearise=KernelDistanceThreshold(1e-3, every=2),
    )
    for _ in range(20):
        trainer.step(x, y)
    assert 1 <= trainer.feature_updates <= 10
    assert trainer.distance_from_linearisation() < trainer.kernel_distance()


def test_kernel_distance_against_dense_kernels():
    x, _ = data(5)
    model = mlp()
    trainer = IterativeLinearisation(model, torch.optim.SGD(model.parameters(), lr=0.1), period=1, probe=x)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    jac0, _ = dense_jacobian(mlp(), x, flat(mlp()))
    jac1, _ = dense_jacobian(model, x, flat(model))
    k0, k1 = jac0 @ jac0.T, jac1 @ jac1.T
    expected = 1 - (k0 * k1).sum() / (k0.norm() * k1.norm())
    assert abs(trainer.kernel_distance() - float(expected)) < 1e-12
    assert (probe_kernel(trainer.network0, x) - k0).abs().max() < 1e-12
    assert kernel_distance(k0, 2 * k0) == pytest.approx(0, abs=1e-14)


@pytest.mark.parametrize("space", ["function", "parameter"])
def test_mse_gauss_newton_step_equals_dense_damped_step(space):
    x, _ = data(6)
    y = torch.randn(6, 3, generator=torch.Generator().manual_seed(4))
    model = mlp()
    jac, f = dense_jacobian(model, x, flat(model))
    lam = 0.3
    dense = -torch.linalg.solve(jac.T @ jac + lam * torch.eye(jac.shape[1]), jac.T @ (f - y).reshape(-1))
    step = gauss_newton_step(model, x, y, "mse", damping=lam, space=space)
    assert (step - dense).abs().max() < 1e-8 * max(1.0, float(dense.abs().max()))


def test_undamped_gauss_newton_is_the_minimum_norm_step_of_the_kernel_regime():
    """λ = 0 in function space: Jᵀ(JJᵀ)⁻¹(y − f) (eq. 19) = pinv(J)(y − f) (eq. 5, p > n·C); small λ tends to it."""
    x, _ = data(5)
    y = torch.randn(5, 3, generator=torch.Generator().manual_seed(4))
    model = mlp()
    jac, f = dense_jacobian(model, x, flat(model))
    exact = torch.linalg.pinv(jac) @ (y - f).reshape(-1)
    assert (gauss_newton_step(model, x, y, "mse", damping=0.0) - exact).abs().max() < 1e-8
    near = gauss_newton_step(model, x, y, "mse", damping=1e-7, space="function")
    assert (near - exact).abs().max() < 1e-4 * float(exact.abs().max())


def test_iterative_linearisation_with_large_period_converges_to_the_gauss_newton_step():
    """K = ∞ with plain gradient descent on the MSE proxy from θ_s converges to θ_s + the undamped GN step (eq. 18)."""
    x, _ = data(4)
    y = torch.randn(4, 1, generator=torch.Generator().manual_seed(2))
    model = mlp(outputs=1)
    theta0 = flat(model)
    target = theta0 + gauss_newton_step(model, x, y, "mse", damping=0.0)
    trainer = IterativeLinearisation(model, torch.optim.SGD(model.parameters(), lr=0.5), period=None, loss="mse")
    for _ in range(4000):
        trainer.step(x, y)
    assert (flat(model) - target).abs().max() < 1e-6


def test_cross_entropy_gauss_newton_step_is_the_dense_linearised_minimiser():
    x, y = data(10)
    model = mlp()
    jac, f = dense_jacobian(model, x, flat(model))
    lam = 0.5
    step = gauss_newton_step(model, x, y, "cross_entropy", damping=lam)
    lin = f + (jac @ step).reshape(f.shape)
    gradient = jac.T @ (torch.softmax(lin, -1) - nn.functional.one_hot(y, 3)).reshape(-1) + lam * step
    assert gradient.abs().max() < 1e-9
    delta = torch.zeros_like(step)  # dense Newton from 0 reaches the same minimiser
    for _ in range(30):
        lin = f + (jac @ delta).reshape(f.shape)
        p = torch.softmax(lin, -1)
        hess = torch.block_diag(*[torch.diag(q) - torch.outer(q, q) for q in p])
        g = jac.T @ (p - nn.functional.one_hot(y, 3)).reshape(-1) + lam * delta
        delta = delta - torch.linalg.solve(jac.T @ hess @ jac + lam * torch.eye(len(delta)), g)
    assert (step - delta).abs().max() < 1e-8


def test_damped_gauss_newton_fits_a_regression():
    torch.manual_seed(0)
    x = torch.linspace(-2, 2, 20).unsqueeze(-1)
    y = torch.sin(2 * x)
    model = mlp(outputs=1, inputs=1)
    optimizer = DampedGaussNewton(model, damping=0.1)
    losses = [optimizer.step(x, y) for _ in range(10)]
    assert losses[-1] < 1e-2 * losses[0]


def test_float32_proxy_step_against_float64():
    x, y = data(12)
    runs = {}
    for dtype in (torch.float32, torch.float64):
        model = mlp().to(dtype)
        trainer = IterativeLinearisation(model, torch.optim.SGD(model.parameters(), lr=0.3), period=3)
        for _ in range(6):
            trainer.step(x.to(dtype), y)
        runs[dtype] = flat(model).double()
    assert (runs[torch.float32] - runs[torch.float64]).abs().max() < 1e-5


def test_bad_input():
    x, y = data(6)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="period"):
        IterativeLinearisation(model, opt, period=0)
    with pytest.raises(TypeError, match="period"):
        IterativeLinearisation(model, opt, period=2.5)
    with pytest.raises(ValueError, match="bound to exactly the parameters"):
        IterativeLinearisation(model, torch.optim.SGD(mlp().parameters(), lr=0.1))
    with pytest.raises(ValueError, match="bound to exactly the parameters.*'4.weight'"):
        IterativeLinearisation(model, torch.optim.SGD(list(model.parameters())[:4], lr=0.1))
    with pytest.raises(TypeError, match="loss must take"):
        IterativeLinearisation(model, opt, loss=lambda f: f.sum())
    trainer = IterativeLinearisation(model, opt, loss=lambda f, t: torch.tensor(1.0, dtype=f.dtype))
    with pytest.raises(ValueError, match="does not depend on the outputs"):
        trainer.step(x, y)
    with pytest.raises(ValueError, match="either period=K or relinearise"):
        IterativeLinearisation(model, opt, period=3, relinearise=FixedPeriod(3))
    bn = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="train mode .*iterative linearisation.*model.eval"):
        IterativeLinearisation(bn, torch.optim.SGD(bn.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="damping"):
        gauss_newton_step(model, x, y, "cross_entropy", damping=-1.0)
    with pytest.raises(ValueError, match="damping must be > 0 for loss='cross_entropy'"):
        gauss_newton_step(model, x, y, "cross_entropy", damping=0.0)
    with pytest.raises(ValueError, match="damping"):
        DampedGaussNewton(model, damping=-0.1)
    with pytest.raises(ValueError, match="probe"):
        IterativeLinearisation(model, opt).kernel_distance()


def test_parameter_subset_with_momentum_equals_plain_training_of_that_subset():
    """params=["4."] (the last layer): K = 3 trains only it; on the last layer the network is linear in θ, so every
    K equals plain training (to rounding), and the other layers never move."""
    x, y = data(10)
    plain, ours = mlp(), mlp()
    plain_opt = torch.optim.SGD(plain[4].parameters(), lr=0.2, momentum=0.9)
    trainer = IterativeLinearisation(
        ours, torch.optim.SGD(ours[4].parameters(), lr=0.2, momentum=0.9), period=3, params=["4."]
    )
    for _ in range(12):
        plain_opt.zero_grad()
        nn.functional.cross_entropy(plain(x), y).backward()
        plain_opt.step()
        trainer.step(x, y)
    assert (flat(plain) - flat(ours)).abs().max() < 1e-10 and trainer.feature_updates == 4
    assert torch.equal(flat(ours[:4]), flat(mlp()[:4]))


def test_closure_optimizers_such_as_lbfgs():
    """torch.optim.LBFGS needs a closure (it raised "step() missing 1 required positional argument: 'closure'"): with
    K = ∞ five LBFGS steps equal LBFGS on the dense f0 + J0(θ − θ0) to 1e-8."""
    x, y = data(10)
    model = mlp()
    theta0 = flat(model)
    jac, f0 = dense_jacobian(model, x, theta0)
    theta = theta0.clone().requires_grad_(True)
    reference = torch.optim.LBFGS([theta], lr=0.5, max_iter=4)

    def closure():
        reference.zero_grad()
        loss = nn.functional.cross_entropy(f0 + (jac @ (theta - theta0)).reshape(f0.shape), y)
        loss.backward()
        return loss

    trainer = IterativeLinearisation(model, torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4), period=math.inf)
    losses = []
    for _ in range(5):
        reference.step(closure)
        losses.append(trainer.step(x, y))
    assert (flat(model) - theta.detach()).abs().max() < 1e-8
    assert losses[-1] < losses[0]


def test_undamped_gauss_newton_with_more_outputs_than_parameters():
    """n·C > p (JᵀJ full rank): the default space picked parameter space and then raised claiming p > n·C. The
    undamped step is now taken there: the least-squares step −(JᵀJ)⁻¹Jᵀ(f − y), to 1e-8."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).eval()  # p = 17
    x = torch.randn(20, 2, generator=torch.Generator().manual_seed(1))  # n·C = 40
    y = torch.randn(20, 2, generator=torch.Generator().manual_seed(2))
    jac, f = dense_jacobian(model, x, flat(model))
    exact = torch.linalg.lstsq(jac, (y - f).reshape(-1, 1)).solution[:, 0]
    for space in ("auto", "parameter", "function"):
        step = gauss_newton_step(model, x, y, "mse", damping=0.0, space=space)
        assert (step - exact).abs().max() < 1e-8 * max(1.0, float(exact.abs().max()))
    few = x[:3]  # n·C = 6 < p = 17: JᵀJ singular
    with pytest.raises(ValueError, match=r"damping = 0 with p = 17 > n·C = 6: JᵀJ \(p × p\) is singular"):
        gauss_newton_step(model, few, y[:3], "mse", damping=0.0, space="parameter")
