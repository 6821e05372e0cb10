"""LQF against dense float64 references: the closed form (= the NTK-GP posterior mean), SGD with and without
K-FAC, leave-one-out and influence against brute-force refits, online updates, the Hessian's spectrum."""

import pytest
import torch
from conftest import dense_jacobian, rel_err
from torch import nn

from ntkgp import LQF, NTKGP


def classification_case(n=24, classes=3, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, classes)).eval()
    return model, torch.randn(n, 4), torch.randint(0, classes, (n,)), torch.randn(5, 4)


def dense_minimiser(model, x, targets, lam, params=None):
    """θ* − θ0 = (JᵀJ + (λ/2)I)⁻¹ Jᵀ(targets − f0), from the jacrev Jacobian."""
    j = dense_jacobian(model, x, params)
    with torch.no_grad():
        r = (targets - model(x)).reshape(-1)
    return torch.linalg.solve(j.T @ j + lam / 2 * torch.eye(j.shape[1]), j.T @ r)


@pytest.mark.parametrize("space", ["function", "parameter"])
def test_closed_form_is_the_ntk_gp_posterior_mean(space):
    model, x, y, xt = classification_case()
    lam = 0.3
    lqf = LQF(model, weight_decay=lam).fit(x, y, solver="closed_form", progress=False).solve(space)
    targets = 15 * nn.functional.one_hot(y, 3).double()
    assert rel_err(lqf.delta, dense_minimiser(model, x, targets, lam)) < 1e-8
    gp = NTKGP(model, x, targets, noise=lam / 2, outputscale=1.0)
    assert rel_err(lqf.predict(xt), gp.predict(xt).mean) < 1e-8


def test_regression_closed_form_and_subset_scope():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).eval()
    x, y = torch.randn(15, 3), torch.randn(15, 2)
    lqf = LQF(model, params=["2."], weight_decay=0.1, task="regression").fit(x, y, solver="closed_form", progress=False)
    assert lqf.delta.shape == (8 * 2 + 2,)
    assert rel_err(lqf.delta, dense_minimiser(model, x, y, 0.1, ["2."])) < 1e-8
    assert lqf.predict(x).shape == (15, 2)


def test_variance_is_the_ntk_gp_of_which_lqf_is_the_mean():
    """σ² = t/2, s² = t/λ: var = t·s²(diag K** − K*X (K + (λ/2)I)⁻¹ KX*) against the dense formula, t the scale that
    maximises the evidence of t·(K/λ + I/2) (checked against a grid of dense log-likelihoods)."""
    model, x, y, xt = classification_case()
    lam = 0.5
    lqf = LQF(model, weight_decay=lam).fit(x, y, solver="closed_form", progress=False)
    pred = lqf.predict(xt, variance=True)
    j, js = dense_jacobian(model, x), dense_jacobian(model, xt)
    kxx, ksx = j @ j.T, js @ j.T
    var = (js * js).sum(-1) - (ksx @ torch.linalg.solve(kxx + lam / 2 * torch.eye(len(kxx)), ksx.T)).diagonal()
    residual = (lqf.train_targets - model(x)).detach().reshape(-1)
    covariance = kxx / lam + 0.5 * torch.eye(len(kxx))
    scale = float(residual @ torch.linalg.solve(covariance, residual)) / len(residual)
    assert lqf.variance_scale() == pytest.approx(scale, rel=1e-8)
    zero = torch.zeros_like(residual)
    evidence = [
        float(torch.distributions.MultivariateNormal(zero, t * covariance).log_prob(residual))
        for t in (0.9 * scale, scale, 1.1 * scale)
    ]
    assert evidence[1] > max(evidence[0], evidence[2])
    assert rel_err(pred.variance.reshape(-1), scale * var / lam) < 1e-8
    assert rel_err(pred.mean, lqf.predict(xt)) == 0


def epochs_to_reach(model, x, y, reference, params, preconditioner, lr, epochs=400):
    errors = []
    try:
        LQF(model, params=params, weight_decay=1.0, preconditioner=preconditioner).fit(
            x,
            y,
            epochs=epochs,
            lr=lr,
            batch_size=len(x),
            progress=False,
            callback=lambda lqf, record: errors.append(rel_err(lqf.delta, reference)),
        )
    except FloatingPointError:  # diverged: this learning rate is too large
        return None
    return next((i + 1 for i, e in enumerate(errors) if e <= 1e-3), None)


def test_kfac_sgd_reaches_the_closed_form_in_fewer_epochs_than_plain_sgd(capsys):
    """Full-batch SGD with momentum 0.9 on the last layer of a Leaky-ReLU MLP over inputs of scales 0.1, 1, 3
    (κ(H) ≈ 940; K-FAC of one Linear layer is exact, κ(P⁻¹H) = 1): epochs until ‖δ − δ*‖ ≤ 1e-3‖δ*‖, K-FAC at
    the default lr 0.1 against plain SGD at the best of a grid of learning rates up to the stability limit of
    heavy-ball momentum (3.8/λ_max). Measured: 83 against 127 (at 3.5/λ_max)."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(3, 16), nn.LeakyReLU(0.1), nn.Linear(16, 16), nn.LeakyReLU(0.1), nn.Linear(16, 3)
    ).eval()
    x, y, params = torch.randn(200, 3) * torch.tensor([0.1, 1.0, 3.0]), torch.randint(0, 3, (200,)), ["4."]
    exact = LQF(model, params=params, weight_decay=1.0).fit(x, y, solver="closed_form", progress=False)
    reference = exact.delta
    kfac = epochs_to_reach(model, x, y, reference, params, "kfac", None)
    largest = float(exact.hessian_ritz_values(60)[-1])
    plain = {m: epochs_to_reach(model, x, y, reference, params, None, m / largest) for m in (0.5, 1, 2, 3, 3.5)}
    best = min(e for e in plain.values() if e is not None)
    with capsys.disabled():
        print(f"\nepochs to 1e-3 of the closed form: K-FAC (lr 0.1) {kfac}; plain SGD by lr·λ_max {plain}")
    assert kfac is not None and kfac < best


def test_kfac_preconditioner_against_dense_curvature():
    """One Linear layer without bias: type-2 K-FAC is exactly 2JᵀJ. Other layers' parameters (LayerNorm) get the
    exact diagonal of 2JᵀJ, with a warning naming them."""
    from ntkgp.functional import FunctionalNetwork
    from ntkgp.lqf.kfac import KFACPreconditioner

    torch.manual_seed(0)
    x = torch.randn(20, 4)
    net = FunctionalNetwork(nn.Sequential(nn.Linear(4, 3, bias=False)).eval())
    j = dense_jacobian(net.module, x)
    dense = 2 * j.T @ j + 0.5 * torch.eye(net.num_params)
    pre = KFACPreconditioner(net, x, 0.5)
    v = torch.randn(net.num_params, 3)
    assert rel_err(pre.curvature(v), dense @ v) < 1e-12
    assert rel_err(pre @ (dense @ v), v) < 1e-12
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).eval()
    with pytest.warns(RuntimeWarning, match=r"1 other layer\(s\) in scope \(1 \(LayerNorm\)\)"):
        pre = KFACPreconditioner(FunctionalNetwork(model), x, 0.5)
    j = dense_jacobian(model, x)
    idx = pre.diagonal_index
    assert rel_err(pre.curvature(torch.eye(j.shape[1]))[idx, idx], 2 * (j * j).sum(0)[idx] + 0.5) < 1e-12


def test_leave_one_out_and_influence_against_refits(capsys):
    from ntkgp import KFACPreconditioner

    model, x, y, xt = classification_case(n=16)
    lam = 0.4
    lqf = LQF(model, weight_decay=lam).fit(x, y, solver="closed_form", progress=False)
    loo, influence = lqf.leave_one_out(), lqf.influence(xt)
    refit_loo, refit_influence = [], []
    for i in range(len(x)):
        keep = torch.arange(len(x)) != i
        without = LQF(model, weight_decay=lam).fit(x[keep], y[keep], solver="closed_form", progress=False)
        refit_loo.append(without.predict(x[i : i + 1])[0])
        refit_influence.append(lqf.predict(xt) - without.predict(xt))
    refit_influence = torch.stack(refit_influence, 1)
    assert loo.shape == (16, 3) and influence.shape == (5, 16, 3)
    assert rel_err(loo, torch.stack(refit_loo)) < 1e-8
    assert rel_err(influence, refit_influence) < 1e-8
    fsi = lqf.informativeness(xt)
    assert rel_err(fsi, refit_influence.square().sum(-1).mean(0)) < 1e-8
    approximate = lqf.influence(xt, method="kfac")
    error = rel_err(approximate, refit_influence)
    rank = torch.corrcoef(torch.stack([lqf.informativeness(xt, "kfac"), fsi]))[0, 1]
    # eq. (8)'s error split: the exact inverse or K-FAC's (2(K + λI)⁻¹), with eq. (8)'s leverage factor, the
    # exact removal factor (I − H_i)⁻¹, or none
    j, js, n = dense_jacobian(model, x).reshape(16, 3, -1), dense_jacobian(model, xt).reshape(5, 3, -1), len(x)
    exact = torch.linalg.inv(j.reshape(48, -1).T @ j.reshape(48, -1) + lam / 2 * torch.eye(j.shape[-1]))
    kfac = 2 * ((lqf._kfac or KFACPreconditioner(lqf.network, x, lam)) @ torch.eye(j.shape[-1]))
    residual = (lqf.train_targets - lqf.predict(x)).unsqueeze(-1)
    errors = {}
    for inverse_name, inverse in (("exact", exact), ("K-FAC", kfac)):
        leverage, eye = j @ inverse @ j.mT, torch.eye(3)
        for factor_name, factor in (
            ("eq. 8", (n - 1) * torch.linalg.inv((n - 1) * eye + n * leverage)),
            ("removal", torch.linalg.inv(eye - leverage)),
            ("none", eye),
        ):
            change = torch.einsum("mcp,pq,idq,id->mic", js, inverse, j, (factor @ residual).squeeze(-1))
            errors[f"{inverse_name} inverse, {factor_name} factor"] = round(rel_err(change, refit_influence), 3)
    with capsys.disabled():
        print(f"\ninfluence by eq. (8) with K-FAC: relative error {error:.3f}, F-SI correlation {rank:.3f}; {errors}")
    assert abs(errors["K-FAC inverse, eq. 8 factor"] - error) < 1e-3 and errors["exact inverse, removal factor"] == 0
    assert approximate.shape == influence.shape and error < 1


def test_updates_in_three_steps_equal_the_union():
    model, x, y, _ = classification_case(n=30)
    union = LQF(model, weight_decay=0.5).fit(x, y, solver="closed_form", progress=False)
    online = LQF(model, weight_decay=0.5).fit(x[:10], y[:10], solver="closed_form", progress=False)
    online.update(x[10:20], y[10:20]).update(x[20:], y[20:])
    assert rel_err(online.delta, union.delta) < 1e-10
    assert rel_err(online.kernel_system().factor, union.kernel_system().factor) < 1e-10
    assert rel_err(online.leave_one_out(), union.leave_one_out()) < 1e-10
    # SGD: warm-started from the previous δ on the union (last layer, full batch, K-FAC: exact there)
    union = LQF(model, params=["2."], weight_decay=0.5).fit(x, y, solver="closed_form", progress=False)
    sgd = LQF(model, params=["2."], weight_decay=0.5).fit(x[:20], y[:20], epochs=100, batch_size=30, progress=False)
    before = rel_err(sgd.delta, union.delta)
    sgd.update(x[20:25], y[20:25], epochs=1)
    assert rel_err(sgd.delta, union.delta) < before  # one epoch on from where it was, not from θ0
    sgd.update(x[25:], y[25:], epochs=200)
    assert sgd.train_x.shape[0] == 30 and len(sgd.history) == 301
    assert rel_err(sgd.delta, union.delta) < 1e-3


def test_float32_against_float64():
    model, x, y, xt = classification_case()
    reference = LQF(model, weight_decay=0.5).fit(x, y, solver="closed_form", progress=False)
    single = LQF(model.float(), weight_decay=0.5).fit(x.float(), y, solver="closed_form", progress=False)
    assert rel_err(single.predict(xt.float()).double(), reference.predict(xt)) < 1e-4
    sgd64 = LQF(model.double(), weight_decay=0.5).fit(x, y, epochs=3, progress=False)
    sgd32 = LQF(model.float(), weight_decay=0.5).fit(x.float(), y, epochs=3, progress=False)
    assert rel_err(sgd32.delta.double(), sgd64.delta) < 1e-4


def test_dataloader_history_and_cross_entropy():
    model, x, y, xt = classification_case(n=40)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=20)
    closed = LQF(model, weight_decay=0.5).fit(loader, solver="closed_form", progress=False)
    assert (
        rel_err(closed.delta, LQF(model, weight_decay=0.5).fit(x, y, solver="closed_form", progress=False).delta)
        < 1e-12
    )
    lqf = LQF(model, weight_decay=0.5).fit(loader, epochs=4, progress=False)
    assert [r["epoch"] for r in lqf.history] == [1, 2, 3, 4] and lqf.lr == (1 - lqf.momentum) / lqf.lr_curvature
    assert set(lqf.history[0]) == {"epoch", "loss", "accuracy", "lr"}
    assert lqf.history[-1]["loss"] < lqf.history[0]["loss"]
    probabilities = lqf.predict_proba(xt)
    assert torch.allclose(probabilities.sum(-1), torch.ones(5)) and lqf.classify(xt).shape == (5,)
    for preconditioner in (None, "kfac"):  # GaF (linearised, cross-entropy, plain SGD) and CE with K-FAC
        gaf = LQF(model, loss="cross_entropy", preconditioner=preconditioner, weight_decay=0.5)
        gaf.fit(x, y, epochs=30, batch_size=40, progress=False)
        assert gaf.history[-1]["loss"] < gaf.history[0]["loss"]
        assert (
            gaf.objective()
            < LQF(model, loss="cross_entropy", preconditioner=None, weight_decay=0.5)
            .fit(x, y, epochs=1, lr=1e-12, batch_size=40, progress=False)
            .objective()
        )


def test_hessian_ritz_values_against_dense_eigenvalues():
    model, x, y, _ = classification_case(n=40)
    lqf = LQF(model, weight_decay=0.5).fit(x, y, solver="closed_form", progress=False)
    j = dense_jacobian(model, x)
    h = 2 * j.T @ j + 0.5 * torch.eye(j.shape[1])
    exact = torch.linalg.eigvalsh(h)
    ritz = lqf.hessian_ritz_values(steps=j.shape[1])
    assert rel_err(ritz[[0, -1]], exact[[0, -1]]) < 1e-8
    pre = lqf._preconditioner()
    dense_p = pre.curvature(torch.eye(j.shape[1]))
    pencil = torch.linalg.eigvals(torch.linalg.solve(dense_p, h)).real.sort().values
    ritz = lqf.hessian_ritz_values(steps=j.shape[1], preconditioned=True)
    assert rel_err(ritz[[0, -1]], pencil[[0, -1]]) < 1e-6


def test_kfac_products_equal_curvlinops_own():
    """Our range-restricted eigenbasis products against curvlinops' KFACLinearOperator and its exactly damped
    KFACInverseLinearOperator, on a CNN with a weight-only, a bias-only and joint weight-and-bias layers."""
    from curvlinops import KFACInverseLinearOperator

    from ntkgp.functional import FunctionalNetwork
    from ntkgp.lqf.kfac import KFACPreconditioner

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 2, 3, bias=False),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 5),
        nn.Tanh(),
        nn.Linear(5, 3),
    ).eval()
    x = torch.randn(6, 1, 6, 6)
    net = FunctionalNetwork(model, ["0.", "2.weight", "4.bias", "6."])
    pre = KFACPreconditioner(net, x, 0.3)
    v = torch.randn(net.num_params, 2)
    reference = pre.kfac @ v + 0.3 * v  # curvlinops takes θ in the order of the parameters it was given
    assert rel_err(pre.curvature(v), reference) < 1e-12
    inverse = KFACInverseLinearOperator(pre.kfac, damping=0.3, use_exact_damping=True)
    assert rel_err(pre @ v, inverse @ v) < 1e-10


def test_kfac_runs_on_the_frozen_prefix_output():
    """With a frozen prefix (two frozen convolutions before the scope) K-FAC is computed on the rest of the network
    from the cached prefix outputs: the same operator (K-FAC blocks and the BatchNorm diagonal) as on the whole
    network, and the prefix is evaluated once for the factors, the diagonal and the training products."""
    from ntkgp.functional import FunctionalNetwork
    from ntkgp.lqf.kfac import KFACPreconditioner

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3),
        nn.Tanh(),
        nn.Conv2d(4, 3, 3),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 3),
    ).eval()
    model[5].running_mean.uniform_(-0.5, 0.5)
    x = torch.randn(7, 1, 8, 8)
    scope = ["4.", "5.", "8."]
    split, whole = FunctionalNetwork(model, scope), FunctionalNetwork(model, scope, frozen_prefix=False)
    calls = []
    split.split.prefix.register_forward_hook(lambda *args: calls.append(1))
    with pytest.warns(RuntimeWarning, match="BatchNorm2d"):
        a, b = KFACPreconditioner(split, x, 0.2), KFACPreconditioner(whole, x, 0.2)
    assert split.split is not None and len(calls) == 2  # the split check on x[:2], then x once
    v = torch.randn(split.num_params, 3)
    assert a.diagonal.numel() == 6 and rel_err(a.diagonal, b.diagonal) < 1e-12
    assert rel_err(a.curvature(v), b.curvature(v)) < 1e-12 and rel_err(a @ v, b @ v) < 1e-10


def test_grouped_convolutions_get_a_diagonal_block():
    """curvlinops' K-FAC averages a grouped convolution's input covariance over its groups; those layers get the
    exact diagonal instead, like BatchNorm."""
    from ntkgp.lqf.kfac import kfac_layers

    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 3, groups=4), nn.BatchNorm2d(4))
    names = [n for n, _ in model.named_parameters()]
    assert kfac_layers(model, names) == (["0.weight", "0.bias"], ["1.weight", "1.bias", "2.weight", "2.bias"])


def test_kernel_matrix_from_layer_factors_equals_ntk_products():
    from ntkgp import NTKOperator
    from ntkgp.operators import LayerKernel

    torch.manual_seed(0)
    model = (
        nn.Sequential(
            nn.Conv2d(2, 64, 3),
            nn.BatchNorm2d(64),
            nn.Tanh(),
            nn.Conv2d(64, 32, 1),
            nn.Flatten(),
            nn.Linear(32 * 2 * 2, 3),
        )
        .double()
        .eval()
    )
    model[1].running_mean.uniform_(-0.5, 0.5)
    x, y = torch.randn(6, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    xt = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    lqf = LQF(model, params=["1.", "3.", "5."], weight_decay=0.5).fit(x, y, solver="closed_form", progress=False)
    assert isinstance(lqf._layer_kernel, LayerKernel)  # factored: 1 × 1 conv and Linear; BatchNorm by Jacobians
    for a, b in ((x, None), (xt, x), (x, xt)):
        dense = NTKOperator(a, a if b is None else b, network=lqf.network, num_outputs=3).to_dense()
        assert rel_err(lqf.kernel_matrix(a, b), dense) < 1e-10
    reference = dense_minimiser(model, x, 15 * nn.functional.one_hot(y, 3).double(), 0.5, ["1.", "3.", "5."])
    assert rel_err(lqf.delta, reference) < 1e-8
    # a first convolution over many pixels costs more than its Jacobian: NTK products then
    costly = LQF(model, params=["0."], weight_decay=0.5).fit(x, y, solver="closed_form", progress=False)
    assert costly._layer_kernel is False
    dense = NTKOperator(xt, x, network=costly.network, num_outputs=3).to_dense()
    assert rel_err(costly.kernel_matrix(xt, x), dense) < 1e-12


@pytest.mark.parametrize("preconditioner", [None, "kfac"])
@pytest.mark.parametrize("batch_size", [40, 16])
def test_default_step_from_the_preconditioned_minibatch_curvature(preconditioner, batch_size):
    """lr = 1/λ̂ with λ̂ the largest eigenvalue of P⁻¹H_B, H_B = (N/b)·2J_bᵀJ_b + λI on the most scaled batch: against
    the dense float64 eigenvalues of P⁻¹H_B on every batch an epoch of 40 = 16 + 16 + 8 can produce."""
    model, x, y, _ = classification_case(n=40)
    lam = 0.5
    lqf = LQF(model, weight_decay=lam, preconditioner=preconditioner).fit(
        x, y, epochs=1, batch_size=batch_size, progress=False
    )
    precondition = lqf._kfac
    p = lqf.network.num_params
    inverse = torch.eye(p) if precondition is None else torch.stack([precondition @ e for e in torch.eye(p)], -1)

    def largest(rows, scale):
        j = dense_jacobian(model, x[rows])
        hessian = scale * 2 * j.T @ j + lam * torch.eye(p)
        return float(torch.linalg.eigvals(inverse @ hessian).real.max())

    if batch_size >= 40:
        exact = largest(slice(None), 1.0)
        assert lqf.lr_curvature == pytest.approx(exact, rel=1e-3)
    else:  # the sampled batches are subsets: λ̂ within what the batches of an epoch can reach
        full = largest(slice(None), 40 / 8)  # the smallest batch (8) scaled by 5 can reach at most the whole data's ×5
        assert largest(slice(0, 8), 5.0) * 0.5 < lqf.lr_curvature <= full * (1 + 1e-6)
    assert lqf.lr == pytest.approx((1 - lqf.momentum) / lqf.lr_curvature)


def test_default_step_does_not_diverge_where_the_papers_does():
    """ReLU layers on inputs offset by 5 put K-FAC's preconditioned curvature near 100, far from the 1 the paper's
    lr = 0.1 assumes: 0.1 grows the objective; 1/λ̂ (inside heavy ball's full-batch bound) grew it 14-fold by epoch
    30 on alternating minibatches; the default (1 − momentum)/λ̂ lowers it at every epoch's end."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)).eval()
    x, y = torch.randn(50, 4) + 5, torch.randint(0, 3, (50,))
    lqf = LQF(model).fit(x, y, epochs=30, progress=False)
    losses = [record["loss"] for record in lqf.history]
    assert lqf.lr == pytest.approx(0.1 / lqf.lr_curvature) and lqf.lr_curvature > 50
    assert max(losses) <= losses[0] and losses[-1] < 0.2 * losses[0]
    for lr in (0.1, 1 / lqf.lr_curvature):
        try:
            history = LQF(model).fit(x, y, epochs=30, lr=lr, progress=False).history
        except FloatingPointError:
            continue
        assert max(record["loss"] for record in history) > 5 * losses[0]
