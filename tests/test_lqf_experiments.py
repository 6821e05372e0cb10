"""The LQF paper's experiments: their pieces, and each tiny configuration end to end with a resume."""

import json

import pytest
import torch
from test_experiments import run_tiny

from ntkgp.cli import main
from ntkgp_experiments import lqf_methods
from ntkgp_experiments.datasets import load_digits, load_mnist, load_olivetti, support_indices
from ntkgp_experiments.lqf_hyperparameters import best_runs, effective_lr, shared_setting
from ntkgp_experiments.lqf_online import increments
from ntkgp_experiments.lqf_tasks import draw_task, load_pool


def test_offline_loaders_shapes_and_labels():
    images, people = load_olivetti()
    assert images.shape == (400, 1, 64, 64) and 0 <= float(images.min()) and float(images.max()) <= 1
    assert torch.equal(people, torch.arange(400) // 10)
    # upright faces: the top rows (forehead, hair) differ from the bottom rows (chin) in the mean image
    assert not torch.allclose(images.mean(0)[0, :8], images.mean(0)[0, -8:].flip(0), atol=0.05)
    digits, labels = load_digits()
    assert digits.shape == (1797, 1, 8, 8) and float(digits.max()) == 1.0 and set(labels.tolist()) == set(range(10))
    mnist, mnist_labels = load_mnist()
    assert mnist.shape == (10000, 1, 28, 28) and torch.bincount(mnist_labels).min() > 800


def test_support_indices_and_pools_are_balanced_and_disjoint():
    labels = torch.arange(40) % 4
    index = support_indices(labels, 3, torch.Generator().manual_seed(0))
    assert torch.equal(torch.bincount(labels[index]), torch.full((4,), 3))
    assert len(set(index.tolist())) == 12
    assert torch.equal(torch.bincount(labels[support_indices(labels, 50, torch.Generator())]), torch.full((4,), 10))
    pool = load_pool("digits", 0, 100)
    assert pool.test_images.shape[0] == 100 and pool.images.shape[0] == 898  # halves of 1797
    again = load_pool("digits", 0, 100)
    assert torch.equal(pool.test_images, again.test_images)  # the split is the seed's
    faces = load_pool("olivetti", 0, 100)
    task = draw_task(faces, 3, 1, lambda x: x)
    assert task.train_x.shape[0] == 120 and task.test_x.shape[0] == 280  # the rest of each person is the test set
    assert torch.equal(torch.bincount(task.test_y), torch.full((40,), 7))


def test_online_increments_are_disjoint_and_balanced():
    labels = torch.arange(300) % 10
    parts = increments(labels, steps=5, per_class=2, seed=0)
    assert len(parts) == 5 and len(torch.cat(parts).unique()) == 100
    for part in parts:
        assert torch.equal(torch.bincount(labels[part], minlength=10), torch.full((10,), 2))


def test_small_formulas():
    assert effective_lr(0.01, 32) == pytest.approx(0.01 / (0.1 * 32))
    assert lqf_methods.epochs_for(10, 32, 10, 30) == 30 and lqf_methods.epochs_for(320, 32, 10, 30) == 10
    assert lqf_methods.test_error(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 0])) == 50.0
    rows = [{"method": "LQF", "scope": "s", "dataset": "d", "error": e, "elr": r} for e, r in ((5, 1), (3, 2), (4, 3))]
    assert best_runs(rows)["LQF", "s", "d"]["elr"] == 2
    grid = [
        {"method": "M", "scope": "s", "dataset": d, "lr": lr, "batch_size": 8, "error": e}
        for d, lr, e in (("a", 1, 10), ("a", 2, 12), ("b", 1, 30), ("b", 2, 20))
    ]  # lr 2: mean 16 < 20
    assert shared_setting(grid, "M", "s", ["a", "b"], best_runs(grid)) == ((2, 8), 2)


@pytest.mark.slow
def test_lqf_transfer_tiny_run_and_resume(tmp_path, capsys):
    from ntkgp_experiments.lqf_transfer import ABLATION, LOWSHOT, OLIVETTI

    argv, out, payload = run_tiny("lqf-transfer", tmp_path)
    rows = payload["rows"]
    methods = {(r["backbone"], r["dataset"], r["method"]) for r in rows}
    assert {("mobilenet", "digits", m) for m in LOWSHOT + ABLATION} <= methods
    assert {("cnn", "digits", m) for m in ["NLFT", "LQF"] + ABLATION} <= methods
    assert {("mobilenet", "olivetti", m) for m in OLIVETTI} <= methods
    for r in rows:
        assert 0 <= r["error"] <= 100 and r["seconds"] > 0
    nlft = [r for r in rows if r["method"] == "NLFT" and r["backbone"] == "mobilenet" and r["dataset"] == "digits"]
    assert all(len(r["grid"]) == 4 and r["error"] == min(r["grid"].values()) for r in nlft)  # best of the 2 × 2 grid
    same = [r for r in rows if r["dataset"] == "digits" and r["backbone"] == "mobilenet" and r["shots"] == 2]
    assert len({r["test_size"] for r in same}) == 1  # every method of a draw sees the same test set
    assert payload["cnn_pretraining"]["leaky"]["training"]["train_size"] == 512
    assert (out / "lowshot.png").stat().st_size > 10_000 and (out / "ablation.png").stat().st_size > 10_000
    capsys.readouterr()
    assert main(argv) == 0  # resumes: nothing runs again
    assert json.loads((out / "results.json").read_text())["rows"] == rows
    assert "pretraining" not in capsys.readouterr().err  # the CNNs come from the cache


@pytest.mark.slow
def test_lqf_online_tiny_run(tmp_path):
    from ntkgp_experiments.lqf_online import METHODS

    argv, out, payload = run_tiny("lqf-online", tmp_path)
    for method in METHODS:
        steps = payload["steps"][method]
        assert [s["train_size"] for s in steps] == [10, 20, 30] and all(0 <= s["accuracy"] <= 1 for s in steps)
    assert all(1 <= s["epochs"] <= 2 for s in payload["steps"]["NLFT paragon"])
    assert (out / "online.png").stat().st_size > 10_000
    payload["steps"]["NLFT paragon"].pop()  # an interrupted paragon resumes at its missing step only
    (out / "results.json").write_text(json.dumps(payload))
    assert main(argv) == 0
    assert [s["step"] for s in json.loads((out / "results.json").read_text())["steps"]["NLFT paragon"]] == [1, 2, 3]


@pytest.mark.slow
def test_lqf_informativeness_tiny_run(tmp_path):
    argv, out, payload = run_tiny("lqf-informativeness", tmp_path)
    part = payload["summarisation"]
    assert len(part["fsi"]) == part["train_size"] == 30 and min(part["fsi"]) >= 0
    assert part["most"][0] == part["least"][0] == part["random"][0]  # nothing dropped: the same fit
    assert part["fresh_fit_max_difference"] < 1e-3  # the sub-system refit equals LQF refitted (float32 logits ~15)
    timing = payload["loo_timing"]
    assert timing["max_difference"] < 1e-3 and timing["checked"] == 1  # exact LOO equals brute-force refitting
    assert len(payload["loo"]["cells"]) == 3 and 0 <= payload["loo"]["mean_absolute_gap"] <= 1
    assert (out / "informative.png").stat().st_size > 5_000 and (out / "summarisation.png").stat().st_size > 10_000


@pytest.mark.slow
def test_lqf_hyperparameters_tiny_run(tmp_path):
    argv, out, payload = run_tiny("lqf-hyperparameters", tmp_path)
    rows = payload["rows"]
    assert len(rows) == 2 * 2 * 2  # datasets × methods × batch sizes (one lr)
    assert {r["elr"] for r in rows} == {effective_lr(0.01, 4), effective_lr(0.01, 8)}
    assert (out / "hyperparameters.png").stat().st_size > 10_000


def test_fresh_discards_the_results_to_resume_from(tmp_path, monkeypatch):
    from ntkgp import cli

    experiments = cli.discover_experiments()
    real = experiments["lqf-hyperparameters"]
    calls = []
    probe = type(real)(
        real.name,
        real.description,
        lambda config, out, device, seed: calls.append((out / "results.json").exists()),
        real.configs,
    )
    monkeypatch.setattr(cli, "discover_experiments", lambda: {**experiments, real.name: probe})
    (tmp_path / real.name).mkdir()
    (tmp_path / real.name / "results.json").write_text("{}")
    assert main(["run", real.name, "--out", str(tmp_path)]) == 0  # kept: the run resumes from it
    assert main(["run", real.name, "--out", str(tmp_path), "--fresh"]) == 0  # discarded first
    assert calls == [True, False]


def test_backbone_heads_are_shared_by_both_activations_and_bilinear_keeps_the_scopes(tmp_path):
    from torch import nn

    from ntkgp import LeakyReLU6
    from ntkgp.functional import select_parameters
    from ntkgp_experiments.lqf_backbones import Backbone, bilinear_mobilenet

    backbone = Backbone("mobilenet", 32, "cpu", tmp_path)
    relu, leaky = backbone.network(7, "relu", seed=3), backbone.network(7, "leaky", seed=3)
    assert torch.equal(relu.classifier[-1].weight, leaky.classifier[-1].weight)
    assert relu.classifier[-1].out_features == 7
    assert not any(isinstance(m, LeakyReLU6) for m in relu.modules())
    assert any(isinstance(m, LeakyReLU6) for m in leaky.modules()) and not any(
        isinstance(m, nn.ReLU6) for m in leaky.modules()
    )
    x = backbone.prepare(torch.rand(4, 1, 28, 28))
    assert x.shape == (4, 3, 32, 32)
    model = bilinear_mobilenet(backbone, 7, "leaky", reduction=4, train_x=x, seed=0)
    assert model(x).shape == (4, 7)
    names = select_parameters(model, backbone.params("last_block"))
    assert names and all(n.startswith(("features.17.", "features.18.", "classifier.")) for n in names)
    assert not any(p.requires_grad for p in model.pool.parameters())  # the PCA reduction stays fixed
