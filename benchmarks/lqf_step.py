"""Cost of one LQF SGD step and of K-FAC, relative to one gradient of the same network on the same batch.

Prints, measured in one run: one LQF step (f_lin by one JVP, its gradient by one VJP, the K-FAC preconditioner,
the momentum update) / one gradient (forward + backward of the summed outputs over the batch, with respect to
the parameters in scope), and their peak memory above the baseline (CUDA's allocator statistics; on the CPU
the running sum of the profiler's memory events, ``timing.cpu_peak_bytes``); the time to build the K-FAC
factors once (on ``--kfac-n`` inputs) and one preconditioner application / one gradient. Models: torchvision's
MobileNetV2 (ImageNet weights when $NTKGP_DATA/torch_home holds them, else random) with a new 10-way head, its last
block and head in scope, batch 64 at 64 × 64; ResNet-18 (10 classes, random weights), all parameters, batch 64 at
32 × 32. Writes ``results/benchmarks/lqf_step.json``. Usage::

    python benchmarks/lqf_step.py                   # cuda if available
    python benchmarks/lqf_step.py --device cpu --repeats 5
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import torch
import torchvision
from timing import cpu_peak_bytes, header, measure, sync, write_results
from torch import nn

from ntkgp import LQF, KFACPreconditioner

MOBILENET_SCOPE = ["features.17.", "features.18.", "classifier."]


def mobilenet() -> nn.Module:
    home = Path(os.environ.get("NTKGP_DATA", "../shared/data")) / "torch_home"
    weights = None
    if (home / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth").exists():
        os.environ.setdefault("TORCH_HOME", str(home))
        weights = "IMAGENET1K_V1"
    model = torchvision.models.mobilenet_v2(weights=weights)
    model.classifier[1] = nn.Linear(1280, 10)
    return model.eval()


def bench(name: str, model: nn.Module, params: list[str] | None, x: torch.Tensor, kfac_n: int, repeats: int) -> dict:
    device = x.device
    model = model.to(device).eval()
    torch.manual_seed(0)
    y = torch.randint(0, 10, (x.shape[0],), device=device)
    lqf = LQF(model, params=params, weight_decay=1e-3)
    in_scope = set(lqf.network.names)
    for n, p in model.named_parameters():  # the gradient's graph starts where the scope does, as LQF's
        p.requires_grad_(n in in_scope)
    scope = [p for n, p in model.named_parameters() if n in in_scope]

    def gradient():
        return torch.autograd.grad(model(x).sum(), scope)

    train_x = torch.cat([x] * (kfac_n // x.shape[0] + 1))[:kfac_n]
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the BatchNorm layers' diagonal blocks
        preconditioner = KFACPreconditioner(lqf.network, train_x, lqf.weight_decay)
    sync(device)
    build = time.perf_counter() - start
    w = torch.zeros(lqf.network.num_params, device=device, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.SGD([w], lr=1e-12, momentum=0.9)
    targets, f0 = lqf.alpha * nn.functional.one_hot(y, 10).to(x.dtype), lqf.network.outputs(x)
    vector = torch.randn(lqf.network.num_params, device=device, dtype=x.dtype)

    def step():
        return lqf._step(w, optimizer, x, targets, f0, len(train_x), preconditioner)

    def apply():
        return preconditioner @ vector

    timings = measure({"gradient": gradient, "step": step, "kfac": apply}, device, repeats)
    times = {name: seconds for name, (seconds, _) in timings.items()}
    peaks = {
        name: timings[name][1] if device.type == "cuda" else cpu_peak_bytes(fn)
        for name, fn in (("gradient", gradient), ("step", step))
    }
    return {
        "model": name,
        "batch": x.shape[0],
        "input": list(x.shape[1:]),
        "params": lqf.network.num_params,
        "gradient_ms": 1e3 * times["gradient"],
        "step_ms": 1e3 * times["step"],
        "step_ratio": times["step"] / times["gradient"],
        "gradient_peak_mib": peaks["gradient"] / 2**20,
        "step_peak_mib": peaks["step"] / 2**20,
        "memory_ratio": peaks["step"] / peaks["gradient"],
        "kfac_inputs": kfac_n,
        "kfac_build_s": build,
        "kfac_apply_ms": 1e3 * times["kfac"],
        "kfac_apply_ratio": times["kfac"] / times["gradient"],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--kfac-n", type=int, default=256, help="inputs the K-FAC factors are built on")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--models", nargs="+", default=["mobilenet_v2", "resnet18"], choices=["mobilenet_v2", "resnet18"]
    )
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/lqf_step.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = []
    if "mobilenet_v2" in args.models:
        rows.append(
            bench(
                "MobileNetV2 last block 64x64",
                mobilenet(),
                MOBILENET_SCOPE,
                torch.randn(args.batch, 3, 64, 64, device=device),
                args.kfac_n,
                args.repeats,
            )
        )
    if "resnet18" in args.models:
        rows.append(
            bench(
                "ResNet-18 all 32x32",
                torchvision.models.resnet18(num_classes=10),
                None,
                torch.randn(args.batch, 3, 32, 32, device=device),
                args.kfac_n,
                args.repeats,
            )
        )
    print(header(device, args.repeats))
    for r in rows:
        print(
            f"{r['model']:30s} b={r['batch']:3d} p={r['params']:9d}  gradient {r['gradient_ms']:8.1f} ms  "
            f"LQF step {r['step_ms']:8.1f} ms  ratio {r['step_ratio']:.2f}  memory ratio {r['memory_ratio']:.2f} "
            f"({r['step_peak_mib']:.0f} / {r['gradient_peak_mib']:.0f} MiB)  K-FAC build {r['kfac_build_s']:.1f} s "
            f"on {r['kfac_inputs']}  apply {r['kfac_apply_ms']:.1f} ms  ratio {r['kfac_apply_ratio']:.2f}"
        )
    write_results(args.out, device, rows)
    return rows


if __name__ == "__main__":
    main()
