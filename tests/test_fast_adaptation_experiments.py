"""The Fast Adaptation supplement's remaining experiments (issue 13): tiny configurations end to end."""

import json
import math

import pytest

from ntkgp.cli import main
from test_experiments import run_tiny


@pytest.mark.slow
def test_qualitative_regression_tiny_run_and_resume(tmp_path):
    argv, out, payload = run_tiny("qualitative-regression", tmp_path)
    rows = list(payload["rows"])
    assert [r["name"] for r in rows] == ["clusters", "[10, 1000, 10]"]
    assert rows[1]["params"] == 21041  # the paper's count for this architecture
    for r in rows:
        for kind in ("ML", "known noise"):
            g = r[kind]
            assert g["noise"] > 0 and g["outputscale"] > 0 and len(g["mean"]) == len(r["grid"]) == 21
        assert r["known noise"]["noise"] == pytest.approx(0.81 if r["task"] == "clusters" else 1e-4)
    assert (out / "clusters.png").stat().st_size > 5_000 and (out / "architectures.png").stat().st_size > 5_000
    payload["rows"].pop()
    (out / "results.json").write_text(json.dumps(payload))
    assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())["rows"]
    assert [r["name"] for r in again] == ["clusters", "[10, 1000, 10]"] and again[0] == rows[0]


@pytest.mark.slow
def test_jacobian_spectra_tiny_run_against_a_dense_spectrum(tmp_path):
    import torch

    from experiments.jacobian_spectra import SOURCES, lenet5, spectrum

    argv, out, payload = run_tiny("jacobian-spectra", tmp_path)
    assert sorted((m["source"], m["index"]) for m in payload["models"]) == sorted((s, i) for s in SOURCES
                                                                                  for i in range(2))
    for m in payload["models"]:
        values = m["singular_values"]
        assert len(values) == 8 and all(a >= b for a, b in zip(values, values[1:])) and 0 <= m["accuracy"] <= 1
    assert (out / "spectra.png").stat().st_size > 10_000
    torch.manual_seed(0)  # Lanczos on J Jᵀ against the SVD of the dense Jacobian (4 images, 40 rows: all of them)
    model, x = lenet5().double().eval(), torch.randn(4, 1, 32, 32, dtype=torch.float64)
    rows = torch.cat([torch.cat([g.reshape(-1) for g in torch.autograd.grad(model(x)[i, c], model.parameters())])
                      .unsqueeze(0) for i in range(4) for c in range(10)])
    dense = torch.linalg.svdvals(rows)
    assert (torch.tensor(spectrum(model, x, 40))[:10] - dense[:10]).abs().max() < 1e-6 * float(dense[0])


@pytest.mark.slow
def test_transfer_bo_tiny_run(tmp_path):
    from experiments.transfer_bo import METHODS, branin, task_minimum
    import torch

    argv, out, payload = run_tiny("transfer-bo", tmp_path)
    assert sorted({r["method"] for r in payload["runs"]}) == sorted(METHODS) and len(payload["runs"]) == 10
    for r in payload["runs"]:
        assert len(r["regret"]) == 3 and min(r["regret"]) >= -1e-9
        assert all(a >= b for a, b in zip(r["regret"], r["regret"][1:]))  # the best so far only improves
    assert (out / "regret.png").stat().st_size > 10_000
    # Branin's known minimum 0.397887 on its domain, found by the grid + L-BFGS minimiser
    assert task_minimum({"shift": [0.0, 0.0], "scale": 1.0, "offset": 0.0}) == pytest.approx(0.397887, abs=1e-5)
    assert float(branin(torch.tensor([(math.pi + 5) / 15, 2.275 / 15], dtype=torch.float64))) == pytest.approx(
        0.397887, abs=1e-5)
