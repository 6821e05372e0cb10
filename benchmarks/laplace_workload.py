"""ntkgp.Laplace against laplace-torch on laplace-torch's own workload: post-hoc last-layer Laplace of a trained head.

ImageNet MobileNetV2 features (1280-d, 64 × 64 inputs; computed once and cached) of Fashion-MNIST; a 10-way head
(p = 12,810) trained by full-batch Adam on the first N training images; post-hoc Laplace over the head with the prior
N(0, I/δ) (both libraries' default post hoc), δ chosen by the evidence (ours: a grid of 33 values, 10^-4 … 10^4;
laplace-torch: its default, 100 Adam steps on log δ); the probit GLM predictive on 2,000 Fashion-MNIST and 2,000
MNIST test images. For each N and Hessian structure (full, kron, diag) and each library: fit, prior-optimisation and
predict seconds (ours with the error estimate of an approximate posterior, whose share is measured by predicting
again), peak resident memory above the level before, accuracy, NLL, ECE (15 bins) on Fashion-MNIST, the
out-of-distribution AUROC of the top probability (Fashion-MNIST in, MNIST out), and the largest distance of the
probabilities from the exact float64 closed form at the δ the library chose (F = Σ_i H_i ⊗ ã_i ã_iᵀ by einsum,
Σ = (F + δI)⁻¹ by Cholesky). For full and diag, where both libraries form the same posterior, also the largest
difference between their probabilities at δ = 1 (each library's saved beside the JSON file, compared once both ran).
The last block (MobileNetV2's features 17 and 18 and the head, BatchNorm frozen) on block-16 outputs at small N:
kron in both libraries against our exact function-space posterior.

The networks run in float32, as users train them. Every finished cell is written to the JSON file at once
(atomically) and skipped on a rerun.

Usage::

    python benchmarks/laplace_workload.py                        # N = 1,000, 10,000, 60,000
    python benchmarks/laplace_workload.py --n 1000 --structures full diag --libraries ntkgp

Needs the data root (``NTKGP_DATA``, default ../shared/data) and the ``bench`` extra (laplace-torch). Writes
``results/benchmarks/laplace_workload.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from pathlib import Path

import torch
from laplace_vs_laplace_torch import PeakResident
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import binary_auroc, multiclass_calibration_error

from ntkgp import Laplace
from ntkgp_experiments.common import format_table, write_json_atomic
from ntkgp_experiments.datasets import load_fashion_mnist, load_mnist
from ntkgp_experiments.fashion_fewshot import load_mobilenet, preprocess

STRUCTURES = ("diag", "kron", "full")  # (the slowest last)
LIBRARIES = ("ntkgp", "laplace-torch")
TEST = 2000  # Fashion-MNIST and MNIST test images each


def features(cache: Path, batch: int = 500) -> dict[str, torch.Tensor]:
    """MobileNetV2 features of Fashion-MNIST train, its test and MNIST test (the first ``TEST`` of each), with the
    labels: the pooled 1280-d features (n, 1280) and the outputs of block 16 (n, 160, 2, 2), float32; computed once
    and cached at ``cache``."""
    if cache.exists():
        return torch.load(cache, weights_only=True)
    net = load_mobilenet("cpu")
    trunk, block = net.features[:17], last_block(net, nn.Identity())

    def embed(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inner, pooled = [], []
        with torch.no_grad():
            for i in range(0, len(images), batch):
                inner.append(trunk(preprocess(images[i : i + batch], 64)))
                pooled.append(block(inner[-1]))
        return torch.cat(pooled), torch.cat(inner)

    (train, train_y), (test, test_y) = load_fashion_mnist(True), load_fashion_mnist(False)
    out = {"train_y": train_y, "test_y": test_y[:TEST]}
    for name, images in (("train", train), ("test", test[:TEST]), ("ood", load_mnist()[0][:TEST])):
        out[name], out[f"{name}_block"] = embed(images)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache.with_suffix(".tmp"))
    os.replace(cache.with_suffix(".tmp"), cache)
    return out


def last_block(net: nn.Module, head: nn.Module) -> nn.Module:
    """MobileNetV2's last two blocks (features 17 and 18), pooling and ``head``: block-16 outputs (n, 160, 2, 2) to
    the head's outputs."""
    return nn.Sequential(net.features[17], net.features[18], nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval()


def train_head(x: torch.Tensor, y: torch.Tensor, steps: int = 500, lr: float = 1e-2) -> nn.Module:
    """A 10-way Linear head trained by full-batch Adam with weight decay 1e-4 (seeded)."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.Flatten(), nn.Linear(x.shape[1], 10)).to(x.device)  # (laplace-torch needs two modules)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(head(x), y).backward()
        optimizer.step()
    return head.eval()


def exact_probit(head: nn.Module, x: torch.Tensor, xs: torch.Tensor, delta: float) -> torch.Tensor:
    """The probit GLM predictive (m, C) of the post-hoc last-layer Laplace in closed form, float64: F = Σ_i H_i ⊗ ã_i
    ã_iᵀ (ã = [a, 1], θ = vec of [W b] row by row: reordered to the weight then the bias), Σ = (F + δI)⁻¹."""
    layer = head[-1]
    w, b = layer.weight.detach().double().cpu(), layer.bias.detach().double().cpu()
    x, xs = x.cpu(), xs.cpu()
    a = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    probs = torch.softmax(x.double() @ w.T + b, -1)
    c, d = w.shape[0], a.shape[1]
    fisher = torch.zeros(c, d, c, d, dtype=torch.float64)
    for i in range(0, len(a), 1000):
        pi, ai = probs[i : i + 1000], a[i : i + 1000]
        h = torch.diag_embed(pi) - pi[:, :, None] * pi[:, None, :]
        fisher += torch.einsum("ncd,na,nb->cadb", h, ai, ai)
    fisher = fisher.reshape(c * d, c * d)
    chol = torch.linalg.cholesky(fisher + delta * torch.eye(c * d, dtype=torch.float64))
    test = torch.cat([xs.double(), torch.ones(len(xs), 1, dtype=torch.float64)], 1)
    mean = xs.double() @ w.T + b
    variance = torch.empty_like(mean)
    for k in range(c):  # J* for output k: e_k ⊗ ã* → rows of the (c·d) Jacobian
        rows = torch.zeros(len(test), c, d, dtype=torch.float64)
        rows[:, k] = test
        solved = torch.linalg.solve_triangular(chol, rows.reshape(len(test), -1).T, upper=False)
        variance[:, k] = solved.square().sum(0)
    return torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * variance), -1)


def scores(probs: torch.Tensor, labels: torch.Tensor, ood: torch.Tensor) -> dict[str, float]:
    """Accuracy, NLL, ECE on the in-distribution test set and the AUROC of max-probability (in = 1, out = 0)."""
    probs, ood = probs.double(), ood.double()
    confidence = torch.cat([probs.max(-1).values, ood.max(-1).values])
    truth = torch.cat([torch.ones(len(probs)), torch.zeros(len(ood))]).long()
    return {
        "accuracy": float((probs.argmax(-1) == labels).double().mean()),
        "nll": float(-torch.log(probs.gather(-1, labels[:, None]).clamp_min(1e-12)).mean()),
        "ece": float(multiclass_calibration_error(probs, labels, num_classes=10, n_bins=15, norm="l1")),
        "auroc": float(binary_auroc(confidence, truth)),
    }


def run_cell(
    library: str, structure: str, model: nn.Module, data: dict, n: int, block: bool = False
) -> tuple[dict, torch.Tensor, object]:
    """One library and structure on the first n training images: timings, memory, scores and probabilities. The
    head on the pooled features (``block`` False: last-layer Laplace), or the last block and the head on block-16
    outputs (all its convolution and linear weights; BatchNorm frozen)."""
    suffix = "_block" if block else ""
    x, y = data[f"train{suffix}"][:n], data["train_y"][:n]
    loader = DataLoader(TensorDataset(x, y), batch_size=256)
    xs = torch.cat([data[f"test{suffix}"], data[f"ood{suffix}"]])
    with PeakResident() as memory, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        if library == "ntkgp":
            scope = None if block else "last_layer"
            la = Laplace(model, "classification", params=scope, hessian_structure=structure, progress=False)
            la.fit(loader, find_map=False)
            fitted = time.perf_counter()
            delta = la.optimize_prior_precision(progress=False)
            optimised = time.perf_counter()
            probs = torch.cat([la.predict(xs[i : i + 500]) for i in range(0, len(xs), 500)])
            again = time.perf_counter()  # the same prediction again: without the first one's error estimate
            torch.cat([la.predict(xs[i : i + 500]) for i in range(0, len(xs), 500)])
            estimate = (again - optimised) - (time.perf_counter() - again) if la.approximate else 0.0
        else:
            from laplace import Laplace as LaplaceTorch

            scope = "all" if block else "last_layer"
            la = LaplaceTorch(model, "classification", subset_of_weights=scope, hessian_structure=structure)
            la.fit(loader)
            fitted = time.perf_counter()
            la.optimize_prior_precision(method="marglik")
            delta = float(la.prior_precision)
            optimised = time.perf_counter()
            probs = laplace_torch_probit(la, xs, 20 if block else 500)
            again = estimate = None
        done = again or time.perf_counter()
    probs = probs.detach().cpu()
    row = {
        "library": library,
        "structure": structure,
        "scope": "last block" if block else "last layer",
        "n": n,
        "fit_s": fitted - start,
        "prior_s": optimised - fitted,
        "predict_s": done - optimised,
        "total_s": done - start,
        "peak_mib": memory.increase / 2**20,
        "delta": float(delta),
        **({} if estimate is None else {"error_estimate_s": estimate}),
        **scores(probs[: len(data["test_y"])], data["test_y"].cpu(), probs[len(data["test_y"]) :]),
    }
    return row, probs, la


def probit_at_one(library: str, la: object, xs: torch.Tensor) -> torch.Tensor:
    """The library's probit GLM predictive at δ = 1 (float64), to compare the two where the posterior is the same."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the error estimate's, reported in the timed cell)
        return _probit_at_one(library, la, xs)


def _probit_at_one(library: str, la: object, xs: torch.Tensor) -> torch.Tensor:
    if library == "ntkgp":
        la._update(1.0)  # type: ignore[attr-defined]
        return torch.cat([la.predict(xs[i : i + 500]) for i in range(0, len(xs), 500)]).double()  # type: ignore[attr-defined]
    la.prior_precision = 1.0  # type: ignore[attr-defined]
    return laplace_torch_probit(la, xs).double()


def laplace_torch_probit(la: object, xs: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """laplace-torch's probit GLM predictive on xs in batches (it holds the batch's Jacobians: batch·C·p numbers)."""
    parts = [la(xs[i : i + batch], pred_type="glm", link_approx="probit") for i in range(0, len(xs), batch)]  # type: ignore[operator]
    return torch.cat(parts).detach()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="*", default=[1000, 10000, 60000])
    parser.add_argument("--block-n", type=int, nargs="*", default=[500], help="N of the last-block cases")
    parser.add_argument("--structures", nargs="+", default=list(STRUCTURES), choices=STRUCTURES)
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    parser.add_argument("--test", type=int, default=TEST, help="test images of each set")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="where the networks, data and posteriors live")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/laplace_workload.json"))
    parser.add_argument("--features", type=Path, default=Path("results/benchmarks/laplace_workload_features.pt"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = features(args.features)
    tests = ("test", "test_y", "ood", "test_block", "ood_block")
    data = {k: (v[: args.test] if k in tests else v).to(args.device) for k, v in data.items()}
    rows = json.loads(args.out.read_text())["rows"] if args.out.exists() else []

    def record(row: dict) -> None:
        rows.append(row)
        write_json_atomic(args.out, {"rows": rows})
        print(json.dumps(row), flush=True)

    def finished(library: str, structure: str, scope: str, n: int) -> bool:
        return any((r["library"], r["structure"], r["scope"], r["n"]) == (library, structure, scope, n) for r in rows)

    xs = torch.cat([data["test"], data["ood"]])
    saved = args.out.parent / "laplace_workload_probs"  # probabilities at δ = 1, to compare the libraries
    for n in args.n:
        head = train_head(data["train"][:n], data["train_y"][:n])
        for structure in args.structures:
            for library in args.libraries:
                if finished(library, structure, "last layer", n):
                    continue
                row, probs, la = run_cell(library, structure, head, data, n)
                if structure == "full":
                    exact = exact_probit(head, data["train"][:n], xs, row["delta"])
                    row["distance_from_exact"] = float((probs.double() - exact).abs().max())
                if structure in ("full", "diag"):  # the same posterior in both libraries
                    at_one = probit_at_one(library, la, xs).cpu()
                    saved.mkdir(parents=True, exist_ok=True)
                    torch.save(at_one, saved / f"{n}-{structure}-{library}.pt")
                    other = saved / f"{n}-{structure}-{'ntkgp' if library != 'ntkgp' else 'laplace-torch'}.pt"
                    if other.exists():
                        row["difference_at_delta_1"] = float((torch.load(other) - at_one).abs().max())
                record(row)
    for n in args.block_n:  # the last block: kron in both libraries, against our exact function-space posterior
        model = last_block(load_mobilenet(args.device), train_head(data["train"][:n], data["train_y"][:n]))
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.requires_grad_(False)
        xs_block = torch.cat([data["test_block"], data["ood_block"]])
        exact = None
        for library, structure in (("ntkgp", "function"), ("ntkgp", "kron"), ("laplace-torch", "kron")):
            if library not in args.libraries or finished(library, structure, "last block", n):
                continue
            try:
                row, probs, la = run_cell(library, structure, model, data, n, block=True)
            except Exception as err:  # noqa: BLE001  (a peer that cannot run this network: recorded, not fatal)
                record({"library": library, "structure": structure, "scope": "last block", "n": n, "error": str(err)})
                continue
            if structure == "function":
                exact = la
            elif exact is not None:
                exact.prior_precision = row["delta"]  # type: ignore[attr-defined]
                exact._update(row["delta"])  # type: ignore[attr-defined]
                reference = torch.cat([exact.predict(xs_block[i : i + 500]) for i in range(0, len(xs_block), 500)])  # type: ignore[attr-defined]
                row["distance_from_exact"] = float((probs.double() - reference.double().cpu()).abs().max())
            record(row)
    print(table(rows))
    return rows


def table(rows: list[dict]) -> str:
    headers = [
        "scope",
        "N",
        "structure",
        "library",
        "fit s",
        "δ s",
        "predict s",
        "total s",
        "peak MiB",
        "δ",
        "acc",
        "NLL",
        "ECE",
        "AUROC",
        "from exact",
        "vs ntkgp",
    ]
    body = [
        [
            r["scope"],
            f"{r['n']:,}",
            r["structure"],
            r["library"],
            f"{r['fit_s']:.1f}",
            f"{r['prior_s']:.1f}",
            f"{r['predict_s']:.1f}",
            f"{r['total_s']:.1f}",
            f"{r['peak_mib']:.0f}",
            f"{r['delta']:.3g}",
            f"{r['accuracy']:.3f}",
            f"{r['nll']:.3f}",
            f"{r['ece']:.3f}",
            f"{r['auroc']:.3f}",
            f"{r['distance_from_exact']:.1e}" if "distance_from_exact" in r else "",
            f"{r['difference_at_delta_1']:.1e}" if "difference_at_delta_1" in r else "",
        ]
        if "error" not in r
        else [r["scope"], f"{r['n']:,}", r["structure"], r["library"], "error: " + r["error"][:60]] + [""] * 11
        for r in sorted(rows, key=lambda r: (r["scope"], r["n"], r["structure"], r["library"]))
    ]
    return format_table(headers, body)


if __name__ == "__main__":
    main()
