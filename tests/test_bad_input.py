"""Bad input gets a clear exception that names the problem."""

import pytest
import torch
from conftest import make_case
from torch import nn

from ntkgp import NTKGP, Solver, gram_operator, ntk_operator


@pytest.fixture
def mlp():
    model, x, _ = make_case("mlp_c3")
    return model, x, torch.randn(x.shape[0], 3)


def test_mismatched_rows(mlp):
    model, x, y = mlp
    with pytest.raises(ValueError, match="7 inputs but train_y has 6 rows"):
        NTKGP(model, x, y[:6])


def test_targets_do_not_match_outputs(mlp):
    model, x, _ = mlp
    with pytest.raises(ValueError, match=r"3 output\(s\): expected \(n, 3\)"):
        NTKGP(model, x, torch.randn(x.shape[0]))


def test_inputs_do_not_fit_network(mlp):
    model, _, _ = mlp
    with pytest.raises(ValueError, match="network failed on inputs of shape"):
        NTKGP(model, torch.randn(5, 4), torch.randn(5, 3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_and_targets(mlp, bad):
    model, x, y = mlp
    x_bad, y_bad = x.clone(), y.clone()
    x_bad[2, 1], y_bad[0, 0] = bad, bad
    with pytest.raises(ValueError, match="train_x contains NaN or Inf"):
        NTKGP(model, x_bad, y)
    with pytest.raises(ValueError, match="train_y contains NaN or Inf"):
        NTKGP(model, x, y_bad)
    with pytest.raises(ValueError, match="x1 contains NaN or Inf"):
        ntk_operator(model, x_bad)
    gp = NTKGP(model, x, y, noise=0.1)
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        gp.predict(x_bad)


def test_integer_inputs_and_targets(mlp):
    model, x, y = mlp
    with pytest.raises(TypeError, match="dtype torch.int64.*floating"):
        NTKGP(model, x.long(), y)
    with pytest.raises(TypeError, match="regression targets must be floating"):
        NTKGP(model, x, y.long())
    with pytest.raises(TypeError, match="float32 but the network's parameters are torch.float64"):
        ntk_operator(model, x.float())


@pytest.mark.parametrize("noise", [0.0, -1.0, float("nan")])
def test_non_positive_noise(mlp, noise):
    model, x, y = mlp
    with pytest.raises(ValueError, match="noise must be a finite number > 0"):
        NTKGP(model, x, y, noise=noise)
    with pytest.raises(ValueError, match="outputscale must be a finite number > 0"):
        NTKGP(model, x, y, outputscale=noise)


def test_unknown_parameter_name(mlp):
    model, x, _ = mlp
    with pytest.raises(ValueError, match="no parameter of the network matches 'fc.'"):
        ntk_operator(model, x, params=["fc."])


def test_batchnorm_in_train_mode():
    model, x, _ = make_case("cnn_batchnorm")
    model.train()
    with pytest.raises(ValueError, match="train mode.*call model.eval"):
        ntk_operator(model, x)
    with pytest.raises(ValueError, match="train mode"):
        NTKGP(model, x, torch.randn(x.shape[0], 2))


def test_op_without_any_jvp_rule():
    class Square(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x):
            return x**2

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad):
            return 2 * ctx.saved_tensors[0] * grad

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return Square.apply(self.lin(x))

    x = torch.randn(4, 3)
    with pytest.raises(NotImplementedError, match="custom autograd.Function with no jvp.*double-VJP fallback cannot"):
        ntk_operator(Net(), x) @ torch.randn(8)


def test_bad_options(mlp):
    model, x, y = mlp
    with pytest.raises(ValueError, match="space must be"):
        NTKGP(model, x, y, space="weights")
    with pytest.raises(ValueError, match="mean must be"):
        NTKGP(model, x, y, mean="linear")
    with pytest.raises(ValueError, match="solver method"):
        Solver("qr")
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        gram_operator(lambda t: t, x)
    gp = NTKGP(model, x, y, noise=0.1)
    with pytest.raises(ValueError, match="per-input shape"):
        gp.predict(torch.randn(3, 4))


# --- LQF -------------------------------------------------------------------------------------------------
def lqf_case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).eval()
    return model, torch.randn(8, 3), torch.randint(0, 3, (8,))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"alpha": 0.0}, ValueError, "alpha must be a finite number > 0"),
        ({"alpha": -15}, ValueError, "alpha must be a finite number > 0"),
        ({"weight_decay": -1e-4}, ValueError, "weight_decay must be a finite number >= 0"),
        ({"weight_decay": 0.0}, ValueError, "needs weight_decay λ > 0"),
        ({"loss": "hinge"}, ValueError, "loss"),
        ({"preconditioner": "shampoo"}, ValueError, "preconditioner"),
        ({"task": "regression", "loss": "cross_entropy"}, ValueError, "classification loss"),
        ({"task": "regression", "alpha": 15.0}, ValueError, "takes no alpha"),
        ({"momentum": 1.0}, ValueError, r"momentum must lie in \[0, 1\)"),
        ({"params": ["1."]}, ValueError, "no parameter of the network matches"),
    ],
)
def test_lqf_bad_settings(kwargs, error, match):
    from ntkgp import LQF

    model, _, _ = lqf_case()
    with pytest.raises(error, match=match):
        LQF(model, **kwargs)


def test_lqf_kfac_needs_a_linear_or_conv2d_layer_in_scope():
    from ntkgp import LQF

    model = nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Linear(6, 3)).eval()
    with pytest.raises(ValueError, match="needs parameters of Linear or ungrouped Conv2d layers in scope"):
        LQF(model, params=["1."])
    LQF(model, params=["1."], preconditioner=None)  # plain SGD is fine there


def test_lqf_bad_data_and_calls():
    from ntkgp import LQF

    model, x, y = lqf_case()
    lqf = LQF(model)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        lqf.fit(x, y + 1, progress=False)
    with pytest.raises(TypeError, match="classification takes integer labels"):
        lqf.fit(x, y.double(), progress=False)
    with pytest.raises(TypeError, match="task='regression'"):
        lqf.fit(x, torch.randn(8, 3), progress=False)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        lqf.fit(x, y, lr=0.0, progress=False)
    with pytest.raises(ValueError, match="batch_size must be"):
        lqf.fit(x, y, batch_size=0, progress=False)
    with pytest.raises(RuntimeError, match=r"leave_one_out\(\)|call fit"):
        lqf.leave_one_out()
    with pytest.raises(RuntimeError, match="call fit"):
        lqf.predict(x)
    lqf.fit(x, y, epochs=1, progress=False)
    with pytest.raises(
        ValueError, match=r"new_x has per-input shape \(4,\), but \(3,\) is expected \(that of the training inputs\)"
    ):
        lqf.update(torch.randn(2, 4), y[:2])
    with pytest.raises(ValueError, match="solver"):
        lqf.fit(x, y, solver="lbfgs", progress=False)
    with pytest.raises(ValueError, match="closed form is the minimiser of the MSE loss"):
        LQF(model, loss="cross_entropy").fit(x, y, solver="closed_form", progress=False)
    regression = LQF(model, task="regression", preconditioner=None)
    with pytest.raises(ValueError, match=r"predict_proba\(\) is for classification"):
        regression.fit(x, torch.randn(8, 3), epochs=1, progress=False).predict_proba(x)


def test_lqf_network_in_train_mode():
    from ntkgp import LQF

    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    with pytest.raises(ValueError, match=r"train mode .* call model.eval\(\) first"):
        LQF(model.train())
    lqf = LQF(model.eval())
    model.train()
    with pytest.raises(ValueError, match=r"call model.eval\(\) first"):
        lqf.fit(torch.randn(8, 3), torch.randint(0, 3, (8,)), progress=False)


def test_lqf_update_that_makes_the_system_singular_changes_nothing():
    from ntkgp import LQF

    model, x, y = lqf_case()
    lqf = LQF(model, weight_decay=1e-30, preconditioner=None).fit(x[:4], y[:4], solver="closed_form", progress=False)
    delta = lqf.delta.clone()
    with pytest.raises(FloatingPointError, match="numerically singular"):
        lqf.update(x[:1], y[:1])  # a repeated input with λ/2 = 5e-31
    assert lqf.train_x.shape[0] == 4 and lqf.kernel_system().size == 12 and torch.equal(lqf.delta, delta)
