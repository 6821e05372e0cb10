"""Qualitative NTK-GP regression (the Fast Adaptation paper's Figure 3 and its supplement, Appendix E).

- ``clusters`` (Figure 3a): y = 0.1x² + |x| + ε, ε ~ N(0, 0.9²), ``points`` training inputs from N(±5, 0.8²) (half
  each side); an MLP (``hidden`` widths, tanh: the paper does not give this architecture) trained with SGD,
  momentum 0.9, lr 1e-4, 250 epochs (batches of ``batch_size``; the paper's recipe), then the NTK-GP of the trained
  network (function space, network mean, output scale and noise by the exact marginal likelihood).
- ``architectures`` (Figure 3b): y = sin(3x) + 1.5 sin(0.5x) + 0.8|x| − 4 + 0.1·N(0, 0.1²) on ``arch_points``
  inputs from the same mixture, three tanh MLPs of about 21k parameters — hidden widths [2110, 3, 2110],
  [10, 1000, 10], [100, 100, 100] — each fitted by full-batch Adam (lr ``arch_lr``, ``arch_steps`` steps: the paper
  does not say how), then its NTK-GP as above.

Two NTK-GPs per network: output scale and noise by the exact marginal likelihood ("ML"), and the noise fixed at the
generating variance with the output scale by the marginal likelihood ("known noise"). Reported per network: train
RMSE of the network and of the NTK-GP means, the hyperparameters, and the predictive standard deviation
(observation noise excluded) at the data (|x| = 5), in the gap between the clusters (x = 0) and away from the data
(|x| = 10): the claim is that the NTK-GP's variance grows away from the data, and that its shape depends on the
architecture. Figures ``clusters.png`` and ``architectures.png``; results written per network as they finish.
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib
import torch
from torch import nn

from ntkgp import NTKGP

from .common import Experiment, begin, format_table, save_figure_atomic, write_json_atomic

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NOISE_VARIANCE = {"clusters": 0.9**2, "architectures": (0.1 * 0.1) ** 2}  # of the generating processes
ARCHITECTURES = {
    "[2110, 3, 2110]": [2110, 3, 2110],
    "[10, 1000, 10]": [10, 1000, 10],
    "[100, 100, 100]": [100, 100, 100],
}


def tanh_mlp(hidden: list[int]) -> nn.Sequential:
    sizes = [1, *hidden, 1]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


def cluster_inputs(n: int, generator: torch.Generator) -> torch.Tensor:
    """n inputs (n, 1) from N(±5, 0.8²), half on each side."""
    sign = torch.where(torch.arange(n) % 2 == 0, -1.0, 1.0).double()
    return (5 * sign + 0.8 * torch.randn(n, generator=generator, dtype=torch.float64)).unsqueeze(-1)


def targets(task: str, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    if task == "clusters":
        return 0.1 * x**2 + x.abs() + 0.9 * noise
    return torch.sin(3 * x) + 1.5 * torch.sin(0.5 * x) + 0.8 * x.abs() - 4 + 0.1 * 0.1 * noise


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str, config: dict, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    model.train()
    if task == "clusters":
        optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
        for _ in range(config["epochs"]):
            for rows in torch.randperm(len(x), generator=generator).split(config["batch_size"]):
                optimizer.zero_grad()
                nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
                optimizer.step()
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=config["arch_lr"])
        for _ in range(config["arch_steps"]):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    model.eval()


def one_network(name: str, hidden: list[int], task: str, config: dict, seed: int) -> dict:
    """Train, fit the NTK-GP, and predict on the plotting grid."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    n = config["points"] if task == "clusters" else config["arch_points"]
    x = cluster_inputs(n, generator)
    y = targets(task, x, generator)
    torch.manual_seed(seed)
    model = tanh_mlp(hidden).double()
    train(model, x, y, task, config, seed)
    noise = NOISE_VARIANCE[task]
    gps = {
        "ML": NTKGP(model, x, y[:, 0], mean="network", progress=False).fit(),
        "known noise": NTKGP(model, x, y[:, 0], mean="network", noise=noise, progress=False).fit(),
    }
    grid = torch.linspace(-config["x_max"], config["x_max"], config["grid_points"], dtype=torch.float64).unsqueeze(-1)
    probes = torch.tensor([[-10.0], [-5.0], [0.0], [5.0], [10.0]], dtype=torch.float64)
    with torch.no_grad():
        network_rmse = float((model(x) - y).pow(2).mean().sqrt())
    row = {
        "name": name,
        "task": task,
        "params": sum(p.numel() for p in model.parameters()),
        "seed": seed,
        "network_train_rmse": network_rmse,
        "x": x[:, 0].tolist(),
        "y": y[:, 0].tolist(),
        "grid": grid[:, 0].tolist(),
        "network": _network_curve(model, grid),
    }
    for kind, gp in gps.items():
        pred, std = gp.predict(grid), gp.predict(probes).stddev.tolist()
        row[kind] = {
            "train_rmse": float((gp.predict(x).mean - y[:, 0]).pow(2).mean().sqrt()),
            "outputscale": gp.outputscale,
            "noise": gp.noise,
            "std_at_data": 0.5 * (std[1] + std[3]),
            "std_gap": std[2],
            "std_away": 0.5 * (std[0] + std[4]),
            "mean": pred.mean.tolist(),
            "std": pred.stddev.tolist(),
        }
    return {**row, "seconds": time.perf_counter() - start}


def _network_curve(model: nn.Module, grid: torch.Tensor) -> list[float]:
    with torch.no_grad():
        return model(grid)[:, 0].tolist()


def plot(rows: list[dict], task: str, path: Path) -> None:
    chosen = [r for r in rows if r["task"] == task]
    fig, axes = plt.subplots(1, len(chosen), figsize=(5 * len(chosen), 3.6), squeeze=False)
    for ax, r in zip(axes[0], chosen):
        grid = torch.tensor(r["grid"])
        for kind, color in (("known noise", "tab:blue"), ("ML", "tab:orange")):
            mean, std = torch.tensor(r[kind]["mean"]), torch.tensor(r[kind]["std"])
            ax.fill_between(
                grid, mean - 2 * std, mean + 2 * std, alpha=0.25, color=color, label=f"NTK-GP ({kind}) ± 2 sd"
            )
            ax.plot(grid, mean, color=color, lw=1)
        ax.plot(grid, r["network"], "--", lw=1, label="network")
        ax.scatter(r["x"], r["y"], s=4, color="k", label="data")
        ax.set_title(f"{r['name']} ({r['params']} parameters)", fontsize=9)
        ax.legend(fontsize=7)
    save_figure_atomic(fig, path)


def run(config: dict, out_dir: Path, device: str = "cpu", seed: int = 0) -> dict:
    path, payload, start = begin(config, out_dir, device, seed, rows=[])
    jobs = [("clusters", config["hidden"], "clusters")] + [
        (name, ARCHITECTURES[name], "architectures") for name in config["architectures"]
    ]
    done = {r["name"] for r in payload["rows"]}
    for name, hidden, task in jobs:
        if name not in done:
            print(f"{task}: {name}")
            payload["rows"].append(one_network(name, hidden, task, config, seed))
            write_json_atomic(path, payload)
    payload["wall_seconds_this_run"] = time.perf_counter() - start
    write_json_atomic(path, payload)
    plot(payload["rows"], "clusters", out_dir / "clusters.png")
    plot(payload["rows"], "architectures", out_dir / "architectures.png")
    body = [
        [
            r["name"],
            str(r["params"]),
            f"{r['network_train_rmse']:.3f}",
            kind,
            f"{g['train_rmse']:.3f}",
            f"{g['outputscale']:.3g}",
            f"{g['noise']:.3g}",
            f"{g['std_at_data']:.3f}",
            f"{g['std_gap']:.3f}",
            f"{g['std_away']:.3f}",
        ]
        for r in payload["rows"]
        for kind, g in (("ML", r["ML"]), ("known noise", r["known noise"]))
    ]
    print(
        "NTK-GP of each trained network: output scale and noise by the marginal likelihood (ML), or the noise "
        "fixed at the generating variance and the output scale by the marginal likelihood (known noise); "
        "predictive sd without observation noise"
    )
    print(
        format_table(
            [
                "network",
                "params",
                "train RMSE net",
                "NTK-GP",
                "train RMSE GP",
                "s²",
                "σ²",
                "sd at data (|x|=5)",
                "sd in the gap (x=0)",
                "sd away (|x|=10)",
            ],
            body,
        )
    )
    print(
        f"results: {path}; figures: {out_dir / 'clusters.png'}, {out_dir / 'architectures.png'}; "
        f"{payload['wall_seconds_this_run']:.0f} s this run"
    )
    return {"rows": len(payload["rows"])}


DEFAULT = {
    "points": 300,
    "hidden": [100, 100],
    "lr": 1e-4,
    "epochs": 250,
    "batch_size": 32,
    "arch_points": 150,
    "architectures": list(ARCHITECTURES),
    "arch_lr": 1e-3,
    "arch_steps": 2000,
    "x_max": 12.0,
    "grid_points": 241,
}
TINY = {
    **DEFAULT,
    "points": 20,
    "hidden": [8],
    "epochs": 2,
    "arch_points": 12,
    "architectures": ["[10, 1000, 10]"],
    "arch_steps": 5,
    "grid_points": 21,
}

EXPERIMENT = Experiment(
    name="qualitative-regression",
    description="Fast Adaptation Fig. 3 / supplement E: NTK-GP predictive bands, clusters and three architectures",
    run=run,
    configs={"default": DEFAULT, "tiny": TINY, "paper": {**DEFAULT, "arch_steps": 10000}},
)
