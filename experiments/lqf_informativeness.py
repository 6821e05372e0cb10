"""Informativeness of samples and exact leave-one-out (the LQF paper's Figure 6, §2(ii) and §3.4), on our library.

Stand-ins: MobileNetV2 (ImageNet, Leaky-ReLU version: :mod:`experiments.lqf_backbones`), scope ``scope``;
the paper's Oxford Flowers becomes ``dataset`` with ``shots`` training images per class, ``val_per_class`` more
per class from the same pool as the validation set of F-SI, and the pool's test images
(:mod:`experiments.lqf_tasks`). LQF is the exact minimiser (``solver="closed_form"``, λ = ``weight_decay``).

- F-SI (eq. 9) of every training sample: :meth:`ntkgp.LQF.informativeness` on the validation set (exact: the
  rank-C downdate of the function-space solve); figure ``informative.png`` of the ``show`` most and least
  informative training images.
- Summarisation (Figure 6 right): test accuracy after dropping the N most / N least informative samples and
  refitting exactly, for N in ``drop``; each refit solves the sub-system of K(X, X) + (λ/2)I (K from the fit's
  Cholesky factor) and predicts with K(X*, X) (:meth:`ntkgp.LQF.kernel_matrix`); one refit is checked against
  a fresh :meth:`ntkgp.LQF.fit` on the kept samples.
- Leave-one-out: the LOO accuracy of :meth:`ntkgp.LQF.leave_one_out` (no test set) against the test accuracy for
  ``loo_datasets`` × ``loo_shots``: Pearson correlation and mean absolute gap; exact LOO's time against brute-force
  refitting without each of ``brute_force`` samples (their predictions compared; the total extrapolated to n).

Results are written after each part and a rerun resumes; figures ``informative.png`` and ``summarisation.png``.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import torch

from ntkgp import LQF

from .common import Experiment, begin, format_table, save_figure_atomic, write_json_atomic
from .datasets import support_indices
from .lqf_backbones import Backbone
from .lqf_tasks import Task, load_pool

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ntkgp.progress import progress_bar


def draw_with_validation(pool, backbone: Backbone, shots: int, val_per_class: int, seed: int) -> tuple:
    """A training draw of ``shots`` per class, a disjoint validation set of ``val_per_class`` per class, and the
    pool's test set: (Task, val_x, training images (n, 1, h, w) for the figure)."""
    index = support_indices(pool.labels, shots + val_per_class, torch.Generator().manual_seed(seed))
    classes = pool.num_classes
    by_class = index.reshape(classes, shots + val_per_class)
    train, val = by_class[:, :shots].reshape(-1), by_class[:, shots:].reshape(-1)
    task = Task(
        backbone.prepare(pool.images[train]),
        pool.labels[train].to(backbone.device),
        backbone.prepare(pool.test_images),
        pool.test_labels.to(backbone.device),
        train,
    )
    return task, backbone.prepare(pool.images[val]), pool.images[train]


def fit_exact(model, params, task: Task, weight_decay: float) -> LQF:
    learner = LQF(model, params=params, weight_decay=weight_decay)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return learner.fit(task.train_x, task.train_y, solver="closed_form", progress=False)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).double().mean())


def refit_accuracies(learner: LQF, task: Task, order: torch.Tensor, drops: list[int]) -> tuple[list[float], dict]:
    """Test accuracy of the exact minimiser without the first N of ``order`` (training indices), for N in
    ``drops``; and the refit predictions for the largest N (to check against a fresh fit)."""
    system, k = learner.kernel_system(), learner.num_outputs
    eye = torch.eye(system.size, dtype=torch.float64)
    kernel = system.factor @ system.factor.mT - system.c * eye  # K(X, X) from the fit's factor
    cross = learner.kernel_matrix(task.test_x, task.train_x).double()
    with torch.no_grad():
        f0 = learner.network(task.test_x).double()
    out, last = [], {}
    for n_drop in drops:
        keep = torch.ones(len(task.train_y), dtype=torch.bool)
        keep[order[:n_drop]] = False
        rows = keep.repeat_interleave(k)
        weights = torch.linalg.solve(
            kernel[rows][:, rows] + system.c * eye[: rows.sum(), : rows.sum()], system.residual[rows]
        )
        logits = f0 + (cross[:, rows] @ weights).reshape(-1, k)
        out.append(accuracy(logits, task.test_y.cpu()))
        last = {"keep": keep, "logits": logits}
    return out, last


def plot_images(images: torch.Tensor, labels: torch.Tensor, fsi: torch.Tensor, show: int, path: Path) -> None:
    order = torch.argsort(fsi, descending=True)
    fig, axes = plt.subplots(2, show, figsize=(1.3 * show, 3.2), squeeze=False)
    for row, (picks, title) in enumerate(((order[:show], "most"), (order.flip(0)[:show], "least"))):
        for ax, i in zip(axes[row], picks):
            ax.imshow(images[i, 0], cmap="gray")
            ax.set_title(f"{int(labels[i])}: {float(fsi[i]):.2g}", fontsize=7)
            ax.axis("off")
        axes[row][0].text(
            -0.1, 0.5, f"{title}\ninformative", transform=axes[row][0].transAxes, ha="right", va="center", fontsize=8
        )
    save_figure_atomic(fig, path)


def plot_summarisation(payload: dict, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    part = payload["summarisation"]
    for key, label in (
        ("most", "dropping the most informative"),
        ("least", "dropping the least informative"),
        ("random", "dropping random samples"),
    ):
        left.plot(part["drop"], part[key], marker="o", label=label)
    left.set_xlabel("training samples dropped")
    left.set_ylabel("test accuracy")
    left.set_title("Figure 6 (right): summarisation")
    left.legend(fontsize=7)
    cells = payload["loo"]["cells"]
    for dataset in sorted({c["dataset"] for c in cells}):
        sel = [c for c in cells if c["dataset"] == dataset]
        right.scatter([c["test_accuracy"] for c in sel], [c["loo_accuracy"] for c in sel], label=dataset)
        for c in sel:
            right.annotate(str(c["shots"]), (c["test_accuracy"], c["loo_accuracy"]), fontsize=6)
    right.plot([0, 1], [0, 1], "k--", lw=0.8)
    right.set_xlabel("test accuracy")
    right.set_ylabel("exact leave-one-out accuracy")
    right.set_title("LOO against test (numbers: shots)")
    right.legend(fontsize=7)
    save_figure_atomic(fig, path)


def run(config: dict, out_dir: Path, device: str = "cpu", seed: int = 0) -> dict:
    path, payload, start = begin(config, out_dir, device, seed)
    backbone = Backbone("mobilenet", config["image_size"], device, out_dir / "backbones")
    params, lam = backbone.params(config["scope"]), config["weight_decay"]
    pools = {}

    def pool_of(name: str):
        if name not in pools:
            pools[name] = load_pool(name, seed, config["test_size"])
        return pools[name]

    pool = pool_of(config["dataset"])
    if "summarisation" not in payload or "loo_timing" not in payload:
        task, val_x, images = draw_with_validation(pool, backbone, config["shots"], config["val_per_class"], seed)
        model = backbone.network(pool.num_classes, "leaky", seed)
        clock = time.perf_counter()
        learner = fit_exact(model, params, task, lam)
        fit_seconds = time.perf_counter() - clock
        clock = time.perf_counter()
        fsi = learner.informativeness(val_x).cpu()
        fsi_seconds = time.perf_counter() - clock
        plot_images(images, task.train_y.cpu(), fsi, config["show"], out_dir / "informative.png")
        order = {
            "most": torch.argsort(fsi, descending=True),
            "least": torch.argsort(fsi),
            "random": torch.randperm(len(fsi), generator=torch.Generator().manual_seed(seed)),
        }
        part = {
            "drop": config["drop"],
            "fit_seconds": fit_seconds,
            "fsi_seconds": fsi_seconds,
            "fsi": fsi.tolist(),
            "train_size": len(fsi),
        }
        for key, o in order.items():
            part[key], last = refit_accuracies(learner, task, o, config["drop"])
            if key == "most":  # the largest drop, refitted from scratch by LQF itself
                kept = Task(
                    task.train_x[last["keep"]],
                    task.train_y[last["keep"]],
                    task.test_x,
                    task.test_y,
                    task.train_index[last["keep"]],
                )
                fresh = fit_exact(model, params, kept, lam).predict(task.test_x).double().cpu()
                part["fresh_fit_max_difference"] = float((fresh - last["logits"]).abs().max())
        payload["summarisation"] = part
        clock = time.perf_counter()
        loo = learner.leave_one_out().double().cpu()
        loo_seconds = time.perf_counter() - clock  # the kernel system is the fit's: this is the downdate only
        brute, differences = [], []
        for i in progress_bar(range(config["brute_force"]), desc="brute-force LOO"):
            keep = torch.ones(len(task.train_y), dtype=torch.bool)
            keep[i] = False
            clock = time.perf_counter()
            minus = fit_exact(
                model,
                params,
                Task(task.train_x[keep], task.train_y[keep], task.test_x, task.test_y, task.train_index[keep]),
                lam,
            )
            prediction = minus.predict(task.train_x[i : i + 1]).double().cpu()[0]
            brute.append(time.perf_counter() - clock)
            differences.append(float((prediction - loo[i]).abs().max()))
        payload["loo_timing"] = {
            "exact_seconds": loo_seconds,
            "exact_with_fit_seconds": loo_seconds + fit_seconds,
            "brute_force_seconds_each": float(np.mean(brute)),
            "brute_force_extrapolated_seconds": float(np.mean(brute)) * len(task.train_y),
            "max_difference": max(differences),
            "checked": len(brute),
        }
        write_json_atomic(path, payload)
    loo_part = payload.setdefault("loo", {"cells": []})
    done = {(c["dataset"], c["shots"]) for c in loo_part["cells"]}
    grid = [(d, k) for d in config["loo_datasets"] for k in config["loo_shots"] if (d, k) not in done]
    for dataset, k in progress_bar(grid, desc="LOO against test"):
        p = pool_of(dataset)
        task, _, _ = draw_with_validation(p, backbone, k, 0, seed + k)
        learner = fit_exact(backbone.network(p.num_classes, "leaky", seed), params, task, lam)
        loo_accuracy = accuracy(learner.leave_one_out().cpu(), task.train_y.cpu())
        test_accuracy = accuracy(learner.predict(task.test_x).cpu(), task.test_y.cpu())
        loo_part["cells"].append(
            {"dataset": dataset, "shots": k, "loo_accuracy": loo_accuracy, "test_accuracy": test_accuracy}
        )
        write_json_atomic(path, payload)
    cells = loo_part["cells"]
    loo_acc, test_acc = np.array([c["loo_accuracy"] for c in cells]), np.array([c["test_accuracy"] for c in cells])
    loo_part["correlation"] = float(np.corrcoef(loo_acc, test_acc)[0, 1]) if len(cells) > 2 else float("nan")
    loo_part["mean_absolute_gap"] = float(np.abs(loo_acc - test_acc).mean())
    payload["wall_seconds_this_run"] = time.perf_counter() - start
    write_json_atomic(path, payload)
    plot_summarisation(payload, out_dir / "summarisation.png")
    part, timing = payload["summarisation"], payload["loo_timing"]
    print(
        f"{config['dataset']}, {part['train_size']} training images, MobileNetV2 scope {config['scope']}, "
        f"exact LQF fit {part['fit_seconds']:.1f} s, F-SI on {config['val_per_class']} validation images per class "
        f"{part['fsi_seconds']:.1f} s"
    )
    print(
        format_table(
            ["dropped", "most informative", "least informative", "random"],
            [
                [str(n), f"{a:.3f}", f"{b:.3f}", f"{c:.3f}"]
                for n, a, b, c in zip(part["drop"], part["most"], part["least"], part["random"])
            ],
        )
    )
    print(
        f"refit check: exact sub-system against a fresh LQF fit, max |Δ logit| = {part['fresh_fit_max_difference']:.2e}"
    )
    print(
        f"exact LOO of all {part['train_size']}: {timing['exact_seconds']:.2f} s after the fit "
        f"({timing['exact_with_fit_seconds']:.1f} s with it); brute force {timing['brute_force_seconds_each']:.1f} s "
        f"per refit, {timing['brute_force_extrapolated_seconds']:.0f} s for all (extrapolated from "
        f"{timing['checked']}); max |LOO − refit| = {timing['max_difference']:.2e}"
    )
    print(
        format_table(
            ["dataset", "shots", "LOO accuracy", "test accuracy", "gap"],
            [
                [
                    c["dataset"],
                    str(c["shots"]),
                    f"{c['loo_accuracy']:.3f}",
                    f"{c['test_accuracy']:.3f}",
                    f"{c['loo_accuracy'] - c['test_accuracy']:+.3f}",
                ]
                for c in cells
            ],
        )
    )
    print(
        f"LOO against test accuracy: correlation {loo_part['correlation']:.3f}, mean absolute gap "
        f"{loo_part['mean_absolute_gap']:.3f}; results: {path}; figures: {out_dir / 'informative.png'}, "
        f"{out_dir / 'summarisation.png'}; {payload['wall_seconds_this_run']:.0f} s this run"
    )
    return {"cells": len(cells)}


DEFAULT = {
    "dataset": "mnist",
    "shots": 20,
    "val_per_class": 10,
    "scope": "last_block",
    "image_size": 64,
    "test_size": 500,
    "weight_decay": 0.1,
    "show": 8,
    "drop": [0, 10, 20, 40, 80, 120],
    "brute_force": 3,
    "loo_datasets": ["mnist", "digits", "fashion"],
    "loo_shots": [2, 5, 10, 20],
}
TINY = {
    **DEFAULT,
    "dataset": "digits",
    "shots": 3,
    "val_per_class": 1,
    "scope": "last_layer",
    "image_size": 32,
    "test_size": 30,
    "show": 3,
    "drop": [0, 5],
    "brute_force": 1,
    "loo_datasets": ["digits"],
    "loo_shots": [1, 2, 3],
}

EXPERIMENT = Experiment(
    name="lqf-informativeness",
    description="LQF paper Fig. 6 / §2(ii): F-SI, dropping informative samples, exact LOO against test accuracy",
    run=run,
    configs={
        "default": DEFAULT,
        "tiny": TINY,
        "paper": {**DEFAULT, "scope": "all", "shots": 50, "drop": [0, 50, 100, 200, 300]},
    },
)
