"""Cost of one iterative-linearisation proxy step and of one damped Gauss-Newton step, in gradients.

Prints, measured in one run on the same network and batch: one proxy step of :class:`ntkgp.IterativeLinearisation`
(f_lin by one JVP at θ_s, its gradient by one VJP, an SGD update; no re-linearisation) / one gradient (forward and
backward of the cross-entropy, plain autograd, with an SGD update: one K = 1 step of plain training), and one damped
Gauss-Newton step (cross-entropy, λ = 1: Newton-CG on the Fisher operator, ``--newton`` Newton iterations of at most
``--cg`` CG products each; MSE, function space: the dense NTK of the batch and one VJP) / one gradient. Models: the
paper's modified LeNet (50 channels) and ResNet-18 (10 classes, random weights), all parameters, at 32 × 32 (3
channels). Writes ``results/benchmarks/iterative_step.json``. Usage::

    python benchmarks/iterative_step.py                   # cuda if available
    python benchmarks/iterative_step.py --device cpu --repeats 3
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torchvision
from timing import header, measure, write_results
from torch import nn

from ntkgp import IterativeLinearisation, gauss_newton_step
from ntkgp_experiments.iterative_linearisation import lenet


def bench(name: str, model: nn.Module, x: torch.Tensor, repeats: int, newton: int, cg: int, gn_batch: int) -> dict:
    model = model.to(x.device).eval()
    y = torch.randint(0, 10, (x.shape[0],), device=x.device)
    params = list(model.parameters())
    plain = torch.optim.SGD(params, lr=1e-12)

    def gradient():
        plain.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        plain.step()

    trainer = IterativeLinearisation(model, torch.optim.SGD(params, lr=1e-12), period=math.inf)

    def proxy_step():
        trainer.step(x, y)

    xs, ys = x[:gn_batch], y[:gn_batch]
    targets = nn.functional.one_hot(ys, 10).to(x.dtype)

    def gn_cross_entropy():
        gauss_newton_step(model, xs, ys, "cross_entropy", damping=1.0, newton_steps=newton, max_iter=cg, tolerance=1e-4)

    def gn_mse():
        gauss_newton_step(model, xs, targets, "mse", damping=1.0, space="function")

    def gradient_gn_batch():
        plain.zero_grad()
        nn.functional.cross_entropy(model(xs), ys).backward()
        plain.step()

    times = {k: v[0] for k, v in measure({"gradient": gradient, "proxy": proxy_step}, x.device, repeats).items()}
    gn = {
        k: v[0]
        for k, v in measure(
            {"gradient": gradient_gn_batch, "ce": gn_cross_entropy, "mse": gn_mse}, x.device, max(1, repeats // 3)
        ).items()
    }
    return {
        "model": name,
        "batch": x.shape[0],
        "params": sum(p.numel() for p in params),
        "gradient_ms": 1e3 * times["gradient"],
        "proxy_step_ms": 1e3 * times["proxy"],
        "proxy_step_ratio": times["proxy"] / times["gradient"],
        "gn_batch": gn_batch,
        "gn_gradient_ms": 1e3 * gn["gradient"],
        "gn_cross_entropy_ratio": gn["ce"] / gn["gradient"],
        "gn_mse_function_ratio": gn["mse"] / gn["gradient"],
        "newton_steps": newton,
        "cg_products": cg,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--gn-batch", type=int, default=32, help="batch of the Gauss-Newton steps")
    parser.add_argument("--newton", type=int, default=3, help="Newton iterations of the cross-entropy GN step")
    parser.add_argument("--cg", type=int, default=20, help="CG products per Newton iteration at most")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=["lenet", "resnet18"], choices=["lenet", "resnet18"])
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/iterative_step.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    models = {
        "lenet": ("LeNet-50 32x32", lambda: lenet(50, in_channels=3, size=32)),
        "resnet18": ("ResNet-18 32x32", lambda: torchvision.models.resnet18(num_classes=10)),
    }
    rows = []
    for key in args.models:
        name, build = models[key]
        rows.append(
            bench(
                name,
                build(),
                torch.randn(args.batch, 3, 32, 32, device=device),
                args.repeats,
                args.newton,
                args.cg,
                args.gn_batch,
            )
        )
    print(header(device, args.repeats))
    for r in rows:
        print(
            f"{r['model']:18s} b={r['batch']:3d} p={r['params']:9d}  gradient {r['gradient_ms']:8.1f} ms  proxy "
            f"step {r['proxy_step_ms']:8.1f} ms  ratio {r['proxy_step_ratio']:.2f}  |  GN step on b={r['gn_batch']}"
            f": cross-entropy ({r['newton_steps']} Newton × ≤{r['cg_products']} CG) {r['gn_cross_entropy_ratio']:.0f}"
            f" gradients, MSE function space {r['gn_mse_function_ratio']:.0f} gradients"
        )
    write_results(args.out, device, rows)
    return rows


if __name__ == "__main__":
    main()
