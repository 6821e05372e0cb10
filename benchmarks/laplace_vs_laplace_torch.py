"""ntkgp.Laplace side by side with laplace-torch (full Hessian, GLM predictive).

1. Agreement (float64): on small regression and classification problems, laplace-torch's
   ``FullLaplace`` (all weights, GGN, prior centred at θ0) and ``ntkgp.Laplace(..., find_map=False)``
   (the same post-hoc posterior around θ0) give the same GLM predictive and log marginal likelihood.
2. Cost: fit + predictive on 200 test points for both, as the training set (n) and the parameter count
   (p, through the MLP width) grow; 10-way classification, float32. Each case runs in a fresh process
   and reports its wall time and its peak resident memory above the level before fitting.
   laplace-torch's full Hessian costs O(p²) memory and O(p³) time; ours O((n·C)²) and O((n·C)³).

Usage::

    python benchmarks/laplace_vs_laplace_torch.py                # agreement, then the cost grid
    python benchmarks/laplace_vs_laplace_torch.py --n 100 400 --width 16 48 96

Needs the ``bench`` extra (``pip install -e .[bench]``). Writes
``results/benchmarks/laplace_vs_laplace_torch.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ntkgp import Laplace
from ntkgp.functional import FunctionalNetwork

LIBRARIES = ("ntkgp", "laplace-torch")


def mlp(inputs: int, width: int, outputs: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(inputs, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, outputs)
    ).eval()


def laplace_torch(model: nn.Module, task: str, x, y, prior_precision: float, noise: float | None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from laplace import Laplace as LaplaceTorch

        kw = {} if noise is None else {"sigma_noise": math.sqrt(noise)}
        la = LaplaceTorch(
            model,
            task,
            subset_of_weights="all",
            hessian_structure="full",
            prior_precision=prior_precision,
            prior_mean=FunctionalNetwork(model).theta0.clone(),
            **kw,
        )
        la.fit(DataLoader(TensorDataset(x, y), batch_size=min(len(x), 256)))
    return la


def agreement(seed: int = 0) -> dict:
    """Largest absolute differences between the two libraries' predictives and evidences (float64)."""
    torch.manual_seed(seed)
    default, out = torch.get_default_dtype(), {}
    torch.set_default_dtype(torch.float64)  # laplace-torch makes some tensors in the default dtype
    try:
        _agreement(out)
    finally:
        torch.set_default_dtype(default)
    return out


def _agreement(out: dict) -> None:
    for task, c in (("regression", 2), ("classification", 3)):
        model = mlp(3, 16, c).double()
        x, xs = torch.randn(30, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
        y = torch.randn(30, c, dtype=torch.float64) if task == "regression" else torch.randint(0, c, (30,))
        noise = 0.3 if task == "regression" else None
        theirs = laplace_torch(model, task, x, y, 0.7, noise)
        ours = Laplace(model, task, prior_precision=0.7, noise=noise, prior_mean="theta0").fit(x, y, find_map=False)
        if task == "regression":
            mean, cov = theirs(xs, pred_type="glm")
            pred = ours.predict(xs)
            out["regression_mean"] = float((mean - pred.mean).abs().max())
            out["regression_variance"] = float((cov.diagonal(dim1=-2, dim2=-1) - pred.variance).abs().max())
        else:
            probs = theirs(xs, pred_type="glm", link_approx="probit")
            out["classification_probit"] = float((probs - ours.predict(xs)).abs().max())
        out[f"{task}_log_marginal_likelihood"] = float(
            abs(theirs.log_marginal_likelihood().detach() - ours.log_marginal_likelihood())
        )


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakResident:
    """Peak resident memory (bytes) above the level at entry, polled every millisecond by a thread."""

    def __enter__(self) -> PeakResident:
        self.base = self.peak = resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(1e-3):
            self.peak = max(self.peak, resident_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())

    @property
    def increase(self) -> int:
        return self.peak - self.base


def run_case(library: str, n: int, width: int, seed: int = 0) -> dict:
    """One timed fit + predictive in this process, after a warm-up on 10 points: wall seconds and peak
    resident memory above the level before fitting."""
    torch.manual_seed(seed)
    model = mlp(20, width, 10)
    x, xs = torch.randn(n, 20), torch.randn(200, 20)
    y = torch.randint(0, 10, (n,))

    def fit_predict(inputs, labels):
        if library == "ntkgp":
            return Laplace(model, "classification").fit(inputs, labels, find_map=False).predict(xs)
        return laplace_torch(model, "classification", inputs, labels, 1.0, None)(
            xs, pred_type="glm", link_approx="probit"
        )

    fit_predict(x[:10], y[:10])  # first-call costs (torch.func, imports) stay out of the numbers
    with PeakResident() as memory:
        start = time.perf_counter()
        probs = fit_predict(x, y)
        seconds = time.perf_counter() - start
    assert probs.shape == (200, 10)
    return {
        "library": library,
        "n": n,
        "width": width,
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": seconds,
        "peak_mib": memory.increase / 2**20,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[100, 400])
    parser.add_argument("--width", type=int, nargs="+", default=[16, 48, 96])
    parser.add_argument("--case", nargs=3, metavar=("LIBRARY", "N", "WIDTH"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/laplace_vs_laplace_torch.json"))
    args = parser.parse_args(argv)
    if args.case:  # a child process: one measurement, printed as JSON
        print(json.dumps(run_case(args.case[0], int(args.case[1]), int(args.case[2]))))
        return {}
    diffs = agreement()
    print("agreement with laplace-torch (float64, largest absolute difference):")
    for key, value in diffs.items():
        print(f"  {key:40s} {value:.1e}")
    rows = []
    for n in args.n:
        for width in args.width:
            for library in LIBRARIES:
                child = subprocess.run(
                    [sys.executable, __file__, "--case", library, str(n), str(width)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(
                    f"{library:14s} n={n:5d} p={r['params']:7d}  {r['seconds']:8.2f} s  peak +{r['peak_mib']:8.1f} MiB",
                    flush=True,
                )
    payload = {"agreement": diffs, "rows": rows, "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1))
    return payload


if __name__ == "__main__":
    main()
