"""Online learning (the LQF paper's Figure 5 and §4.5), on our library.

Stand-ins: MobileNetV2 (ImageNet) as in :mod:`experiments.lqf_backbones`, scope ``scope``; the paper's MIT-67 in
30 steps becomes ``dataset`` (:mod:`experiments.lqf_tasks`) in ``steps`` increments of ``per_class`` new images
of every class (drawn from the training pool by the seed, balanced as the paper's), one fixed test set.
D_t is the union of the first t increments. Methods, at every step t:

- ``LQF exact``: :meth:`ntkgp.LQF.update` of the closed form — the function-space Cholesky factor bordered with
  the new rows (no refactorisation): the unique minimiser on D_t, so also LQF retrained from scratch;
- ``LQF SGD``: :meth:`ntkgp.LQF.update` warm-started from the previous δ (``lqf_epochs`` epochs of SGD on D_t,
  K-FAC recomputed on D_t, fixed lr ``lqf_lr``; the first step is a fit of ``lqf_epochs`` epochs from θ0);
- ``NLFT incremental``: fine-tuning of the scope (cross-entropy, SGD, momentum 0.9, lr ``nlft_lr``, weight decay
  ``nlft_weight_decay``) on D_t from the previous step's weights, until the train error on D_t is below 0.5 % for
  5 consecutive epochs (the paper's rule) or ``max_epochs``;
- ``NLFT paragon``: the same from θ0 on D_t at every step.

Per step: test accuracy and the seconds of the step (and NLFT's epochs). Results are written after each step;
a rerun resumes: the paragon step by step, the incremental methods from the start of the first unfinished one
(they carry state from step to step). Figure ``online.png``: test accuracy and cumulative seconds against step.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import matplotlib
import torch

from ntkgp import LQF, FunctionalNetwork

from .common import Experiment, begin, format_table, save_figure_atomic, seed_everything, write_json_atomic
from .datasets import support_indices
from .lqf_backbones import Backbone
from .lqf_methods import sgd_cross_entropy, test_error
from .lqf_tasks import load_pool

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ntkgp.progress import progress_bar

METHODS = ["LQF exact", "LQF SGD", "NLFT incremental", "NLFT paragon"]


def increments(labels, steps: int, per_class: int, seed: int) -> list:
    """``steps`` disjoint index sets of the pool, each ``per_class`` images of every class."""
    chosen = support_indices(labels, steps * per_class, torch.Generator().manual_seed(seed))
    classes = int(labels.max()) + 1
    by_class = chosen.reshape(classes, steps * per_class)  # class-major, each class's picks in random order
    return [by_class[:, t * per_class : (t + 1) * per_class].reshape(-1) for t in range(steps)]


def train_until_fit(net: FunctionalNetwork, x, y, theta, config: dict, seed: int) -> tuple:
    """NLFT from ``theta`` until the train error is below 0.5 % for 5 consecutive epochs (or ``max_epochs``)."""
    streak = [0]

    def stop(current) -> bool:
        with torch.no_grad():
            error = test_error(net(x, current).argmax(-1), y)
        streak[0] = streak[0] + 1 if error < 0.5 else 0
        return streak[0] >= 5

    return sgd_cross_entropy(
        net,
        x,
        y,
        config["nlft_lr"],
        config["nlft_weight_decay"],
        config["max_epochs"],
        config["batch_size"],
        seed,
        theta=theta,
        stop=stop,
    )


def run_lqf(kind: str, model, params, data: list, test, config: dict, seed: int, first: int = 0):
    """LQF exact or SGD over the steps (all of them: each carries the last one's state): yields
    (step, accuracy, seconds, {})."""
    learner = LQF(model, params=params, weight_decay=config["weight_decay"])
    for t, (x, y) in enumerate(data):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # K-FAC: BatchNorm and depthwise blocks go diagonal
            if t == 0 and kind == "LQF exact":
                learner.fit(x, y, solver="closed_form", progress=False)
            elif t == 0:
                learner.fit(
                    x,
                    y,
                    epochs=config["lqf_epochs"],
                    lr=config["lqf_lr"],
                    batch_size=config["batch_size"],
                    seed=seed,
                    progress=False,
                )
            else:
                learner.update(x, y)
        accuracy = 1 - test_error(learner.classify(test[0]), test[1]) / 100
        yield t, accuracy, time.perf_counter() - start, {}


def run_nlft(kind: str, model, params, data: list, test, config: dict, seed: int, first: int = 0):
    """NLFT incremental (every step) or paragon (from step ``first``: each starts at θ0) over the steps: yields
    (step, accuracy, seconds, {"epochs"})."""
    net = FunctionalNetwork(model, params)
    theta = net.theta0
    for t in range(first if kind == "NLFT paragon" else 0, len(data)):
        start = time.perf_counter()
        x = torch.cat([d[0] for d in data[: t + 1]])
        y = torch.cat([d[1] for d in data[: t + 1]])
        theta, epochs = train_until_fit(
            net, x, y, theta if kind == "NLFT incremental" else net.theta0, config, seed + t
        )
        with torch.no_grad():
            accuracy = 1 - test_error(net(test[0], theta).argmax(-1), test[1]) / 100
        yield t, accuracy, time.perf_counter() - start, {"epochs": epochs}


def plot(payload: dict, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for method in METHODS:
        steps = payload["steps"].get(method, [])
        if steps:
            sizes = [s["train_size"] for s in steps]
            left.plot(sizes, [s["accuracy"] for s in steps], marker="o", label=method)
            right.plot(sizes, torch.tensor([s["seconds"] for s in steps]).cumsum(0).tolist(), marker="o", label=method)
    left.set_xlabel("training images seen")
    left.set_ylabel("test accuracy")
    left.set_title("Figure 5: online learning")
    left.legend(fontsize=7)
    right.set_xlabel("training images seen")
    right.set_ylabel("cumulative seconds")
    right.set_yscale("log")
    save_figure_atomic(fig, path)


def run(config: dict, out_dir: Path, device: str = "cpu", seed: int = 0) -> dict:
    path, payload, start = begin(config, out_dir, device, seed, steps={})
    backbone = Backbone("mobilenet", config["image_size"], device, out_dir / "backbones")
    pool = load_pool(config["dataset"], seed, config["test_size"])
    parts = increments(pool.labels, config["steps"], config["per_class"], seed)
    data = [(backbone.prepare(pool.images[i]), pool.labels[i].to(device)) for i in parts]
    test = (backbone.prepare(pool.test_images), pool.test_labels.to(device))
    params = backbone.params(config["scope"])
    for method in progress_bar(METHODS, desc="lqf-online"):
        done = payload["steps"].get(method, [])
        if len(done) == len(data):
            continue
        if method != "NLFT paragon":  # stateful: an unfinished sequence starts again
            done = payload["steps"][method] = []
        else:
            payload["steps"].setdefault(method, [])
        seed_everything(seed)
        activation = "leaky" if method.startswith("LQF") else "relu"
        model = backbone.network(pool.num_classes, activation, seed)
        runner = run_lqf if method.startswith("LQF") else run_nlft
        for t, accuracy, seconds, extra in runner(method, model, params, data, test, config, seed, len(done)):
            payload["steps"][method].append(
                {
                    "step": t + 1,
                    "train_size": sum(len(d[1]) for d in data[: t + 1]),
                    "accuracy": accuracy,
                    "seconds": seconds,
                    **extra,
                }
            )
            write_json_atomic(path, payload)
    payload["wall_seconds_this_run"] = time.perf_counter() - start
    write_json_atomic(path, payload)
    plot(payload, out_dir / "online.png")
    steps = payload["steps"]
    rows = []
    for t in range(len(data)):
        row = [str(t + 1), str(steps[METHODS[0]][t]["train_size"])]
        for method in METHODS:
            s = steps[method][t]
            row.append(
                f"{s['accuracy']:.3f} ({s['seconds']:.1f} s" + (f", {s['epochs']} ep)" if "epochs" in s else ")")
            )
        rows.append(row)
    print(
        f"{config['dataset']}, MobileNetV2 scope {config['scope']}, {config['steps']} increments of "
        f"{config['per_class']} images per class, {len(test[1])} test images: test accuracy (seconds of the step)"
    )
    print(format_table(["step", "images", *METHODS], rows))
    totals = {m: sum(s["seconds"] for s in steps[m]) for m in METHODS}
    print(
        "total seconds: "
        + ", ".join(f"{m} {v:.0f}" for m, v in totals.items())
        + f"; results: {path}, figure: {out_dir / 'online.png'}; {payload['wall_seconds_this_run']:.0f} s this run"
    )
    return {"steps": len(data)}


DEFAULT = {
    "dataset": "mnist",
    "steps": 10,
    "per_class": 2,
    "scope": "last_block",
    "image_size": 64,
    "test_size": 500,
    "batch_size": 32,
    "weight_decay": 0.1,
    "lqf_epochs": 5,
    "lqf_lr": 1e-4,
    "nlft_lr": 1e-3,
    "nlft_weight_decay": 1e-4,
    "max_epochs": 40,
}
TINY = {
    **DEFAULT,
    "dataset": "digits",
    "steps": 3,
    "per_class": 1,
    "scope": "last_layer",
    "image_size": 32,
    "test_size": 30,
    "lqf_epochs": 1,
    "max_epochs": 2,
}

EXPERIMENT = Experiment(
    name="lqf-online",
    description="LQF paper Fig. 5: online learning, LQF exact and warm-started updates against incremental NLFT",
    run=run,
    configs={
        "default": DEFAULT,
        "tiny": TINY,
        "paper": {**DEFAULT, "steps": 30, "per_class": 5, "scope": "all", "max_epochs": 100},
    },
)
