"""Condition numbers of LQF's Hessian and of its K-FAC-preconditioned form on a real pretrained network.

torchvision's ImageNet MobileNetV2 (weights from $NTKGP_DATA/torch_home) with a new seeded 10-way head, on
``--shots`` Fashion-MNIST images per class at 64 × 64 (ImageNet-normalised, as experiments/fashion_fewshot.py),
α = 15, the scopes "last layer" (the head) and "last block" (features.17–18 and the head). For each weight
decay λ: the extreme Ritz values after ``--steps`` Lanczos steps of H = 2(JᵀJ + (λ/2)I) — the condition number
of F + (λ/2)I, F = JᵀJ — and of P⁻¹H with P = K + λI the K-FAC preconditioner (the pencil (H, P)). Ritz
values lie inside the spectrum, so the printed condition numbers are lower bounds that tighten with steps.
In float64 (``--dtype``): with κ near 1e6, float32 products are too coarse for the small end of the spectrum
(float32 gave negative Ritz values for the preconditioned pencil, which is positive definite).
Writes ``results/benchmarks/kfac_conditioning.json``. Usage::

    NTKGP_DATA=../shared/data python benchmarks/kfac_conditioning.py
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch
from timing import write_results
from torch import nn

from ntkgp import LQF
from ntkgp_experiments.datasets import load_fashion_mnist
from ntkgp_experiments.fashion_fewshot import load_mobilenet, preprocess

SCOPES = {"last layer": ["classifier."], "last block": ["features.17.", "features.18.", "classifier."]}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--weight-decay", type=float, nargs="+", default=[0.1, 10.0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--scopes", nargs="+", default=list(SCOPES), choices=list(SCOPES))
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/kfac_conditioning.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    images, labels = load_fashion_mnist(train=True)
    picks = torch.cat([torch.nonzero(labels == c).squeeze(-1)[: args.shots] for c in range(10)])
    dtype = getattr(torch, args.dtype)
    x, y = preprocess(images[picks], 64).to(dtype), labels[picks]
    model = load_mobilenet("cpu")
    model.classifier[1] = nn.Linear(1280, 10)
    model = model.to(dtype).eval()
    rows = []
    for scope in args.scopes:
        for lam in args.weight_decay:
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # BatchNorm parameters: diagonal blocks
                lqf = LQF(model, params=SCOPES[scope], weight_decay=lam)
                lqf.fit(x, y, epochs=1, lr=1e-12, batch_size=len(x), progress=False)  # data and K-FAC
                plain = lqf.hessian_ritz_values(args.steps)
                kfac = lqf.hessian_ritz_values(args.steps, preconditioned=True)
            row = {
                "scope": scope,
                "dtype": args.dtype,
                "params": lqf.network.num_params,
                "n": len(x),
                "weight_decay": lam,
                "steps": args.steps,
                "hessian_min": float(plain[0]),
                "hessian_max": float(plain[-1]),
                "hessian_condition": float(plain[-1] / plain[0]),
                "kfac_min": float(kfac[0]),
                "kfac_max": float(kfac[-1]),
                "kfac_condition": float(kfac[-1] / kfac[0]),
                "seconds": time.perf_counter() - start,
            }
            rows.append(row)
            print(
                f"{scope:10s} p={row['params']:7d} n={len(x)} λ={lam:<6g} H: [{row['hessian_min']:.3g}, "
                f"{row['hessian_max']:.3g}] κ ≥ {row['hessian_condition']:.3g}   K-FAC P⁻¹H: [{row['kfac_min']:.3g}, "
                f"{row['kfac_max']:.3g}] κ ≥ {row['kfac_condition']:.3g}   ({row['seconds']:.0f} s)",
                flush=True,
            )
    write_results(args.out, torch.device("cpu"), rows)
    return rows


if __name__ == "__main__":
    main()
