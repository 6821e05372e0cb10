"""NTKGP.predict (mean and exact or low-rank variance) on a real pretrained network, before and after.

torchvision's ImageNet MobileNetV2 (weights from $NTKGP_DATA/torch_home) with a new seeded 10-way head and its
last block in scope (features.17–18 and the head: 898,890 parameters), 10-way k-shot Fashion-MNIST at 64 × 64
(N = 10·k·10 outputs), `NTKGP(..., mean="zero", noise=0.1)`, mean and variance on m test images. Each time is
a ratio to one gradient of the whole network (forward + backward of the summed squared outputs) over the same
m test images, measured in the same run. Variants:

- ``before``: what predict did before the frozen prefix and the projection paths — the whole network in every
  product (``frozen_prefix=False``),
  K(X, X) by N VJPs and N JVPs, the variance by N tangents over the test images (``variance_path="tangents"``);
- ``exact``: the defaults — frozen prefix once per input tensor, K(X, X), K(x*, X) and diag K** from layer factors
  (:mod:`ntkgp.operators.layer_kernel`) where that is cheaper, else the path :mod:`ntkgp.gp.variance_projections`
  chooses;
- ``jacobians``: ``variance_path="jacobians"``, the first exact fast path — per-sample Jacobians of the test
  images against the p × N directions J(X)ᵀ[a, U] (up to ``--jacobians-up-to`` test images);
- ``low rank``: ``variance="low_rank", tolerance=1e-2``, with its rank, its probe error and its largest
  relative error against ``exact`` over all m test images.

Up to ``--float64-up-to`` test images every variant's largest relative variance error against the defaults run in
float64 is reported too (untimed).

``predict`` includes the first prediction's work (the eigendecomposition of K(X, X)); ``fit`` is not timed.
Writes ``results/benchmarks/predict_variance.json`` after every row. Usage::

    NTKGP_DATA=../shared/data python benchmarks/predict_variance.py --shots 5 10 --tests 200 500 2000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from timing import device_name, sync, write_results
from torch import nn

from ntkgp import NTKGP, FunctionalNetwork
from ntkgp.gp.parameter_space import ntk_eigh
from ntkgp_experiments.datasets import load_fashion_mnist, support_indices
from ntkgp_experiments.fashion_fewshot import SCOPES, load_mobilenet, preprocess, with_head


def timed(fn, device: torch.device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shots", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--tests", type=int, nargs="+", default=[200, 500, 2000])
    parser.add_argument("--before-up-to", type=int, default=200, help="largest m to time the old path at")
    parser.add_argument(
        "--jacobians-up-to",
        type=int,
        default=500,
        help="largest m to time the per-sample Jacobian path at (the first exact fast path)",
    )
    parser.add_argument(
        "--float64-up-to",
        type=int,
        default=200,
        help="largest m at which every variant's float32 variance is compared with a float64 one",
    )
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/predict_variance.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = with_head(load_mobilenet(args.device), nn.Linear(1280, 10).to(device))
    params = SCOPES["last_block"]
    train_images, train_labels = load_fashion_mnist(train=True)
    test_images, _ = load_fashion_mnist(train=False)
    print(f"device: {device_name(device)}, torch {torch.__version__}, float32; MobileNetV2 last block + head")
    print(
        f"{'k':>3} {'m':>5}  {'variant':<9} {'seconds':>8} {'/ gradient':>10} {'rank':>5} {'probe err':>9} "
        f"{'max err':>8} {'vs float64':>10}"
    )
    rows: list[dict] = []
    for k in args.shots:
        idx = support_indices(train_labels, k, torch.Generator().manual_seed(k))
        x = preprocess(train_images[idx].to(device), args.size)
        y = nn.functional.one_hot(train_labels[idx].to(device), 10).float()
        for m in args.tests:
            test = preprocess(test_images[:m].to(device), args.size)

            def gradient(test=test):
                model.zero_grad()
                model(test).square().sum().backward()

            gradient()
            _, grad_seconds = timed(gradient, device)
            variants = {"exact": ({}, {})}
            if m <= args.before_up_to:
                variants["before"] = ({"frozen_prefix": False}, {"variance_path": "tangents"})
            if m <= args.jacobians_up_to:
                variants["jacobians"] = ({}, {"variance_path": "jacobians"})
            variants["low rank"] = ({}, {"variance": "low_rank", "tolerance": 1e-2})
            exact, reference = None, None
            if m <= args.float64_up_to:  # the defaults in float64: the accuracy reference of every variant
                gp64 = NTKGP(
                    FunctionalNetwork(model.double(), params),
                    x.double(),
                    y.double(),
                    mean="zero",
                    noise=0.1,
                    space="function",
                    progress=False,
                )
                reference = gp64.predict(test.double()).variance
                model.float()
            for name, (net_options, predict_options) in variants.items():
                net = FunctionalNetwork(model, params, **net_options)
                gp = NTKGP(net, x, y, mean="zero", noise=0.1, space="function")

                def predict(name=name, gp=gp, net=net, x=x, test=test, predict_options=predict_options):
                    if name == "before":  # K(X, X) by N VJPs and N JVPs, as before (the first prediction forms it)
                        gp._ntk = ntk_eigh(net, x, 10)
                    return gp.predict(test.clone(), **predict_options)

                pred, seconds = timed(predict, device)
                row = {
                    "shots": k,
                    "tests": m,
                    "N": int(y.numel()),
                    "variant": name,
                    "seconds": seconds,
                    "gradient_seconds": grad_seconds,
                    "ratio": seconds / grad_seconds,
                    "rank": pred.rank,
                    "probe_error": pred.variance_error,
                }
                if name == "exact":
                    exact = pred
                if name != "exact" and exact is not None:
                    row["max_error_vs_exact"] = float(((pred.variance - exact.variance) / exact.variance).abs().max())
                    row["mean_difference"] = float((pred.mean - exact.mean).abs().max())
                if reference is not None:
                    error = (pred.variance.double() - reference) / reference
                    row["max_error_vs_float64"] = float(error.abs().max())
                rows.append(row)
                write_results(args.out, device, rows)
                err, err64 = row.get("max_error_vs_exact"), row.get("max_error_vs_float64")
                print(
                    f"{k:>3} {m:>5}  {name:<9} {seconds:>8.1f} {row['ratio']:>10.1f} {pred.rank or '':>5} "
                    f"{'' if pred.variance_error is None else format(pred.variance_error, '.1e'):>9} "
                    f"{'' if err is None else format(err, '.1e'):>8} "
                    f"{'' if err64 is None else format(err64, '.1e'):>10}",
                    flush=True,
                )
    return rows


if __name__ == "__main__":
    main()
