"""Few-shot sinusoid regression (Fast Adaptation with Linearized Neural Networks, supplement E and F.3).

Tasks y = A sin(w x + b) + ε with A ~ U(0.1, 5), w ~ U(0.5, 2), b ~ U(0, 2π), x ~ U(−5, 5),
ε ~ N(0, (0.01 A)²). An MLP 1-40-40-1 (tanh) is pretrained on one task; then, for each new task and
k support points, every method adapts and is scored on test points of the same task.

Methods: NTK-GP with the network as prior mean and with zero mean, each with hyperparameters learned
by marginal likelihood ("ML") and with the paper's fixed setting (outputscale 1, noise =
max(1e-3, pretraining MSE)), in function and parameter space; fine-tuning the whole network
(100 and 500 Adam steps); retraining the last layer (500 Adam steps); a Bayesian last layer
(Bayesian linear regression on the penultimate features with prior scale and noise by marginal
likelihood, ABLR-style: the NTK-GP of the last layer alone with zero mean). Point-estimate methods
get the predictive variance max(fixed noise, support MSE).
"""

from __future__ import annotations

import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ntkgp import NTKGP, LayerScaledNTKGP
from ntkgp.progress import progress_bar

from .common import Experiment, begin, format_table, mean_and_stderr, save_figure_atomic, write_json_atomic

Z95 = 1.959964


@dataclass(frozen=True)
class Task:
    amplitude: float
    frequency: float
    phase: float

    def __call__(self, x: Tensor) -> Tensor:
        return self.amplitude * torch.sin(self.frequency * x + self.phase)

    def sample(self, n: int, generator: torch.Generator, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """n points x ~ U(−5, 5) (n, 1) and noisy targets (n,)."""
        x = 10 * torch.rand(n, 1, generator=generator, dtype=dtype) - 5
        noise = 0.01 * self.amplitude * torch.randn(n, generator=generator, dtype=dtype)
        return x, self(x).squeeze(-1) + noise


def sample_task(generator: torch.Generator) -> Task:
    u = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
    return Task(0.1 + 4.9 * u[0], 0.5 + 1.5 * u[1], 2 * math.pi * u[2])


def make_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(1, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 1))


def adam(loss_fn, params: list[Tensor], steps: int, lr: float) -> None:
    """Full-batch Adam on ``loss_fn()`` over the leaf tensors ``params``."""
    optimizer = torch.optim.Adam(params, lr=lr, fused=True)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn().backward()
        optimizer.step()


def pretrain(seed: int, config: dict, dtype: torch.dtype, device: str) -> tuple[nn.Module, float]:
    """Pretrain the MLP on one task — full-batch Adam for ``pretrain_steps`` steps, or (``pretrain_batch_size`` set:
    the supplement's recipe) SGD with momentum ``pretrain_momentum`` on minibatches of that size for
    ``pretrain_epochs`` epochs —; returns (model in eval mode, training MSE)."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    torch.manual_seed(seed)
    task = sample_task(generator)
    x, y = task.sample(config["pretrain_points"], generator, dtype)
    model = make_mlp().to(dtype=dtype, device=device)
    x, y = x.to(device), y.to(device)
    loss = lambda rows=slice(None): (model(x[rows]).squeeze(-1) - y[rows]).square().mean()  # noqa: E731
    size = config["pretrain_batch_size"]
    if size is None:
        adam(loss, list(model.parameters()), config["pretrain_steps"], config["pretrain_lr"])
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=config["pretrain_lr"], momentum=config["pretrain_momentum"])
        for _ in range(config["pretrain_epochs"]):
            for rows in torch.randperm(len(x), generator=generator).to(device).split(size):
                optimizer.zero_grad()
                loss(rows).backward()
                optimizer.step()
    with torch.no_grad():
        return model.eval(), float(loss())


def gaussian_scores(mean: Tensor, var: Tensor, y: Tensor) -> dict[str, float]:
    """Test MSE, mean Gaussian NLL and 95%-interval coverage for predictive N(mean, var)."""
    var = var.clamp_min(1e-12)
    nll = 0.5 * (torch.log(2 * math.pi * var) + (y - mean).square() / var)
    inside = (y - mean).abs() <= Z95 * var.sqrt()
    return {
        "mse": float((y - mean).square().mean()),
        "nll": float(nll.mean()),
        "coverage": float(inside.double().mean()),
    }


def ntk_method(mean: str, space: str, learn: bool):
    def adapt(model, x, y, xs, fixed_noise):
        gp = NTKGP(model, x, y, space=space, mean=mean, noise=None if learn else fixed_noise, outputscale=1.0)
        if learn:
            gp.fit()
        pred = gp.predict(xs, observation_noise=True)
        return pred.mean, pred.variance

    return adapt


def layer_scaled(model, x, y, xs, fixed_noise):
    """NTK-GP with one kernel scale per layer and the noise, all by the exact marginal likelihood."""
    gp = LayerScaledNTKGP(model, x, y, mean="network").fit()
    pred = gp.predict(xs, observation_noise=True)
    return pred.mean, pred.variance


def bayesian_last_layer(model, x, y, xs, fixed_noise):
    last = [name for name, _ in model.named_children()][-1]
    gp = NTKGP(model, x, y, params=[last], space="parameter", mean="zero").fit()
    pred = gp.predict(xs, observation_noise=True)
    return pred.mean, pred.variance


def batched_mlp(layers: list[tuple[Tensor, Tensor]], x: Tensor) -> Tensor:
    """T copies of the tanh MLP at once: weights (T, out, in), biases (T, out); x (T, k, 1) -> (T, k)."""
    for i, (weight, bias) in enumerate(layers):
        x = torch.baddbmm(bias.unsqueeze(1), x, weight.mT)
        x = torch.tanh(x) if i < len(layers) - 1 else x
    return x.squeeze(-1)


def finetune_batched(
    model: nn.Module, x: Tensor, y: Tensor, xs: Tensor, steps: int, lr: float, last_layer_only: bool
) -> tuple[Tensor, Tensor]:
    """Fine-tune T copies of the MLP ``model`` on T tasks at once, each with its own Adam state.

    x (T, k, 1), y (T, k), xs (T, m, 1) -> test means (T, m) and final training MSEs (T,). The loss is
    the sum of per-task MSEs and Adam is elementwise, so each task gets exactly its own run.
    """
    linear = [m for m in model if isinstance(m, nn.Linear)]
    layers = [
        (
            m.weight.detach().expand(x.shape[0], *m.weight.shape).clone(),
            m.bias.detach().expand(x.shape[0], *m.bias.shape).clone(),
        )
        for m in linear
    ]
    trainable = [t.requires_grad_() for layer in (layers[-1:] if last_layer_only else layers) for t in layer]
    task_mse = lambda: (batched_mlp(layers, x) - y).square().mean(-1)  # noqa: E731
    adam(lambda: task_mse().sum(), trainable, steps, lr)
    with torch.no_grad():
        return batched_mlp(layers, xs), task_mse()


def point_method(steps: int, last_layer_only: bool, lr: float):
    """A point estimate with predictive variance max(fixed noise, support MSE), adapted on all tasks at once."""

    def adapt(model, x, y, xs, fixed_noise):
        mean, mse = finetune_batched(model, x, y, xs, steps, lr, last_layer_only)
        return mean, mse.clamp_min(fixed_noise).unsqueeze(-1).expand_as(mean)

    adapt.batched = True
    return adapt


def methods(config: dict) -> dict:
    table = {}
    for mean in ("network", "zero"):
        for learn in (True, False):
            for space in ("function", "parameter"):
                label = f"NTK-GP {mean} mean, {'ML' if learn else 'fixed'}, {space[:5]}."
                table[label] = ntk_method(mean, space, learn)
    table["NTK-GP network mean, layer-wise scales (ML)"] = layer_scaled
    table["Bayesian last layer (ML)"] = bayesian_last_layer
    for steps in config["finetune_steps"]:
        table[f"fine-tune all, {steps} steps"] = point_method(steps, False, config["finetune_lr"])
    table[f"retrain last layer, {config['last_layer_steps']} steps"] = point_method(
        config["last_layer_steps"], True, config["finetune_lr"]
    )
    return table


def summarise(rows: list[dict]) -> dict:
    """{shots: {method: {metric: [mean, stderr]}}} over all tasks and pretraining seeds."""
    summary: dict = {}
    for row in rows:
        summary.setdefault(str(row["shots"]), {}).setdefault(row["method"], []).append(row)
    return {
        k: {
            m: {metric: mean_and_stderr(r[metric] for r in rs) for metric in ("mse", "nll", "coverage", "time")}
            for m, rs in by_method.items()
        }
        for k, by_method in sorted(summary.items(), key=lambda i: int(i[0]))
    }


def print_tables(summary: dict) -> str:
    text = []
    for shots, by_method in summary.items():
        rows = [
            [
                m,
                *(f"{s[key][0]:.3g} ± {s[key][1]:.2g}" for key in ("mse", "nll", "coverage")),
                f"{1e3 * s['time'][0]:.1f} ± {1e3 * s['time'][1]:.1f}",
            ]
            for m, s in by_method.items()
        ]
        text.append(
            f"\n{shots}-shot (mean ± standard error over tasks × pretraining seeds)\n"
            + format_table(["method", "test MSE", "test NLL", "95% coverage", "time / task (ms)"], rows)
        )
    return "\n".join(text)


def plot_bands(examples: list[dict], path: Path) -> None:
    """Predictive mean ± 1.96 sd of a few methods on a few tasks, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(examples[0]["predictions"])  # (the examples come back from results.json as lists)
    fig, axes = plt.subplots(
        len(examples), len(labels), figsize=(3.2 * len(labels), 2.4 * len(examples)), squeeze=False, sharex=True
    )
    for row, example in zip(axes, examples):
        for ax, label in zip(row, labels):
            mean, var = (np.asarray(values) for values in example["predictions"][label])
            sd = np.sqrt(np.maximum(var, 0))
            ax.fill_between(example["grid"], mean - Z95 * sd, mean + Z95 * sd, alpha=0.3, label="95% band")
            ax.plot(example["grid"], example["truth"], "k--", lw=1, label="truth")
            ax.plot(example["grid"], mean, lw=1.5, label="mean")
            ax.scatter(example["x"], example["y"], c="r", s=14, zorder=3, label="support")
            ax.set_ylim(-6, 6)
            ax.set_title(f"{label}\n{example['shots']}-shot", fontsize=8)
    axes[0, 0].legend(fontsize=6, loc="lower left")
    save_figure_atomic(fig, path, dpi=110)


def adapt_all(adapt, model, x: Tensor, y: Tensor, xs: Tensor, fixed_noise: float) -> tuple[Tensor, Tensor, list]:
    """Run one method on T tasks: x (T, k, 1), y (T, k), xs (T, m, 1) -> means, variances (T, m), seconds per task.

    Batched methods adapt all tasks in one run and are charged the batch time divided by T.
    """
    if getattr(adapt, "batched", False):
        start = time.perf_counter()
        mean, var = adapt(model, x, y, xs, fixed_noise)
        return mean, var, [(time.perf_counter() - start) / x.shape[0]] * x.shape[0]
    means, variances, times = [], [], []
    for t in range(x.shape[0]):
        start = time.perf_counter()
        mean, var = adapt(model, x[t], y[t], xs[t], fixed_noise)
        times.append(time.perf_counter() - start)
        means.append(mean.detach())
        variances.append(var.detach())
    return torch.stack(means), torch.stack(variances), times


def evaluate(job: dict) -> dict:
    """All methods on all tasks of one pretraining seed and one number of shots: {"rows", "examples"}.

    A job runs in one thread (its timings are single-thread timings) and may run in a worker process.
    """
    torch.set_num_threads(1)
    config, device, dtype = job["config"], job["device"], torch.float64
    model = make_mlp().to(dtype=dtype, device=device)
    model.load_state_dict(job["state"])
    model.eval()
    generator = torch.Generator().manual_seed(job["task_seed"])
    tasks = [sample_task(generator) for _ in range(config["tasks"])]
    pools = [task.sample(max(config["shots"]), generator, dtype) for task in tasks]
    tests = [task.sample(config["test_points"], generator, dtype) for task in tasks]
    shots, num_plot = job["shots"], min(config["plot_tasks"], len(tasks)) if job["plot"] else 0
    x = torch.stack([pool[0][:shots] for pool in pools]).to(device)
    y = torch.stack([pool[1][:shots] for pool in pools]).to(device)
    test_x, test_y = torch.stack([t[0] for t in tests]).to(device), torch.stack([t[1] for t in tests])
    grid = torch.linspace(-5, 5, 200, dtype=dtype, device=device).reshape(1, -1, 1)
    rows, predictions = [], {}
    # untimed warm-up: torch.func and GPyTorch pay a one-off cost on their first call in a process
    ntk_method("network", "function", True)(model, x[0], y[0], test_x[0], job["fixed_noise"])
    finetune_batched(model, x[:1], y[:1], test_x[:1], 1, config["finetune_lr"], False)
    for label, adapt in methods(config).items():
        torch.manual_seed(job["task_seed"] + shots)
        mean, var, times = adapt_all(adapt, model, x, y, test_x, job["fixed_noise"])
        rows += [
            {
                "pretrain_seed": job["pretrain_seed"],
                "task": t,
                "shots": shots,
                "method": label,
                "time": times[t],
                **gaussian_scores(mean[t].cpu(), var[t].cpu(), test_y[t]),
                "task_params": [task.amplitude, task.frequency, task.phase],
            }
            for t, task in enumerate(tasks)
        ]
        if num_plot and label in config["plot_methods"]:
            gm, gv, _ = adapt_all(
                adapt, model, x[:num_plot], y[:num_plot], grid.expand(num_plot, -1, -1), job["fixed_noise"]
            )
            predictions[label] = (gm.cpu().numpy(), gv.cpu().numpy())
    examples = [
        {
            "shots": shots,
            "grid": grid.flatten().cpu().tolist(),
            "x": x[t].flatten().cpu().tolist(),
            "y": y[t].cpu().tolist(),
            "truth": tasks[t](grid[0]).flatten().cpu().tolist(),
            "predictions": {k: (v[0][t].tolist(), v[1][t].tolist()) for k, v in predictions.items()},
        }
        for t in range(num_plot)
    ]
    return {"job": [job["pretrain_seed"], shots], "rows": rows, "examples": examples}


def run(config: dict, out_dir: Path, device: str = "cpu", seed: int = 0) -> dict:
    """Pretrain one network per seed, then evaluate every (seed, shots) job, in ``config["workers"]`` processes.

    ``results.json`` is rewritten (atomically) after every finished job, with the job's rows and plotted examples; a
    rerun of the same configuration and seed skips the finished jobs (and the pretraining of seeds with none left).
    ``bands.png`` at the end.
    """
    path, payload, start = begin(config, out_dir, device, seed, pretraining=[], rows=[], examples=[], done=[])
    done = {tuple(job) for job in payload["done"]}
    remaining = {
        s: [k for k in sorted(config["shots"], reverse=True) if (seed + s, k) not in done]
        for s in config["pretrain_seeds"]
    }
    num_jobs = sum(len(shots) for shots in remaining.values())
    workers = min(config["workers"], num_jobs)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
    pretrained, pending = {p["seed"] for p in payload["pretraining"]}, []
    try:
        # workers start (and jobs run) while the next network pretrains; larger jobs (more shots) first
        todo = [s for s in config["pretrain_seeds"] if remaining[s]]
        for pretrain_seed in progress_bar(todo, desc="pretraining", unit="network"):
            model, pre_mse = pretrain(seed + pretrain_seed, config, torch.float64, device)
            fixed_noise = max(1e-3, pre_mse)
            if seed + pretrain_seed not in pretrained:
                payload["pretraining"].append(
                    {"seed": seed + pretrain_seed, "pretrain_mse": pre_mse, "fixed_noise": fixed_noise}
                )
            state = {k: v.cpu() for k, v in model.state_dict().items()}
            for shots in remaining[pretrain_seed]:
                job = {
                    "config": config,
                    "device": device,
                    "state": state,
                    "pretrain_seed": seed + pretrain_seed,
                    "task_seed": seed + pretrain_seed,
                    "shots": shots,
                    "fixed_noise": fixed_noise,
                    "plot": pretrain_seed == config["pretrain_seeds"][0] and shots == min(config["shots"]),
                }
                pending.append(pool.submit(evaluate, job) if pool else job)
        finished = as_completed(pending) if pool else (evaluate(job) for job in pending)
        for result in progress_bar(finished, total=num_jobs, desc="sinusoid", unit="job"):
            result = result.result() if pool else result
            payload["rows"] += result["rows"]
            payload["examples"] += result["examples"]
            payload["done"].append(result["job"])
            payload["summary"] = summarise(payload["rows"])
            write_json_atomic(path, payload)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    payload["wall_seconds_this_run"] = time.perf_counter() - start
    write_json_atomic(path, payload)
    if payload["examples"]:
        plot_bands(payload["examples"], out_dir / "bands.png")
    summary = summarise(payload["rows"])
    print(print_tables(summary))
    print(
        "\ntimes are single-thread; fine-tuning and last-layer retraining adapt all tasks of a pretraining seed in"
        " one batched run, and their time is that run's time divided by the number of tasks."
    )
    print(f"results: {path}  figure: {out_dir / 'bands.png'}; {payload['wall_seconds_this_run']:.0f} s this run")
    return summary


DEFAULT = {
    "pretrain_seeds": [0, 1, 2],
    "tasks": 20,
    "shots": [5, 10, 20],
    "test_points": 100,
    "pretrain_points": 200,
    "pretrain_steps": 1000,
    "pretrain_lr": 1e-2,
    "pretrain_batch_size": None,  # None: full-batch Adam for pretrain_steps; a size: SGD for pretrain_epochs
    "pretrain_epochs": 0,
    "pretrain_momentum": 0.9,
    "finetune_steps": [100, 500],
    "last_layer_steps": 500,
    "finetune_lr": 1e-2,
    "workers": 2,
    "plot_tasks": 3,
    "plot_methods": [
        "NTK-GP network mean, ML, funct.",
        "NTK-GP zero mean, ML, funct.",
        "Bayesian last layer (ML)",
        "fine-tune all, 500 steps",
    ],
}
TINY = {
    **DEFAULT,
    "pretrain_seeds": [0],
    "tasks": 2,
    "shots": [5],
    "test_points": 20,
    "pretrain_points": 100,
    "pretrain_steps": 50,
    "finetune_steps": [5],
    "last_layer_steps": 5,
    "plot_tasks": 1,
    "workers": 1,
}

#: the supplement's pretraining (E): SGD, batches of 3, 2500 epochs, lr 1e-3, momentum 0.9; more tasks per seed
PAPER = {
    **DEFAULT,
    "pretrain_seeds": [0, 1, 2, 3, 4],
    "tasks": 50,
    "pretrain_batch_size": 3,
    "pretrain_epochs": 2500,
    "pretrain_lr": 1e-3,
    "pretrain_momentum": 0.9,
}

EXPERIMENT = Experiment(
    name="sinusoid",
    description="few-shot sinusoid regression: NTK-GP against fine-tuning, last-layer retraining and a Bayesian "
    "last layer",
    run=run,
    configs={"default": DEFAULT, "tiny": TINY, "paper": PAPER},
)
