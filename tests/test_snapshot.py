"""What a FunctionalNetwork snapshots (docs/api.md): the selected parameters, the frozen parameters and the buffers
are copied, so later changes to the module do not change a linearisation; with copy_frozen=False the frozen
parameters are shared and an in-place change raises. The module's mode is checked at every use."""

import pytest
import torch
from conftest import make_case
from torch import nn

from ntkgp import NTKGP, FunctionalNetwork, ntk_operator


def _changes(model):
    """In-place changes a user makes to a network after building a GP on part of it."""
    conv, bn = model[0], model[1]

    def optimizer_step():
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.randn(2, 1, 9, 9)).sum().backward()
        opt.step()

    def no_grad_update():
        with torch.no_grad():
            conv.weight.add_(1.0)

    def data_write():
        conv.weight.data.mul_(2.0)

    def running_stats():
        bn.running_mean.add_(0.5)
        bn.running_var.mul_(3.0)

    def batchnorm_forward_in_train_mode():
        model.train()
        with torch.no_grad():
            model(torch.randn(8, 1, 9, 9) * 3)
        model.eval()

    def load_state_dict():
        state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
        state["1.running_var"] = state["1.running_var"].abs()
        model.load_state_dict(state)

    return [optimizer_step, no_grad_update, data_write, running_stats, batchnorm_forward_in_train_mode, load_state_dict]


@pytest.mark.parametrize("change", range(6))
def test_changes_to_the_module_do_not_change_the_linearisation(change):
    """The last layer linearised, the convolution and BatchNorm frozen. Before, changing a frozen weight or a
    running mean in place moved the predictions (by 1.24 and 0.40 in the reported example)."""
    model, x, _ = make_case("cnn_batchnorm")
    y, xs = torch.randn(x.shape[0], 2), torch.randn(3, *x.shape[1:])
    gp = NTKGP(model, x, y, params=["7."], noise=0.1)
    op = ntk_operator(model, x, params=["7."])
    before, kernel = gp.predict(xs), op.to_dense()
    _changes(model)[change]()
    after = gp.predict(xs)
    assert torch.equal(after.mean, before.mean) and torch.equal(after.variance, before.variance)
    assert torch.equal(op.to_dense(), kernel)


def test_shared_frozen_parameters_are_guarded():
    """copy_frozen=False shares the frozen parameters with the module: an in-place change raises at the next use,
    naming them; a write through .data bypasses version counters and is not seen (as docs/api.md says): it
    changes the products of inputs whose frozen-prefix output was not cached yet."""
    model, x, _ = make_case("cnn_batchnorm")
    net = FunctionalNetwork(model, params=["7."], copy_frozen=False)
    assert net.frozen["0.weight"].data_ptr() == model[0].weight.data_ptr()
    op = ntk_operator(net, x)
    op.to_dense()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(RuntimeError, match=r"frozen parameter\(s\) \['0.weight'\].*changed in place"):
        ntk_operator(net, x).to_dense()
    net = FunctionalNetwork(model, params=["7."], copy_frozen=False)
    kernel = ntk_operator(net, x).to_dense()
    model[0].weight.data.mul_(2.0)
    assert torch.equal(ntk_operator(net, x).to_dense(), kernel)  # x's prefix output was cached
    assert not torch.equal(ntk_operator(net, x.clone()).to_dense(), kernel)


def test_train_mode_after_building_is_caught_at_use():
    model, x, _ = make_case("cnn_batchnorm")
    gp = NTKGP(model, x, torch.randn(x.shape[0], 2), noise=0.1)
    model.train()
    with pytest.raises(ValueError, match=r"train mode \(1, 4\).*call model.eval\(\) first"):
        gp.predict(x)
    model.eval()
    assert torch.isfinite(gp.predict(x).mean).all()


def test_snapshot_memory_is_the_frozen_part_once():
    """The copy holds the frozen parameters and buffers once each (no more than the module itself)."""
    model, _, _ = make_case("cnn_batchnorm")
    net = FunctionalNetwork(model, params=["7."])
    frozen = sum(t.numel() for t in net.frozen.values()) + sum(t.numel() for t in net.buffers.values())
    module = sum(t.numel() for n, t in model.named_parameters() if not n.startswith("7.")) + sum(
        t.numel() for t in model.buffers()
    )
    assert frozen == module
    assert all(t.data_ptr() != dict(model.named_parameters())[n].data_ptr() for n, t in net.frozen.items())


def test_flat_vector_follows_named_parameters_order():
    """θ is in model.named_parameters() order restricted to the selection, whatever the order of the
    params entries: it equals torch.nn.utils.parameters_to_vector over the same parameters."""
    from torch.nn.utils import parameters_to_vector

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    expected = parameters_to_vector([model[2].weight, model[4].weight, model[4].bias])
    for params in (["4.", "2.weight"], ["2.weight", "4."], ["4.bias", "2.weight", "4.weight", "4"]):
        net = FunctionalNetwork(model, params)
        assert net.names == ["2.weight", "4.weight", "4.bias"], params
        assert torch.equal(net.theta0, expected)
