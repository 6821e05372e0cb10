"""The Fast Adaptation supplement's remaining experiments: tiny configurations end to end."""

import json
import math

import pytest
from test_experiments import run_tiny

from ntkgp.cli import main


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

    from ntkgp_experiments.jacobian_spectra import SOURCES, lenet5, spectrum

    argv, out, payload = run_tiny("jacobian-spectra", tmp_path)
    assert sorted((m["source"], m["index"]) for m in payload["models"]) == sorted(
        (s, i) for s in SOURCES for i in range(2)
    )
    for m in payload["models"]:
        values = m["singular_values"]
        assert len(values) == 8 and all(a >= b for a, b in zip(values, values[1:])) and 0 <= m["accuracy"] <= 1
    assert (out / "spectra.png").stat().st_size > 10_000
    torch.manual_seed(0)  # Lanczos on J Jᵀ against the SVD of the dense Jacobian (4 images, 40 rows: all of them)
    model, x = lenet5().double().eval(), torch.randn(4, 1, 32, 32, dtype=torch.float64)
    rows = torch.cat(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(model(x)[i, c], model.parameters())]).unsqueeze(0)
            for i in range(4)
            for c in range(10)
        ]
    )
    dense = torch.linalg.svdvals(rows)
    assert (torch.tensor(spectrum(model, x, 40))[:10] - dense[:10]).abs().max() < 1e-6 * float(dense[0])


@pytest.mark.slow
def test_transfer_bo_tiny_run(tmp_path):
    import torch

    from ntkgp_experiments.transfer_bo import METHODS, branin, task_minimum

    argv, out, payload = run_tiny("transfer-bo", tmp_path)
    assert sorted({r["method"] for r in payload["runs"]}) == sorted(METHODS) and len(payload["runs"]) == 10
    for r in payload["runs"]:
        assert len(r["regret"]) == 3 and min(r["regret"]) >= -1e-9
        assert all(a >= b for a, b in zip(r["regret"], r["regret"][1:]))  # the best so far only improves
    assert (out / "regret.png").stat().st_size > 10_000
    # Branin's known minimum 0.397887 on its domain, found by the grid + L-BFGS minimiser
    assert task_minimum({"shift": [0.0, 0.0], "scale": 1.0, "offset": 0.0}) == pytest.approx(0.397887, abs=1e-5)
    assert float(branin(torch.tensor([(math.pi + 5) / 15, 2.275 / 15], dtype=torch.float64))) == pytest.approx(
        0.397887, abs=1e-5
    )


@pytest.mark.slow
def test_olivetti_rotation_tiny_run_and_resume(tmp_path):
    from ntkgp_experiments.olivetti_rotation import METHODS

    argv, out, payload = run_tiny("olivetti-rotation", tmp_path)
    rows = list(payload["rows"])
    assert [r["method"] for r in rows] == list(METHODS) and all(r["shots"] == 10 for r in rows)
    for r in rows:
        assert 0 < r["rmse"] < 180 and math.isfinite(r["nll"]) and r["seconds"] > 0
    assert payload["pretraining"]["noise"] > 0 and (out / "pretrained.pt").exists()
    assert (out / "olivetti.png").stat().st_size > 10_000
    stamp = (out / "pretrained.pt").stat().st_mtime_ns
    payload["rows"].pop()
    (out / "results.json").write_text(json.dumps(payload))
    assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert (out / "pretrained.pt").stat().st_mtime_ns == stamp  # resumed: not pretrained again
    assert again["rows"][:-1] == rows[:-1] and again["rows"][-1]["method"] == METHODS[-1]
    assert again["rows"][-1]["rmse"] == pytest.approx(rows[-1]["rmse"], rel=1e-5)  # seeded fine-tuning


def test_olivetti_rotations_are_exact_on_the_pixel_grid():
    import torch

    from ntkgp_experiments.olivetti_rotation import rotate_and_crop

    torch.manual_seed(0)
    image = torch.rand(1, 1, 64, 64, dtype=torch.float64)
    upright = rotate_and_crop(image, torch.tensor([0.0]))
    # the 45 central pixel centres of 64 fall half-way between pixels: bilinear sampling averages four crops
    crops = [image[..., 9 + i : 54 + i, 9 + j : 54 + j] for i in (0, 1) for j in (0, 1)]
    assert upright.shape == (1, 1, 45, 45)
    assert torch.allclose(upright, sum(crops) / 4, atol=1e-12)
    quarter = rotate_and_crop(image, torch.tensor([90.0]))  # anticlockwise, as torchvision's rotate
    assert torch.allclose(quarter, torch.rot90(upright, 1, dims=(-2, -1)), atol=1e-12)
    both = rotate_and_crop(image.expand(2, -1, -1, -1), torch.tensor([90.0, -90.0]))
    assert torch.allclose(both[1], torch.rot90(upright[0], -1, dims=(-2, -1)), atol=1e-12)


def test_olivetti_splits_keep_photographs_apart_and_grow_by_prefix():
    import torch

    from ntkgp_experiments.olivetti_rotation import rotated_faces, split

    data = rotated_faces(3, 0, torch.float32)
    assert data["images"].shape == (1200, 1, 45, 45) and data["angles"].abs().max() <= 90
    config = {"test_images": 50}
    small, test = split(data, 10, config, seed=4)
    large, test_again = split(data, 40, config, seed=4)
    assert torch.equal(large[:10], small) and torch.equal(test, test_again) and len(test) == 50
    assert set(data["photo"][large].tolist()).isdisjoint(data["photo"][test].tolist())
    assert data["person"][large].min() >= 20 and data["person"][test].min() >= 20
    assert not torch.equal(split(data, 10, config, seed=5)[0], small)


def test_olivetti_losses_and_scores_in_degrees():
    import torch

    from ntkgp_experiments.olivetti_rotation import heteroscedastic_loss, scores

    outputs = torch.tensor([[0.1, -1.0], [2.0, 0.5]], dtype=torch.float64)
    y = torch.tensor([0.3, 1.0], dtype=torch.float64)
    var = torch.log1p(outputs[:, 1].exp()) + 1e-5
    expected = (0.5 * torch.log(2 * math.pi * var) + (y - outputs[:, 0]) ** 2 / (2 * var)).mean()
    assert float(heteroscedastic_loss(outputs, y)) == pytest.approx(float(expected), rel=1e-12)
    # standardised predictions scored in degrees equal the Gaussian scores of the predictions mapped to degrees
    got = scores(outputs[:, 0], var, y, angle_std=50.0)
    mean_deg, var_deg, y_deg = 50 * outputs[:, 0], 2500 * var, 50 * y
    nll = (0.5 * torch.log(2 * math.pi * var_deg) + (y_deg - mean_deg) ** 2 / (2 * var_deg)).mean()
    assert got["nll"] == pytest.approx(float(nll), rel=1e-12)
    assert got["rmse"] == pytest.approx(float((y_deg - mean_deg).square().mean().sqrt()), rel=1e-12)
