"""Accuracy of finite-difference Fisher-vector products across ε (the supplement's Figure A.1 protocol).

A small CNN (ReLU and max-pooling, or ``--set activation=silu``: SiLU and average pooling) is trained on
Fashion-MNIST (``NTKGP_DATA``); at several stages of training the relative
error ‖F v_FD(ε) − F v_exact‖ / ‖F v_exact‖ is measured for ε from 1e-6 to 1 and for the default ε, in
float32 and float64, for the categorical and the Gaussian likelihood, with the forward difference (the
paper's, one gradient) and the central difference (two gradients). The reference is the exact
product (JVP, H, VJP) in float64. The vectors v are the gradient of the training loss on the batch
(the supplement's F ∇) and random Gaussian directions.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ntkgp import fisher_operator
from ntkgp.progress import progress_bar

from .common import Experiment, atomic_path, begin, format_table, save_figure_atomic, write_json_atomic
from .datasets import load_fashion_mnist

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU}


def make_cnn(activation: str = "relu") -> nn.Sequential:
    """Two conv layers and a linear head, 5,994 parameters: ReLU and max-pooling (kinks), or SiLU and
    average pooling (smooth)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    act, pool = ACTIVATIONS[activation], nn.MaxPool2d if activation == "relu" else nn.AvgPool2d
    return nn.Sequential(
        nn.Conv2d(1, 8, 5), act(), pool(2), nn.Conv2d(8, 16, 5), act(), pool(2), nn.Flatten(), nn.Linear(256, 10)
    )


def probe_vectors(model: nn.Module, x: torch.Tensor, y: torch.Tensor, count: int) -> torch.Tensor:
    """(p, 1 + count): the loss gradient on (x, y) and ``count`` random directions, float64."""
    loss = nn.functional.cross_entropy(model(x), y)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    random = torch.randn(grad.numel(), count, dtype=torch.float64, device=grad.device)
    return torch.cat([grad.double().unsqueeze(-1), random], dim=-1)


def measure(model: nn.Module, x: torch.Tensor, vectors: torch.Tensor, config: dict) -> list[dict]:
    """Relative errors of FD products for every likelihood, method, dtype and ε (None = the default ε)."""
    rows = []
    model64 = copy.deepcopy(model).double().eval()
    for likelihood in config["likelihoods"]:
        exact = fisher_operator(model64, x.double(), likelihood, method="exact") @ vectors
        for method in config["methods"]:
            for dtype in (torch.float32, torch.float64):
                net, inputs = copy.deepcopy(model).to(dtype).eval(), x.to(dtype)
                for eps in [*config["epsilons"], None]:
                    op = fisher_operator(net, inputs, likelihood, method, epsilon=eps)
                    approx = (op @ vectors.to(dtype)).double()
                    err = ((approx - exact).norm(dim=0) / exact.norm(dim=0)).tolist()
                    rows.append(
                        {
                            "likelihood": likelihood,
                            "method": method,
                            "dtype": str(dtype).replace("torch.", ""),
                            "epsilon": op.epsilon,
                            "default_epsilon": eps is None,
                            "error_gradient_direction": err[0],
                            "error_random_mean": float(np.mean(err[1:])),
                            "error_max": max(err),
                        }
                    )
    return rows


def plot(rows: list[dict], path: Path, activation: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    likelihoods = sorted({r["likelihood"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    columns = [(lk, dt) for lk in likelihoods for dt in ("float32", "float64")]
    fig, axes = plt.subplots(
        len(methods), len(columns), figsize=(4.2 * len(columns), 3.4 * len(methods)), squeeze=False, sharey=True
    )
    for ax, (method, (likelihood, dtype)) in zip(axes.flat, [(m, c) for m in methods for c in columns]):
        for stage in sorted({r["stage"] for r in rows}):
            sel = [
                r
                for r in rows
                if r["likelihood"] == likelihood
                and r["dtype"] == dtype
                and r["stage"] == stage
                and r["method"] == method
            ]
            grid = [r for r in sel if not r["default_epsilon"]]
            line = ax.loglog(
                [r["epsilon"] for r in grid], [r["error_max"] for r in grid], "o-", ms=3, label=f"epoch {stage}"
            )
            default = [r for r in sel if r["default_epsilon"]]
            ax.loglog([default[0]["epsilon"]], [default[0]["error_max"]], "*", ms=10, color=line[0].get_color())
        ax.axhline(1e-2, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{method.replace('_', ' ')}, {likelihood}, {dtype}", fontsize=9)
        ax.set_xlabel("ε (step along v/‖v‖)")
    for ax in axes[:, 0]:
        ax.set_ylabel("relative error (max over v)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"finite-difference Fisher-vector products vs exact, {activation} CNN (★ = default ε)", fontsize=10)
    save_figure_atomic(fig, path, dpi=110)


def run(config: dict, out_dir: Path, device: str = "cpu", seed: int = 0) -> dict:
    """Train the CNN, measure FD errors at each stage; writes results.json (per stage) and errors.png.

    After each stage the network, its optimizer and the random state go to ``checkpoint.pt`` (atomically, with the
    configuration and seed): a rerun of the same configuration and seed continues from the last finished stage and
    ends with the rows an uninterrupted run gives."""
    path, payload, start = begin(config, out_dir, device, seed, rows=[])
    images, labels = load_fashion_mnist(train=True)
    order = torch.randperm(len(images))[: config["train_size"]]
    images, labels = images[order].to(device), labels[order].to(device)
    probe_x, probe_y = images[: config["probe_size"]], labels[: config["probe_size"]]
    model = make_cnn(config["activation"]).to(device=device, dtype=torch.float32)  # float32 whatever the default
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    rows, epoch, resumed = payload["rows"], 0, False
    checkpoint = out_dir / "checkpoint.pt"
    finished = sorted({r["stage"] for r in rows})
    if finished and checkpoint.exists():
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        if saved["config"] == config and saved["seed"] == seed and saved["epoch"] == finished[-1]:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            torch.set_rng_state(saved["rng"])
            epoch, resumed = saved["epoch"], True
    if not resumed:  # nothing to continue from: start over
        rows.clear()
    for stage in progress_bar([s for s in config["stages"] if s > epoch or not resumed], desc="fisher-accuracy"):
        while epoch < stage:
            for batch in torch.randperm(len(images), device=device).split(config["batch_size"]):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
                optimizer.step()
            epoch += 1
        model.eval()
        with torch.no_grad():
            accuracy = float((model(probe_x).argmax(-1) == probe_y).float().mean())
        vectors = probe_vectors(model, probe_x, probe_y, config["random_vectors"])
        for row in measure(model, probe_x, vectors, config):
            rows.append({"stage": stage, "train_accuracy": accuracy, **row})
        model.train()
        state = {"config": config, "seed": seed, "epoch": epoch, "rng": torch.get_rng_state()}
        with atomic_path(checkpoint) as tmp:
            torch.save({**state, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp)
        payload["seconds_this_run"] = time.perf_counter() - start
        write_json_atomic(path, payload)
    plot(rows, out_dir / "errors.png", config["activation"])
    table = [
        [
            r["stage"],
            r["likelihood"],
            r["method"],
            r["dtype"],
            "default" if r["default_epsilon"] else "",
            f"{r['epsilon']:.1e}",
            f"{r['error_max']:.1e}",
            f"{r['error_gradient_direction']:.1e}",
        ]
        for r in rows
    ]
    print(format_table(["epoch", "likelihood", "method", "dtype", "", "ε", "max rel. error", "error on ∇L"], table))
    summary = {}
    for method in config["methods"]:
        window = [
            r
            for r in rows
            if r["dtype"] == "float32"
            and r["method"] == method
            and not r["default_epsilon"]
            and 1e-4 <= r["epsilon"] <= 1e-2
        ]
        summary[method] = max(r["error_max"] for r in window) if window else math.nan
        print(f"{method}, float32, ε in [1e-4, 1e-2]: worst relative error {summary[method]:.2e} (target < 1e-2)")
    print(f"results: {path}  figure: {out_dir / 'errors.png'}")
    return {"worst_float32_window": summary}


DEFAULT = {
    "activation": "relu",
    "train_size": 12000,
    "probe_size": 256,
    "batch_size": 128,
    "lr": 1e-3,
    "stages": [0, 1, 3, 6],
    "random_vectors": 3,
    "likelihoods": ["categorical", "gaussian"],
    "methods": ["finite_difference", "central_difference"],
    "epsilons": [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0],
}
TINY = {**DEFAULT, "train_size": 512, "probe_size": 32, "stages": [0, 1], "random_vectors": 1, "epsilons": [1e-4, 1e-2]}

EXPERIMENT = Experiment(
    name="fisher-accuracy",
    description="relative error of finite-difference Fisher-vector products across ε during training (Fig. A.1)",
    run=run,
    configs={"default": DEFAULT, "tiny": TINY},
)
