"""Transfer Bayesian optimisation with the NTK-GP of a network pretrained on related tasks (BoTorch).

The family (our choice): Branin on [0, 1]² (mapped to [−5, 10] × [0, 15]) with task parameters — an input shift
δ ~ U(−0.1, 0.1)² (of the unit square), an output scale a ~ U(0.5, 1.5) and an offset b ~ U(−10, 10):
f_τ(x) = a·branin(x + δ) + b, minimised. Related tasks share the landscape's shape (three basins, one valley)
but not its position or units, which is what a surrogate pretrained on other tasks can and cannot know. An MLP
(2 – 64 – 64 – 1, tanh) is pretrained on ``source_points`` evaluations of each of ``source_tasks`` source tasks
(pooled; targets standardised by the pooled mean and standard deviation, the network's output in those units).
On each of ``tasks`` new tasks × ``seeds`` seeds, starting from ``initial`` random points (the same for every
method), ``iterations`` rounds of:

- ``NTK-GP (ML)``: :class:`ntkgp.botorch.NTKGPModel` (network mean; output scale and noise by the marginal
  likelihood), qLogEI (q = 1) maximised by ``optimize_acqf``;
- ``NTK-GP (fixed)``: the same with output scale 1 and noise 1e-3 (in the network's units; targets are mapped to
  them with the source statistics, as the network was trained);
- ``SingleTaskGP``: BoTorch's default GP (Matérn 5/2, its default transforms, fitted by ``fit_gpytorch_mll``),
  qLogEI;
- ``fine-tuned network``: the pretrained network fine-tuned on the task's data (Adam, ``finetune_steps`` steps),
  its predicted minimiser among 2,000 random points (greedy);
- ``random search``.

Simple regret f(best so far) − min f (the minimum from a 400 × 400 grid refined by L-BFGS), mean ± standard error
over tasks × seeds, against iterations (figure ``regret.png``), at fixed budgets (table), and seconds per iteration.
Results are written per (method, task, seed) run.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import torch
from torch import nn

from .common import (
    Experiment,
    begin,
    format_table,
    mean_and_stderr,
    save_figure_atomic,
    seed_everything,
    write_json_atomic,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ntkgp.progress import progress_bar

METHODS = ("NTK-GP (ML)", "NTK-GP (fixed)", "SingleTaskGP", "fine-tuned network", "random search")


def branin(u: torch.Tensor) -> torch.Tensor:
    """Branin on the unit square (..., 2) -> (...)."""
    x1, x2 = 15 * u[..., 0] - 5, 15 * u[..., 1]
    return (
        (x2 - 5.1 / (4 * math.pi**2) * x1**2 + 5 / math.pi * x1 - 6) ** 2
        + 10 * (1 - 1 / (8 * math.pi)) * torch.cos(x1)
        + 10
    )


def sample_task(generator: torch.Generator) -> dict:
    draw = lambda *shape: torch.rand(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    return {"shift": (0.2 * draw(2) - 0.1).tolist(), "scale": float(0.5 + draw(1)), "offset": float(20 * draw(1) - 10)}


def objective(task: dict, x: torch.Tensor) -> torch.Tensor:
    return task["scale"] * branin(x + torch.tensor(task["shift"], dtype=x.dtype)) + task["offset"]


def task_minimum(task: dict) -> float:
    """min f_τ over the unit square: a 400 × 400 grid, then L-BFGS from its best point (clamped to the square)."""
    grid = torch.stack(torch.meshgrid(*(torch.linspace(0, 1, 400, dtype=torch.float64),) * 2, indexing="ij"), -1)
    values = objective(task, grid.reshape(-1, 2))
    x = grid.reshape(-1, 2)[values.argmin()].clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([x], max_iter=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = objective(task, x.clamp(0, 1))
        value.backward()
        return value

    optimizer.step(closure)
    return min(float(values.min()), float(objective(task, x.detach().clamp(0, 1))))


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)).double()


def pretrain(config: dict, seed: int) -> tuple[nn.Module, float, float, float]:
    """The MLP trained on the pooled source tasks; (model, target mean, target sd, seconds)."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for _ in range(config["source_tasks"]):
        task = sample_task(generator)
        x = torch.rand(config["source_points"], 2, generator=generator, dtype=torch.float64)
        xs.append(x)
        ys.append(objective(task, x))
    x, y = torch.cat(xs), torch.cat(ys)
    mean, std = float(y.mean()), float(y.std())
    torch.manual_seed(seed)
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=config["pretrain_lr"])
    target = ((y - mean) / std).unsqueeze(-1)
    for _ in range(config["pretrain_epochs"]):
        for rows in torch.randperm(len(x), generator=generator).split(256):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x[rows]), target[rows]).backward()
            optimizer.step()
    return model.eval(), mean, std, time.perf_counter() - start


def propose(
    method: str,
    model: nn.Module,
    stats: tuple[float, float],
    x: torch.Tensor,
    y: torch.Tensor,
    config: dict,
    generator: torch.Generator,
) -> torch.Tensor:
    """The next point (1, 2) of ``method`` given the task's data x (n, 2), y (n,) (values to minimise)."""
    from botorch.acquisition import qLogExpectedImprovement
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.optim import optimize_acqf
    from gpytorch.mlls import ExactMarginalLogLikelihood

    from ntkgp.botorch import NTKGPModel

    bounds = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    if method == "random search":
        return torch.rand(1, 2, generator=generator, dtype=torch.float64)
    mean, std = stats
    target = (-(y - mean) / std).unsqueeze(-1)  # maximise −f, in the network's units
    if method == "fine-tuned network":
        net = mlp()
        net.load_state_dict(model.state_dict())
        optimizer = torch.optim.Adam(net.parameters(), lr=config["finetune_lr"])
        for _ in range(config["finetune_steps"]):
            optimizer.zero_grad()
            nn.functional.mse_loss(-net(x), target).backward()
            optimizer.step()
        candidates = torch.rand(2000, 2, generator=generator, dtype=torch.float64)
        with torch.no_grad():
            return candidates[net(candidates)[:, 0].argmin()].unsqueeze(0)
    if method == "SingleTaskGP":
        gp = SingleTaskGP(x, -y.unsqueeze(-1))
        fit_gpytorch_mll(ExactMarginalLogLikelihood(gp.likelihood, gp))
        best = float((-y).max())
    else:
        negated = nn.Sequential(model, _Negate()).eval()  # the network predicts f; the GP models −f
        fixed = method == "NTK-GP (fixed)"
        gp = NTKGPModel(negated, x, target, outputscale=1.0 if fixed else None, noise=1e-3 if fixed else None)
        best = float(target.max())
    acq = qLogExpectedImprovement(gp, best_f=best)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optimize_acqf's restarts and BoTorch's input-scaling hints
        candidate, _ = optimize_acqf(
            acq,
            bounds=bounds,
            q=1,
            num_restarts=config["restarts"],
            raw_samples=config["raw_samples"],
            options={"maxiter": 50},
        )
    return candidate.detach()


class _Negate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -x


def bo_run(method: str, task: dict, model: nn.Module, stats: tuple[float, float], config: dict, seed: int) -> dict:
    # seeded by the job alone (optimize_acqf's raw samples draw from the global generator): a resumed run that skips
    # finished jobs gets the same numbers as an uninterrupted one
    seed_everything(seed)
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(config["initial"], 2, generator=generator, dtype=torch.float64)  # the same for every method
    y = objective(task, x)
    times = []
    for _ in range(config["iterations"]):
        start = time.perf_counter()
        new = propose(method, model, stats, x, y, config, generator).clamp(0, 1)
        times.append(time.perf_counter() - start)
        x, y = torch.cat([x, new]), torch.cat([y, objective(task, new)])
    best = torch.cummin(y, 0).values[config["initial"] - 1 :]
    return {"best": best.tolist(), "seconds_per_iteration": float(np.mean(times))}


def run(config: dict, out_dir: Path, device: str = "cpu", seed: int = 0) -> dict:
    path, payload, start = begin(config, out_dir, device, seed, runs=[])
    model, mean, std, pretrain_seconds = pretrain(config, seed)
    payload["pretrain_seconds"] = payload.get("pretrain_seconds", pretrain_seconds)
    generator = torch.Generator().manual_seed(10_000 + seed)
    tasks = [sample_task(generator) for _ in range(config["tasks"])]
    minima = [task_minimum(t) for t in tasks]
    done = {(r["method"], r["task"], r["seed"]) for r in payload["runs"]}
    jobs = [
        (m, t, s)
        for t in range(config["tasks"])
        for s in range(config["seeds"])
        for m in config["methods"]
        if (m, t, s) not in done
    ]
    for method, t, s in progress_bar(jobs, desc="transfer-bo"):
        result = bo_run(method, tasks[t], model, (mean, std), config, 100 * seed + 10 * t + s)
        regret = [b - minima[t] for b in result["best"]]
        payload["runs"].append(
            {
                "method": method,
                "task": t,
                "seed": s,
                "regret": regret,
                "seconds_per_iteration": result["seconds_per_iteration"],
            }
        )
        write_json_atomic(path, payload)
    payload["wall_seconds_this_run"] = time.perf_counter() - start
    write_json_atomic(path, payload)
    budgets = [b for b in config["budgets"] if b <= config["iterations"]]
    body = []
    for method in config["methods"]:
        runs = [r for r in payload["runs"] if r["method"] == method]
        cells = ["{:.3g} ± {:.2g}".format(*mean_and_stderr(r["regret"][b] for r in runs)) for b in budgets]
        body.append(
            [method, str(len(runs)), *cells, "{:.2f}".format(np.mean([r["seconds_per_iteration"] for r in runs]))]
        )
    print(
        f"Shifted and scaled Branin, {config['tasks']} new tasks × {config['seeds']} seeds, {config['initial']} "
        f"initial points; simple regret after n iterations (mean ± s.e.), seconds per iteration"
    )
    print(format_table(["method", "runs", *[f"n={b}" for b in budgets], "s / iteration"], body))
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in config["methods"]:
        runs = np.asarray([r["regret"] for r in payload["runs"] if r["method"] == method])
        if len(runs):
            m, e = runs.mean(0), runs.std(0, ddof=1) / math.sqrt(len(runs)) if len(runs) > 1 else 0 * runs[0]
            ax.plot(np.arange(runs.shape[1]), m, label=method)
            ax.fill_between(np.arange(runs.shape[1]), np.maximum(m - e, 1e-6), m + e, alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("simple regret")
    ax.set_title("Transfer BO on shifted, scaled Branin (mean ± s.e.)")
    ax.legend(fontsize=8)
    save_figure_atomic(fig, out_dir / "regret.png")
    print(
        f"results: {path}; figure: {out_dir / 'regret.png'}; pretraining {payload['pretrain_seconds']:.0f} s; "
        f"{payload['wall_seconds_this_run']:.0f} s this run"
    )
    return {"runs": len(payload["runs"])}


DEFAULT = {
    "source_tasks": 30,
    "source_points": 200,
    "pretrain_epochs": 100,
    "pretrain_lr": 3e-3,
    "tasks": 10,
    "seeds": 2,
    "initial": 2,
    "iterations": 15,
    "budgets": [0, 5, 10, 15],
    "methods": list(METHODS),
    "restarts": 2,
    "raw_samples": 32,
    "finetune_steps": 100,
    "finetune_lr": 1e-3,
}
TINY = {
    **DEFAULT,
    "source_tasks": 3,
    "source_points": 20,
    "pretrain_epochs": 2,
    "tasks": 2,
    "seeds": 1,
    "iterations": 2,
    "budgets": [0, 2],
    "restarts": 1,
    "raw_samples": 8,
    "finetune_steps": 2,
}

EXPERIMENT = Experiment(
    name="transfer-bo",
    description="Transfer BO: NTK-GP of a network pretrained on related tasks against SingleTaskGP and baselines",
    run=run,
    configs={
        "default": DEFAULT,
        "tiny": TINY,
        "paper": {
            **DEFAULT,
            "tasks": 20,
            "seeds": 5,
            "iterations": 40,
            "budgets": [0, 10, 20, 40],
            "restarts": 8,
            "raw_samples": 256,
        },
    },
)
