"""What the benchmark scripts share: interleaved median timings, peak memory, the device's name, JSON output."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ntkgp.functional.network_output import select_output
from ntkgp.inputs import Inputs, call_arguments


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fns: dict, device: torch.device, repeats: int) -> dict[str, tuple[float, float]]:
    """name -> (median seconds, peak bytes above the baseline; 0 on CPU) of each ``fn()`` after one warm-up,
    timed in interleaved rounds so that clock and load drift hit every function alike."""
    for fn in fns.values():
        fn()
    sync(device)
    times = {name: [] for name in fns}
    peaks = dict.fromkeys(fns, 0.0)
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
            if device.type == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device) - base)
    return {name: (statistics.median(times[name]), peaks[name]) for name in fns}


def cpu_peak_bytes(fn) -> float:
    """Peak memory allocated by ``fn()`` on the CPU above what was allocated before it: the running sum of the
    profiler's memory events (allocations and frees, in time order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return float(peak)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def header(device: torch.device, repeats: int) -> str:
    """The line every benchmark prints first: where and how it measured."""
    return f"device: {device_name(device)}, torch {torch.__version__}, float32, median of {repeats}"


def write_results(path: Path, device: torch.device, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": device_name(device), "torch": torch.__version__, "rows": rows}, indent=1))


def mlp_and_resnet(device: torch.device, n_mlp: int, n_resnet: int) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """(name, network, inputs) of the two reference networks (GUIDE §5), random weights (seed 0): the MLP
    784-1024-1024-10 on n_mlp inputs and torchvision's ResNet-18 (10 outputs) on n_resnet 32 × 32 images."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    resnet = torchvision.models.resnet18(num_classes=10)
    return [
        ("MLP 784-1024-1024-10", mlp, torch.randn(n_mlp, 784, device=device)),
        ("ResNet-18 32x32", resnet, torch.randn(n_resnet, 3, 32, 32, device=device)),
    ]


#: transformer sizes: (layers, hidden, heads, batch) — "base" is ViT-B/16 and BERT-base (a GPU's), "small" fits a
#: 2-core CPU run, "tiny" the test suite
TRANSFORMER_SIZES = {"base": (12, 768, 12, 32), "small": (4, 256, 4, 8), "tiny": (1, 32, 2, 2)}


class Logits(nn.Module):
    """f of a network with any inputs, as one tensor: ``model(x)``, ``model(*x)`` or ``model(**x)``, a ModelOutput's
    logits (what curvlinops and a plain gradient need)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Inputs) -> torch.Tensor:
        args, kwargs = call_arguments(x)
        return select_output(self.model(*args, **kwargs), None)


def transformers_vit_and_bert(
    device: torch.device, size: str, seq_len: int = 128
) -> list[tuple[str, nn.Module, Inputs]]:
    """(name, network, inputs) of a torchvision ViT on 224 × 224 images (patch 16) and a HuggingFace BERT encoder on
    ``seq_len`` tokens (dict inputs), ``size`` from :data:`TRANSFORMER_SIZES`, 10 outputs, random weights (seed 0)."""
    from torchvision.models import VisionTransformer
    from transformers import BertConfig, BertForSequenceClassification

    layers, hidden, heads, n = TRANSFORMER_SIZES[size]
    torch.manual_seed(0)
    vit = VisionTransformer(224, 16, layers, heads, hidden, 4 * hidden, num_classes=10)
    config = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        num_labels=10,
        max_position_embeddings=max(512, seq_len),
    )
    bert = BertForSequenceClassification(config)
    tokens = {
        "input_ids": torch.randint(1, config.vocab_size, (n, seq_len), device=device),
        "attention_mask": torch.ones(n, seq_len, dtype=torch.long, device=device),
    }
    return [
        (f"ViT {layers}x{hidden} 224px", vit, torch.randn(n, 3, 224, 224, device=device)),
        (f"BERT {layers}x{hidden} seq {seq_len}", bert, tokens),
    ]


def add_transformer_arguments(parser: argparse.ArgumentParser) -> None:
    """``--transformers`` (a size of :data:`TRANSFORMER_SIZES`, or none) and ``--seq-len``, for the benchmarks that
    measure the ViT and the BERT encoder beside the MLP and ResNet-18."""
    parser.add_argument("--transformers", choices=[*TRANSFORMER_SIZES, "none"], default=None,
                        help="ViT and BERT sizes (default: base on cuda, small on the CPU)")  # fmt: skip
    parser.add_argument("--seq-len", type=int, default=128)


def benchmark_networks(device: torch.device, args: argparse.Namespace) -> list[tuple[str, nn.Module, Inputs]]:
    """The MLP and ResNet-18 (``--n-mlp``, ``--n-resnet``) and, unless ``--transformers none``, the ViT and BERT."""
    size = args.transformers or ("base" if device.type == "cuda" else "small")
    networks = mlp_and_resnet(device, args.n_mlp, args.n_resnet)
    if size != "none":
        networks += transformers_vit_and_bert(device, size, args.seq_len)
    return networks
