"""Each experiment's tiny configuration runs end to end through the command line."""

import importlib.metadata
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ntkgp.cli import discover_experiments, main

UMASK = os.umask(0)
os.umask(UMASK)

ROOT = Path(__file__).resolve().parents[1]


def test_list_names_every_experiment(capsys):
    assert main(["list"]) == 0
    assert "sinusoid" in capsys.readouterr().out
    assert set(discover_experiments()) >= {"sinusoid"}


@pytest.mark.slow
def test_sinusoid_tiny_run_writes_results_and_figure(tmp_path, capsys):
    assert main(["run", "sinusoid", "--config", "tiny", "--out", str(tmp_path), "--seed", "3"]) == 0
    out = tmp_path / "sinusoid"
    payload = json.loads((out / "results.json").read_text())
    from ntkgp_experiments.sinusoid import methods as method_table

    tiny = discover_experiments()["sinusoid"].configs["tiny"]
    expected = set(method_table(tiny))
    assert {row["method"] for row in payload["rows"]} == expected and len(expected) == 12
    assert len(payload["rows"]) == len(expected) * tiny["tasks"] * len(tiny["shots"])
    for row in payload["rows"]:
        assert row["mse"] >= 0 and 0 <= row["coverage"] <= 1 and row["time"] > 0
    by_method = {r["method"]: r for r in payload["rows"] if r["task"] == 0}
    function, parameter = (
        by_method["NTK-GP network mean, fixed, funct."],
        by_method["NTK-GP network mean, fixed, param."],
    )
    assert abs(function["mse"] - parameter["mse"]) <= 1e-6 * function["mse"]
    assert (out / "bands.png").stat().st_size > 10_000
    assert "test NLL" in capsys.readouterr().out
    for name in ("results.json", "bands.png"):  # not tempfile's 0600
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~UMASK
    assert sorted(p.name for p in out.iterdir()) == ["bands.png", "results.json"]  # no temporary file left


def test_atomic_files_are_made_as_the_user_makes_files_and_a_failure_leaves_nothing(tmp_path):
    from ntkgp_experiments.common import atomic_path, write_json_atomic

    previous = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
        with pytest.raises(RuntimeError), atomic_path(tmp_path / "b.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    finally:
        os.umask(previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_version_is_pyproject_s_and_the_packages_are_all_installed(capsys):
    """One version, in pyproject.toml; every subpackage of ntkgp/ in its package list; the experiments installed as
    ntkgp_experiments (not as a generic top-level ``experiments``)."""
    tomllib = pytest.importorskip("tomllib")
    import ntkgp
    import ntkgp_experiments

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert ntkgp.__version__ == project["project"]["version"]
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"ntkgp {ntkgp.__version__}"
    listed = set(project["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "ntkgp").rglob("__init__.py")}
    assert found <= listed and "ntkgp_experiments" in listed
    assert Path(ntkgp_experiments.__file__).parent == root / "experiments"
    assert all(
        entry.value.startswith("ntkgp_experiments.")
        for entry in importlib.metadata.entry_points(group="ntkgp.experiments")
    )


def test_unknown_experiment_is_an_error():
    with pytest.raises(SystemExit):
        main(["run", "no-such-experiment"])


def test_console_script_is_installed():
    exe = shutil.which("ntkgp") or str(Path(sys.executable).parent / "ntkgp")
    result = subprocess.run([exe, "list"], capture_output=True, text=True, check=True)
    assert "sinusoid" in result.stdout


@pytest.mark.slow
def test_fisher_accuracy_tiny_run(tmp_path, capsys):
    assert main(["run", "fisher-accuracy", "--config", "tiny", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "fisher-accuracy" / "results.json").read_text())
    tiny = payload["config"]
    per_stage = len(tiny["likelihoods"]) * len(tiny["methods"]) * 2 * (len(tiny["epsilons"]) + 1)
    assert len(payload["rows"]) == per_stage * len(tiny["stages"])
    for row in payload["rows"]:
        assert 0 <= row["error_max"] < 1 and row["epsilon"] > 0
        if row["default_epsilon"]:  # the default step is accurate in both precisions; the central one is
            # larger (eps^(1/3)), and ReLU kinks crossed by it make its error O(ε) here, not O(ε²)
            float32 = 1e-2 if row["method"] == "finite_difference" else 2e-2
            assert row["error_max"] < (float32 if row["dtype"] == "float32" else 1e-5), row
    assert (tmp_path / "fisher-accuracy" / "errors.png").stat().st_size > 10_000
    assert "target < 1e-2" in capsys.readouterr().out


@pytest.mark.slow
def test_fashion_fewshot_tiny_run(tmp_path, capsys):
    argv = ["run", "fashion-fewshot", "--config", "tiny", "--out", str(tmp_path), "--set", "shots=[1]"]
    assert main(argv) == 0
    payload = json.loads((tmp_path / "fashion-fewshot" / "results.json").read_text())
    from ntkgp_experiments.fashion_fewshot import METHODS

    assert payload["config"]["shots"] == [1] and payload["scope"] == "last_block"
    assert [r["method"] for r in payload["rows"]] == METHODS
    for row in payload["rows"]:
        assert 0 <= row["accuracy"] <= 1 and row["nll"] > 0 and 0 <= row["ece"] <= 1 and row["seconds"] >= 0
    assert (tmp_path / "fashion-fewshot" / "fewshot.png").stat().st_size > 10_000
    assert "Laplace (probit)" in capsys.readouterr().out


@pytest.mark.slow
def test_fashion_fewshot_fixed_prior_precision(tmp_path):
    argv = [
        "run",
        "fashion-fewshot",
        "--config",
        "tiny",
        "--out",
        str(tmp_path),
        "--set",
        "shots=[1]",
        "--set",
        'methods=["linearised MAP"]',
        "--set",
        "prior_precision=3.0",
    ]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "fashion-fewshot" / "results.json").read_text())["rows"]
    assert [(r["method"], r["prior_precision"]) for r in rows] == [("linearised MAP", 3.0)]


def test_fisher_accuracy_networks():
    from ntkgp_experiments.fisher_accuracy import make_cnn

    x = torch.randn(2, 1, 28, 28)
    for activation in ("relu", "silu"):
        assert make_cnn(activation)(x).shape == (2, 10)
    with pytest.raises(ValueError, match="activation must be one of"):
        make_cnn("gelu")


def test_set_overrides_are_checked():
    with pytest.raises(SystemExit):
        main(["run", "fashion-fewshot", "--config", "tiny", "--set", "no_such_key=1"])
    with pytest.raises(SystemExit):
        main(["run", "fashion-fewshot", "--config", "tiny", "--set", "scope"])


def test_fewshot_pieces():
    from ntkgp_experiments.fashion_fewshot import gp_class_probabilities, metrics, scope_params

    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    result = metrics(probs, torch.tensor([0, 1, 1]))
    assert abs(result["accuracy"] - 2 / 3) < 1e-12
    assert abs(result["nll"] + (torch.log(torch.tensor([0.9, 0.8, 0.4])).sum() / 3).item()) < 1e-6
    # bins: 0.9 correct, 0.8 correct, 0.6 wrong -> ECE = (0.1 + 0.2 + 0.6) / 3
    assert abs(result["ece"] - 0.3) < 1e-6
    p = gp_class_probabilities(
        torch.tensor([[5.0, 0.0]]), torch.tensor([[1e-6, 1e-6]]), 98, torch.Generator().manual_seed(0)
    )
    assert torch.allclose(p, torch.tensor([[99 / 100, 1 / 100]]))
    with pytest.raises(ValueError, match="scope must be one of"):
        scope_params("everything")


def run_tiny(name: str, tmp_path: Path) -> tuple[list[str], Path, dict]:
    """Run experiment ``name``'s tiny configuration: (its command line, its results folder, its results.json)."""
    argv = ["run", name, "--config", "tiny", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = tmp_path / name
    return argv, out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_uci_large_tiny_run_resumes_and_forms_no_n_by_n_matrix(tmp_path, capsys):
    argv, out, payload = run_tiny("uci-large", tmp_path)
    from ntkgp_experiments.uci_large import METHODS

    assert list(payload["methods"]) == METHODS
    n = payload["gp_size"]
    for method, record in payload["methods"].items():
        assert record["rmse"] > 0 and math.isfinite(record["nll"]) and record["seconds"] >= 0, method
    for method in ("NTK-GP (function space, CG + LOVE)", "Laplace (matrix-free)"):
        assert math.prod(payload["methods"][method]["largest_tensor"]) < n * n  # checked inside the run too
        agreement = payload["methods"][method]["against_parameter_space"]
        assert agreement["mean"] < 1e-3 and agreement["variance_median"] < 1e-3, (method, agreement)
    laplace = payload["methods"]["Laplace (matrix-free)"]["hyperparameters"]
    assert laplace["dense"] is False  # rank 64 of a Fisher of larger rank: the estimated error is recorded
    assert 0 <= laplace["variance_error"] < math.inf
    assert (out / "uci_large.png").stat().st_size > 10_000
    first = capsys.readouterr().out
    assert "GPyTorch exact GP" in first
    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("*.pt")}
    assert main(argv) == 0  # a rerun resumes: nothing is recomputed
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.pt")} == stamp
    assert "pretraining" not in capsys.readouterr().err


def test_no_n_by_n_guard_fails_a_dense_kernel():
    from ntkgp_experiments.uci_large import measured

    with pytest.raises(AssertionError, match="no N × N matrix"):
        measured(lambda: torch.zeros(30, 30), forbid_elements=900)
    value, record = measured(lambda: torch.zeros(30, 29), forbid_elements=900)
    assert record["largest_tensor"] == [30, 29]


@pytest.mark.slow
def test_lqf_conditioning_tiny_run_and_resume(tmp_path, capsys):
    argv, out, payload = run_tiny("lqf-conditioning", tmp_path)
    from ntkgp_experiments.lqf_conditioning import SPECTRA

    assert list(payload["spectra"]) == SPECTRA
    for name, spectrum in payload["spectra"].items():
        values = spectrum["ritz_values"]
        assert values == sorted(values) and values[0] >= 0.1 * (1 - 1e-9), name  # all ≥ λ = 0.1 (GGN, 2JᵀJ ≥ 0)
        assert spectrum["condition"] == pytest.approx(values[-1] / values[0])
    # the last layer with its bias in one K-FAC block: P = H exactly, every Ritz value of P⁻¹H is 1
    assert payload["spectra"]["LQF, K-FAC preconditioned"]["condition"] == pytest.approx(1.0, abs=1e-8)
    assert set(payload["curves"]) == {f"{p} lr={lr}" for p in ("kfac", "plain") for lr in ("auto", 0.1, 0.0001)}
    # the default step (1 − momentum)/λ̂ is the paper's 0.1 where K-FAC is exact (λ̂ = 1, P⁻¹H = I)
    assert payload["curves"]["kfac lr=auto"]["lr_used"] == pytest.approx(0.1, rel=1e-9)
    assert payload["best"]["kfac"] is not None
    assert (out / "conditioning.png").stat().st_size > 10_000
    capsys.readouterr()
    stamp = (out / "results.json").read_text()
    assert main(argv) == 0  # resumes: nothing left to measure, the same results
    assert json.loads((out / "results.json").read_text())["spectra"] == json.loads(stamp)["spectra"]
    assert "NLFT" not in capsys.readouterr().err  # NLFT did not run again


@pytest.mark.slow
def test_vit_fewshot_tiny_run_and_resume(tmp_path, capsys):
    """Every method on both networks (LoRA on the ViT only); an interrupted run — its last draw missing — resumes at
    that draw, from the cached pretrained networks, and ends with the uninterrupted run's results."""
    from ntkgp_experiments.vit_fewshot import METHODS

    argv, out, payload = run_tiny("vit-fewshot", tmp_path)
    tiny = payload["config"]
    for kind in ("vit", "cnn"):
        methods = [m for m in METHODS if kind == "vit" or m != "NTK-GP LoRA"]
        rows = [r for r in payload["rows"] if r["model"] == kind]
        assert len(rows) == len(methods) * len(tiny["shots"]) * tiny["draws"]
        assert {r["method"] for r in rows} == set(methods)
    for r in payload["rows"]:
        assert 0 <= r["accuracy"] <= 1 and r["nll"] > 0 and 0 <= r["ece"] <= 1 and r["seconds"] > 0
    assert (out / "vit_fewshot.png").stat().st_size > 10_000
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "pretrained").iterdir()}
    last = payload["done"][-1]
    interrupted = {
        **payload,
        "done": payload["done"][:-1],
        "rows": [r for r in payload["rows"] if [r["model"], r["shots"], r["draw"]] != last],
    }
    (out / "results.json").write_text(json.dumps(interrupted))
    capsys.readouterr()
    assert main(argv) == 0
    resumed = json.loads((out / "results.json").read_text())
    assert "pretrained the" not in capsys.readouterr().out  # from the cache
    assert {p.name: p.stat().st_mtime_ns for p in (out / "pretrained").iterdir()} == stamps
    assert resumed["done"] == payload["done"]
    assert len(resumed["rows"]) == len(payload["rows"])
    for again, first in zip(resumed["rows"], payload["rows"]):
        assert [again[k] for k in ("model", "shots", "draw", "method")] == [
            first[k] for k in ("model", "shots", "draw", "method")
        ]
        assert [again[k] for k in ("accuracy", "nll", "ece")] == pytest.approx(
            [first[k] for k in ("accuracy", "nll", "ece")]
        )
