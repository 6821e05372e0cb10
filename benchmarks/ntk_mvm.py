"""NTK and Fisher product costs relative to one gradient of the same network on the same batch.

Prints, measured in one run: NTK-MVM time / gradient time (forward + backward of the summed outputs
over the batch), the same with the linearisation cached as inside CG (``FunctionalNetwork.linearised``: one
forward pass for all products; its relative difference from the plain product and its estimated memory),
finite-difference Fisher-vector product time / gradient time (categorical
likelihood, forward pass at θ0 cached as in a CG loop; forward and central differences), the exact GGN product
(JVP then VJP) and, on CUDA, peak memory of each product / peak memory of the gradient. Transformers (a torchvision
ViT on 224 × 224 images and a HuggingFace BERT encoder on 128 tokens, ``--transformers base|small|tiny|none``): the
gradient runs on the network's default attention backend (torch's fused kernels), our products on the math one
(:mod:`ntkgp.functional.attention`); the gradient on the math backend is printed too, to show what the switch costs.
Writes ``results/benchmarks/ntk_mvm.json``. Usage::

    python benchmarks/ntk_mvm.py                    # cuda if available: MLP n=4096, ResNet-18 n=512, ViT-B, BERT-base
    python benchmarks/ntk_mvm.py --device cpu --n-mlp 512 --n-resnet 32 --transformers small --repeats 3
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from timing import Logits, add_transformer_arguments, benchmark_networks, header, measure, write_results
from torch import nn

from ntkgp import fisher_operator, ntk_operator
from ntkgp.functional.attention import differentiable_attention
from ntkgp.inputs import Inputs, length


def bench(name: str, model: nn.Module, x: Inputs, device: torch.device, repeats: int, chunk_size: int) -> dict:
    model = model.to(device).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    f = Logits(model)

    def gradient():
        return torch.autograd.grad(f(x).sum(), params)

    def gradient_math():
        with differentiable_attention():
            return torch.autograd.grad(f(x).sum(), params)

    op = ntk_operator(model, x, chunk_size=chunk_size)
    dtype = op.network.dtype
    v = torch.randn(op.shape[-1], device=device, dtype=dtype)

    def mvm():
        with torch.no_grad():
            return op @ v

    w = torch.randn(op.network.num_params, device=device, dtype=dtype)
    fvps = {}
    for method in ("finite_difference", "central_difference", "exact"):
        fisher = fisher_operator(op.network, x, "categorical", method=method)  # runs the forward pass at θ0
        fvps[method] = lambda fisher=fisher: fisher @ w

    timings = measure(
        {
            "gradient": gradient,
            "gradient_math": gradient_math,
            "mvm": mvm,
            "fvp": fvps["finite_difference"],
            "central": fvps["central_difference"],
            "ggn": fvps["exact"],
        },
        device,
        repeats,
    )
    (t_grad, m_grad), (t_mvm, m_mvm), (t_fvp, m_fvp) = timings["gradient"], timings["mvm"], timings["fvp"]
    plain = mvm()
    with op.network.linearised(x, budget=float("inf")):  # as around a CG loop: built once, not timed
        cached = measure({"gradient": gradient, "mvm": mvm}, device, repeats)
        difference = float((mvm() - plain).norm() / plain.norm())
    row = {
        "model": name,
        "n": length(x),
        "outputs": op.shape[0] // length(x),
        "params": op.network.num_params,
        "gradient_ms": 1e3 * t_grad,
        "gradient_math_ms": 1e3 * timings["gradient_math"][0],
        "math_backend_ratio": timings["gradient_math"][0] / t_grad,
        "ggn_ms": 1e3 * timings["ggn"][0],
        "ggn_ratio": timings["ggn"][0] / t_grad,
        "ntk_mvm_ms": 1e3 * t_mvm,
        "time_ratio": t_mvm / t_grad,
        "cached_ntk_mvm_ms": 1e3 * cached["mvm"][0],
        "cached_time_ratio": cached["mvm"][0] / cached["gradient"][0],
        "cached_relative_difference": difference,
        "cached_estimate_gib": op.network.saved_activation_bytes(x) / 2**30,
        "fd_fisher_ms": 1e3 * t_fvp,
        "fd_fisher_ratio": t_fvp / t_grad,
        "central_fisher_ms": 1e3 * timings["central"][0],
        "central_fisher_ratio": timings["central"][0] / t_grad,
    }
    if device.type == "cuda":
        row.update(
            gradient_peak_gib=m_grad / 2**30,
            ntk_mvm_peak_gib=m_mvm / 2**30,
            memory_ratio=m_mvm / m_grad,
            cached_memory_ratio=cached["mvm"][1] / cached["gradient"][1],
            fd_fisher_peak_gib=m_fvp / 2**30,
            fd_fisher_memory_ratio=m_fvp / m_grad,
            central_fisher_memory_ratio=timings["central"][1] / m_grad,
        )
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n-mlp", type=int, default=4096)
    parser.add_argument("--n-resnet", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--chunk-size", type=int, default=32)
    add_transformer_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/ntk_mvm.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    networks = benchmark_networks(device, args)
    rows = [bench(name, model, x, device, args.repeats, args.chunk_size) for name, model, x in networks]
    print(header(device, args.repeats))
    for r in rows:
        mem = (
            f", memory ratio {r['memory_ratio']:.2f} ({r['ntk_mvm_peak_gib']:.2f} / {r['gradient_peak_gib']:.2f} GiB)"
            if "memory_ratio" in r
            else ""
        )
        print(
            f"{r['model']:22s} n={r['n']:5d} p={r['params']:9d}  gradient {r['gradient_ms']:8.2f} ms  "
            f"(math attention {r['math_backend_ratio']:.2f}×)  GGN {r['ggn_ms']:8.2f} ms  ratio {r['ggn_ratio']:.2f}  "
            f"NTK-MVM {r['ntk_mvm_ms']:8.2f} ms  ratio {r['time_ratio']:.2f}{mem}  "
            f"cached {r['cached_ntk_mvm_ms']:8.2f} ms  ratio {r['cached_time_ratio']:.2f} (difference "
            f"{r['cached_relative_difference']:.1e}, estimate {r['cached_estimate_gib']:.2f} GiB)  "
            f"FD-Fisher {r['fd_fisher_ms']:8.2f} ms  ratio {r['fd_fisher_ratio']:.2f}  "
            f"central {r['central_fisher_ms']:8.2f} ms  ratio {r['central_fisher_ratio']:.2f}"
        )
    write_results(args.out, device, rows)
    return rows


if __name__ == "__main__":
    main()
