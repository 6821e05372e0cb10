"""Every experiment resumes: a tiny run interrupted in its second item (the function that computes one item raises
on its second call), rerun with the same configuration and seed, computes only what was missing — the function
runs once fewer than in an uninterrupted run — and ends with the uninterrupted run's results (timings, memory
readings and the device aside). vit-fewshot's interrupted run is tested in test_experiments.py."""

import json

import pytest

from ntkgp.cli import main

#: keys whose values are measurements of this machine, not results
VOLATILE = ("second", "time", "wall", "peak", "memory", "bytes", "device")


def stable(value):
    """``value`` (a JSON payload) without the measurements of VOLATILE keys; lists of records sorted."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if not any(word in k for word in VOLATILE)}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return sorted((stable(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def results(out):
    return stable(json.loads((out / "results.json").read_text()))


class Interrupt(Exception):
    """Stands for a Ctrl-C or a killed job in the middle of an item."""


def counting(monkeypatch, module, function, raise_at=None):
    """Replace ``module.function`` by a wrapper that counts its calls (and raises Interrupt at call ``raise_at``)."""
    original, calls = getattr(module, function), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == raise_at:
            raise Interrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, function, wrapper)
    return calls


#: experiment, the function that computes one item (a module-level name looked up at call time), extra arguments
CASES = [
    ("sinusoid", "evaluate", ["--set", "shots=[5, 10]"]),
    ("fisher-accuracy", "measure", ["--set", "stages=[0, 1, 2]"]),
    ("gauss-newton-damping", "train_one", []),
    ("qualitative-regression", "one_network", []),
    ("jacobian-spectra", "train_model", []),
    ("transfer-bo", "bo_run", []),
    ("olivetti-rotation", "adapt", []),
    ("iterative-linearisation", "train_run", []),
    ("uci-large", "ntk_gp", []),
    pytest.param(
        "fashion-fewshot",
        "adapt",
        ["--set", "shots=[1, 2]", "--set", 'methods=["linearised MAP", "NTK-GP one-hot"]'],
        marks=pytest.mark.slow,
    ),
    pytest.param("lqf-conditioning", "lqf_curve", [], marks=pytest.mark.slow),
    pytest.param("lqf-hyperparameters", "lqf", [], marks=pytest.mark.slow),
    pytest.param("lqf-informativeness", "draw_with_validation", [], marks=pytest.mark.slow),
    pytest.param("lqf-online", "run_lqf", [], marks=pytest.mark.slow),
    pytest.param(
        "lqf-transfer",
        "run_method",  # the low-shot part alone: one draw of five methods
        ["--set", "shots=[1]", "--set", "cnn_datasets=[]", "--set", "olivetti_draws=0"],
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize("name, function, argv", CASES)
def test_an_interrupted_run_resumes(monkeypatch, tmp_path, name, function, argv):
    module = __import__(f"ntkgp_experiments.{name.replace('-', '_')}", fromlist=[function])
    command = ["run", name, "--config", "tiny", *argv]
    with monkeypatch.context() as patch:
        whole_calls = counting(patch, module, function)
        assert main([*command, "--out", str(tmp_path / "whole")]) == 0
    assert len(whole_calls) >= 2, "the item function must run at least twice for an interruption in between"
    part = tmp_path / "part"
    with monkeypatch.context() as patch:
        counting(patch, module, function, raise_at=2)
        with pytest.raises(Interrupt):
            main([*command, "--out", str(part)])
    with monkeypatch.context() as patch:
        rerun_calls = counting(patch, module, function)
        assert main([*command, "--out", str(part)]) == 0
    assert results(part / name) == results(tmp_path / "whole" / name)
    if name == "lqf-online":  # an LQF sequence is stateful: an unfinished one starts again, a finished one is kept
        assert len(rerun_calls) < len(whole_calls)
    else:
        assert len(rerun_calls) == len(whole_calls) - 1
