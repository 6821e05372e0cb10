"""Our curvature and kernel products against curvlinops' and laplace-torch's on the same network and batch.

Ratios to one gradient (forward + backward of the summed outputs) measured in one run, float32, for the
networks of ``benchmarks/ntk_mvm.py`` (MLP 784-1024-1024-10, ResNet-18 at 32 × 32, 10 outputs, random weights):
- ours: the categorical GGN/Fisher product JᵀHJ v (``fisher_operator(..., "categorical", method="exact")``,
  JVP then VJP), its finite-difference version (one gradient per product) and the NTK product K u;
- curvlinops: ``GGNLinearOperator(model, CrossEntropyLoss(reduction="sum"), params, [(x, y)])`` @ v, the same
  matrix (its agreement with ours is printed);
- transformers (``--transformers small|base|tiny|none``, :func:`timing.transformers_vit_and_bert`): a torchvision ViT
  and a HuggingFace BERT encoder on 128 tokens (dict inputs); the gradient and curvlinops run on the network's default
  attention backend, ours on the math one;
- laplace-torch 0.3 has no matrix-free product: its GLM predictive and full GGN go through per-sample
  Jacobians, ``CurvlinopsGGN(model, "classification").jacobians(x)`` (n, C, p), and then Jᵀ(H(J v)); timed
  when n·C·p floats fit ``--jacobian-budget-gib``, else reported as skipped with the memory it needs.
Peak memory above the baseline: CUDA's allocator, or the running sum of the profiler's memory events on the
CPU. Needs the ``bench`` extra (laplace-torch). Writes ``results/benchmarks/peers.json``. Usage::

    python benchmarks/peers.py --device cpu --n-mlp 512 --n-resnet 32 --repeats 3
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from curvlinops import GGNLinearOperator
from laplace.curvature import CurvlinopsGGN
from timing import (
    Logits,
    add_transformer_arguments,
    benchmark_networks,
    cpu_peak_bytes,
    header,
    measure,
    write_results,
)
from torch import nn

from ntkgp import fisher_operator, ntk_operator
from ntkgp.functional.attention import differentiable_attention
from ntkgp.inputs import Inputs, length


def peer_product(peer: GGNLinearOperator, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    """curvlinops' product on the network's default attention backend; where that raises (its GGN product is a
    torch.func JVP too: no forward-mode rule for torch's fused attention), on the math one, which ntkgp selects."""
    try:
        peer @ v
    except NotImplementedError as err:
        print(f"curvlinops on the default attention backend: {str(err).splitlines()[0][:120]}; timed on the math one")

        def on_math() -> torch.Tensor:
            with differentiable_attention():
                return peer @ v

        return on_math
    return lambda: peer @ v


def bench(name: str, model: nn.Module, x: Inputs, device: torch.device, repeats: int, budget_gib: float) -> list[dict]:
    model = model.to(device).eval()
    f = Logits(model)
    params = [p for p in model.parameters() if p.requires_grad]
    n = length(x)
    y = torch.randint(0, 10, (n,), device=device)
    fisher = fisher_operator(model, x, "categorical", method="exact")
    finite = fisher_operator(fisher.network, x, "categorical", method="finite_difference")
    ntk = ntk_operator(fisher.network, x)
    peer = GGNLinearOperator(
        f, nn.CrossEntropyLoss(reduction="sum"), params, [(x, y)], check_deterministic=False, batch_size_fn=length
    )
    dtype = fisher.network.dtype
    v = torch.randn(fisher.shape[-1], device=device, dtype=dtype)
    u = torch.randn(ntk.shape[-1], device=device, dtype=dtype)

    def gradient():
        return torch.autograd.grad(f(x).sum(), params)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()

        return run

    # ours through `_matmul`, the product itself: the CPU profiler does not see the allocations made under
    # linear_operator's `@` (an autograd Function): 0.02 MiB there against 18 MiB for the same MLP NTK product
    products = {
        "gradient": gradient,
        "ours: GGN (JVP + VJP)": no_grad(lambda: fisher._matmul(v[:, None])),
        "ours: GGN finite difference": no_grad(lambda: finite._matmul(v[:, None])),
        "ours: NTK K u": no_grad(lambda: ntk._matmul(u[:, None])),
        "curvlinops: GGNLinearOperator": peer_product(peer, v),
    }
    needed = n * 10 * fisher.shape[-1] * v.element_size() / 2**30
    skipped = needed > budget_gib
    if not skipped:
        interface = CurvlinopsGGN(f, "classification")

        def laplace_torch():
            js, f = interface.jacobians(x)  # (n, C, p), (n, C)
            pi = torch.softmax(f, -1)
            jv = js @ v
            return torch.einsum("ncp,nc->p", js, pi * jv - pi * (pi * jv).sum(-1, keepdim=True))

        products["laplace-torch: Jacobians, then JᵀHJ v"] = laplace_torch
    timings = measure(products, device, repeats)
    reference = (fisher @ v).reshape(-1)
    agreement = {"curvlinops: GGNLinearOperator": products["curvlinops: GGNLinearOperator"]()}
    if not skipped:
        agreement["laplace-torch: Jacobians, then JᵀHJ v"] = products["laplace-torch: Jacobians, then JᵀHJ v"]()
    rows = []
    grad_time, grad_peak = timings["gradient"][0], None
    for method, fn in products.items():
        seconds, peak = timings[method]
        peak = peak if device.type == "cuda" else cpu_peak_bytes(fn)
        grad_peak = peak if method == "gradient" else grad_peak
        row = {
            "model": name,
            "n": n,
            "params": fisher.shape[-1],
            "method": method,
            "ms": 1e3 * seconds,
            "time_ratio": seconds / grad_time,
            "peak_mib": peak / 2**20,
            "memory_ratio": peak / grad_peak,
        }
        if method in agreement:
            row["relative_difference"] = float((agreement[method].reshape(-1) - reference).norm() / reference.norm())
        rows.append(row)
    if skipped:
        rows.append(
            {
                "model": name,
                "n": n,
                "params": fisher.shape[-1],
                "method": "laplace-torch: Jacobians, then JᵀHJ v",
                "skipped": f"needs {needed:.1f} GiB",
            }
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n-mlp", type=int, default=512)
    parser.add_argument("--n-resnet", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--jacobian-budget-gib", type=float, default=4.0)
    add_transformer_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/peers.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    networks = benchmark_networks(device, args)
    rows = [
        row
        for name, model, x in networks
        for row in bench(name, model, x, device, args.repeats, args.jacobian_budget_gib)
    ]
    print(header(device, args.repeats))
    for r in rows:
        if "skipped" in r:
            print(f"{r['model']:22s} n={r['n']:4d}  {r['method']:40s} skipped: {r['skipped']}")
            continue
        agree = f"  vs ours {r['relative_difference']:.1e}" if "relative_difference" in r else ""
        print(
            f"{r['model']:22s} n={r['n']:4d}  {r['method']:40s} {r['ms']:9.1f} ms  ratio {r['time_ratio']:6.2f}  "
            f"memory {r['memory_ratio']:6.2f} ({r['peak_mib']:.0f} MiB){agree}"
        )
    write_results(args.out, device, rows)
    return rows


if __name__ == "__main__":
    main()
