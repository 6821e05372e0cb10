"""The benchmark scripts run (on tiny sizes) and report finite ratios."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    if str(ROOT / "benchmarks") not in sys.path:  # the scripts import their shared benchmarks/timing.py
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_in_float32(name, argv):
    """``main(argv)`` of a benchmark script, with float32 as the default dtype (as a user runs it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        return load(name).main(argv)
    finally:
        torch.set_default_dtype(previous)


def tiny_argv(n_mlp: int, out: Path) -> list[str]:
    """The command line of a benchmark's smallest run on the CPU: every network, the transformers at their tiny size."""
    sizes = ["--n-mlp", str(n_mlp), "--n-resnet", "2", "--transformers", "tiny", "--seq-len", "16"]
    return ["--device", "cpu", *sizes, "--repeats", "1", "--out", str(out)]


def test_ntk_mvm_benchmark_runs(tmp_path):
    rows = run_in_float32(
        "ntk_mvm",
        tiny_argv(8, tmp_path / "ntk_mvm.json"),
    )
    assert [r["model"] for r in rows] == [
        "MLP 784-1024-1024-10",
        "ResNet-18 32x32",
        "ViT 1x32 224px",
        "BERT 1x32 seq 16",
    ]
    assert all(
        math.isfinite(r[key]) and r[key] > 0
        for r in rows
        for key in (
            "time_ratio",
            "cached_time_ratio",
            "fd_fisher_ratio",
            "central_fisher_ratio",
            "ggn_ratio",
            "math_backend_ratio",
        )
    )
    assert all(r["cached_relative_difference"] < 1e-5 for r in rows)
    assert (tmp_path / "ntk_mvm.json").exists()


def test_laplace_agrees_with_laplace_torch_and_benchmark_runs(tmp_path):
    pytest.importorskip("laplace", reason="laplace-torch (the bench/test extra) is not installed")
    module = load("laplace_vs_laplace_torch")
    payload = module.main(["--n", "20", "--width", "8", "--out", str(tmp_path / "lvlt.json")])
    # GLM predictive and evidence of the same post-hoc posterior, float64: 1e-10 absolute
    assert set(payload["agreement"]) == {
        "regression_mean",
        "regression_variance",
        "classification_probit",
        "regression_log_marginal_likelihood",
        "classification_log_marginal_likelihood",
    }
    assert all(value < 1e-10 for value in payload["agreement"].values()), payload["agreement"]
    assert {r["library"] for r in payload["rows"]} == {"ntkgp", "laplace-torch"}
    assert all(r["seconds"] > 0 and r["params"] == 330 for r in payload["rows"])


def test_lqf_step_benchmark_runs(tmp_path):
    rows = run_in_float32(
        "lqf_step",
        [
            "--device",
            "cpu",
            "--batch",
            "2",
            "--kfac-n",
            "4",
            "--repeats",
            "1",
            "--models",
            "mobilenet_v2",
            "--out",
            str(tmp_path / "lqf_step.json"),
        ],
    )
    assert [r["model"] for r in rows] == ["MobileNetV2 last block 64x64"] and rows[0]["params"] == 898890
    assert all(
        math.isfinite(rows[0][key]) and rows[0][key] > 0
        for key in ("step_ratio", "memory_ratio", "kfac_build_s", "kfac_apply_ratio")
    )
    assert (tmp_path / "lqf_step.json").exists()


def test_kfac_conditioning_benchmark_runs(tmp_path):
    rows = run_in_float32(
        "kfac_conditioning",
        [
            "--shots",
            "1",
            "--steps",
            "4",
            "--scopes",
            "last layer",
            "--weight-decay",
            "1.0",
            "--out",
            str(tmp_path / "cond.json"),
        ],
    )
    row = rows[0]
    assert row["params"] == 12810 and row["n"] == 10
    assert 0 < row["hessian_min"] <= row["hessian_max"] and 0 < row["kfac_min"] <= row["kfac_max"]


def test_peers_benchmark_runs_and_agrees(tmp_path):
    pytest.importorskip("laplace", reason="laplace-torch (the bench/test extra) is not installed")
    rows = run_in_float32(
        "peers",
        tiny_argv(4, tmp_path / "peers.json"),
    )
    assert {r["model"] for r in rows} >= {"ViT 1x32 224px", "BERT 1x32 seq 16"}
    methods = {r["method"] for r in rows}
    assert {
        "ours: GGN (JVP + VJP)",
        "curvlinops: GGNLinearOperator",
        "laplace-torch: Jacobians, then JᵀHJ v",
    } <= methods
    # the peers compute the same matrix as ours (float32)
    assert all(r["relative_difference"] < 1e-4 for r in rows if "relative_difference" in r)
    assert all(r["time_ratio"] > 0 for r in rows if "time_ratio" in r)


def test_predict_variance_benchmark_runs(tmp_path):
    """On the real MobileNetV2 (../shared/data), 1 shot and 6 test images at 32 × 32: the old path, the per-sample
    Jacobian path, the default (layer factors) and the low-rank one give the same means, and the exact variances
    agree, with each other and with the defaults in float64."""
    rows = run_in_float32(
        "predict_variance",
        [
            "--device",
            "cpu",
            "--shots",
            "1",
            "--tests",
            "6",
            "--size",
            "32",
            "--before-up-to",
            "6",
            "--out",
            str(tmp_path / "pv.json"),
        ],
    )
    assert [r["variant"] for r in rows] == ["exact", "before", "jacobians", "low rank"]
    for row in rows[1:3]:
        assert row["max_error_vs_exact"] < 1e-3 and row["mean_difference"] < 1e-4  # the same numbers
    assert all(r["max_error_vs_float64"] < 1e-3 for r in rows)
    assert all(math.isfinite(r["ratio"]) and r["ratio"] > 0 for r in rows)
    assert rows[3]["rank"] is not None and rows[3]["mean_difference"] < 1e-4
    assert (tmp_path / "pv.json").exists()


def test_iterative_step_benchmark_runs(tmp_path):
    rows = run_in_float32(
        "iterative_step",
        [
            "--device",
            "cpu",
            "--batch",
            "4",
            "--gn-batch",
            "2",
            "--newton",
            "1",
            "--cg",
            "2",
            "--repeats",
            "1",
            "--models",
            "lenet",
            "--out",
            str(tmp_path / "iterative_step.json"),
        ],
    )
    assert [r["model"] for r in rows] == ["LeNet-50 32x32"]
    assert all(
        math.isfinite(r[key]) and r[key] > 0
        for r in rows
        for key in ("proxy_step_ratio", "gn_cross_entropy_ratio", "gn_mse_function_ratio")
    )
    assert (tmp_path / "iterative_step.json").exists()


def test_laplace_workload_benchmark_runs_resumes_and_agrees(tmp_path):
    """benchmarks/laplace_workload.py on synthetic 16-d features (p = 170): every cell of both libraries, the full
    posterior within 1e-6 of the exact float64 closed form, full and diag equal to laplace-torch's at δ = 1; a rerun
    finds every cell done and recomputes none."""
    pytest.importorskip("laplace")
    g = torch.Generator().manual_seed(0)
    features = {
        "train_y": torch.randint(0, 10, (300,), generator=g),
        "test_y": torch.randint(0, 10, (40,), generator=g),
    }
    for name, n in (("train", 300), ("test", 40), ("ood", 40)):
        shift = 0.5 * features.get(f"{name}_y", torch.zeros(n))[:, None]  # a little class signal
        features[name] = (torch.randn(n, 16, generator=g) + shift).float()
    torch.save(features, tmp_path / "features.pt")
    argv = ["--n", "300", "--block-n", "--test", "40", "--features", str(tmp_path / "features.pt")]
    argv += ["--out", str(tmp_path / "out.json")]
    rows = run_in_float32("laplace_workload", argv)
    assert {(r["library"], r["structure"]) for r in rows} == {
        (library, structure) for library in ("ntkgp", "laplace-torch") for structure in ("full", "kron", "diag")
    }
    for row in rows:
        assert math.isfinite(row["nll"]) and 0 <= row["accuracy"] <= 1 and row["total_s"] > 0
        if row["structure"] == "full":
            assert row["distance_from_exact"] < (1e-6 if row["library"] == "ntkgp" else 1e-3)
        if row["structure"] in ("full", "diag") and row["library"] == "laplace-torch":
            assert row["difference_at_delta_1"] < 1e-5  # float32 networks, the same posterior
    again = run_in_float32("laplace_workload", argv)
    assert again == rows
