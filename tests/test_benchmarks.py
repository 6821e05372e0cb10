"""The benchmark scripts run (on tiny sizes) and report finite ratios."""

import importlib.util
import math
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_ntk_mvm_benchmark_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("ntk_mvm", ROOT / "benchmarks" / "ntk_mvm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        rows = module.main(["--device", "cpu", "--n-mlp", "8", "--n-resnet", "2", "--repeats", "1",
                            "--out", str(tmp_path / "ntk_mvm.json")])
    finally:
        torch.set_default_dtype(previous)
    assert [r["model"] for r in rows] == ["MLP 784-1024-1024-10", "ResNet-18 32x32"]
    assert all(math.isfinite(r[key]) and r[key] > 0 for r in rows for key in ("time_ratio", "fd_fisher_ratio"))
    assert (tmp_path / "ntk_mvm.json").exists()
