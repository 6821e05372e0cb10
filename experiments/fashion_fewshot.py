"""Few-shot Fashion-MNIST (10-way, k-shot) with torchvision's ImageNet MobileNetV2.

The 1000-way ImageNet head is replaced by a new 10-way linear head (seeded PyTorch init, the same for
every method of a draw); images are resized to ``image_size`` and replicated to 3 channels with the
ImageNet normalisation. The parameter ``scope`` decides what is adapted: ``last_layer`` (the head,
12,810 parameters), ``last_block`` (the last inverted residual block, the final 1×1 convolution and the
head: 898,890) or ``all`` (every parameter; meant for the GPU). Every method gets the whole network and
``params=`` for the scope, through one :class:`ntkgp.FunctionalNetwork` per draw: the library finds the
frozen prefix itself and runs it once per image tensor (``frozen_prefix=false`` runs the whole network in
every product instead, to measure what that saves).

Methods, on the same support draws and the same test images:
- ``linearised MAP``: the MAP of the linearised network under the prior N(θ0, I/δ) (Newton, exact);
- ``Laplace (probit)``: its GLM predictive with the per-class probit, δ by the Laplace evidence over
  ``prior_grid`` (or fixed: ``--set prior_precision=30``);
- ``SVI``: mean-field Gaussian over the linearised network (same δ), Monte Carlo predictive;
- ``NTK-GP one-hot``: GP regression on one-hot targets (zero mean, evidence-fitted scale and noise),
  class probabilities = frequency of each class being the largest of the predictive samples;
- ``retrain last layer``: logistic regression on the pooled 1280-d features from the new head;
- ``fine-tune``: Adam on the cross-entropy over every parameter in scope (BatchNorm statistics frozen).
Metrics: accuracy, NLL, expected calibration error (15 bins); time per adaptation (fit + prediction).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_calibration_error

from ntkgp import NTKGP, SVI, FunctionalNetwork, Laplace
from ntkgp.progress import progress_bar

from .common import Experiment, begin, format_table, mean_and_stderr, save_figure_atomic, write_json_atomic
from .datasets import data_root, load_fashion_mnist, support_indices

METHODS = ["linearised MAP", "Laplace (probit)", "SVI", "NTK-GP one-hot", "retrain last layer", "fine-tune"]
SCOPES = {"last_layer": ["classifier."], "last_block": ["features.17.", "features.18.", "classifier."], "all": None}
NUM_CLASSES = 10


def load_mobilenet(device: str) -> nn.Module:
    """ImageNet MobileNetV2 through torchvision's API, from TORCH_HOME (default: $NTKGP_DATA/torch_home)."""
    os.environ.setdefault("TORCH_HOME", str(data_root() / "torch_home"))
    return torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1").to(device).eval()


def preprocess(images: Tensor, size: int) -> Tensor:
    """(N, 1, 28, 28) in [0, 1] -> (N, 3, size, size), ImageNet-normalised."""
    x = nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def with_head(backbone: nn.Module, head: nn.Linear) -> nn.Module:
    """The backbone with ``head`` as its last layer (classifier = dropout, head), in eval mode."""
    backbone.classifier[-1] = head
    return backbone.eval()


def scope_params(scope: str) -> list[str] | None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {list(SCOPES)}, got {scope!r}")
    return SCOPES[scope]


def metrics(probs: Tensor, labels: Tensor, bins: int = 15) -> dict:
    """Accuracy, NLL and expected calibration error (torchmetrics' top-label L1 ECE, ``bins`` equal-width bins)
    of class probabilities (m, C)."""
    probs = probs.double().cpu()
    labels = labels.cpu()
    correct = (probs.argmax(-1) == labels).double()
    nll = -torch.log(probs.gather(-1, labels[:, None]).clamp_min(1e-12)).mean()
    ece = multiclass_calibration_error(probs, labels, num_classes=probs.shape[-1], n_bins=bins, norm="l1")
    return {"accuracy": float(correct.mean()), "nll": float(nll), "ece": float(ece)}


def gp_class_probabilities(mean: Tensor, variance: Tensor, samples: int, generator: torch.Generator) -> Tensor:
    """P(class c has the largest latent value) under independent N(mean, variance), by sampling (+1 smoothing)."""
    z = torch.randn(samples, *mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
    winners = (mean + variance.clamp_min(0).sqrt() * z).argmax(-1)
    counts = nn.functional.one_hot(winners, mean.shape[-1]).sum(0).to(mean.dtype)
    return (counts + 1) / (samples + mean.shape[-1])


def train_cross_entropy(net: FunctionalNetwork, x: Tensor, y: Tensor, steps: int, lr: float) -> Tensor:
    """Full-batch Adam on the cross-entropy of f(x; θ) from θ0, through the snapshot (BatchNorm frozen, the
    frozen prefix run once): the trained θ (p,)."""
    theta = net.theta0.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x, theta), y).backward()
        optimizer.step()
    return theta.detach()


def adapt(
    config: dict, net: FunctionalNetwork, pooled_net: FunctionalNetwork, support: dict, test: dict, seed: int
) -> dict:
    """Run the methods of ``config["methods"]`` on one support draw (and only those): method -> (test probabilities,
    seconds); and the prior precision δ used by the MAP, Laplace and SVI: ``config["prior_precision"]`` if set, else
    the grid value of largest Laplace evidence."""
    x, y = support["inputs"], support["labels"]
    out, generator, wanted = {}, torch.Generator().manual_seed(seed), set(config["methods"])
    clock = time.perf_counter()
    fixed = config["prior_precision"]
    laplace = Laplace(
        net, "classification", prior_precision=1.0 if fixed is None else fixed, num_classes=NUM_CLASSES
    ).fit(x, y)
    if fixed is None:
        delta = laplace.optimize_prior_precision(
            torch.logspace(*config["prior_grid"], dtype=torch.float64), progress=False
        )
    else:
        delta = laplace.prior_precision
    shared = time.perf_counter() - clock
    for method, link in (("linearised MAP", "map"), ("Laplace (probit)", "probit")):
        if method in wanted:
            clock = time.perf_counter()
            probs = laplace.predict(test["inputs"], link=link, batch_size=config["predict_batch"])
            out[method] = (probs, shared + time.perf_counter() - clock)
    if "SVI" in wanted:
        clock = time.perf_counter()
        svi = SVI(net, "classification", prior_precision=delta, num_classes=NUM_CLASSES)
        svi.fit(
            x,
            y,
            epochs=config["svi_epochs"],
            lr=config["svi_lr"],
            num_samples=config["svi_samples"],
            progress=False,
            generator=generator,
        )
        out["SVI"] = (
            svi.predict(test["inputs"], num_samples=config["predictive_samples"], generator=generator),
            time.perf_counter() - clock,
        )
    if "NTK-GP one-hot" in wanted:
        clock = time.perf_counter()
        onehot = nn.functional.one_hot(y, NUM_CLASSES).to(x.dtype)
        gp = NTKGP(net, x, onehot, mean="zero")
        gp.fit()
        pred = gp.predict(test["inputs"])
        probs = gp_class_probabilities(
            pred.mean.detach(), pred.variance.detach(), config["predictive_samples"], generator
        )
        out["NTK-GP one-hot"] = (probs, time.perf_counter() - clock)
    if "retrain last layer" in wanted:
        clock = time.perf_counter()
        head = train_cross_entropy(pooled_net, x, y, config["retrain_steps"], config["retrain_lr"])
        with torch.no_grad():
            probs = torch.softmax(pooled_net(test["inputs"], head), -1)
        out["retrain last layer"] = (probs, time.perf_counter() - clock)
    if "fine-tune" in wanted:
        clock = time.perf_counter()
        tuned = train_cross_entropy(net, x, y, config["finetune_steps"], config["finetune_lr"])
        with torch.no_grad():
            probs = torch.softmax(net(test["inputs"], tuned), -1)
        out["fine-tune"] = (probs, time.perf_counter() - clock)
    return {m: out[m] for m in config["methods"]}, delta


def summarise(rows: list[dict], shots: list[int], methods: list[str]) -> str:
    tables = []
    for k in shots:
        table = []
        for method in methods:
            sel = [r for r in rows if r["shots"] == k and r["method"] == method]
            if not sel:
                continue
            cells = [mean_and_stderr(r[key] for r in sel) for key in ("accuracy", "nll", "ece")]
            t, t_err = mean_and_stderr(r["seconds"] for r in sel)
            table.append([method] + [f"{m:.3f} ± {e:.3f}" for m, e in cells] + [f"{t:.2f} ± {t_err:.2f}"])
        tables.append(
            f"{k}-shot (mean ± standard error over {len(sel)} draws)\n"
            + format_table(["method", "accuracy", "NLL", "ECE", "seconds"], table)
        )
    return "\n\n".join(tables)


def plot(rows: list[dict], shots: list[int], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in zip(axes, ("accuracy", "nll", "ece"), ("accuracy", "NLL", "expected calibration error")):
        for method in methods:
            stats = [mean_and_stderr(r[key] for r in rows if r["shots"] == k and r["method"] == method) for k in shots]
            ax.errorbar(shots, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3, label=method)
        ax.set_xscale("log")
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.set_xlabel("shots per class")
        ax.set_title(label)
    axes[0].legend(fontsize=7)
    save_figure_atomic(fig, path)


def run(config: dict, out_dir: Path, device: str = "cpu", seed: int = 0) -> dict:
    """Every (shots, draw) job, results.json rewritten after each; a rerun of the same configuration and seed skips
    the finished draws (each draw is seeded by itself: 1000·seed + 100·k + draw)."""
    unknown = [m for m in config["methods"] if m not in METHODS]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; the methods are {METHODS}")
    path, payload, start = begin(config, out_dir, device, seed, scope=config["scope"], rows=[])
    size, scope = config["image_size"], config["scope"]
    train_images, train_labels = load_fashion_mnist(train=True)
    test_images, test_labels = load_fashion_mnist(train=False)
    pick = torch.randperm(len(test_labels), generator=torch.Generator().manual_seed(seed))[: config["test_size"]]
    test_images, test_labels = test_images[pick].to(device), test_labels[pick].to(device)
    head = nn.Linear(1280, NUM_CLASSES).to(device)
    model = with_head(load_mobilenet(device), head)
    params, split_prefix = scope_params(scope), config["frozen_prefix"]
    test = {"inputs": preprocess(test_images, size)}
    rows = payload["rows"]
    done = {(r["shots"], r["draw"]) for r in rows}
    jobs = [(k, d) for k in config["shots"] for d in range(config["draws"]) if (k, d) not in done]
    for k, draw in progress_bar(jobs, desc="fashion-fewshot"):
        draw_seed = 1000 * seed + 100 * k + draw
        generator = torch.Generator().manual_seed(draw_seed)
        torch.manual_seed(draw_seed)
        head.reset_parameters()  # the new head, seeded per draw, shared by every method
        idx = support_indices(train_labels, k, generator)
        images = train_images[idx].to(device)
        support = {"inputs": preprocess(images, size), "labels": train_labels[idx].to(device)}
        net = FunctionalNetwork(model, params, config["chunk_size"], frozen_prefix=split_prefix)
        pooled_net = FunctionalNetwork(model, ["classifier."], frozen_prefix=split_prefix)
        results, delta = adapt(config, net, pooled_net, support, test, draw_seed)
        for method, (probs, seconds) in results.items():
            rows.append(
                {
                    "shots": k,
                    "draw": draw,
                    "method": method,
                    "seconds": seconds,
                    "prior_precision": delta,
                    **metrics(probs, test_labels),
                }
            )
        payload.update(parameters=net.num_params, cut=net.split and net.split.cut)
        payload["seconds_this_run"] = time.perf_counter() - start
        write_json_atomic(path, payload)
    payload["seconds_this_run"] = time.perf_counter() - start
    write_json_atomic(path, payload)
    plot(rows, config["shots"], config["methods"], out_dir / "fewshot.png")
    print(
        f"scope {scope}: {payload['parameters']:,} adapted parameters (frozen prefix up to {payload['cut']}), "
        f"{len(test_labels)} test images, {size}×{size} inputs, device {device}, {payload['seconds_this_run']:.0f} s"
        " this run"
    )
    print(summarise(rows, config["shots"], config["methods"]))
    print(f"results: {path}  figure: {out_dir / 'fewshot.png'}")
    return {"rows": len(rows)}


DEFAULT = {
    "shots": [1, 5, 10, 20],
    "draws": 5,
    "test_size": 2000,
    "image_size": 64,
    "scope": "last_layer",
    "methods": METHODS,
    "chunk_size": 32,
    "predict_batch": 256,
    "prior_precision": None,
    "prior_grid": [-4, 4, 33],
    "svi_epochs": 300,
    "svi_lr": 1e-2,
    "svi_samples": 4,
    "predictive_samples": 1000,
    "retrain_steps": 300,
    "retrain_lr": 1e-2,
    "finetune_steps": 100,
    "finetune_lr": 1e-3,
    "frozen_prefix": True,
}
TINY = {
    **DEFAULT,
    "shots": [1, 2],
    "draws": 1,
    "test_size": 40,
    "image_size": 32,
    "scope": "last_block",
    "prior_grid": [-2, 2, 5],
    "svi_epochs": 5,
    "predictive_samples": 50,
    "retrain_steps": 5,
    "finetune_steps": 2,
}

EXPERIMENT = Experiment(
    name="fashion-fewshot",
    description="10-way k-shot Fashion-MNIST with an ImageNet MobileNetV2: Laplace, SVI, NTK-GP and baselines",
    run=run,
    configs={
        "default": DEFAULT,
        "tiny": TINY,
        "gpu_all": {
            **DEFAULT,
            "scope": "all",
            "shots": [1, 5],
            "draws": 2,
            "test_size": 200,
            "chunk_size": 8,
            "predict_batch": 50,
        },
    },
)
