"""A batch of inputs (ntkgp.inputs) and the entry points that take token ids, tuples and mappings: the helpers, their
errors, GPyTorch's packed inputs, DataLoaders of dict batches, the trainers, float32 against float64."""

from __future__ import annotations

import copy
import warnings
from collections import UserDict

import gpytorch
import pytest
import torch
from conftest import DictModel
from torch import nn

from ntkgp import LQF, FunctionalNetwork, JacobianKernel, gauss_newton_step, ntk_operator
from ntkgp.inputs import (
    Unpack,
    cat,
    check_inputs,
    chunks,
    convert,
    describe,
    inputs_at,
    length,
    pack,
    same,
    structure,
)


def _batch(n: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "features": torch.randn(n, 4, generator=g, dtype=torch.float64),
        "ids": torch.randint(0, 10, (n, 3), generator=g),
        "keep": torch.rand(n, 3, generator=g) > 0.3,
    }


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(ids).mean(1)))


def _model(cls: type[nn.Module] = DictModel) -> nn.Module:
    torch.manual_seed(0)
    return cls().double().eval()


def dense_jacobian(model: nn.Module, x: dict | torch.Tensor) -> torch.Tensor:
    """J (n·C × p) of every parameter by plain autograd, row by row."""
    params = list(model.parameters())
    out = model(**x) if isinstance(x, dict) else model(x)
    out = out.reshape(out.shape[0], -1)
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[i, c], params, retain_graph=True)])
        for i in range(out.shape[0])
        for c in range(out.shape[1])
    ]
    return torch.stack(rows)


def test_helpers_keep_kind_names_and_integer_dtypes() -> None:
    x = _batch()
    assert length(x) == 5 and length((x["features"], x["ids"])) == 5
    part = inputs_at(x, torch.tensor([0, 3]))
    assert list(part) == ["features", "ids", "keep"] and length(part) == 2 and part["ids"].dtype == torch.int64
    assert [length(c) for c in chunks(x, 2)] == [2, 2, 1]
    joined = cat(list(chunks(x, 2)))
    assert all(torch.equal(joined[k], x[k]) for k in x)
    moved = convert(x, dtype=torch.float32)
    assert moved["features"].dtype == torch.float32 and moved["ids"].dtype == torch.int64
    assert moved["keep"].dtype == torch.bool
    assert describe(x) == "dict {features: (5, 4) float64, ids: (5, 3) int64, keep: (5, 3) bool}"
    assert same(x, dict(x)) and not same(x, inputs_at(x, torch.arange(5)))


def test_pack_and_unpack_are_exact_and_unpack_returns_the_same_tensors_for_the_same_matrix() -> None:
    x = _batch()
    packed = pack(x, torch.float64)
    assert packed.shape == (5, 4 + 3 + 3) and packed.dtype == torch.float64
    unpack = Unpack(structure(x))
    back = unpack(packed)
    assert all(torch.equal(back[k], x[k]) and back[k].dtype == x[k].dtype for k in x)
    assert unpack(packed) is back  # cached linearisations recognise the training inputs
    assert unpack(packed.clone()) is not back
    with pytest.raises(ValueError, match=r"packed inputs must have shape \(n, 10\)"):
        unpack(packed[:, :9])
    with pytest.raises(ValueError, match="cannot be carried exactly as torch.float32"):
        pack(torch.tensor([[2**25]]), torch.float32)


def test_a_batchencoding_like_userdict_is_accepted_as_a_mapping() -> None:
    class BatchEncoding(UserDict):  # transformers' BatchEncoding is a UserDict, not a dict
        pass

    model, x = _model(), _batch()
    K = ntk_operator(model, BatchEncoding(x)).to_dense()
    assert torch.allclose(K, ntk_operator(model, x).to_dense(), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("bad", "error", "pattern"),
    [
        ([1.0, 2.0], TypeError, r"x\[0\] is a float, not a tensor"),
        ("text", TypeError, "must be a torch.Tensor .*, a tuple/list of tensors"),
        ({}, TypeError, "must map argument names"),
        ({"a": torch.zeros(2, 1), "b": torch.zeros(3, 1)}, ValueError, "must share their first dimension"),
        ({"a": torch.zeros(2, 1, dtype=torch.complex64)}, TypeError, r"x\['a'\] has dtype torch.complex64"),
        ({"a": torch.zeros(2, 1, dtype=torch.float32)}, TypeError, r"x\['a'\] has dtype torch.float32 but the network"),
        ((torch.zeros(2, 1, dtype=torch.float64), torch.full((2, 1), float("nan"), dtype=torch.float64)),
         ValueError, r"x\[1\] contains NaN"),
        ((), ValueError, "x is an empty tuple"),
    ],
)  # fmt: skip
def test_bad_inputs_name_the_tensor_and_say_what_to_do(bad: object, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        check_inputs(bad, torch.float64, "x")


def test_test_inputs_must_have_the_training_structure() -> None:
    like = structure(_batch())
    with pytest.raises(
        ValueError,
        match=r"x is a mapping \{features: .*ids: \(n, 4\) int64.* is expected \(that of the training inputs\)",
    ):
        check_inputs({**_batch(), "ids": torch.zeros(5, 4, dtype=torch.long)}, torch.float64, "x", like=like)
    with pytest.raises(TypeError, match=r"has dtype floating, floating, torch.bool where the training inputs"):
        check_inputs({**_batch(), "ids": torch.zeros(5, 3, dtype=torch.float64)}, torch.float64, "x", like=like)


def test_jacobian_kernel_maps_gpytorch_float_inputs_to_token_ids() -> None:
    """Token ids carried as floats through an ExactGP: the posterior mean equals the dense closed form."""
    model = _model(TokenModel)
    ids, test = torch.randint(0, 10, (6, 3)), torch.randint(0, 10, (2, 3))
    y = torch.randn(6, dtype=torch.float64)

    class GP(gpytorch.models.ExactGP):
        def __init__(self) -> None:
            likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
            super().__init__(ids.double(), y, likelihood)
            self.covar = JacobianKernel(model, inputs=lambda x: x.long()).double()

        def forward(self, x: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
            return gpytorch.distributions.MultivariateNormal(torch.zeros_like(x[:, 0]), self.covar(x))

    gp = GP()
    gp.likelihood.noise = 0.1
    gp.eval()
    mean = gp(test.double()).mean
    j, js = dense_jacobian(model, ids), dense_jacobian(model, test)
    expected = js @ j.T @ torch.linalg.solve(j @ j.T + 0.1 * torch.eye(6, dtype=torch.float64), y)
    assert torch.allclose(mean, expected, rtol=1e-8, atol=1e-10)
    with pytest.raises(TypeError, match="GPyTorch's inputs are \\(n, d\\) float matrices"):
        JacobianKernel(model, inputs=lambda x: x.long())(ids, ids).to_dense()


def test_lqf_from_a_dataloader_of_dict_batches_equals_the_tensors() -> None:
    from torch.utils.data import DataLoader, Dataset

    model, x, labels = _model(), _batch(8), torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])

    class Pairs(Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> tuple[dict, torch.Tensor]:
            return {k: v[i] for k, v in x.items()}, labels[i]

    loader = DataLoader(Pairs(), batch_size=3)
    direct = LQF(model, preconditioner=None).fit(x, labels, solver="closed_form").predict(x)
    batched = LQF(model, preconditioner=None).fit(loader, solver="closed_form").predict(x)
    assert torch.allclose(batched, direct, rtol=1e-10, atol=1e-12)


def test_gauss_newton_step_on_tuple_inputs_equals_the_dense_step() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.h = nn.Linear(3, 5), nn.Linear(2, 5), nn.Linear(5, 2)

        def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self.h(torch.tanh(self.a(u) + self.b(v)))

    model = _model(Two)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64))
    targets = torch.randn(6, 2, generator=g, dtype=torch.float64)
    step = gauss_newton_step(model, x, targets, damping=0.5)
    j = dense_jacobian(model, {"u": x[0], "v": x[1]})
    residual = (targets - model(*x)).reshape(-1)
    expected = j.T @ torch.linalg.solve(j @ j.T + 0.5 * torch.eye(12, dtype=torch.float64), residual)
    assert torch.allclose(step, expected, rtol=1e-8, atol=1e-10)


def test_float32_kernel_of_a_dict_model_matches_float64() -> None:
    model, x = _model(), _batch()
    k64 = ntk_operator(model, x).to_dense()
    k32 = ntk_operator(FunctionalNetwork(model.float()), convert(x, dtype=torch.float32)).to_dense()
    assert ((k32.double() - k64).norm() / k64.norm()) < 1e-5


def test_output_must_be_a_function_and_a_tuple_output_asks_for_it() -> None:
    lstm = nn.LSTM(3, 4, batch_first=True).double().eval()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="output=lambda out"):
        ntk_operator(lstm, x)
    with pytest.raises(TypeError, match="output must be a function"):
        FunctionalNetwork(lstm, output="logits")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ntk_operator(FunctionalNetwork(lstm, output=lambda out: out[0][:, -1]), x).shape == (8, 8)


class Packed(nn.Module):
    """The same network taking its inputs packed into one float matrix (ntkgp.inputs.pack): the tensor path, which
    the rest of the suite tests against dense references."""

    def __init__(self, model: nn.Module, unpack: Unpack):
        super().__init__()
        self.model, self.unpack = model, unpack

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.unpack.structure
        tensors, start = {}, 0
        for name, shape, kind in zip(x.names, x.shapes, x.dtypes):
            width = int(torch.tensor(shape).prod())
            part = z[:, start : start + width].reshape(z.shape[0], *shape)
            tensors[name] = part if kind == "floating" else part.round().to(getattr(torch, kind))
            start += width
        return self.model(**tensors)


def _twins() -> tuple[nn.Module, nn.Module, dict, torch.Tensor, dict, torch.Tensor]:
    model = _model()
    x, test = _batch(8), _batch(3, seed=1)
    packed = Packed(copy.deepcopy(model), Unpack(structure(x))).eval()  # its own weights: trainers change them
    return model, packed, x, pack(x, torch.float64), test, pack(test, torch.float64)


@pytest.mark.parametrize(
    "entry",
    ["ntkgp-function", "ntkgp-parameter", "layer-scaled", "laplace", "svi", "lqf", "iterative", "damped-gauss-newton"],
)
def test_every_entry_point_on_dict_inputs_equals_the_same_network_on_packed_tensors(entry: str) -> None:
    from ntkgp import NTKGP, SVI, DampedGaussNewton, IterativeLinearisation, Laplace, LayerScaledNTKGP

    model, packed, x, z, test, test_z = _twins()
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    targets = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def run(network: nn.Module, inputs: object, test_inputs: object) -> torch.Tensor:
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        if entry.startswith("ntkgp"):
            gp = NTKGP(network, inputs, targets, space=entry.split("-")[1]).fit()
            prediction = gp.predict(test_inputs)
            return torch.cat([prediction.mean.reshape(-1), prediction.variance.reshape(-1)])
        if entry == "layer-scaled":
            prediction = LayerScaledNTKGP(network, inputs, targets).fit().predict(test_inputs)
            return torch.cat([prediction.mean.reshape(-1), prediction.variance.reshape(-1)])
        if entry == "laplace":
            return Laplace(network, "classification").fit(inputs, labels).predict(test_inputs)
        if entry == "svi":
            svi = SVI(network, "classification").fit(inputs, labels, epochs=3, batch_size=4, generator=generator,
                                                     progress=False)  # fmt: skip
            return svi.predict(test_inputs, num_samples=20, generator=generator)
        if entry == "lqf":
            return LQF(network).fit(inputs, labels, epochs=2, batch_size=4, progress=False).predict(test_inputs)
        trainable = [p for p in network.parameters()]
        if entry == "iterative":
            optimizer = torch.optim.SGD(trainable, lr=0.1)
            trainer = IterativeLinearisation(network, optimizer, period=2, probe=test_inputs)
            history = trainer.fit((inputs, labels), steps=4, batch_size=4, progress=False)
            return torch.tensor(history.proxy_loss + [trainer.kernel_distance()], dtype=torch.float64)
        trainer = DampedGaussNewton(network, damping=0.5, loss="mse")
        return torch.tensor([trainer.step(inputs, targets) for _ in range(2)], dtype=torch.float64)

    theirs = run(packed, z, test_z)
    ours = run(model, x, test)
    assert torch.allclose(ours, theirs, rtol=1e-7, atol=1e-9)


def _pairs_loader(x: dict, y: torch.Tensor, batch_size: int = 3) -> torch.utils.data.DataLoader:
    class Pairs(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return length(x)

        def __getitem__(self, i: int) -> tuple[dict, torch.Tensor]:
            return {k: v[i] for k, v in x.items()}, y[i]

    return torch.utils.data.DataLoader(Pairs(), batch_size=batch_size)


def test_laplace_and_ntkgp_fit_from_a_dataloader_equal_the_tensors() -> None:
    from ntkgp import NTKGP, Laplace

    model, x, test = _model(), _batch(8), _batch(3, seed=1)
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    targets = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    direct = Laplace(model, "classification").fit(x, labels).predict(test)
    loaded = Laplace(model, "classification").fit(_pairs_loader(x, labels)).predict(test)
    assert torch.allclose(loaded, direct, rtol=1e-10, atol=1e-12)
    gp_direct = NTKGP(model, x, targets).fit().predict(test)
    gp_loaded = NTKGP(model, _pairs_loader(x, targets)).fit().predict(test)
    assert torch.allclose(gp_loaded.mean, gp_direct.mean, rtol=1e-10, atol=1e-12)
    assert torch.allclose(gp_loaded.variance, gp_direct.variance, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="train_y must be None when train_x is a DataLoader"):
        Laplace(model, "classification").fit(_pairs_loader(x, labels), labels)
    with pytest.raises(TypeError, match="must yield \\(x, y\\) pairs"):
        NTKGP(model, torch.utils.data.DataLoader([x["features"][i] for i in range(8)], batch_size=4))
    with pytest.raises(TypeError, match="train_y must be a torch.Tensor"):
        NTKGP(model, x)
