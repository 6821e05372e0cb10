"""Where the time of one NTK-MVM goes: torch.profiler over a gradient and over one product, top kernels.

python benchmarks/profile_mvm.py            # CUDA if available: ResNet-18, 32×32, n = 512
python benchmarks/profile_mvm.py --n 32 --device cpu
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from torch.profiler import ProfilerActivity, profile

from ntkgp import ntk_operator


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    model = torchvision.models.resnet18(num_classes=10).to(device).eval()
    x = torch.randn(args.n, 3, 32, 32, device=device)
    params = list(model.parameters())
    op = ntk_operator(model, x)
    v = torch.randn(op.shape[-1], device=device)

    def gradient():
        return torch.autograd.grad(model(x).sum(), params)

    def mvm():
        with torch.no_grad():
            return op @ v

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    for name, fn in (("gradient", gradient), ("NTK-MVM", mvm)):
        for _ in range(3):
            fn()
        with profile(activities=activities) as prof:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        print(f"\n=== {name} (n = {args.n}, {device}) ===")
        print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
