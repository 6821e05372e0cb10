"""Rotation angles of new people's faces (the Fast Adaptation paper's Olivetti experiment, supplement E.2).

Each of the 400 Olivetti faces is rotated ``rotations`` times (30 in the paper) by angles drawn uniformly in
[−90°, 90°] and sampled at 45 × 45 around the centre (bilinear; the largest square inside every rotation of the 64 × 64
image, so no padding shows). The angle is the target. People 0–19 are for pretraining; people 20–39 for adaptation
and testing: per seed their 200 photographs are split into 100 adaptation photographs and 100 test photographs (no
photograph appears, under any rotation, on both sides), ``n`` rotated images are drawn from the adaptation side
and ``test_images`` from the test side.

The network is the supplement's (conv 5×5 20 channels, max pool, conv 5×5 50 channels, max pool, dense
3200 − 500 − 2, ReLU; pooling after each convolution is what makes 3200 inputs from 45 × 45 images), trained with the
heteroscedastic Gaussian loss N(y | μ(x), softplus(s(x)) + 1e-5) on standardised angles (pixels standardised
too), Adam lr 1e-3, batch 32, ``epochs`` epochs (150 in the paper and in ``paper``; fewer in ``default``, for the
CPU). Adapted, for each n in ``shots``:

- ``pretrained``: the network as it is (its own mean and variance);
- ``NTK-GP (pretraining noise)``: the function-space NTK-GP of the mean output μ (network mean, all 1.6M
  parameters), the noise fixed at the network's mean predicted variance on its pretraining images, the output
  scale by the exact marginal likelihood;
- ``NTK-GP (ML)``: the same with the noise by the marginal likelihood too;
- ``retrain last layer``: Adam (lr 1e-3, batches of ≤ 32) on the last Linear layer with the heteroscedastic loss,
  ``finetune_steps`` steps from the pretrained weights;
- ``fine-tune all``: the same on every parameter.

Test RMSE and Gaussian NLL in degrees (mean ± standard error over seeds), seconds per adaptation; figure
``olivetti.png`` (both against n); a row per (seed, n, method) written as it finishes; the pretrained weights kept
in ``pretrained.pt``, so a rerun resumes without pretraining again.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
from torch import Tensor, nn

from ntkgp import NTKGP

from .common import (
    Experiment,
    adam_epochs,
    atomic_path,
    begin,
    format_table,
    mean_and_stderr,
    save_figure_atomic,
    write_json_atomic,
)
from .datasets import load_olivetti

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ntkgp.progress import progress_bar

METHODS = ("pretrained", "NTK-GP (pretraining noise)", "NTK-GP (ML)", "retrain last layer", "fine-tune all")
CROP = 45
VARIANCE_FLOOR = 1e-5


def lenet3() -> nn.Sequential:
    """The supplement's network on (b, 1, 45, 45) images -> (b, 2): the mean and the raw variance."""
    return nn.Sequential(
        nn.Conv2d(1, 20, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3200, 500),
        nn.ReLU(),
        nn.Linear(500, 2),
    )


class MeanOutput(nn.Module):
    """The mean output μ(x) (b,) of a heteroscedastic network: what the NTK-GP linearises."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)[:, 0]


def mean_and_variance(outputs: Tensor) -> tuple[Tensor, Tensor]:
    """(μ, softplus(s) + 1e-5) from the network's outputs (b, 2)."""
    return outputs[:, 0], nn.functional.softplus(outputs[:, 1]) + VARIANCE_FLOOR


def heteroscedastic_loss(outputs: Tensor, y: Tensor) -> Tensor:
    """Mean Gaussian negative log-likelihood of y (b,) under N(μ, softplus(s) + 1e-5), outputs (b, 2)."""
    mean, var = mean_and_variance(outputs)
    return nn.functional.gaussian_nll_loss(mean, y, var, full=True, eps=VARIANCE_FLOOR / 2)


def rotate_and_crop(images: Tensor, angles: Tensor, size: int = CROP) -> Tensor:
    """Each image (b, 1, H, H) rotated anticlockwise by its angle in degrees (b,), bilinearly sampled on the central
    size × size pixels -> (b, 1, size, size)."""
    radians = torch.deg2rad(angles.to(images.dtype))
    cos, sin, scale = radians.cos(), radians.sin(), size / images.shape[-1]
    theta = scale * torch.stack([torch.stack([cos, -sin, 0 * cos], -1), torch.stack([sin, cos, 0 * cos], -1)], 1)
    grid = nn.functional.affine_grid(theta, [images.shape[0], 1, size, size], align_corners=False)
    return nn.functional.grid_sample(images, grid, mode="bilinear", align_corners=False)


def rotated_faces(rotations: int, seed: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """Every face rotated ``rotations`` times by angles U(−90°, 90°): images (400·R, 1, 45, 45), angles in degrees,
    the photograph (0..399) and the person (0..39) of each, photographs in blocks of R."""
    faces, people = load_olivetti()
    generator = torch.Generator().manual_seed(seed)
    angles = 180 * torch.rand(len(faces) * rotations, generator=generator, dtype=torch.float64) - 90
    photo = torch.arange(len(faces)).repeat_interleave(rotations)
    images = rotate_and_crop(faces[photo].double(), angles).to(dtype)
    return {"images": images, "angles": angles, "photo": photo, "person": people[photo]}


def pretrain(data: dict, config: dict, seed: int, dtype: torch.dtype) -> tuple[nn.Module, dict]:
    """Train the network on people 0–19; returns it (eval mode) and the standardisation and pretraining noise."""
    rows = torch.nonzero(data["person"] < 20).squeeze(-1)
    pixels = data["images"][rows]
    angles = data["angles"][rows]
    stats = {
        "pixel_mean": float(pixels.mean()),
        "pixel_std": float(pixels.std()),
        "angle_mean": float(angles.mean()),
        "angle_std": float(angles.std()),
    }
    x, y = standardised(data, rows, stats, dtype)
    torch.manual_seed(seed)
    model = lenet3().to(dtype)
    steps = config["epochs"] * -(-len(x) // config["batch_size"])
    start = time.perf_counter()
    adam_epochs(
        model, model.parameters(), x, y, config["lr"], config["batch_size"], steps, seed, loss=heteroscedastic_loss
    )
    mean, var = predict_network(model.eval(), x)
    stats.update(
        noise=float(var.mean()),
        train_rmse_deg=float((mean - y).square().mean().sqrt()) * stats["angle_std"],
        seconds=time.perf_counter() - start,
        steps=steps,
    )
    return model, stats


def standardised(data: dict, rows: Tensor, stats: dict, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Standardised images (len(rows), 1, 45, 45) and angles (len(rows),) of the given rows."""
    x = (data["images"][rows] - stats["pixel_mean"]) / stats["pixel_std"]
    y = (data["angles"][rows] - stats["angle_mean"]) / stats["angle_std"]
    return x.to(dtype), y.to(dtype)


def split(data: dict, shots: int, config: dict, seed: int) -> tuple[Tensor, Tensor]:
    """Rows of ``shots`` adaptation images and of ``test_images`` test images for one seed (module docstring).
    The draw for a smaller n is a prefix of the one for a larger n."""
    generator = torch.Generator().manual_seed(1_000 + seed)
    photos = 200 + torch.randperm(200, generator=generator)
    adapt = torch.nonzero(torch.isin(data["photo"], photos[:100])).squeeze(-1)
    test = torch.nonzero(torch.isin(data["photo"], photos[100:])).squeeze(-1)
    adapt = adapt[torch.randperm(len(adapt), generator=generator)]
    test = test[torch.randperm(len(test), generator=generator)]
    return adapt[:shots], test[: config["test_images"]]


def predict_network(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The network's own predictive mean and variance (len(x),) each, in chunks of 500 images."""
    with torch.no_grad():
        return mean_and_variance(torch.cat([model(chunk) for chunk in x.split(500)]))


def finetuned(model: nn.Module, x: Tensor, y: Tensor, last_layer_only: bool, config: dict, seed: int) -> nn.Module:
    """A copy of the pretrained network trained on (x, y) with the heteroscedastic loss."""
    copy = lenet3().to(next(model.parameters()).dtype)
    copy.load_state_dict(model.state_dict())
    params = copy[-1].parameters() if last_layer_only else copy.parameters()
    adam_epochs(
        copy,
        params,
        x,
        y,
        config["lr"],
        config["batch_size"],
        config["finetune_steps"],
        seed,
        loss=heteroscedastic_loss,
    )
    return copy.eval()


def adapt(
    method: str, model: nn.Module, x: Tensor, y: Tensor, xs: Tensor, noise: float, config: dict, seed: int
) -> tuple[Tensor, Tensor]:
    """Predictive mean and variance (of an observation) at xs, standardised units, after adapting on (x, y)."""
    if method == "pretrained":
        return predict_network(model, xs)
    if method.startswith("NTK-GP"):
        fixed = noise if method == "NTK-GP (pretraining noise)" else None
        gp = NTKGP(MeanOutput(model), x, y, mean="network", noise=fixed, progress=False).fit()
        pred = gp.predict(xs, observation_noise=True)
        return pred.mean, pred.variance
    return predict_network(finetuned(model, x, y, method == "retrain last layer", config, seed), xs)


def scores(mean: Tensor, var: Tensor, y: Tensor, angle_std: float) -> dict[str, float]:
    """Test RMSE and mean Gaussian NLL in degrees, from predictions in standardised units."""
    mean, var, y = mean.double(), var.double().clamp_min(1e-12), y.double()
    nll = 0.5 * (torch.log(2 * math.pi * var) + (y - mean).square() / var) + math.log(angle_std)
    return {"rmse": float((y - mean).square().mean().sqrt()) * angle_std, "nll": float(nll.mean())}


def save_model_atomic(model: nn.Module, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)


def summary_table(rows: list[dict], shots: list[int], methods: list[str], metric: str) -> list[list[str]]:
    body = []
    for method in methods:
        cells = []
        for n in shots:
            values = [r[metric] for r in rows if r["method"] == method and r["shots"] == n]
            cells.append("{:.2f} ± {:.2f}".format(*mean_and_stderr(values)) if values else "-")
        times = [r["seconds"] for r in rows if r["method"] == method]
        body.append([method, *cells, f"{np.mean(times):.2f}" if times else "-"])
    return body


def plot(rows: list[dict], shots: list[int], methods: list[str], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, label in ((axes[0], "rmse", "test RMSE (degrees)"), (axes[1], "nll", "test NLL (degrees)")):
        for method in methods:
            stats = [
                mean_and_stderr(r[metric] for r in rows if r["method"] == method and r["shots"] == n) for n in shots
            ]
            ns = [n for n, s in zip(shots, stats) if not math.isnan(s[0])]
            m = [s[0] for s in stats if not math.isnan(s[0])]
            e = [s[1] for s in stats if not math.isnan(s[0])]
            ax.errorbar(ns, m, yerr=e, marker="o", ms=3, capsize=2, label=method)
        ax.set_xscale("log")
        ax.set_xlabel("adaptation images n")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle("Olivetti rotation angles of 20 new people (mean ± s.e. over seeds)", fontsize=10)
    save_figure_atomic(fig, path)


def run(config: dict, out_dir: Path, device: str = "cpu", seed: int = 0) -> dict:
    path, payload, start = begin(config, out_dir, device, seed, rows=[])
    dtype = getattr(torch, config["dtype"])
    data = rotated_faces(config["rotations"], seed, dtype)
    weights = out_dir / "pretrained.pt"
    model = lenet3().to(dtype)
    if "pretraining" in payload and weights.exists():
        model.load_state_dict(torch.load(weights))
        model.eval()
    else:
        print(f"pretraining on people 0-19 ({config['epochs']} epochs)")
        model, payload["pretraining"] = pretrain(data, config, seed, dtype)
        save_model_atomic(model, weights)
        payload["rows"] = []
        write_json_atomic(path, payload)
    stats = payload["pretraining"]
    done = {(r["seed"], r["shots"], r["method"]) for r in payload["rows"]}
    jobs = [
        (s, n)
        for s in config["seeds"]
        for n in config["shots"]
        if any((s, n, m) not in done for m in config["methods"])
    ]
    for s, n in progress_bar(jobs, desc="olivetti-rotation", unit="draw"):
        adapt_rows, test_rows = split(data, n, config, s)
        x, y = standardised(data, adapt_rows, stats, dtype)
        xs, ys = standardised(data, test_rows, stats, dtype)
        for method in config["methods"]:
            if (s, n, method) in done:
                continue
            began = time.perf_counter()
            mean, var = adapt(method, model, x, y, xs, stats["noise"], config, 100 * s + n)
            row = {
                "seed": s,
                "shots": n,
                "method": method,
                "seconds": time.perf_counter() - began,
                **scores(mean, var, ys, stats["angle_std"]),
            }
            payload["rows"].append(row)
            write_json_atomic(path, payload)
    payload["wall_seconds_this_run"] = time.perf_counter() - start
    write_json_atomic(path, payload)
    rows, shots, methods = payload["rows"], config["shots"], config["methods"]
    plot(rows, shots, methods, out_dir / "olivetti.png")
    print(
        f"pretrained {stats['steps']} Adam steps in {stats['seconds']:.0f} s: "
        f"train RMSE {stats['train_rmse_deg']:.2f}°,"
        f" mean predicted variance {stats['noise']:.3g} (standardised; angle sd {stats['angle_std']:.1f}°)"
    )
    for metric, title in (("rmse", "test RMSE (degrees)"), ("nll", "test NLL (degrees)")):
        print(f"\n{title}, mean ± s.e. over {len(config['seeds'])} seeds, {config['test_images']} test images each")
        print(
            format_table(
                ["method", *[f"n={n}" for n in shots], "s / adaptation"], summary_table(rows, shots, methods, metric)
            )
        )
    print(f"results: {path}; figure: {out_dir / 'olivetti.png'}; {payload['wall_seconds_this_run']:.0f} s this run")
    return {"rows": len(rows)}


DEFAULT = {
    "rotations": 30,
    "epochs": 10,
    "batch_size": 32,
    "lr": 1e-3,
    "shots": [10, 20, 50, 100, 200],
    "seeds": [0, 1, 2],
    "test_images": 300,
    "finetune_steps": 100,
    "methods": list(METHODS),
    "dtype": "float32",
}
TINY = {**DEFAULT, "rotations": 2, "epochs": 1, "shots": [10], "seeds": [0], "test_images": 16, "finetune_steps": 2}

EXPERIMENT = Experiment(
    name="olivetti-rotation",
    description="Fast Adaptation E.2: rotation angles of new people's faces, NTK-GP against retraining and fine-tuning",
    run=run,
    configs={
        "default": DEFAULT,
        "tiny": TINY,
        "paper": {**DEFAULT, "epochs": 150, "seeds": list(range(10)), "test_images": 3000},
    },
)
