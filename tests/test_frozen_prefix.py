"""The frozen prefix is found (fx, then module structure), evaluated once per input tensor, and changes nothing."""

import pytest
import torch
import torchvision
from conftest import dense_jacobian, make_case, rel_err
from torch import nn

from ntkgp import NTKGP, FunctionalNetwork, ntk_operator


class Untraceable(nn.Module):
    """Control flow on a value: torch.fx cannot trace it."""

    def __init__(self, width: int):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x):
        return torch.tanh(self.lin(x)) if float(x.sum()) > -1e9 else x


def counted(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_mobilenet_last_block_is_cut_by_fx_and_its_prefix_runs_once_per_input():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=3, width_mult=0.25).double().eval()
    params = ["features.17.", "classifier."]
    x, test = torch.randn(4, 3, 32, 32), torch.randn(5, 3, 32, 32)
    net = FunctionalNetwork(model, params)
    assert (net.split.cut, net.split.how) == ("features.16", "fx")
    calls = counted(model.features[3])
    gp = NTKGP(net, x, torch.randn(4, 3), noise=0.1, mean="zero")
    fast = gp.predict(test)
    assert calls[0] == 2 + 2  # the split check (whole and split on x[:2]), then train_x once, test once
    reference = NTKGP(
        FunctionalNetwork(model, params, frozen_prefix=False), x, torch.randn(4, 3), noise=0.1, mean="zero"
    )
    reference.train_targets.copy_(gp.train_targets)
    reference._clear_caches()
    slow = reference.predict(test)
    assert calls[0] > 4 + 4  # the whole network in every Jacobian, output and flop count
    assert rel_err(fast.mean, slow.mean) < 1e-10 and rel_err(fast.variance, slow.variance) < 1e-10


def test_residual_network_with_last_blocks_selected_matches_the_whole_network():
    model, x, _ = make_case("residual_layernorm")
    net = FunctionalNetwork(model, params=["2.", "3."])
    assert net.split.cut == "1" and net.split.how == "fx"
    whole = ntk_operator(FunctionalNetwork(model, params=["2.", "3."], frozen_prefix=False), x).to_dense()
    assert rel_err(ntk_operator(net, x).to_dense(), whole) < 1e-12
    jac = torch.cat(list(net.jacobian_chunks(x)))
    reference = torch.cat(list(FunctionalNetwork(model, ["2.", "3."], frozen_prefix=False).jacobian_chunks(x)))
    assert rel_err(jac, reference) < 1e-12


def test_cut_inside_a_block_moves_back_to_a_single_tensor():
    """Selecting lin2 of a residual block: lin1's output and the skip input both cross the cut, so the cut
    moves back to the block's input."""
    model, x, _ = make_case("residual_layernorm")
    net = FunctionalNetwork(model, params=["2.lin2."])
    assert net.split.cut == "1"  # the first block's output, not 2.lin1
    whole = FunctionalNetwork(model, params=["2.lin2."], frozen_prefix=False)
    assert rel_err(ntk_operator(net, x).to_dense(), ntk_operator(whole, x).to_dense()) < 1e-12


def test_untraceable_blocks_are_cut_by_module_structure():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), Untraceable(5), Untraceable(5), nn.Linear(5, 2)).eval()
    net = FunctionalNetwork(model, params=["2."])
    assert (net.split.cut, net.split.how) == ("1", "structure")
    x = torch.randn(6, 3)
    calls = counted(model[1])
    op = ntk_operator(net, x)
    op.to_dense()
    op.to_dense()
    assert calls[0] == 2 + 1  # the check on x[:2], then x once
    whole = FunctionalNetwork(model, params=["2."], frozen_prefix=False)
    assert rel_err(op.to_dense(), ntk_operator(whole, x).to_dense()) < 1e-12


def test_no_split_when_the_first_module_is_selected_or_nothing_traces():
    model, x, _ = make_case("mlp_c3")
    assert FunctionalNetwork(model, params=["0."]).split is None

    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.a(x)) if float(x.sum()) > -1e9 else x

    torch.manual_seed(0)
    model = Opaque().eval()
    net = FunctionalNetwork(model, params=["b."])
    assert net.split is None
    assert net(x).shape == (7, 2)


def test_gradients_in_x_flow_through_the_prefix():
    model, x, _ = make_case("cnn_batchnorm")
    y = torch.randn(7, 2)
    test = torch.randn(3, 1, 9, 9, requires_grad=True)
    grads = []
    for frozen_prefix in (True, False):
        gp = NTKGP(FunctionalNetwork(model, params=["7."], frozen_prefix=frozen_prefix), x, y, noise=0.1)
        pred = gp.predict(test)
        (grad,) = torch.autograd.grad(pred.mean.sum() + pred.variance.sum(), test)
        grads.append(grad)
    assert grads[0].abs().max() > 0 and rel_err(*grads) < 1e-10


def test_cached_features_follow_in_place_changes_and_the_budget():
    model, x, _ = make_case("mlp_c3")
    net = FunctionalNetwork(model, params=["4."])
    before = net(x).clone()
    x.mul_(2.0)  # same tensor, new version: recomputed
    after = net(x)
    assert rel_err(after, FunctionalNetwork(model, params=["4."], frozen_prefix=False)(x)) < 1e-14
    assert not torch.allclose(before, after)
    small = FunctionalNetwork(model, params=["4."], feature_cache_bytes=0)
    small(x)
    assert len(small._features) == 0


@pytest.mark.parametrize("bad", [1, "yes"])
def test_frozen_prefix_flag_is_checked(bad):
    model, _, _ = make_case("mlp_c1")
    with pytest.raises(TypeError, match="frozen_prefix must be True or False"):
        FunctionalNetwork(model, frozen_prefix=bad)


def test_row_blocks_of_a_cached_input_reuse_its_prefix_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), Untraceable(5), nn.Linear(5, 2)).eval()
    net = FunctionalNetwork(model, params=["2."])
    x = torch.randn(9, 3)
    net(x)
    calls = counted(model[1])
    whole = FunctionalNetwork(model, params=["2."], frozen_prefix=False)
    for block in (x[2:5], x[:1], x[8:], x.split(4)[1]):
        assert rel_err(net(block), whole(block)) < 1e-14
    assert calls[0] == 4  # only the reference ran the prefix
    assert rel_err(net(x[::2]), whole(x[::2])) < 1e-14  # a strided view is not a block of rows: recomputed
    assert calls[0] == 6


def test_minibatches_take_their_prefix_outputs_from_the_training_set():
    from ntkgp import SVI

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), Untraceable(5), nn.Linear(5, 2)).eval()
    x, y = torch.randn(12, 3), torch.randn(12, 2)
    calls = counted(model[1])
    svi = SVI(model, "regression", params=["2."], noise=0.1)
    svi.fit(x, y, epochs=4, batch_size=5, progress=False, generator=torch.Generator().manual_seed(0))
    assert calls[0] == 2 + 1  # the split check (whole and split), then x once for every epoch and batch
    reference = SVI(FunctionalNetwork(model, ["2."], frozen_prefix=False), "regression", noise=0.1)
    reference.fit(x, y, epochs=4, batch_size=5, progress=False, generator=torch.Generator().manual_seed(0))
    assert rel_err(svi.loc, reference.loc) < 1e-12


class SeqFirst(nn.Module):
    """A frozen prefix that ends in a transpose to (T, b, d): a cut there would not have the batch first."""

    def __init__(self):
        super().__init__()
        self.embed, self.mix = nn.Linear(2, 3), nn.Linear(3, 3)

    def forward(self, x):  # x (b, T, 2)
        h = self.embed(x).transpose(0, 1)  # (T, b, 3): frozen
        return self.mix(torch.tanh(h)).transpose(0, 1).flatten(1)


@pytest.mark.parametrize("block", ["stage2.1.", "stage3.1.", "stage4.1."])
def test_shufflenet_is_never_cut_where_the_value_is_a_tuple(block):
    """A subset starting at a ShuffleNet V2 stride-1 block put the cut at its ``x.chunk(2, dim=1)``, a tuple
    (AttributeError: 'tuple' object has no attribute 'numel'). The cut moves to the block before; the kernel is
    exact."""
    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=3).double().eval()
    x = torch.randn(3, 3, 32, 32)
    params = [block, "fc."]
    net = FunctionalNetwork(model, params)
    kernel = ntk_operator(net, x, x)
    assert net.split is not None and net.split.cut == block[:-2] + "0"
    reference = dense_jacobian(model, x, params)
    assert rel_err(kernel.to_dense(), reference @ reference.T) < 1e-10
    assert rel_err(kernel.diagonal(), (reference * reference).sum(1)) < 1e-10


def test_a_cut_without_the_batch_first_is_refused():
    """The prefix cache serves row blocks x[a:b] as rows of x's prefix output: a cut after a transpose to (T, b, d)
    would hand them the wrong rows."""
    torch.manual_seed(0)
    model, x = SeqFirst().eval(), torch.randn(4, 5, 2)
    net = FunctionalNetwork(model, ["mix."])
    assert rel_err(ntk_operator(net, x, x).to_dense(), (lambda j: j @ j.T)(dense_jacobian(model, x, ["mix."]))) < 1e-12
    block, rows = ntk_operator(net, x[1:3], x[1:3]).to_dense(), dense_jacobian(model, x[1:3], ["mix."])
    assert rel_err(block, rows @ rows.T) < 1e-12
    assert net.split is None or net.split.prefix(x[:2]).shape[0] == 2
