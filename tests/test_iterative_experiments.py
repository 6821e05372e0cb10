"""The iterative-linearisation paper's experiments: each tiny configuration end to end, and a resume."""

import json

import pytest
import torch
from test_experiments import run_tiny

from ntkgp.cli import main
from ntkgp_experiments.gauss_newton_damping import quintic, relu_mlp
from ntkgp_experiments.iterative_linearisation import lenet, specs, updates_to_reach


def test_pieces():
    assert float(quintic(torch.tensor(2.0))) == pytest.approx(1 - 4 + 4 - 1)
    assert sum(isinstance(m, torch.nn.Linear) for m in relu_mlp(5, 50)) == 5
    assert lenet(50)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    run = {
        "evaluations": [{"test_network_accuracy": a, "feature_updates": u} for a, u in ((0.1, 0), (0.5, 2), (0.7, 5))]
    }
    assert updates_to_reach(run, 0.6) == 5 and updates_to_reach(run, 0.9) is None


@pytest.mark.slow
def test_gauss_newton_damping_tiny_run_and_resume(tmp_path):
    argv, out, payload = run_tiny("gauss-newton-damping", tmp_path)
    rows = list(payload["rows"])
    assert sorted((r["damping"], r["seed"]) for r in rows) == [(0.01, 0), (0.01, 1), (1.0, 0), (1.0, 1)]
    assert all(r["train_rmse"] >= 0 and len(r["curve"]) in (0, 10) for r in rows)
    assert (out / "damping.png").stat().st_size > 10_000
    payload["rows"].pop()
    (out / "results.json").write_text(json.dumps(payload))
    assert main(argv) == 0  # only the missing run again
    again = json.loads((out / "results.json").read_text())["rows"]
    assert again[:3] == rows[:3] and again[3]["train_rmse"] == pytest.approx(rows[3]["train_rmse"], rel=1e-9)


@pytest.mark.slow
def test_iterative_linearisation_tiny_run(tmp_path):
    argv, out, payload = run_tiny("iterative-linearisation", tmp_path)
    from ntkgp_experiments.iterative_linearisation import TINY

    runs = dict(payload["runs"])
    assert set(runs) == set(specs(TINY))
    assert runs["periods/full/K=1"]["feature_updates"] == 6 and runs["periods/full/K=inf"]["feature_updates"] == 0
    assert runs["periods/mini/K=1"]["steps"] == 12 and runs["periods/mini/K=1"]["feature_updates"] == 6
    last = runs["periods/full/K=inf"]["evaluations"][-1]
    assert 0 <= last["test_network_accuracy"] <= 1 and 0 <= last["kernel_distance"] <= 1
    k1 = runs["periods/full/K=1"]["evaluations"][-1]  # just re-linearised: the proxy is the network
    assert k1["test_proxy_loss"] == pytest.approx(k1["test_network_loss"], rel=1e-5)
    assert [p["step"] for p in runs["periods/full/K=1"]["probes"]][-1] == 6
    assert (out / "periods.png").stat().st_size > 10_000 and (out / "probes.png").stat().st_size > 10_000
    del payload["runs"]["converged/Adam"]
    (out / "results.json").write_text(json.dumps(payload))
    assert main(argv) == 0
    assert set(json.loads((out / "results.json").read_text())["runs"]) == set(runs)
