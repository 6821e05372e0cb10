"""Robustness to hyperparameters (the LQF paper's Figure 1 right and §4.7), on our library.

Stand-ins: MobileNetV2 (ImageNet; :mod:`experiments.lqf_backbones`) and the tasks of :mod:`experiments.lqf_tasks`
(``datasets``, ``shots`` images per class, one draw each) for the paper's ten datasets. For every task, scope in
``scopes`` and method — LQF (MSE, α = 15, K-FAC, the Leaky-ReLU network) and NLFT (cross-entropy, the ReLU6
network; on the last layer it is the FC baseline) — the grid lr ∈ ``lrs`` × batch size ∈ ``batch_sizes``, SGD with
momentum m = 0.9, ``epochs`` epochs (at least ``min_steps`` steps). The effective learning rate of a run is
ELR = η / ((1 − m) b); the best combination of a task is the one of lowest test error. Reported: the best ELR per
task and method, the spread of the best ELRs across tasks (decades: log10 of max / min), and the range of test
errors within each grid (diverged runs score chance level). Results are written after every run and a rerun
resumes; figure ``hyperparameters.png``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import matplotlib
import numpy as np

from ntkgp import FunctionalNetwork

from .common import Experiment, begin, format_table, save_figure_atomic, write_json_atomic
from .lqf_backbones import Backbone
from .lqf_methods import fine_tune, lqf
from .lqf_tasks import draw_task, load_pool

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ntkgp.progress import progress_bar

MOMENTUM = 0.9


def effective_lr(lr: float, batch_size: int) -> float:
    """ELR = η / ((1 − m) b)."""
    return lr / ((1 - MOMENTUM) * batch_size)


def best_runs(rows: list[dict]) -> dict:
    """(method, scope, dataset) -> the grid row of lowest test error."""
    best: dict = {}
    for r in rows:
        key = (r["method"], r["scope"], r["dataset"])
        if key not in best or r["error"] < best[key]["error"]:
            best[key] = r
    return best


def summary(rows: list[dict], config: dict) -> list[list[str]]:
    best = best_runs(rows)
    out = []
    for scope in config["scopes"]:
        for method in ("LQF", "NLFT"):
            picks = [best[method, scope, d] for d in config["datasets"] if (method, scope, d) in best]
            if not picks:
                continue
            elrs = [p["elr"] for p in picks]
            ranges = []
            for d in config["datasets"]:
                errors = [r["error"] for r in rows if (r["method"], r["scope"], r["dataset"]) == (method, scope, d)]
                if errors:
                    ranges.append(max(errors) - min(errors))
            shared, excess = shared_setting(rows, method, scope, config["datasets"], best)
            out.append(
                [
                    method,
                    scope,
                    ", ".join(f"{p['dataset']} {p['elr']:.2g} ({p['error']:.1f}%)" for p in picks),
                    f"{math.log10(max(elrs) / min(elrs)):.2f}",
                    f"{np.mean(ranges):.1f}",
                    f"lr {shared[0]:g}, b {shared[1]}: +{excess:.1f}",
                ]
            )
    return out


def shared_setting(rows: list[dict], method: str, scope: str, datasets: list[str], best: dict) -> tuple[tuple, float]:
    """The grid point of lowest mean test error over the tasks (one setting for all of them) and its largest
    excess over a task's own best, in points."""
    errors: dict = {}
    for r in rows:
        if (r["method"], r["scope"]) == (method, scope) and r["dataset"] in datasets:
            errors.setdefault((r["lr"], r["batch_size"]), {})[r["dataset"]] = r["error"]
    complete = {k: v for k, v in errors.items() if len(v) == len(datasets)}
    setting = min(complete, key=lambda k: np.mean(list(complete[k].values())))
    return setting, max(complete[setting][d] - best[method, scope, d]["error"] for d in datasets)


def plot(rows: list[dict], config: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 1 + len(config["scopes"]), figsize=(5 * (1 + len(config["scopes"])), 3.8))
    best = best_runs(rows)
    labels = []
    for i, (method, scope) in enumerate((m, s) for s in config["scopes"] for m in ("LQF", "NLFT")):
        elrs = [best[method, scope, d]["elr"] for d in config["datasets"] if (method, scope, d) in best]
        axes[0].scatter(np.full(len(elrs), i), elrs, marker="o" if method == "LQF" else "s")
        if elrs:
            axes[0].plot([i, i], [min(elrs), max(elrs)], lw=6, alpha=0.3)
        labels.append(f"{method}\n{scope}")
    axes[0].set_xticks(range(len(labels)), labels, fontsize=7)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("best ELR = η / ((1 − m) b)")
    axes[0].set_title("Figure 1 (right): best ELR across tasks")
    for ax, scope in zip(axes[1:], config["scopes"]):
        for method, style in (("LQF", "-"), ("NLFT", "--")):
            for d in config["datasets"]:
                sel = sorted(
                    (r["elr"], r["error"])
                    for r in rows
                    if (r["method"], r["scope"], r["dataset"]) == (method, scope, d)
                )
                if sel:
                    ax.plot(*zip(*sel), style, marker=".", label=f"{method} {d}")
        ax.set_xscale("log")
        ax.set_xlabel("ELR")
        ax.set_ylabel("test error %")
        ax.set_title(f"scope {scope}")
        ax.legend(fontsize=6)
    save_figure_atomic(fig, path)


def run(config: dict, out_dir: Path, device: str = "cpu", seed: int = 0) -> dict:
    path, payload, start = begin(config, out_dir, device, seed, rows=[])
    done = {(r["dataset"], r["scope"], r["method"], r["lr"], r["batch_size"]) for r in payload["rows"]}
    backbone = Backbone("mobilenet", config["image_size"], device, out_dir / "backbones")
    grid = [
        (d, s, m, lr, b)
        for d in config["datasets"]
        for s in config["scopes"]
        for m in ("LQF", "NLFT")
        for lr in config["lrs"]
        for b in config["batch_sizes"]
    ]
    tasks: dict = {}
    for dataset, scope, method, lr, b in progress_bar([g for g in grid if g not in done], desc="lqf-hyperparameters"):
        if dataset not in tasks:
            pool = load_pool(dataset, seed, config["test_size"])
            tasks.clear()  # one dataset's networks at a time
            tasks[dataset] = (pool, draw_task(pool, config["shots"], seed, backbone.prepare), {})
        pool, task, nets = tasks[dataset]
        activation = "leaky" if method == "LQF" else "relu"
        if (activation, scope) not in nets:
            nets[activation, scope] = FunctionalNetwork(
                backbone.network(pool.num_classes, activation, seed), backbone.params(scope)
            )
        settings = {**config, "batch_size": b}
        net = nets[activation, scope]
        result = (
            lqf(net, task, settings, seed, lr=lr)
            if method == "LQF"
            else fine_tune(net, task, lr, config["nlft_weight_decay"], settings, seed)
        )
        payload["rows"].append(
            {
                "dataset": dataset,
                "scope": scope,
                "method": method,
                "lr": lr,
                "batch_size": b,
                "elr": effective_lr(lr, b),
                **result,
            }
        )
        write_json_atomic(path, payload)
    payload["wall_seconds_this_run"] = time.perf_counter() - start
    write_json_atomic(path, payload)
    plot(payload["rows"], config, out_dir / "hyperparameters.png")
    print(
        f"MobileNetV2, {config['shots']} images per class; grid lr {config['lrs']} × batch {config['batch_sizes']}, "
        f"momentum {MOMENTUM}; best ELR per task (its test error), spread of best ELRs across tasks in decades, "
        "mean range of test error within a task's grid (points), the one grid point of lowest mean error over the "
        "tasks and its largest excess over a task's best (points)"
    )
    print(
        format_table(
            ["method", "scope", "best ELR per task", "ELR spread", "error range", "one setting for all: worst excess"],
            summary(payload["rows"], config),
        )
    )
    print(
        f"results: {path}; figure: {out_dir / 'hyperparameters.png'}; {payload['wall_seconds_this_run']:.0f} s this run"
    )
    return {"rows": len(payload["rows"])}


DEFAULT = {
    "datasets": ["mnist", "digits", "fashion"],
    "shots": 5,
    "scopes": ["last_layer", "last_block"],
    "lrs": [0.05, 0.01, 0.005, 0.001, 0.0001],
    "batch_sizes": [16, 32, 64],
    "epochs": 10,
    "min_steps": 30,
    "image_size": 64,
    "test_size": 500,
    "weight_decay": 0.1,
    "nlft_weight_decay": 1e-4,
}
TINY = {
    **DEFAULT,
    "datasets": ["digits", "mnist"],
    "shots": 1,
    "scopes": ["last_layer"],
    "lrs": [0.01],
    "batch_sizes": [4, 8],
    "epochs": 1,
    "min_steps": 1,
    "image_size": 32,
    "test_size": 20,
}

EXPERIMENT = Experiment(
    name="lqf-hyperparameters",
    description="LQF paper Fig. 1 right / §4.7: best effective learning rate across tasks, LQF against NLFT",
    run=run,
    configs={
        "default": DEFAULT,
        "tiny": TINY,
        "paper": {
            **DEFAULT,
            "datasets": ["mnist", "digits", "fashion"],
            "shots": 25,
            "scopes": ["last_layer", "last_block", "all"],
        },
    },
)
