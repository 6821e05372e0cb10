"""The benchmark scripts run (on tiny sizes) and report finite ratios."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ntk_mvm_benchmark_runs(tmp_path):
    module = load("ntk_mvm")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        rows = module.main(["--device", "cpu", "--n-mlp", "8", "--n-resnet", "2", "--repeats", "1",
                            "--out", str(tmp_path / "ntk_mvm.json")])
    finally:
        torch.set_default_dtype(previous)
    assert [r["model"] for r in rows] == ["MLP 784-1024-1024-10", "ResNet-18 32x32"]
    assert all(math.isfinite(r[key]) and r[key] > 0 for r in rows
               for key in ("time_ratio", "fd_fisher_ratio", "central_fisher_ratio"))
    assert (tmp_path / "ntk_mvm.json").exists()


def test_laplace_agrees_with_laplace_torch_and_benchmark_runs(tmp_path):
    pytest.importorskip("laplace", reason="laplace-torch (the bench/test extra) is not installed")
    module = load("laplace_vs_laplace_torch")
    payload = module.main(["--n", "20", "--width", "8", "--out", str(tmp_path / "lvlt.json")])
    # GLM predictive and evidence of the same post-hoc posterior, float64: 1e-10 absolute
    assert set(payload["agreement"]) == {"regression_mean", "regression_variance", "classification_probit",
                                         "regression_log_marginal_likelihood",
                                         "classification_log_marginal_likelihood"}
    assert all(value < 1e-10 for value in payload["agreement"].values()), payload["agreement"]
    assert {r["library"] for r in payload["rows"]} == {"ntkgp", "laplace-torch"}
    assert all(r["seconds"] > 0 and r["params"] == 330 for r in payload["rows"])
