"""Large-N regression with bounded memory: the NTK-GP of a pretrained MLP on N = 20,000 rows of
the UCI ``protein`` set, next to GPyTorch's exact GP with a Matérn-5/2 ARD kernel and the network alone.

The 41,157 training rows of split 0 are shuffled: the first ``gp_size`` condition the GPs, the rest (up to
``pretrain_size``) pretrain an MLP (Adam, squared error); the 4,573 test rows of the split are the test set.
Inputs and targets are standardised with the pretraining rows' statistics; RMSE and the Gaussian NLL per point are
in those standardised units. Methods:

- ``network``: the pretrained MLP, with the noise variance its mean squared residual on the GP rows.
- ``NTK-GP (parameter space)``: the exact posterior through the p × p Gram JᵀJ (p = 4,865 ≪ N), output scale
  and noise by the exact evidence (``NTKGP.fit``): the reference the function-space run is compared with.
- ``NTK-GP (function space, CG + LOVE)``: the same model and hyperparameters through the lazy N × N NTK: the mean
  by preconditioned CG, the variances by LOVE (a rank-``lanczos_rank`` Lanczos factor). Run under
  :class:`ntkgp.memory.LargestTensor`, which fails it if any operation forms a tensor of N² elements or more.
- ``Laplace (matrix-free)``: :class:`ntkgp.Laplace` for regression with σ² and δ = 1/s² of the NTK-GP (the same
  posterior: its GLM predictive is the NTK-GP's), N = 20,000 > 8,192 so ``solver="auto"`` goes matrix-free: the
  MAP by CG, the variances from ``lanczos_rank`` Lanczos pairs of the Fisher; run under the same no-N² check.
- ``GPyTorch exact GP (Matérn-5/2 ARD)``: GPyTorch's ExactGP on the same GP rows, constant mean, hyperparameters
  by ``gp_iterations`` Adam steps on its exact marginal likelihood (CG and stochastic Lanczos, its defaults) of the
  first ``gp_fit_size`` rows (a step on all 20,000 took 60–75 s on 2 cores), then conditioned on all N rows;
  variances by LOVE (``fast_pred_var``); its kernel is a dense N × N matrix.

Each method records its time, the increase of the process's peak resident memory over the start of the method
(Linux VmHWM, reset at each start) and the largest tensor it formed. Results are written after every method and a
rerun resumes (the pretrained MLP is saved too). Default: about 4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import gpytorch
import matplotlib
import torch
from torch import Tensor, nn

from ntkgp import NTKGP, Laplace, Solver
from ntkgp.memory import LargestTensor, format_bytes, peak_resident_bytes

from .common import Experiment, format_table, resumed, save_figure_atomic, seed_everything, write_json_atomic
from .datasets import load_uci

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ntkgp.progress import progress_bar

METHODS = [
    "network",
    "NTK-GP (parameter space)",
    "NTK-GP (function space, CG + LOVE)",
    "Laplace (matrix-free)",
    "GPyTorch exact GP (Matérn-5/2 ARD)",
]


def make_mlp(inputs: int, hidden: int, depth: int) -> nn.Sequential:
    """``depth`` tanh layers of width ``hidden`` and a linear output: (n, inputs) -> (n,)."""
    layers, width = [], inputs
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.Tanh()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, 1), nn.Flatten(0))


def pretrain(model: nn.Module, x: Tensor, y: Tensor, epochs: int, lr: float, batch: int, seed: int) -> None:
    """Adam on the mean squared error, minibatches of ``batch`` rows, a cosine learning-rate schedule."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(x.shape[0] / batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in progress_bar(range(epochs), desc="pretraining the MLP", unit="epoch"):
        for rows in torch.randperm(x.shape[0], generator=generator).split(batch):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
            optimizer.step()
            schedule.step()
    model.eval()


def gaussian_metrics(mean: Tensor, variance: Tensor, y: Tensor) -> dict:
    """RMSE and the mean Gaussian negative log-likelihood per point of targets y under N(mean, variance)."""
    mean, variance, y = mean.double(), variance.double().clamp_min(1e-12), y.double()
    nll = 0.5 * (torch.log(2 * math.pi * variance) + (y - mean).square() / variance)
    return {"rmse": float((y - mean).square().mean().sqrt()), "nll": float(nll.mean())}


class _MaternGP(gpytorch.models.ExactGP):
    def __init__(self, x: Tensor, y: Tensor, likelihood):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(
            gpytorch.kernels.MaternKernel(nu=2.5, ard_num_dims=x.shape[-1])
        )

    def forward(self, x: Tensor):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def matern_gp(x: Tensor, y: Tensor, test_x: Tensor, iterations: int, lr: float, fit_size: int) -> tuple[Tensor, Tensor]:
    """GPyTorch's exact GP with a Matérn-5/2 ARD kernel: hyperparameters by Adam on its exact marginal likelihood
    of the first ``fit_size`` rows, then conditioned on all of them; the predictive mean and variance (observation
    noise included) at test_x, LOVE for the variances."""
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(x)
    model = _MaternGP(x[:fit_size], y[:fit_size], likelihood).to(x)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    for _ in progress_bar(range(iterations), desc="GPyTorch exact GP", unit="step"):
        optimizer.zero_grad()
        (-mll(model(*model.train_inputs), model.train_targets)).backward()
        optimizer.step()
    model.set_train_data(x, y, strict=False)
    model.eval()
    with torch.no_grad(), gpytorch.settings.fast_pred_var():
        predictive = likelihood(model(test_x))
        return predictive.mean, predictive.variance


def ntk_gp(
    kind: str, model: nn.Module, x: Tensor, y: Tensor, test_x: Tensor, config: dict, hyper: dict
) -> tuple[Tensor, Tensor, dict]:
    """The NTK-GP predictive mean and variance (observation noise included) at test_x, and its hyperparameters.

    ``kind`` "parameter": exact, hyperparameters fitted; "function": CG + LOVE with the hyperparameters ``hyper``.
    """
    if kind == "parameter":
        gp = NTKGP(model, x, y, space="parameter", solver="cholesky", chunk_size=config["chunk_size"])
        gp.fit()
    else:
        solver = Solver(
            "cg",
            cg_tolerance=config["cg_tolerance"],
            max_cg_iterations=config["max_cg_iterations"],
            preconditioner_size=config["preconditioner_size"],
            lanczos_rank=config["lanczos_rank"],
        )
        gp = NTKGP(
            model,
            x,
            y,
            space="function",  # (what this experiment measures: CG and LOVE at large N)
            solver=solver,
            noise=hyper["noise"],
            outputscale=hyper["outputscale"],
            chunk_size=config["chunk_size"],
        )
    with torch.no_grad():
        prediction = gp.predict(test_x, observation_noise=True)
    return (
        prediction.mean,
        prediction.variance,
        {"noise": gp.noise, "outputscale": gp.outputscale},
    )


def laplace(
    model: nn.Module, x: Tensor, y: Tensor, test_x: Tensor, config: dict, hyper: dict
) -> tuple[Tensor, Tensor, dict]:
    """The matrix-free Laplace posterior of the linearised MLP with the NTK-GP's noise and δ = 1/s²: predictive mean
    and variance (observation noise included) at test_x."""
    la = Laplace(
        model,
        "regression",
        prior_precision=1.0 / hyper["outputscale"],
        noise=hyper["noise"],
        chunk_size=config["chunk_size"],
        solver=Solver(
            config["laplace_solver"], cg_tolerance=config["cg_tolerance"], lanczos_rank=config["laplace_rank"]
        ),
    )
    la.fit(x, y.unsqueeze(-1))
    prediction = la.predict(test_x)
    extra = {"dense": la.dense, "variance_error": la.variance_error}  # the low-rank posterior's estimated error
    return prediction.mean, prediction.variance + hyper["noise"], extra


def measured(fn, forbid_elements: int | None = None) -> tuple[object, dict]:
    """fn() with its seconds, the rise of peak resident memory and the largest tensor formed; with
    ``forbid_elements``, an AssertionError if a tensor of that many elements or more was formed."""
    start_bytes = peak_resident_bytes(reset=True)
    start = time.perf_counter()
    with LargestTensor() as seen:
        out = fn()
    record = {
        "seconds": time.perf_counter() - start,
        "peak_bytes": peak_resident_bytes() - start_bytes,
        "largest_tensor": list(seen.shape),
        "largest_op": seen.op,
    }
    if forbid_elements is not None and seen.elements >= forbid_elements:
        raise AssertionError(f"a tensor of shape {seen.shape} ({seen.op}) was formed: no N × N matrix was allowed")
    return out, record


def split_data(config: dict, seed: int) -> dict[str, Tensor]:
    """GP rows, pretraining rows and test rows, standardised by the pretraining statistics."""
    x, y, test = load_uci(config["dataset"], config["split"])
    dtype = getattr(torch, config["dtype"])
    train = torch.nonzero(~test).squeeze(-1)
    train = train[torch.randperm(train.numel(), generator=torch.Generator().manual_seed(seed))]
    gp_rows, pre_rows = train[: config["gp_size"]], train[config["gp_size"] :][: config["pretrain_size"]]
    test_rows = torch.nonzero(test).squeeze(-1)[: config["test_size"]]
    x_mean, x_std = x[pre_rows].mean(0), x[pre_rows].std(0).clamp_min(1e-12)
    y_mean, y_std = y[pre_rows].mean(), y[pre_rows].std()
    parts = {}
    for name, rows in (("gp", gp_rows), ("pretrain", pre_rows), ("test", test_rows)):
        parts[f"{name}_x"] = ((x[rows] - x_mean) / x_std).to(dtype)
        parts[f"{name}_y"] = ((y[rows] - y_mean) / y_std).to(dtype)
    return parts


def plot(rows: list[dict], path: Path) -> None:
    """Time, peak memory and test NLL of each method, side by side."""
    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in zip(axes, ("seconds", "peak_mib", "nll"), ("time (s)", "peak memory rise (MiB)", "test NLL")):
        ax.barh(range(len(rows)), [r[key] for r in rows], color="tab:blue")
        ax.set_yticks(range(len(rows)), names if ax is axes[0] else [""] * len(rows), fontsize=8)
        ax.set_xlabel(label)
    save_figure_atomic(fig, path)


def run(config: dict, out_dir: Path, device: str = "cpu", seed: int = 0) -> dict:
    seed_everything(seed)
    data = {k: v.to(device) for k, v in split_data(config, seed).items()}
    n = data["gp_x"].shape[0]
    dtype = data["gp_x"].dtype
    path, weights = out_dir / "results.json", out_dir / "mlp.pt"
    payload = {
        "config": config,
        "seed": seed,
        "device": device,
        "gp_size": n,
        "pretrain_size": data["pretrain_x"].shape[0],
        "test_size": data["test_x"].shape[0],
        "methods": {},
    }
    if weights.exists():
        payload = resumed(path, payload)  # finished methods are kept
    model = make_mlp(data["gp_x"].shape[1], config["hidden"], config["depth"]).to(device=device, dtype=dtype)
    if weights.exists() and payload["methods"]:
        model.load_state_dict(torch.load(weights, map_location=device))
    else:
        pretrain(model, data["pretrain_x"], data["pretrain_y"], config["epochs"], config["lr"], config["batch"], seed)
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), weights)
    payload["parameters"] = sum(p.numel() for p in model.parameters())
    gp_x, gp_y, test_x, test_y = data["gp_x"], data["gp_y"], data["test_x"], data["test_y"]

    def network():
        with torch.no_grad():
            noise = (model(gp_x) - gp_y).square().mean()
            mean = model(test_x)
        return mean, noise.expand_as(mean), {"noise": float(noise)}

    jobs = {
        "network": (network, None),
        "NTK-GP (parameter space)": (lambda: ntk_gp("parameter", model, gp_x, gp_y, test_x, config, {}), None),
        "NTK-GP (function space, CG + LOVE)": (
            lambda: ntk_gp(
                "function",
                model,
                gp_x,
                gp_y,
                test_x,
                config,
                payload["methods"]["NTK-GP (parameter space)"]["hyperparameters"],
            ),
            n * n,
        ),
        "Laplace (matrix-free)": (
            lambda: laplace(
                model, gp_x, gp_y, test_x, config, payload["methods"]["NTK-GP (parameter space)"]["hyperparameters"]
            ),
            n * n,
        ),
        "GPyTorch exact GP (Matérn-5/2 ARD)": (
            lambda: (
                *matern_gp(gp_x, gp_y, test_x, config["gp_iterations"], config["gp_lr"], config["gp_fit_size"]),
                {},
            ),
            None,
        ),
    }
    predictions = {}
    for method in config["methods"]:
        saved = out_dir / f"{method.split(' (')[0].replace(' ', '_')}_{len(method)}.pt"
        if method in payload["methods"] and saved.exists():
            predictions[method] = torch.load(saved, map_location=device)
            continue
        fn, forbid = jobs[method]
        (mean, variance, hyper), record = measured(fn, forbid)
        predictions[method] = (mean.detach(), variance.detach())
        torch.save(predictions[method], saved)
        record.update(gaussian_metrics(mean, variance, test_y), hyperparameters=hyper)
        payload["methods"][method] = record
        write_json_atomic(path, payload)
    for other in METHODS[2:4]:
        if {METHODS[1], other} <= set(predictions):
            (ref_mean, ref_var), (mean, variance) = predictions[METHODS[1]], predictions[other]
            relative = ((variance - ref_var) / ref_var).abs()
            payload["methods"][other]["against_parameter_space"] = {
                "mean": float((mean - ref_mean).abs().max() / ref_mean.abs().max()),
                "variance_max": float(relative.max()),
                "variance_median": float(relative.median()),
            }
    write_json_atomic(path, payload)
    rows = [
        {"method": m, **payload["methods"][m], "peak_mib": payload["methods"][m]["peak_bytes"] / 2**20}
        for m in config["methods"]
        if m in payload["methods"]
    ]
    plot(rows, out_dir / "uci_large.png")
    print(
        f"{config['dataset']}: N = {n:,} GP rows, {payload['pretrain_size']:,} pretraining rows, "
        f"{payload['test_size']:,} test rows; MLP of {payload['parameters']:,} parameters; {config['dtype']}"
    )
    print(
        format_table(
            ["method", "RMSE", "NLL", "seconds", "peak memory", "largest tensor"],
            [
                [
                    r["method"],
                    f"{r['rmse']:.4f}",
                    f"{r['nll']:.4f}",
                    f"{r['seconds']:.1f}",
                    format_bytes(r["peak_bytes"]),
                    "×".join(map(str, r["largest_tensor"])),
                ]
                for r in rows
            ],
        )
    )
    for other in METHODS[2:4]:
        if "against_parameter_space" in payload["methods"].get(other, {}):
            agreement = payload["methods"][other]["against_parameter_space"]
            print(
                f"{other} against the exact parameter space: mean {agreement['mean']:.2e} (max abs / max |mean|), "
                f"variance {agreement['variance_max']:.2e} max, {agreement['variance_median']:.2e} median relative"
            )
    print(f"results: {path}  figure: {out_dir / 'uci_large.png'}")
    return {"rows": len(rows)}


DEFAULT = {
    "dataset": "protein",
    "split": 0,
    "gp_size": 20000,
    "pretrain_size": 21157,
    "test_size": 4573,
    "dtype": "float32",
    "hidden": 64,
    "depth": 2,
    "epochs": 40,
    "lr": 3e-3,
    "batch": 256,
    "chunk_size": 32,
    "cg_tolerance": 1e-4,
    "max_cg_iterations": 1000,
    "preconditioner_size": 50,
    "lanczos_rank": 256,
    "laplace_rank": 512,
    "laplace_solver": "auto",
    "gp_iterations": 50,
    "gp_lr": 0.1,
    "gp_fit_size": 5000,
    "methods": METHODS,
}
TINY = {
    **DEFAULT,
    "gp_size": 600,
    "pretrain_size": 1000,
    "test_size": 200,
    "hidden": 16,
    "epochs": 3,
    "lanczos_rank": 64,
    "laplace_rank": 64,
    "laplace_solver": "cg",
    "gp_iterations": 3,
    "gp_fit_size": 300,
    "dtype": "float64",
}

EXPERIMENT = Experiment(
    name="uci-large",
    description="NTK-GP (CG + LOVE, no N × N matrix) on 20,000 protein rows vs GPyTorch's exact Matérn GP",
    run=run,
    configs={"default": DEFAULT, "tiny": TINY},
)
