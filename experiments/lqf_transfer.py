"""Linear against non-linear fine-tuning (the LQF paper's Table 1, Figures 4 and 2, Table 2), on our library.

Stand-ins (the paper's ImageNet Leaky-ReLU ResNet-50 and its datasets are not offline): torchvision's ImageNet
MobileNetV2 (:mod:`experiments.lqf_backbones`; its Leaky-ReLU version is the same ImageNet weights with
:func:`ntkgp.leaky_relu` — not retrained), and a small CNN pretrained here on Fashion-MNIST with ReLU and with
Leaky-ReLU, where both activations are really pretrained. Targets (:mod:`experiments.lqf_tasks`): MNIST (its
10,000 test images split in halves), scikit-learn's digits and Fashion-MNIST, 10-way; Olivetti faces, 40-way
(the fine-grained stand-in). Every method of a draw gets the same training images, test images and new head.

Parts (methods: :mod:`experiments.lqf_methods`):

- ``lowshot`` (Table 1, Figure 4): NLFT (best test error over lr ∈ ``nlft_lrs`` × weight decay ∈
  ``nlft_weight_decays``, the paper's small grid), LQF, LQF FC, GaF and FC on ``datasets`` × ``shots`` images
  per class (the last, larger, count stands for the full training set of Table 1) × ``draws``, scope ``scope``;
  LQF's error relative to NLFT's, (e_LQF − e_NLFT)/e_NLFT, per shot count (Figure 4).
- ``ablation`` (Figure 2): LQF without MSE (cross-entropy on the linearised network, K-FAC of its curvature),
  without K-FAC (plain SGD at LQF's default lr 1/λ_max), without Leaky-ReLU (the ReLU network), at
  ``ablation_shots`` over ``ablation_draws`` draws; the relative error increase over LQF, on MobileNetV2 and on
  the CNN (``cnn_datasets``; there "without Leaky-ReLU" is the CNN pretrained with ReLU).
- ``olivetti`` (Table 2): NLFT, LQF and B-LQF (MobileNetV2's features, :class:`ntkgp.SqrtCovariancePooling` with
  a PCA 1 × 1 reduction to ``bilinear_reduction`` channels, a new head) with ``olivetti_shots`` images per person
  at ``olivetti_image_size`` (a 2 × 2 final map at 64 × 64 has a rank-3 covariance: bilinear pooling needs more).

LQF runs at one fixed lr per scope (``lqf_lr``; lqf-conditioning measured 1e-4 as the best for K-FAC on
MobileNetV2's last block, and 0.1 diverges on the last layer at 25 shots here), λ = ``weight_decay``, α = 15.
Errors are test errors in %; mean ± standard error over draws; seconds per adaptation (fit and test prediction;
for NLFT the whole grid). Results are written after every run and a rerun resumes; figures ``lowshot.png``
(error against shots per dataset; LQF relative to NLFT) and ``ablation.png``.
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib
import numpy as np

from ntkgp import FunctionalNetwork

from .common import (
    Experiment,
    begin,
    format_table,
    mean_and_stderr,
    save_figure_atomic,
    seed_everything,
    write_json_atomic,
)
from .lqf_backbones import CNN_TRAINING, Backbone, bilinear_mobilenet
from .lqf_methods import fine_tune, lqf
from .lqf_tasks import Pool, draw_task, load_pool

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ntkgp.progress import progress_bar

LOWSHOT = ["NLFT", "LQF", "LQF FC", "GaF", "FC"]
ABLATION = ["LQF without MSE", "LQF without K-FAC", "LQF without Leaky-ReLU"]
OLIVETTI = ["NLFT", "LQF", "B-LQF"]


def run_method(method: str, backbone: Backbone, pool: Pool, task, config: dict, seed: int, nets: dict) -> dict:
    """One method on one draw. ``nets`` caches the draw's FunctionalNetworks by (activation, scope), so that each
    one's frozen prefix runs once per draw."""
    scope, num_classes = config["scope"], pool.num_classes

    def net(activation: str, which: str = scope) -> FunctionalNetwork:
        if (activation, which) not in nets:
            nets[activation, which] = FunctionalNetwork(
                backbone.network(num_classes, activation, seed), backbone.params(which)
            )
        return nets[activation, which]

    lr = config["lqf_lr"][scope]
    if method == "NLFT":
        grid = {
            f"lr={a:g} wd={b:g}": fine_tune(net("relu"), task, a, b, config, seed)
            for a in config["nlft_lrs"]
            for b in config["nlft_weight_decays"]
        }
        best = min(grid, key=lambda k: grid[k]["error"])
        return {
            "error": grid[best]["error"],
            "train_error": grid[best]["train_error"],
            "best": best,
            "seconds": sum(g["seconds"] for g in grid.values()),
            "grid": {k: g["error"] for k, g in grid.items()},
        }
    if method == "FC":
        return fine_tune(
            net("relu", "last_layer"), task, config["fc_lr"], config["nlft_weight_decays"][-1], config, seed
        )
    if method == "LQF":
        return lqf(net("leaky"), task, config, seed, lr=lr)
    if method == "LQF FC":
        return lqf(net("leaky", "last_layer"), task, config, seed, lr=config["lqf_lr"]["last_layer"])
    if method == "GaF":
        return lqf(net("relu"), task, config, seed, loss="cross_entropy", preconditioner=None)
    if method == "LQF without MSE":
        return lqf(net("leaky"), task, config, seed, loss="cross_entropy", lr=lr)
    if method == "LQF without K-FAC":
        return lqf(net("leaky"), task, config, seed, preconditioner=None)
    if method == "LQF without Leaky-ReLU":
        return lqf(net("relu"), task, config, seed, lr=lr)
    if method == "B-LQF":
        start = time.perf_counter()
        model = bilinear_mobilenet(backbone, num_classes, "leaky", config["bilinear_reduction"], task.train_x, seed)
        result = lqf(FunctionalNetwork(model, backbone.params(scope)), task, config, seed, lr=lr)
        return {**result, "seconds": time.perf_counter() - start}
    raise ValueError(f"unknown method {method!r}")


def jobs(config: dict) -> list[tuple[str, str, str, int, int, list[str]]]:
    """(part, backbone, dataset, shots, draw, methods) for every draw of the run, in order."""
    out = []
    for dataset in config["datasets"]:
        for k in config["shots"]:
            for draw in range(config["draws"]):
                extra = ABLATION if k == config["ablation_shots"] and draw < config["ablation_draws"] else []
                out.append(("lowshot", "mobilenet", dataset, k, draw, LOWSHOT + extra))
        if config["ablation_shots"] in config["shots"]:
            for draw in range(config["draws"], config["ablation_draws"]):
                out.append(("ablation", "mobilenet", dataset, config["ablation_shots"], draw, ["LQF"] + ABLATION))
    for dataset in config["cnn_datasets"]:
        for draw in range(config["ablation_draws"]):
            out.append(("ablation", "cnn", dataset, config["ablation_shots"], draw, ["NLFT", "LQF"] + ABLATION))
    for draw in range(config["olivetti_draws"]):
        out.append(("olivetti", "mobilenet", "olivetti", config["olivetti_shots"], draw, OLIVETTI))
    return out


def select(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def relative(rows: list[dict], method: str, reference: str, **match) -> list[float]:
    """(e_method − e_reference)/e_reference per draw where both ran (reference error 0: skipped)."""
    out = []
    for r in select(rows, method=method, **match):
        ref = select(
            rows, method=reference, backbone=r["backbone"], dataset=r["dataset"], shots=r["shots"], draw=r["draw"]
        )
        if ref and ref[0]["error"] > 0:
            out.append((r["error"] - ref[0]["error"]) / ref[0]["error"])
    return out


def cell(values) -> str:
    mean, err = mean_and_stderr(values)
    return "—" if np.isnan(mean) else f"{mean:.1f} ± {err:.1f}"


def tables(rows: list[dict], config: dict) -> str:
    out = []
    body = []
    for dataset in config["datasets"]:
        for k in config["shots"]:
            sel = select(rows, backbone="mobilenet", dataset=dataset, shots=k)
            if sel:
                rel = relative(rows, "LQF", "NLFT", backbone="mobilenet", dataset=dataset, shots=k)
                body.append(
                    [dataset, str(k)]
                    + [cell(r["error"] for r in select(sel, method=m)) for m in LOWSHOT]
                    + [cell(100 * v for v in rel)]
                )
    out.append(
        f"Test error % (MobileNetV2, scope {config['scope']}; mean ± s.e. over draws)\n"
        + format_table(["dataset", "shots", *LOWSHOT, "LQF vs NLFT, %"], body)
    )
    body = []
    for backbone, datasets in (("mobilenet", config["datasets"]), ("cnn", config["cnn_datasets"])):
        for dataset in datasets:
            match = {"backbone": backbone, "dataset": dataset, "shots": config["ablation_shots"]}
            if select(rows, method="LQF without MSE", **match):
                body.append(
                    [backbone, dataset, cell(r["error"] for r in select(rows, method="LQF", **match))]
                    + [cell(100 * v for v in relative(rows, m, "LQF", **match)) for m in ABLATION]
                )
    out.append(
        f"Ablation at {config['ablation_shots']} shots: LQF's error %, and each variant's relative error "
        "increase over LQF, %\n" + format_table(["backbone", "dataset", "LQF error", *ABLATION], body)
    )
    body = [
        [
            m,
            cell(r["error"] for r in select(rows, dataset="olivetti", method=m)),
            cell(r["seconds"] for r in select(rows, dataset="olivetti", method=m)),
        ]
        for m in OLIVETTI
    ]
    out.append(
        f"Olivetti, 40 people, {config['olivetti_shots']} images each for training (Table 2)\n"
        + format_table(["method", "test error %", "seconds"], body)
    )
    methods = sorted({r["method"] for r in rows})
    body = [
        [m, cell(r["seconds"] for r in select(rows, method=m, backbone="mobilenet") if r["dataset"] != "olivetti")]
        for m in methods
    ]
    out.append(
        "Seconds per adaptation (MobileNetV2, 10-way, all shot counts)\n" + format_table(["method", "seconds"], body)
    )
    return "\n\n".join(out)


def plot(rows: list[dict], config: dict, out_dir: Path) -> None:
    datasets = config["datasets"]
    fig, axes = plt.subplots(1, len(datasets) + 1, figsize=(4 * (len(datasets) + 1), 3.6), squeeze=False)
    shots = config["shots"]
    for ax, dataset in zip(axes[0], datasets):
        for method in LOWSHOT:
            stats = [
                mean_and_stderr(
                    r["error"] for r in select(rows, backbone="mobilenet", dataset=dataset, shots=k, method=method)
                )
                for k in shots
            ]
            ax.errorbar(shots, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3, label=method)
        ax.set_xscale("log")
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.set_xlabel("images per class")
        ax.set_ylabel("test error %")
        ax.set_title(f"{dataset} (MobileNetV2, {config['scope']})")
    axes[0][0].legend(fontsize=7)
    ax = axes[0][-1]
    for dataset in datasets:
        stats = [
            mean_and_stderr(
                100 * v for v in relative(rows, "LQF", "NLFT", backbone="mobilenet", dataset=dataset, shots=k)
            )
            for k in shots
        ]
        ax.errorbar(shots, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3, label=dataset)
    ax.axhline(0, color="k", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set_xlabel("images per class")
    ax.set_ylabel("LQF error relative to NLFT, %")
    ax.set_title("Figure 4: below 0, LQF wins")
    ax.legend(fontsize=7)
    save_figure_atomic(fig, out_dir / "lowshot.png")
    groups = [(b, d) for b, ds in (("mobilenet", datasets), ("cnn", config["cnn_datasets"])) for d in ds]
    fig, ax = plt.subplots(figsize=(1.6 * len(groups) + 3, 3.6))
    width = 0.8 / len(ABLATION)
    for i, method in enumerate(ABLATION):
        stats = [
            mean_and_stderr(
                100 * v for v in relative(rows, method, "LQF", backbone=b, dataset=d, shots=config["ablation_shots"])
            )
            for b, d in groups
        ]
        ax.bar(
            np.arange(len(groups)) + i * width,
            [s[0] for s in stats],
            width,
            yerr=[s[1] for s in stats],
            capsize=3,
            label=method,
        )
    ax.set_xticks(np.arange(len(groups)) + width, [f"{b}\n{d}" for b, d in groups])
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("relative error increase over LQF, %")
    ax.set_title(f"Figure 2: ablation at {config['ablation_shots']} shots")
    ax.legend(fontsize=7)
    save_figure_atomic(fig, out_dir / "ablation.png")


def run(config: dict, out_dir: Path, device: str = "cpu", seed: int = 0) -> dict:
    path, payload, start = begin(config, out_dir, device, seed, rows=[])
    done = {(r["backbone"], r["dataset"], r["shots"], r["draw"], r["method"]) for r in payload["rows"]}
    backbones: dict[tuple[str, int], Backbone] = {}
    pools: dict[str, Pool] = {}
    todo = [j for j in jobs(config) if any((j[1], j[2], j[3], j[4], m) not in done for m in j[5])]
    for part, name, dataset, k, draw, methods in progress_bar(todo, desc="lqf-transfer"):
        size = config["olivetti_image_size"] if dataset == "olivetti" else config["image_size"]
        if (name, size) not in backbones:
            backbones[name, size] = Backbone(name, size, device, out_dir / "backbones", seed, config["cnn_training"])
            if name == "cnn":
                payload["cnn_pretraining"] = backbones[name, size].records
        if dataset not in pools:
            pools[dataset] = load_pool(dataset, seed, config["test_size"])
        backbone, pool = backbones[name, size], pools[dataset]
        draw_seed = 1000 * seed + 10 * k + draw
        seed_everything(draw_seed)
        task = draw_task(pool, k, draw_seed, backbone.prepare)
        nets: dict = {}
        for method in methods:
            if (name, dataset, k, draw, method) in done:
                continue
            result = run_method(method, backbone, pool, task, config, draw_seed, nets)
            payload["rows"].append(
                {
                    "part": part,
                    "backbone": name,
                    "dataset": dataset,
                    "shots": k,
                    "draw": draw,
                    "method": method,
                    "train_size": len(task.train_y),
                    "test_size": len(task.test_y),
                    **result,
                }
            )
            payload["seconds"] = payload.get("seconds", 0.0) + result["seconds"]
            write_json_atomic(path, payload)
    payload["wall_seconds_this_run"] = time.perf_counter() - start
    write_json_atomic(path, payload)
    rows = payload["rows"]
    plot(rows, config, out_dir)
    if "cnn_pretraining" in payload:
        print(
            "CNN pretraining on Fashion-MNIST: "
            + ", ".join(
                f"{a}: test accuracy {r['fashion_test_accuracy']:.3f} ({r['seconds']:.0f} s)"
                for a, r in payload["cnn_pretraining"].items()
            )
        )
    print(tables(rows, config))
    print(
        f"results: {path}; figures: {out_dir / 'lowshot.png'}, {out_dir / 'ablation.png'}; "
        f"{payload['wall_seconds_this_run']:.0f} s this run"
    )
    return {"rows": len(rows)}


DEFAULT = {
    "datasets": ["mnist", "digits"],
    "shots": [1, 2, 5, 10, 25],
    "draws": 2,
    "scope": "last_block",
    "image_size": 64,
    "test_size": 500,
    "batch_size": 32,
    "epochs": 10,
    "min_steps": 30,
    "nlft_lrs": [0.01, 0.001],
    "nlft_weight_decays": [1e-4, 1e-5],
    "fc_lr": 0.01,
    "lqf_lr": {"last_layer": 0.01, "last_block": 1e-4, "all": 1e-4},
    "weight_decay": 0.1,
    "ablation_shots": 5,
    "ablation_draws": 3,
    "cnn_datasets": ["mnist", "digits"],
    "olivetti_shots": 5,
    "olivetti_draws": 2,
    "olivetti_image_size": 128,
    "bilinear_reduction": 64,
    "cnn_training": CNN_TRAINING,
}
TINY = {
    **DEFAULT,
    "datasets": ["digits"],
    "shots": [1, 2],
    "draws": 1,
    "scope": "last_layer",
    "image_size": 32,
    "test_size": 30,
    "epochs": 1,
    "min_steps": 2,
    "ablation_shots": 2,
    "ablation_draws": 2,
    "cnn_datasets": ["digits"],
    "olivetti_shots": 1,
    "olivetti_draws": 1,
    "olivetti_image_size": 64,
    "bilinear_reduction": 8,
    "cnn_training": {**CNN_TRAINING, "epochs": 1, "train_size": 512},
}

EXPERIMENT = Experiment(
    name="lqf-transfer",
    description="LQF paper Table 1, Figs. 4 and 2, Table 2: NLFT, LQF, LQF FC, GaF, FC; low-shot; ablation; B-LQF",
    run=run,
    configs={
        "default": DEFAULT,
        "tiny": TINY,
        "paper": {
            **DEFAULT,
            "datasets": ["fashion", "mnist", "digits"],
            "shots": [1, 2, 5, 10, 25, 100],
            "draws": 5,
            "scope": "all",
            "ablation_draws": 5,
            "olivetti_draws": 5,
        },
    },
)
