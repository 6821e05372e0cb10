"""Why LQF needs preconditioning (the LQF paper's §3.2 and Figure 3), measured on our library.

Stand-ins (the paper's ImageNet Leaky-ReLU ResNet-50 and its datasets are not offline): torchvision's ImageNet
MobileNetV2 with a new seeded 10-way head, ``shots`` Fashion-MNIST training images per class at ``image_size``
(ImageNet-normalised), ``scope`` the adapted parameters (default the last block: features.17–18 and the head).

Spectra, by ``steps`` Lanczos steps with full reorthogonalisation from a fixed start (Ritz values lie inside the
spectrum: the extreme ones bound it, so the printed condition numbers are lower bounds), in ``dtype``:

- ``LQF Hessian``: H = 2 JᵀJ + λI of LQF's objective Σ‖f_lin − α·onehot‖² + (λ/2)‖θ − θ0‖² (constant in θ);
- ``LQF, K-FAC preconditioned``: P⁻¹H with P = K + λI the K-FAC preconditioner (the pencil (H, P));
- ``NLFT start`` / ``NLFT end``: the loss Hessian of non-linear fine-tuning with cross-entropy — its Gauss-Newton
  part Σ Jᵢᵀ(diag π − ππᵀ)Jᵢ + λI (the paper's Figure 3 plots the Hessian: the GGN is its positive part) — at θ0
  and after NLFT (SGD, momentum 0.9, ``nlft_lr``, weight decay ``nlft_weight_decay`` towards 0 as the paper's
  NLFT, ``nlft_epochs`` epochs of ``batch_size``; lr 0.01 diverged here, to a constant prediction — 0.001 is the
  paper's other value), with the same λI added so that the four spectra compare.

Training curves: LQF's objective per epoch with and without K-FAC at lr 0.1 and over the grid ``lrs`` (plus LQF's
own default, "auto": 0.1 with K-FAC, 1/λ_max without), the best lr per preconditioner (lowest final objective of the
runs that did not diverge — a run diverges when LQF stops it for a non-finite objective or when its objective
ends above its first epoch's), with the test accuracy on ``test_size`` Fashion-MNIST test images. Results are written
after every item and a rerun resumes; figure ``conditioning.png`` (Ritz-value histograms and the curves).
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import torch
from torch import Tensor, nn

from ntkgp import LQF, FisherOperator, FunctionalNetwork
from ntkgp.lanczos import ritz_values

from .common import Experiment, begin, format_table, save_figure_atomic, write_json_atomic
from .datasets import load_fashion_mnist, support_indices
from .fashion_fewshot import NUM_CLASSES, load_mobilenet, preprocess, scope_params, with_head
from .lqf_methods import sgd_cross_entropy

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ntkgp.progress import progress_bar

SPECTRA = ["LQF Hessian", "LQF, K-FAC preconditioned", "NLFT start", "NLFT end"]


def ggn_ritz_values(network: FunctionalNetwork, x: Tensor, weight_decay: float, steps: int) -> Tensor:
    """Ritz values (ascending) of Σ Jᵢᵀ(diag π − ππᵀ)Jᵢ + λI at the network's θ0 (the cross-entropy GGN)."""
    fisher = FisherOperator.of(x, network=network, likelihood="categorical", method="exact", epsilon=1.0)

    def apply(v: Tensor) -> Tensor:
        with torch.no_grad():
            return (fisher @ v.unsqueeze(-1)).squeeze(-1) + weight_decay * v

    return ritz_values(apply, network.num_params, steps, network.dtype, network.device)


def nlft(network: FunctionalNetwork, x: Tensor, y: Tensor, config: dict, seed: int) -> Tensor:
    """Non-linear fine-tuning: SGD (momentum 0.9, the usual weight decay towards 0) on the cross-entropy,
    minibatches; θ (p,)."""
    return sgd_cross_entropy(
        network,
        x,
        y,
        config["nlft_lr"],
        config["nlft_weight_decay"],
        config["nlft_epochs"],
        config["batch_size"],
        seed,
        desc="NLFT",
    )[0]


def at_weights(network: FunctionalNetwork, theta: Tensor) -> FunctionalNetwork:
    """The same network and scope with the selected parameters set to θ."""
    module = network.module_copy()
    values = network.unflatten(theta)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name in values:
                param.copy_(values[name])
    return FunctionalNetwork(module, network.names, network.chunk_size)


def summary(values: Tensor) -> dict:
    values = values.double()
    return {
        "min": float(values[0]),
        "max": float(values[-1]),
        "condition": float(values[-1] / values[0]),
        "ritz_values": values.tolist(),
    }


def lqf_curve(
    model: nn.Module,
    params,
    x: Tensor,
    y: Tensor,
    test: tuple[Tensor, Tensor],
    config: dict,
    preconditioner: str | None,
    lr: float | None,
    seed: int,
) -> dict:
    """LQF's objective per epoch and the final test accuracy at one lr ("auto": LQF's default); diverged runs say so."""
    start = time.perf_counter()
    lqf = LQF(model, params=params, weight_decay=config["weight_decay"], preconditioner=preconditioner)
    try:
        lqf.fit(x, y, epochs=config["lqf_epochs"], lr=lr, batch_size=config["batch_size"], seed=seed, progress=False)
    except FloatingPointError:
        return {
            "diverged": True,
            "loss": [r["loss"] for r in lqf.history],
            "lr_used": lqf.lr,
            "seconds": time.perf_counter() - start,
        }
    losses = [r["loss"] for r in lqf.history]
    if len(losses) > 1 and losses[-1] > losses[0]:  # finite but rising: diverging more slowly than LQF checks
        return {"diverged": True, "loss": losses, "lr_used": lqf.lr, "seconds": time.perf_counter() - start}
    accuracy = float((lqf.classify(test[0]) == test[1]).double().mean())
    return {
        "diverged": False,
        "loss": [r["loss"] for r in lqf.history],
        "lr_used": lqf.lr,
        "accuracy": accuracy,
        "seconds": time.perf_counter() - start,
    }


def plot(payload: dict, path: Path) -> None:
    """Histograms of log10 Ritz values per operator; LQF training curves."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for name in SPECTRA:
        if name in payload["spectra"]:
            values = np.log10(np.clip(payload["spectra"][name]["ritz_values"], 1e-12, None))
            left.hist(values, bins=30, alpha=0.5, label=f"{name} (κ ≥ {payload['spectra'][name]['condition']:.3g})")
    left.set_xlabel("log10 Ritz value")
    left.set_ylabel("count")
    left.legend(fontsize=7)
    firsts = [c["loss"][0] for c in payload["curves"].values() if c["loss"] and not c["diverged"]]
    cap = 100 * max(firsts) if firsts else 1e10  # diverged runs leave the plot at 100× the largest first objective
    for key, curve in payload["curves"].items():
        points = [(epoch, min(loss, cap)) for epoch, loss in enumerate(curve["loss"], 1) if loss > 0]
        if points:
            style = "-" if key.startswith("kfac") else "--"
            right.semilogy(*zip(*points), style, label=key + (" (diverged)" if curve["diverged"] else ""))
    right.set_xlabel("epoch")
    right.set_ylabel("LQF objective")
    right.legend(fontsize=6, ncol=2)
    save_figure_atomic(fig, path)


def run(config: dict, out_dir: Path, device: str = "cpu", seed: int = 0) -> dict:
    path, payload, start = begin(config, out_dir, device, seed, spectra={}, curves={})
    dtype = getattr(torch, config["dtype"])
    images, labels = load_fashion_mnist(train=True)
    idx = support_indices(labels, config["shots"], torch.Generator().manual_seed(seed))
    x = preprocess(images[idx].to(device), config["image_size"]).to(dtype)
    y = labels[idx].to(device)
    test_images, test_labels = load_fashion_mnist(train=False)
    pick = torch.randperm(len(test_labels), generator=torch.Generator().manual_seed(seed + 1))[: config["test_size"]]
    test = (preprocess(test_images[pick].to(device), config["image_size"]).to(dtype), test_labels[pick].to(device))
    torch.manual_seed(seed)
    model = with_head(load_mobilenet(device), nn.Linear(1280, NUM_CLASSES).to(device)).to(dtype).eval()
    params = scope_params(config["scope"])
    net = FunctionalNetwork(model, params)
    payload["parameters"], lam, steps = net.num_params, config["weight_decay"], config["steps"]

    def record(section: str, key: str, fn) -> None:
        if key not in payload[section]:
            payload[section][key] = fn()
            payload["seconds"] = time.perf_counter() - start  # of this run (a resumed run counts its own)
            write_json_atomic(path, payload)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # K-FAC: BatchNorm and depthwise parameters go diagonal
        made: list[LQF] = []

        def at_start() -> LQF:  # LQF with the data and K-FAC, no step taken: made only if a spectrum is missing
            if not made:
                made.append(LQF(model, params=params, weight_decay=lam))
                made[0].fit(x, y, epochs=1, lr=1e-12, batch_size=len(x), progress=False)
            return made[0]

        record("spectra", SPECTRA[0], lambda: summary(at_start().hessian_ritz_values(steps)))
        record("spectra", SPECTRA[1], lambda: summary(at_start().hessian_ritz_values(steps, preconditioned=True)))
        record("spectra", SPECTRA[2], lambda: summary(ggn_ritz_values(net, x, lam, steps)))
        if SPECTRA[3] not in payload["spectra"]:
            theta = nlft(net, x, y, config, seed)
            end = at_weights(net, theta)
            payload["nlft_train_accuracy"] = float((end(x).argmax(-1) == y).double().mean())
            payload["nlft_test_accuracy"] = float((end(test[0]).argmax(-1) == test[1]).double().mean())
            record("spectra", SPECTRA[3], lambda: summary(ggn_ritz_values(end, x, lam, steps)))
        runs = [(p, lr) for p in ("kfac", None) for lr in ["auto", *config["lrs"]]]
        for preconditioner, lr in progress_bar(runs, desc="LQF curves"):
            key = f"{preconditioner or 'plain'} lr={lr}"
            record(
                "curves",
                key,
                lambda preconditioner=preconditioner, lr=lr: lqf_curve(
                    model, params, x, y, test, config, preconditioner, None if lr == "auto" else lr, seed
                ),
            )
    best = {}
    for name in ("kfac", "plain"):
        finished = {k: c for k, c in payload["curves"].items() if k.startswith(name) and not c["diverged"]}
        best[name] = min(finished, key=lambda k: finished[k]["loss"][-1]) if finished else None
    payload["best"] = best
    write_json_atomic(path, payload)
    plot(payload, out_dir / "conditioning.png")
    spectra = payload["spectra"]
    print(
        f"MobileNetV2, scope {config['scope']} ({payload['parameters']:,} parameters), {len(x)} images, λ = {lam:g}, "
        f"{steps} Lanczos steps, {config['dtype']}; NLFT train/test accuracy "
        f"{payload['nlft_train_accuracy']:.3f}/{payload['nlft_test_accuracy']:.3f}"
    )
    print(
        format_table(
            ["operator", "λ_min ≥", "λ_max ≤", "κ ≥"],
            [
                [n, f"{spectra[n]['min']:.3g}", f"{spectra[n]['max']:.3g}", f"{spectra[n]['condition']:.3g}"]
                for n in SPECTRA
            ],
        )
    )
    rows = []
    for key, curve in payload["curves"].items():
        last = curve["loss"][-1] if curve["loss"] else math.nan
        rows.append(
            [
                key,
                f"{curve.get('lr_used', math.nan):.3g}",
                "diverged" if curve["diverged"] else f"{last:.4g}",
                "" if curve["diverged"] else f"{curve['accuracy']:.3f}",
                f"{curve['seconds']:.1f}",
            ]
        )
    print(format_table(["LQF run", "lr", "final objective", "test accuracy", "seconds"], rows))
    print(
        f"best: K-FAC {best['kfac']}, plain SGD {best['plain']}; results: {path}, figure: "
        f"{out_dir / 'conditioning.png'}; {payload['seconds']:.0f} s"
    )
    return {"spectra": len(spectra), "curves": len(payload["curves"])}


DEFAULT = {
    "scope": "last_block",
    "shots": 10,
    "image_size": 64,
    "test_size": 500,
    "dtype": "float64",
    "weight_decay": 0.1,
    "steps": 40,
    "batch_size": 32,
    "nlft_lr": 1e-3,
    "nlft_weight_decay": 1e-4,
    "nlft_epochs": 20,
    "lqf_epochs": 10,
    "lrs": [1.0, 0.1, 0.01, 1e-3, 1e-4, 1e-5, 1e-6],
}
TINY = {
    **DEFAULT,
    "scope": "last_layer",
    "shots": 2,
    "image_size": 32,
    "test_size": 20,
    "steps": 6,
    "nlft_epochs": 2,
    "lqf_epochs": 2,
    "lrs": [0.1, 1e-4],
}

EXPERIMENT = Experiment(
    name="lqf-conditioning",
    description="LQF paper Fig. 3 / §3.2: Hessian spectra of LQF (with and without K-FAC) and of NLFT, LQF curves",
    run=run,
    configs={
        "default": DEFAULT,
        "tiny": TINY,
        "paper": {**DEFAULT, "scope": "all", "shots": 25, "steps": 100, "lqf_epochs": 20},
    },
)
