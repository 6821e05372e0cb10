"""Jacobian spectra across tasks (the Fast Adaptation supplement's Appendix E.1, Figure A.2), on our library.

Stand-ins: MNIST1 and MNIST2 are the two halves of the 10,000-image MNIST set we have (split by the seed: 5,000 and
4,000 images, the last ``test_size`` of the second half held out for testing; the paper's are halves of MNIST's
training set); Fashion-MNIST's first ``fashion_size`` training images. Inputs
zero-padded to 32 × 32. LeNet-5 (conv 5 × 5 with 6 and 16 channels, ReLU, 2 × 2 max pooling, dense 120 – 84 – 10;
61,706 parameters) trained with Adam (lr 2e-3, batches of 256, ``epochs`` epochs) on MNIST1, on MNIST2, and on
Fashion-MNIST — the last then with its final layer retrained on MNIST1 (1,000 Adam steps at lr 0.01, batches of
256) —, ``models`` models each from different seeds (25 in the paper). For each model, the top singular values of
its Jacobian J (10 outputs, all parameters) on ``spectrum_images`` MNIST1 images, without forming J: ``lanczos_steps``
Lanczos steps with full reorthogonalisation on the NTK operator J Jᵀ (:func:`ntkgp.ntk_operator`, one JVP and one
VJP per step), singular values the square roots of the top Ritz values (the extremes converge first). Reported: the
test accuracy of each model on the held-out MNIST images, σ_1, σ_10, σ_k / σ_1 at ``report`` indices, and the mean
absolute difference of log-spectra between models of the same and of different sources. Models and spectra are
written as they finish; figure ``spectra.png``.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
from torch import nn

from ntkgp import ntk_operator
from ntkgp.lanczos import ritz_values

from .common import Experiment, adam_epochs, begin, format_table, mean_and_stderr, save_figure_atomic, write_json_atomic
from .datasets import load_fashion_mnist, load_mnist

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ntkgp.progress import progress_bar

SOURCES = ("MNIST1", "MNIST2", "Fashion-MNIST")


def lenet5() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, 10),
    )


def load(config: dict, seed: int) -> dict:
    """MNIST1, MNIST2 (halves of the 10,000 MNIST images by the seed, the last ``test_size`` of MNIST2's half held out
    as a test set no model trains on) and Fashion-MNIST, padded to 32 × 32."""
    images, labels = load_mnist()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    fashion, fashion_labels = load_fashion_mnist(train=True)
    prep = lambda x: nn.functional.pad((x - 0.5) / 0.5, (2, 2, 2, 2)).to(torch.get_default_dtype())  # noqa: E731
    half, test = len(images) // 2, len(images) - config["test_size"]
    return {
        "MNIST1": (prep(images[order[:half]]), labels[order[:half]]),
        "MNIST2": (prep(images[order[half:test]]), labels[order[half:test]]),
        "Fashion-MNIST": (prep(fashion[: config["fashion_size"]]), fashion_labels[: config["fashion_size"]]),
        "test": (prep(images[order[test:]]), labels[order[test:]]),
    }


def train_model(source: str, index: int, data: dict, config: dict, seed: int) -> nn.Module:
    model_seed = 1000 * seed + 100 * SOURCES.index(source) + index
    torch.manual_seed(model_seed)
    model = lenet5()
    x, y = data[source]
    steps = config["epochs"] * -(-len(x) // config["batch_size"])
    adam_epochs(model, model.parameters(), x, y, 2e-3, config["batch_size"], steps, model_seed)
    if source == "Fashion-MNIST":  # its last layer retrained on MNIST1
        adam_epochs(
            model,
            model[-1].parameters(),
            *data["MNIST1"],
            0.01,
            config["batch_size"],
            config["retrain_steps"],
            model_seed,
        )
    return model.eval()


def spectrum(model: nn.Module, x: torch.Tensor, steps: int) -> list[float]:
    """Top singular values of J(x) (descending), from Lanczos on J Jᵀ."""
    op = ntk_operator(model, x)
    values = ritz_values(lambda v: (op @ v.unsqueeze(-1)).squeeze(-1), op.shape[-1], steps, x.dtype)
    return values.flip(0).clamp_min(0).sqrt().tolist()


def log_distance(a: list[float], b: list[float], count: int) -> float:
    """Mean |log σ_a − log σ_b| over the top ``count`` singular values."""
    return float(np.mean(np.abs(np.log(a[:count]) - np.log(b[:count]))))


def run(config: dict, out_dir: Path, device: str = "cpu", seed: int = 0) -> dict:
    path, payload, start = begin(config, out_dir, device, seed, models=[])
    data = load(config, seed)
    probe = data["MNIST1"][0][: config["spectrum_images"]]
    test_x, test_y = data["test"]
    done = {(m["source"], m["index"]) for m in payload["models"]}
    todo = [(s, i) for s in SOURCES for i in range(config["models"]) if (s, i) not in done]
    for source, index in progress_bar(todo, desc="jacobian-spectra"):
        begun = time.perf_counter()
        model = train_model(source, index, data, config, seed)
        trained = time.perf_counter() - begun
        with torch.no_grad():
            accuracy = float((model(test_x).argmax(-1) == test_y).double().mean())
        values = spectrum(model, probe, config["lanczos_steps"])
        payload["models"].append(
            {
                "source": source,
                "index": index,
                "accuracy": accuracy,
                "singular_values": values,
                "train_seconds": trained,
                "spectrum_seconds": time.perf_counter() - begun - trained,
            }
        )
        write_json_atomic(path, payload)
    payload["wall_seconds_this_run"] = time.perf_counter() - start
    write_json_atomic(path, payload)
    models, top = payload["models"], config["top"]
    body = []
    for source in SOURCES:
        sel = [m for m in models if m["source"] == source]
        cell = lambda values: "{:.3g} ± {:.2g}".format(*mean_and_stderr(values))  # noqa: E731
        body.append(
            [source, str(len(sel)), cell(m["accuracy"] for m in sel), cell(m["singular_values"][0] for m in sel)]
            + [cell(m["singular_values"][k - 1] / m["singular_values"][0] for m in sel) for k in config["report"]]
        )
    print(
        f"LeNet-5, J on {config['spectrum_images']} MNIST1 images (10 outputs), {config['lanczos_steps']} Lanczos "
        "steps on J Jᵀ; accuracy on 1,000 MNIST2 images; mean ± s.e. over models"
    )
    print(
        format_table(
            ["trained on", "models", "MNIST test accuracy", "σ_1"] + [f"σ_{k}/σ_1" for k in config["report"]], body
        )
    )
    pairs = []
    for a, b in itertools.combinations_with_replacement(SOURCES, 2):
        distances = [
            log_distance(m["singular_values"], n["singular_values"], top)
            for m, n in itertools.product(
                [m for m in models if m["source"] == a], [m for m in models if m["source"] == b]
            )
            if m is not n and not (a == b and m["index"] > n["index"])
        ]
        if distances:
            pairs.append([f"{a} – {b}", str(len(distances)), "{:.3f} ± {:.3f}".format(*mean_and_stderr(distances))])
    print(f"Mean |Δ log σ| over the top {top} singular values, between pairs of models")
    print(format_table(["sources", "pairs", "distance"], pairs))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = dict(zip(SOURCES, ("tab:blue", "tab:orange", "tab:green")))
    for m in models:
        values = np.asarray(m["singular_values"][:top])
        label = m["source"] if m["index"] == 0 else None
        axes[0].plot(np.arange(1, len(values) + 1), values, color=colors[m["source"]], alpha=0.7, label=label)
        axes[1].plot(
            np.arange(1, len(values) + 1), values / values[0], color=colors[m["source"]], alpha=0.7, label=label
        )
    for ax, title in zip(axes, ("singular values of J on MNIST1", "normalised by σ_1")):
        ax.set_yscale("log")
        ax.set_xlabel("index")
        ax.set_title(f"Figure A.2: {title}")
        ax.legend()
    save_figure_atomic(fig, out_dir / "spectra.png")
    print(f"results: {path}; figure: {out_dir / 'spectra.png'}; {payload['wall_seconds_this_run']:.0f} s this run")
    return {"models": len(models)}


DEFAULT = {
    "models": 4,
    "epochs": 20,
    "batch_size": 256,
    "fashion_size": 5000,
    "retrain_steps": 1000,
    "test_size": 1000,
    "spectrum_images": 200,
    "lanczos_steps": 60,
    "top": 30,
    "report": [2, 10, 30],
}
TINY = {
    **DEFAULT,
    "models": 2,
    "epochs": 1,
    "fashion_size": 256,
    "retrain_steps": 2,
    "spectrum_images": 4,
    "test_size": 50,
    "lanczos_steps": 8,
    "top": 4,
    "report": [2, 4],
}

EXPERIMENT = Experiment(
    name="jacobian-spectra",
    description="Fast Adaptation supplement E.1, Fig. A.2: Jacobian singular values of LeNet-5 across tasks",
    run=run,
    configs={
        "default": DEFAULT,
        "tiny": TINY,
        "paper": {**DEFAULT, "models": 25, "fashion_size": 60000, "spectrum_images": 1000, "lanczos_steps": 120},
    },
)
