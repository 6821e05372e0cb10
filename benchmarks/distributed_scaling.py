"""Time per data-parallel product on torch.distributed: the training inputs sharded across the processes.

Launch with torchrun; every process holds n / world inputs of the MLP 784-1024-1024-10 (random weights, seed 0)
and times the Gram product G v (local JVP + VJP, one all_reduce of the p-vector), the finite-difference Fisher
product and the NTK product on a sharded vector; rank 0 prints the median seconds and writes
``results/benchmarks/distributed_<world>.json``. Compare the world sizes of two launches (the CPU runs use the
gloo backend and as many threads per process as cores / world; CUDA runs NCCL, one GPU per process)::

    python -m torch.distributed.run --nproc_per_node=1 benchmarks/distributed_scaling.py --inputs 2048
    python -m torch.distributed.run --nproc_per_node=2 benchmarks/distributed_scaling.py --inputs 2048
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from timing import mlp_and_resnet

from ntkgp import FunctionalNetwork, fisher_operator, gram_operator, ntk_operator


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks"))
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    name, model, x = mlp_and_resnet(device, args.inputs, 1)[0]
    model = model.to(device).eval()
    net = FunctionalNetwork(model)
    local = net.shard(x.reshape(world, -1, x.shape[-1])[rank].clone())
    generator = torch.Generator(device="cpu").manual_seed(1)
    v = torch.randn(net.num_params, 1, generator=generator).to(device)
    u = torch.randn(local.shape[0] * 10, 1, generator=generator).to(device)
    operators = {
        "Gram": (gram_operator(net, local), v),
        "FD-Fisher": (fisher_operator(net, local, "categorical"), v),
        "NTK (sharded v)": (ntk_operator(net, local), u),
    }
    times = {}
    for label, (op, rhs) in operators.items():
        op @ rhs  # warm-up
        samples = []
        for _ in range(args.repeats):
            dist.barrier()
            start = time.perf_counter()
            op @ rhs
            if cuda:
                torch.cuda.synchronize(device)
            dist.barrier()
            samples.append(time.perf_counter() - start)
        times[label] = statistics.median(samples)
    result = {
        "model": name,
        "n": args.inputs,
        "world": world,
        "threads_per_process": torch.get_num_threads(),
        "backend": dist.get_backend(),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "seconds": times,
    }
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"distributed_{world}.json").write_text(json.dumps(result, indent=1))
        print(
            f"{name}, n = {args.inputs}, {world} process(es) × {result['threads_per_process']} thread(s), "
            f"{result['backend']}: " + ", ".join(f"{k} {1e3 * t:.1f} ms" for k, t in times.items())
        )
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
