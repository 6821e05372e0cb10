"""A table of malformed and adversarial calls on every public entry point, as a careless or unlucky user makes them.

Each call either raises a clear exception — the expected type, and a message that names the argument or the
problem — or returns a finite result of the right shape. The table is generated: every numeric argument gets
the same list of bad values (strings, None, multi-element tensors, NaN, ±inf, 0, negatives, non-integers where
an integer is due), every tensor argument the same list of bad tensors (lists, NumPy arrays, integer or other
floating dtypes, NaN/Inf, empty, wrong shapes, another device), and every entry point the bad networks (not a
module, train mode, NaN/Inf weights or buffers). `test_the_table_is_large` states how many calls it makes.
"""

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import make_case
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ntkgp import (
    NTKGP,
    SVI,
    FunctionalNetwork,
    JacobianKernel,
    Laplace,
    NetworkMean,
    NTKOperator,
    Prediction,
    Solver,
    fisher_operator,
    gram_operator,
    ntk_operator,
)


def _mlp(outputs=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, outputs)).eval()


MLP, MLP1 = _mlp(), _mlp(1)
X, XS = torch.randn(7, 3, generator=torch.Generator().manual_seed(1)), torch.randn(4, 3)
Y, Y1, LABELS = torch.randn(7, 3), torch.randn(7), torch.tensor([0, 1, 2, 0, 1, 2, 0])
CNN, XC, _ = make_case("cnn_batchnorm")
NET = FunctionalNetwork(MLP)
P, N, C = NET.num_params, X.shape[0], 3
LAPLACE = Laplace(MLP, "classification").fit(X, LABELS)
SVI_FIT = SVI(MLP, "classification").fit(X, LABELS, epochs=1, progress=False)
GP = NTKGP(MLP, X, Y, noise=0.1)
K = ntk_operator(MLP, X)  # 21 × 21

CASES = []


def raises(exc, pattern):
    return ("raises", exc, pattern)


def finite(shape=None, get=lambda r: r):
    """A finite result; ``get`` extracts a tensor from it (a product, a prediction's mean), of ``shape``."""
    return ("finite", shape, get)


def case(entry, what, call, expect):
    CASES.append(pytest.param(call, expect, id=f"{entry} | {what}"))


# --- values -------------------------------------------------------------------------------------------------
POSITIVE_BAD = {
    "a string": ("0.1", TypeError),
    "None": (None, TypeError),
    "a list": ([0.1], TypeError),
    "a 2-element tensor": (torch.tensor([0.1, 0.2]), TypeError),
    "True": (True, TypeError),
    "NaN": (math.nan, ValueError),
    "inf": (math.inf, ValueError),
    "-inf": (-math.inf, ValueError),
    "0": (0.0, ValueError),
    "-1": (-1.0, ValueError),
}
POSITIVE_OK = {"a 0-d tensor": torch.tensor(0.5), "a NumPy float": np.float64(0.5), "an int": 1}
COUNT_BAD = {
    "2.5": (2.5, TypeError),
    "4.0": (4.0, TypeError),
    "None": (None, TypeError),
    "'4'": ("4", TypeError),
    "True": (True, TypeError),
    "0": (0, ValueError),
    "-3": (-3, ValueError),
    "a 2-element tensor": (torch.tensor([1, 2]), TypeError),
}
COUNT_OK = {"a NumPy int": np.int64(3), "a 0-d int tensor": torch.tensor(3)}


def bad_inputs(good):
    """Malformed versions of an input tensor (n, ...): (description, value, exception, pattern)."""
    nan, inf = good.clone(), good.clone()
    nan.view(-1)[0], inf.view(-1)[-1] = math.nan, math.inf
    return [
        ("a list", good.tolist(), TypeError, "must be a torch.Tensor"),
        ("a NumPy array", good.numpy(), TypeError, "must be a torch.Tensor"),
        ("integer dtype", good.long(), TypeError, "dtype torch.int64"),
        ("float32 for a float64 network", good.float(), TypeError, "float32 but the network's parameters"),
        ("NaN", nan, ValueError, "NaN or Inf"),
        ("Inf", inf, ValueError, "NaN or Inf"),
        ("empty", good[:0], ValueError, "n >= 1"),
        ("0-d", good.view(-1)[0], ValueError, r"shape \(n, \.\.\.\)"),
        ("on the meta device", good.to("meta"), ValueError, "is on meta but the network is on cpu"),
    ]


def bad_networks():
    """(description, network, exception, pattern) for networks no entry point may accept."""

    def broken(kind):
        model = make_case("cnn_batchnorm")[0]
        with torch.no_grad():
            if kind == "weight":
                model[0].weight[0, 0, 0, 0] = math.nan
            elif kind == "inf weight":
                model[7].bias[1] = math.inf
            else:
                model[1].running_var[0] = math.nan
        return model

    train = make_case("cnn_batchnorm")[0].train()
    return [
        ("not a module", lambda t: t, TypeError, "must be a torch.nn.Module"),
        ("BatchNorm in train mode", train, ValueError, "train mode.*model.eval"),
        ("a NaN weight", broken("weight"), ValueError, "parameter '0.weight' has 1 NaN or Inf"),
        ("an Inf bias", broken("inf weight"), ValueError, "parameter '7.bias' has 1 NaN or Inf"),
        ("a NaN running_var", broken("buffer"), ValueError, "buffer '1.running_var' has 1 NaN or Inf"),
    ]


# --- the networks every entry point takes ----------------------------------------------------------------------
ENTRIES_ON_A_NETWORK = {
    "ntk_operator": lambda m: ntk_operator(m, XC),
    "gram_operator": lambda m: gram_operator(m, XC),
    "fisher_operator": lambda m: fisher_operator(m, XC, "categorical"),
    "JacobianKernel": lambda m: JacobianKernel(m, input_shape=XC.shape[1:]),
    "FunctionalNetwork": lambda m: FunctionalNetwork(m),
    "NTKGP": lambda m: NTKGP(m, XC, torch.randn(7, 2)),
    "Laplace": lambda m: Laplace(m, "classification").fit(XC, LABELS % 2),
    "SVI": lambda m: SVI(m, "classification"),
}
WITH_OWN_SETTINGS = {  # a FunctionalNetwork given together with a setting that belongs to the snapshot
    "ntk_operator": lambda: ntk_operator(NET, X, params=["0."]),
    "gram_operator": lambda: gram_operator(NET, X, chunk_size=4),
    "fisher_operator": lambda: fisher_operator(NET, X, params=["0."]),
    "JacobianKernel": lambda: JacobianKernel(NET, chunk_size=4),
    "FunctionalNetwork": lambda: ntk_operator(NET, X, chunk_size=2),
    "NTKGP": lambda: NTKGP(NET, X, Y, params="2."),
    "Laplace": lambda: Laplace(NET, params=["2."]),
    "SVI": lambda: SVI(NET, chunk_size=8),
}
WITHOUT_CHANNELS = {  # a CNN given inputs (n, 9, 9) instead of (n, 1, 9, 9)
    "ntk_operator": lambda: ntk_operator(CNN, XC[:, 0]),
    "gram_operator": lambda: gram_operator(CNN, XC[:, 0]),
    "fisher_operator": lambda: fisher_operator(CNN, XC[:, 0], "categorical"),
    "JacobianKernel": lambda: JacobianKernel(CNN, input_shape=(9, 9))(XC.flatten(1)).to_dense(),
    "FunctionalNetwork": lambda: FunctionalNetwork(CNN).num_outputs(XC[:, 0]),
    "NTKGP": lambda: NTKGP(CNN, XC[:, 0], torch.randn(7, 2)),
    "Laplace": lambda: Laplace(CNN, "classification").fit(XC[:, 0], LABELS % 2),
    "SVI": lambda: SVI(CNN, "classification").fit(XC[:, 0], LABELS % 2, epochs=1, progress=False),
}
for entry, build in ENTRIES_ON_A_NETWORK.items():
    for what, network, exc, pattern in bad_networks():
        case(entry, f"model: {what}", lambda build=build, network=network: build(network), raises(exc, pattern))
    case(
        entry,
        "model: a FunctionalNetwork with params= or chunk_size=",
        WITH_OWN_SETTINGS[entry],
        raises(ValueError, "cannot be combined with a FunctionalNetwork"),
    )
    case(
        entry,
        "inputs without the channel dimension",
        WITHOUT_CHANNELS[entry],
        raises(ValueError, r"network failed on inputs of shape \((7|1), 9, 9\)"),
    )

# --- params -----------------------------------------------------------------------------------------------------
USE = {  # something finite computed from what an entry point returns
    "ntk_operator": lambda op: op.to_dense(),
    "gram_operator": lambda op: op.diagonal(),
    "fisher_operator": lambda op: op.diagonal(),
    "JacobianKernel": lambda kernel: kernel(X).to_dense(),
    "NTKGP": lambda gp: gp.predict(XS).mean,
    "Laplace": lambda la: la.fit(X, Y).predict(XS).mean,
    "SVI": lambda svi: svi.predict(XS).mean,
    "FunctionalNetwork": lambda net: net.jvp(X, torch.ones(1, net.num_params)),
}
PARAMS_BAD = {
    "[]": ([], ValueError, "non-empty list"),
    "[0]": ([0], TypeError, "params entries must be strings"),
    "an unknown prefix": (["fc."], ValueError, "no parameter of the network matches 'fc.'"),
    "an int": (5, ValueError, "params must be None"),
}
for entry, build in {
    "ntk_operator": lambda p: ntk_operator(MLP, X, params=p),
    "gram_operator": lambda p: gram_operator(MLP, X, params=p),
    "fisher_operator": lambda p: fisher_operator(MLP, X, params=p),
    "JacobianKernel": lambda p: JacobianKernel(MLP, params=p),
    "NTKGP": lambda p: NTKGP(MLP, X, Y, params=p),
    "Laplace": lambda p: Laplace(MLP, params=p),
    "SVI": lambda p: SVI(MLP, params=p),
    "FunctionalNetwork": lambda p: FunctionalNetwork(MLP, p),
}.items():
    for what, (value, exc, pattern) in PARAMS_BAD.items():
        case(entry, f"params={what}", lambda build=build, value=value: build(value), raises(exc, pattern))
    case(entry, "params='2.' (one string)", lambda build=build: build("2."), finite(get=USE[entry]))

# --- numeric arguments ------------------------------------------------------------------------------------------
NUMERIC = [  # (entry, argument, call(value), kind, None allowed, check of a good result)
    (
        "ntk_operator",
        "chunk_size",
        lambda v: ntk_operator(MLP, X, chunk_size=v) @ torch.randn(21, 2),
        "count",
        True,
        (21, 2),
    ),
    (
        "gram_operator",
        "chunk_size",
        lambda v: gram_operator(MLP, X, chunk_size=v) @ torch.randn(P),
        "count",
        True,
        (P,),
    ),
    (
        "fisher_operator",
        "chunk_size",
        lambda v: fisher_operator(MLP, X, chunk_size=v) @ torch.randn(P),
        "count",
        True,
        (P,),
    ),
    (
        "fisher_operator",
        "epsilon",
        lambda v: fisher_operator(MLP, X, "categorical", epsilon=v) @ torch.randn(P),
        "positive",
        True,
        (P,),
    ),
    (
        "JacobianKernel",
        "chunk_size",
        lambda v: JacobianKernel(MLP, chunk_size=v)(X).to_dense(),
        "count",
        True,
        (21, 21),
    ),
    (
        "FunctionalNetwork",
        "chunk_size",
        lambda v: FunctionalNetwork(MLP, chunk_size=v).jvp(X, torch.randn(3, P)),
        "count",
        False,
        (3, 7, 3),
    ),
    (
        "FunctionalNetwork",
        "jacobian_chunk_elements",
        lambda v: next(FunctionalNetwork(MLP, jacobian_chunk_elements=v).jacobian_chunks(X)),
        "count",
        False,
        None,
    ),
    (
        "Solver",
        "cholesky_max_size",
        lambda v: NTKGP(MLP, X, Y, noise=0.1, solver=Solver(cholesky_max_size=v)).predict(XS).mean,
        "size",
        False,
        (4, 3),
    ),
    ("Solver", "cg_tolerance", lambda v: Solver(cg_tolerance=v).cg_tolerance, "positive", False, ()),
    ("Solver", "max_cg_iterations", lambda v: Solver(max_cg_iterations=v).max_cg_iterations, "count", False, ()),
    ("Solver", "preconditioner_size", lambda v: Solver(preconditioner_size=v).preconditioner_size, "size", False, ()),
    ("Solver", "lanczos_rank", lambda v: Solver(lanczos_rank=v).lanczos_rank, "count", False, ()),
    ("NTKGP", "noise", lambda v: NTKGP(MLP, X, Y, noise=v).predict(XS).mean, "positive", True, (4, 3)),
    ("NTKGP", "outputscale", lambda v: NTKGP(MLP, X, Y, outputscale=v).predict(XS).mean, "positive", False, (4, 3)),
    ("NTKGP", "chunk_size", lambda v: NTKGP(MLP, X, Y, chunk_size=v).predict(XS).mean, "count", True, (4, 3)),
    ("NTKGP.fit", "max_iter", lambda v: GP.fit(max_iter=v).predict(XS).mean, "count", False, (4, 3)),
    (
        "Laplace",
        "prior_precision",
        lambda v: Laplace(MLP, prior_precision=v).fit(X, Y).predict(XS).mean,
        "positive",
        False,
        (4, 3),
    ),
    ("Laplace", "noise", lambda v: Laplace(MLP, noise=v).fit(X, Y).predict(XS).mean, "positive", True, (4, 3)),
    ("Laplace", "chunk_size", lambda v: Laplace(MLP, chunk_size=v).fit(X, Y).predict(XS).mean, "count", True, (4, 3)),
    ("Laplace", "max_size", lambda v: Laplace(MLP, max_size=v).max_size, "count", False, ()),
    (
        "Laplace",
        "memory_budget",
        lambda v: torch.tensor(float(Laplace(MLP, memory_budget=v).memory_budget)),
        "count",
        True,
        (),
    ),
    (
        "Laplace.fit",
        "max_iter",
        lambda v: Laplace(MLP, "classification").fit(X, LABELS, max_iter=v).mean,
        "count",
        False,
        (P,),
    ),
    ("Laplace.predict", "num_samples", lambda v: LAPLACE.predict(XS, link="mc", num_samples=v), "count", False, (4, 3)),
    ("Laplace.predict", "batch_size", lambda v: LAPLACE.predict(XS, batch_size=v), "count", False, (4, 3)),
    ("Laplace.sample", "k", lambda v: LAPLACE.sample(v), "count", False, (3, P)),
    ("Laplace.sample", "rank", lambda v: LAPLACE.sample(2, rank=v), "count", True, (2, P)),
    ("Laplace.log_marginal_likelihood", "rank", lambda v: LAPLACE.log_marginal_likelihood(rank=v), "count", True, ()),
    (
        "Laplace.log_marginal_likelihood",
        "probes",
        lambda v: LAPLACE.log_marginal_likelihood(rank=4, probes=v),
        "count",
        True,
        (),
    ),
    ("SVI", "prior_precision", lambda v: SVI(MLP, prior_precision=v).predict(XS).mean, "positive", False, (4, 3)),
    ("SVI", "init_scale", lambda v: SVI(MLP, init_scale=v).predict(XS).mean, "positive", False, (4, 3)),
    ("SVI", "noise", lambda v: SVI(MLP, noise=v).predict(XS).mean, "positive", True, (4, 3)),
    ("SVI", "chunk_size", lambda v: SVI(MLP, chunk_size=v).predict(XS).mean, "count", True, (4, 3)),
    (
        "SVI.fit",
        "epochs",
        lambda v: SVI(MLP).fit(X, Y, epochs=v, progress=False).predict(XS).mean,
        "count",
        False,
        (4, 3),
    ),
    (
        "SVI.fit",
        "batch_size",
        lambda v: SVI(MLP).fit(X, Y, epochs=1, batch_size=v, progress=False).predict(XS).mean,
        "count",
        True,
        (4, 3),
    ),
    (
        "SVI.fit",
        "lr",
        lambda v: SVI(MLP).fit(X, Y, epochs=1, lr=v * 1e-2, progress=False).predict(XS).mean,
        "positive",
        False,
        (4, 3),
    ),
    (
        "SVI.fit",
        "num_samples",
        lambda v: SVI(MLP).fit(X, Y, epochs=1, num_samples=v, progress=False).predict(XS).mean,
        "count",
        False,
        (4, 3),
    ),
    ("SVI.predict", "num_samples", lambda v: SVI_FIT.predict(XS, num_samples=v), "count", False, (4, 3)),
    (
        "Prediction.confidence_region",
        "z",
        lambda v: Prediction(torch.zeros(3), torch.ones(3)).confidence_region(v)[0],
        "positive",
        False,
        (3,),
    ),
]
for entry, arg, call, kind, none_ok, shape in NUMERIC:
    bad = dict(POSITIVE_BAD if kind == "positive" else COUNT_BAD)
    good = dict(POSITIVE_OK if kind == "positive" else COUNT_OK)
    if kind == "size":  # an integer >= 0
        bad.pop("0")
        good["0"] = 0
    if none_ok:
        bad.pop("None")
        good["None (the default)"] = None
    if arg == "lr":  # a string times 1e-2 fails in the test itself: pass the bad value unscaled

        def call(v):
            return SVI(MLP).fit(X, Y, epochs=1, lr=v, progress=False).predict(XS).mean

    for what, (value, exc) in bad.items():
        case(entry, f"{arg}={what}", lambda call=call, value=value: call(value), raises(exc, arg))
    for what, value in good.items():
        case(entry, f"{arg}={what}", lambda call=call, value=value: call(value), finite(shape))

# --- input tensors --------------------------------------------------------------------------------------------
INPUTS = [  # (entry, argument name, call(x) with x standing for X)
    ("ntk_operator", "x1", lambda x: ntk_operator(MLP, x)),
    ("ntk_operator", "x2", lambda x: ntk_operator(MLP, X, x)),
    ("gram_operator", "x", lambda x: gram_operator(MLP, x)),
    ("fisher_operator", "x", lambda x: fisher_operator(MLP, x)),
    ("JacobianKernel", "x1", lambda x: JacobianKernel(MLP)(x, X).to_dense()),
    ("NTKGP", "train_x", lambda x: NTKGP(MLP, x, Y)),
    ("NTKGP.predict", "x", lambda x: GP.predict(x)),
    ("Laplace.fit", "train_x", lambda x: Laplace(MLP, "classification").fit(x, LABELS)),
    ("Laplace.predict", "x", lambda x: LAPLACE.predict(x)),
    ("SVI.fit", "train_x", lambda x: SVI(MLP, "classification").fit(x, LABELS, epochs=1, progress=False)),
    ("SVI.predict", "x", lambda x: SVI_FIT.predict(x)),
    ("SVI.elbo", "x", lambda x: SVI(MLP).elbo(x, Y)),
]
for entry, arg, call in INPUTS:
    for what, value, exc, pattern in bad_inputs(X):
        if entry == "SVI.fit" and what == "on the meta device":
            continue  # SVI moves tensor data to the network's device (documented); meta tensors cannot be moved back
        if entry == "JacobianKernel" and what == "0-d":
            pattern = r"x1 must have shape \(n, d\)"
        if what in ("a list", "a NumPy array") and entry == "SVI.fit":
            pattern = "train_x must be a torch.Tensor"
        case(entry, f"{arg}: {what}", lambda call=call, value=value: call(value), raises(exc, pattern))
for entry, call in [
    ("NTKGP.predict", lambda x: GP.predict(x)),
    ("Laplace.predict", lambda x: LAPLACE.predict(x)),
    ("SVI.predict", lambda x: SVI_FIT.predict(x)),
    ("ntk_operator", lambda x: ntk_operator(MLP, X, x)),
]:
    case(
        entry,
        "x of another per-input shape",
        lambda call=call: call(torch.randn(4, 4)),
        raises(ValueError, r"per-input shape \(4,\)"),
    )

# --- targets --------------------------------------------------------------------------------------------------
TARGETS_BAD = [
    ("a list", Y.tolist(), TypeError, "train_y must be a torch.Tensor"),
    ("a NumPy array", Y.numpy(), TypeError, "train_y must be a torch.Tensor"),
    ("integer dtype", Y.long(), TypeError, "regression targets must be floating"),
    ("6 rows for 7 inputs", Y[:6], ValueError, "7 inputs but train_y has 6 rows"),
    ("2 outputs for 3", Y[:, :2], ValueError, r"3 output\(s\)"),
    ("NaN", Y.clone().fill_(math.nan), ValueError, "train_y contains NaN"),
]
LABELS_BAD = [
    ("floats", LABELS.double(), TypeError, "integer class indices"),
    ("one-hot", nn.functional.one_hot(LABELS), ValueError, r"shape \(n,\)"),
    ("out of range", LABELS + 5, ValueError, r"labels must lie in \[0, 3\)"),
    ("negative", LABELS - 1, ValueError, "labels must lie in"),
    ("6 for 7 inputs", LABELS[:6], ValueError, "7 inputs but train_y has 6 labels"),
    ("a list", LABELS.tolist(), TypeError, "train_y must be a torch.Tensor"),
]
for entry, call in [
    ("NTKGP", lambda y: NTKGP(MLP, X, y)),
    ("Laplace.fit", lambda y: Laplace(MLP).fit(X, y)),
    ("SVI.fit", lambda y: SVI(MLP).fit(X, y, epochs=1, progress=False)),
    ("SVI.elbo", lambda y: SVI(MLP).elbo(X, y)),
]:
    for what, value, exc, pattern in TARGETS_BAD:
        case(entry, f"train_y: {what}", lambda call=call, value=value: call(value), raises(exc, pattern))
for entry, call in [
    ("Laplace.fit", lambda y: Laplace(MLP, "classification").fit(X, y)),
    ("SVI.fit", lambda y: SVI(MLP, "classification").fit(X, y, epochs=1, progress=False)),
]:
    for what, value, exc, pattern in LABELS_BAD:
        case(entry, f"labels: {what}", lambda call=call, value=value: call(value), raises(exc, pattern))

# --- choices (strings) ----------------------------------------------------------------------------------------
CHOICES = [
    ("NTKGP", "space", lambda v: NTKGP(MLP, X, Y, space=v)),
    ("NTKGP", "mean", lambda v: NTKGP(MLP, X, Y, mean=v)),
    ("fisher_operator", "method", lambda v: fisher_operator(MLP, X, method=v)),
    ("fisher_operator", "likelihood", lambda v: fisher_operator(MLP, X, likelihood=v)),
    ("Laplace", "likelihood", lambda v: Laplace(MLP, likelihood=v)),
    ("Laplace", "hessian", lambda v: Laplace(MLP, hessian=v)),
    ("Laplace.predict", "link", lambda v: LAPLACE.predict(XS, link=v)),
    ("SVI", "likelihood", lambda v: SVI(MLP, likelihood=v)),
    ("Solver", "method", lambda v: Solver(v)),
]
for entry, arg, call in CHOICES:
    for what, value in [("an unknown name", "bogus"), ("an int", 3), ("None", None), ("a list", ["function"])]:
        pattern = "likelihood" if arg == "likelihood" and entry == "fisher_operator" else arg
        case(entry, f"{arg}={what}", lambda call=call, value=value: call(value), raises(ValueError, pattern))
for what, value in [("'cholesky'", "cholesky"), ("'cg'", "cg"), ("a Solver", Solver("auto"))]:
    case(
        "NTKGP",
        f"solver={what}",
        lambda value=value: NTKGP(MLP, X, Y, noise=0.1, solver=value).predict(XS).mean,
        finite((4, 3)),
    )
for what, value, exc in [("'qr'", "qr", ValueError), ("an int", 3, TypeError), ("a dict", {"method": "cg"}, TypeError)]:
    case("NTKGP", f"solver={what}", lambda value=value: NTKGP(MLP, X, Y, solver=value), raises(exc, "solver"))
for what, value in [("'cholesky'", "cholesky"), ("'cg'", "cg"), ("a Solver", Solver("cg", lanczos_rank=P))]:
    case(
        "Laplace",
        f"solver={what}",
        lambda value=value: Laplace(MLP, solver=value, progress=False).fit(X, Y).predict(XS).mean,
        finite((4, 3)),
    )
for what, value, exc in [("'qr'", "qr", ValueError), ("an int", 3, TypeError)]:
    case("Laplace", f"solver={what}", lambda value=value: Laplace(MLP, solver=value), raises(exc, "solver"))
for entry, call in [
    ("NTKGP.predict", lambda: GP.predict(XS, observation_noise="yes")),
    ("Laplace.fit", lambda: Laplace(MLP).fit(X, Y, find_map="no")),
    ("Laplace", lambda: Laplace(MLP, progress="no")),
]:
    case(entry, "a flag given as a string", call, raises(TypeError, "must be True or False"))
for entry, call in [
    ("Laplace.predict", lambda g: LAPLACE.predict(XS, link="mc", generator=g)),
    ("Laplace.sample", lambda g: LAPLACE.sample(2, generator=g)),
    ("SVI.fit", lambda g: SVI(MLP).fit(X, Y, epochs=1, progress=False, generator=g)),
]:
    case(
        entry,
        "generator=an int seed",
        lambda call=call: call(0),
        raises(TypeError, "generator must be a torch.Generator"),
    )

# --- the functional layer -------------------------------------------------------------------------------------
FUNCTIONAL = [
    (
        "jvp",
        "tangents of size p + 1",
        lambda: NET.jvp(X, torch.randn(2, P + 1)),
        ValueError,
        r"tangents must have shape \(k, 59\)",
    ),
    ("jvp", "tangents as one vector (p,)", lambda: NET.jvp(X, torch.randn(P)), ValueError, "tangents must have shape"),
    (
        "jvp",
        "tangents as a list",
        lambda: NET.jvp(X, torch.randn(2, P).tolist()),
        TypeError,
        "tangents must be a torch.Tensor",
    ),
    (
        "jvp",
        "float32 tangents",
        lambda: NET.jvp(X, torch.randn(2, P).float()),
        TypeError,
        "tangents has dtype torch.float32",
    ),
    (
        "vjp",
        "cotangents for 6 inputs",
        lambda: NET.vjp(X, torch.randn(2, 6, 3)),
        ValueError,
        r"cotangents must have shape \(k, 7, 3\)",
    ),
    (
        "vjp",
        "cotangents (n, C) without k",
        lambda: NET.vjp(X, torch.randn(7, 3)),
        ValueError,
        "cotangents must have shape",
    ),
    (
        "vjp",
        "cotangents as a NumPy array",
        lambda: NET.vjp(X, np.zeros((1, 7, 3))),
        TypeError,
        "cotangents must be a torch.Tensor",
    ),
    (
        "unflatten",
        "theta of size p − 1",
        lambda: NET.unflatten(torch.randn(P - 1)),
        ValueError,
        r"theta must have shape \(59,\)",
    ),
    ("unflatten", "theta (1, p)", lambda: NET.unflatten(torch.randn(1, P)), ValueError, "theta must have shape"),
    ("__call__", "theta of size p + 3", lambda: NET(X, torch.randn(P + 3)), ValueError, "theta must have shape"),
    ("__call__", "theta as a list", lambda: NET(X, torch.randn(P).tolist()), TypeError, "theta must be a torch.Tensor"),
    (
        "output_gradients",
        "thetas (p,)",
        lambda: NET.output_gradients(X, lambda f: f.sum(), torch.randn(P)),
        ValueError,
        "thetas must have shape",
    ),
]
for method, what, call, exc, pattern in FUNCTIONAL:
    case(f"FunctionalNetwork.{method}", what, call, raises(exc, pattern))
case("FunctionalNetwork.jvp", "zero tangents (0, p)", lambda: NET.jvp(X, torch.randn(0, P)), finite((0, 7, 3)))
case("FunctionalNetwork.vjp", "zero cotangents (0, n, C)", lambda: NET.vjp(X, torch.randn(0, 7, 3)), finite((0, P)))
case("FunctionalNetwork.to", "float32 and back", lambda: NET.float().double()(X), finite((7, 3)))

# --- operators: products, indexing, batches -------------------------------------------------------------------
for what, call, exc, pattern in [
    ("K[100, 0] on a 21 × 21 operator", lambda: K[100, 0], IndexError, "index 100 is out of range"),
    ("K[0, -22]", lambda: K[0, -22], IndexError, "index -22 is out of range"),
    ("K[tensor([0, 50])]", lambda: K[torch.tensor([0, 50])], IndexError, "index 50 is out of range"),
    ("K[5:5] (selects nothing)", lambda: K[5:5], IndexError, "selects nothing"),
    ("K[0, 0, 0] (too many indices)", lambda: K[0, 0, 0], IndexError, "too many indices"),
    ("K @ a vector of the wrong length", lambda: K @ torch.randn(20), RuntimeError, "[Ss]ize|dimension|shape"),
    ("K @ a float32 vector", lambda: K @ torch.randn(21).float(), TypeError, "right-hand side has dtype torch.float32"),
    ("K.expand(2, 4, 5)", lambda: K.expand(2, 4, 5), RuntimeError, "Invalid expand arguments"),
    (
        "K.diagonal() of a 21 × 12 cross-kernel",
        lambda: ntk_operator(MLP, X, XS).diagonal(),
        RuntimeError,
        "square operators",
    ),
    (
        "at as a list",
        lambda: fisher_operator(MLP, X, "categorical", at=torch.randn(7, 3).tolist()),
        TypeError,
        "at must be a torch.Tensor",
    ),
    (
        "at of shape (7, 2)",
        lambda: fisher_operator(MLP, X, "categorical", at=torch.randn(7, 2)),
        ValueError,
        r"at must hold the outputs \(n, C\)",
    ),
    (
        "at with NaN",
        lambda: fisher_operator(MLP, X, "categorical", at=torch.full((7, 3), math.nan)),
        FloatingPointError,
        "at is not finite",
    ),
    (
        "epsilon = 1e-30 (the step underflows)",
        lambda: fisher_operator(MLP, X, epsilon=1e-30),
        ValueError,
        "epsilon = 1e-30 is too small",
    ),
    (
        "NTKOperator with a module as network",
        lambda: NTKOperator(X, X, network=MLP, num_outputs=3),
        TypeError,
        "network must be a FunctionalNetwork",
    ),
    ("NetworkMean with a string", lambda: NetworkMean("mlp"), TypeError, "network must be an nn.Module or a"),
]:
    case("operators", what, call, raises(exc, pattern))
for what, call, shape in [
    ("K[0, 0]", lambda: K[0, 0], ()),
    ("K[..., 3]", lambda: K[..., 3], (21,)),
    ("K[-1]", lambda: K[-1], (21,)),
    ("K.expand(3, 21, 21) @ v", lambda: K.expand(3, 21, 21) @ torch.randn(21, 2), (3, 21, 2)),
    ("K.unsqueeze(0).to_dense()", lambda: K.unsqueeze(0).to_dense(), (1, 21, 21)),
    ("K + a batch of dense matrices", lambda: (K + torch.eye(21).expand(2, 21, 21)).to_dense(), (2, 21, 21)),
    ("K.reshape(-1, 21, 21)", lambda: K.reshape(-1, 21, 21).to_dense(), (1, 21, 21)),
    ("K @ an empty rhs (21, 0)", lambda: K @ torch.randn(21, 0), (21, 0)),
    ("K.double() on a float64 operator", lambda: K.double().to_dense(), (21, 21)),
    (
        "fisher_operator at=MAP outputs",
        lambda: fisher_operator(MLP, X, "categorical", at=torch.randn(7, 3)).diagonal(),
        (P,),
    ),
]:
    case("operators", what, call, finite(shape, lambda r: r.to_dense() if hasattr(r, "to_dense") else r))

# --- kernels and input shapes ---------------------------------------------------------------------------------
for what, call, exc, pattern in [
    (
        "x1 with 3 features, x2 with 4",
        lambda: JacobianKernel(MLP)(X, torch.randn(4, 4)).to_dense(),
        ValueError,
        "x1 has 3 features per input but x2 has 4",
    ),
    (
        "input_shape (1, 3, 3) for 3 features",
        lambda: JacobianKernel(MLP, input_shape=(1, 3, 3))(X).to_dense(),
        ValueError,
        r"input_shape \(1, 3, 3\) holds 9",
    ),
    ("input_shape 'abc'", lambda: JacobianKernel(MLP, input_shape="abc"), TypeError, "input_shape must be a sequence"),
    ("input_shape (0,)", lambda: JacobianKernel(MLP, input_shape=(0,)), ValueError, "input_shape entries"),
    ("input_shape (2.5,)", lambda: JacobianKernel(MLP, input_shape=(2.5,)), TypeError, "input_shape entries"),
]:
    case("JacobianKernel", what, call, raises(exc, pattern))
case(
    "JacobianKernel",
    "batched inputs (2, 7, 3)",
    lambda: JacobianKernel(MLP)(X.expand(2, 7, 3)).to_dense(),
    finite((2, 21, 21)),
)
case(
    "JacobianKernel",
    "input_shape=3 (an int)",
    lambda: JacobianKernel(MLP, input_shape=3)(X).to_dense(),
    finite((21, 21)),
)

# --- posteriors: state, grids, data loaders -------------------------------------------------------------------
for what, call in [
    ("mean", lambda: Laplace(MLP).mean),
    ("predict", lambda: Laplace(MLP).predict(XS)),
    ("sample", lambda: Laplace(MLP).sample(2)),
    ("covariance", lambda: Laplace(MLP).covariance),
]:
    case("Laplace", f"{what} before fit", call, raises(RuntimeError, r"call .fit\(train_x, train_y\) first"))
for what, value, exc in [
    ("[]", [], ValueError),
    ("[1, inf]", [1.0, math.inf], ValueError),
    ("[-1, 1]", [-1.0, 1.0], ValueError),
    ("'abc'", "abc", TypeError),
    ("[[1, 2]]", [[1.0, 2.0]], ValueError),
    ("[0]", [0.0], ValueError),
]:
    case(
        "Laplace.optimize_prior_precision",
        f"grid={what}",
        lambda value=value: Laplace(MLP).fit(X, Y).optimize_prior_precision(value, progress=False),
        raises(exc, "grid"),
    )
case(
    "Laplace.optimize_prior_precision",
    "grid=[0.1, 1.0] (a list)",
    lambda: torch.tensor(Laplace(MLP).fit(X, Y).optimize_prior_precision([0.1, 1.0], progress=False)),
    finite(()),
)
for what, loader, pattern in [
    ("a DataLoader of inputs only", DataLoader(TensorDataset(X), batch_size=2), "batches are list of length 1"),
    ("a DataLoader of bare tensors", DataLoader(X, batch_size=2), "batches are Tensor"),
    (
        "a DataLoader of (x, y, w) triples",
        DataLoader(TensorDataset(X, Y, Y), batch_size=3),
        "batches are list of length 3",
    ),
]:
    case(
        "SVI.fit",
        what,
        lambda loader=loader: SVI(MLP).fit(loader, epochs=1, progress=False),
        raises(TypeError, pattern),
    )
case(
    "SVI.fit",
    "a list of inputs",
    lambda: SVI(MLP).fit(X.tolist(), Y, epochs=1, progress=False),
    raises(TypeError, "train_x must be a torch.Tensor"),
)
case(
    "SVI.fit",
    "a DataLoader of (x, y)",
    lambda: SVI(MLP).fit(DataLoader(TensorDataset(X, Y), batch_size=3), epochs=1, progress=False).predict(XS).mean,
    finite((4, 3)),
)
case(
    "SVI.fit",
    "lr = 1e8 (diverges)",
    lambda: SVI(MLP, "classification").fit(X, LABELS, epochs=5, lr=1e8, progress=False),
    raises(FloatingPointError, "SVI diverged .* lower the learning rate"),
)
case(
    "SVI.elbo",
    "classification",
    lambda: SVI(MLP, "classification").elbo(X, LABELS),
    raises(NotImplementedError, "exact ELBO is available for regression"),
)

# --- non-finite values inside the computation -----------------------------------------------------------------
RELU32 = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 3)).float().eval()
HUGE = X.float() * 1e30  # finite inputs whose Jacobian products overflow float32
for entry, call, pattern in [
    (
        "ntk_operator",
        lambda: ntk_operator(RELU32, HUGE) @ torch.randn(21, dtype=torch.float32),
        "Jacobian-vector product J\\(x\\)v is not finite",
    ),
    ("NTKGP.predict", lambda: NTKGP(RELU32, HUGE, Y.float()).predict(HUGE), "is not finite"),
    ("Laplace.fit", lambda: Laplace(RELU32, "classification").fit(HUGE, LABELS), "is not finite"),
    ("SVI.predict", lambda: SVI(RELU32, "classification").predict(HUGE), "is not finite"),
    (
        "fisher_operator",
        lambda: fisher_operator(RELU32, HUGE * 1e-10, "categorical").to_dense(),
        "finite-difference Fisher product .* is not finite",
    ),
    ("JacobianKernel", lambda: JacobianKernel(RELU32)(HUGE).to_dense(), "is not finite"),
]:
    case(entry, "inputs of 1e30 into a float32 ReLU network", call, raises(FloatingPointError, pattern))
SATURATED = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 3)).float().eval()
with torch.no_grad():
    SATURATED[2].weight.mul_(1e4)  # logits up to 5e3: softmax saturated
case(
    "fisher_operator",
    "saturated logits under a finite-difference step",
    lambda: fisher_operator(SATURATED, X.float(), "categorical") @ torch.randn(59, dtype=torch.float32),
    raises(FloatingPointError, "finite-difference Fisher product .* not finite.*saturated logits.*method='exact'"),
)

# --- degenerate but legal data --------------------------------------------------------------------------------
REPEATED = X[:1].repeat(12, 1)
for space in ("function", "parameter"):
    case(
        "NTKGP.fit",
        f"12 copies of one input, noise 1e-12 fixed ({space} space)",
        lambda space=space: NTKGP(MLP, REPEATED, torch.randn(12, 3), noise=1e-12, space=space).fit().predict(XS).mean,
        finite((4, 3)),
    )
case("NTKGP.fit", "targets all equal", lambda: NTKGP(MLP, X, torch.ones(7, 3)).fit().predict(XS).mean, finite((4, 3)))
case("NTKGP", "a single training input", lambda: NTKGP(MLP, X[:1], Y[:1]).fit().predict(XS).mean, finite((4, 3)))

# --- half precision, integer outputs, an input_shape the network refuses --------------------------------------
HALF = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).half().eval()
for entry, call in [
    ("NTKGP.fit", lambda: NTKGP(HALF, X.half(), Y[:, 0].half()).fit()),
    ("Laplace", lambda: Laplace(HALF).fit(X.half(), Y[:, :1].half())),
    ("ntk_operator", lambda: ntk_operator(HALF, X.half()).diagonal()),
    ("FunctionalNetwork.to", lambda: FunctionalNetwork(MLP).to(torch.bfloat16)),
]:
    case(entry, "a half-precision network", call, raises(TypeError, "half precision is not supported"))


class _Argmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 4)

    def forward(self, x):
        return self.layer(x).argmax(-1, keepdim=True)


for entry, call in [
    ("NTKGP", lambda: NTKGP(_Argmax().eval(), X, Y[:, 0], noise=0.1).predict(XS)),
    ("ntk_operator", lambda: ntk_operator(_Argmax().eval(), X).diagonal()),
    ("Laplace", lambda: Laplace(_Argmax().eval()).fit(X, Y[:, :1])),
]:
    case(
        entry,
        "a network returning integer outputs (argmax)",
        call,
        raises(TypeError, "the network returned torch.int64 outputs: ntkgp linearises floating outputs"),
    )
CNN = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 1)).eval()
case(
    "JacobianKernel",
    "input_shape=64 for a CNN",
    lambda: JacobianKernel(CNN, input_shape=64),
    raises(ValueError, r"input_shape \(64,\) does not fit the network.*conv2d"),
)
case(
    "JacobianKernel",
    "input_shape=(1, 8, 8) for a CNN",
    lambda: JacobianKernel(CNN, input_shape=(1, 8, 8))(torch.randn(3, 64)).to_dense(),
    finite((3, 3)),
)


def _train_after_build():
    model, x, _ = make_case("cnn_batchnorm")
    gp = NTKGP(model, x, torch.randn(7, 2), noise=0.1)
    model.train()
    return gp.predict(x)


case("NTKGP.predict", "model.train() after the GP was built", _train_after_build, raises(ValueError, "train mode"))


@pytest.mark.parametrize("call,expect", CASES)
def test_malformed_call(call, expect):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # warnings are allowed; what is asserted is the error or the result
        if expect[0] == "raises":
            _, exc, pattern = expect
            with pytest.raises(exc, match=pattern):
                call()
            return
        _, shape, get = expect
        result = get(call())
    result = torch.as_tensor(result)
    assert torch.isfinite(result).all()
    if shape is not None:
        assert tuple(result.shape) == tuple(shape)


def test_the_table_is_large():
    assert len(CASES) >= 400, len(CASES)
