"""Every experiment that keeps no per-job resume of its own elsewhere in the suite (sinusoid, fashion-fewshot,
fisher-accuracy) resumes: a tiny run interrupted after its first job, rerun with the same configuration and seed,
computes only what was missing and ends with the results of an uninterrupted run (timings aside)."""

import json

import pytest

from ntkgp.cli import main

TIMINGS = {"time", "seconds"}


def rows(out):
    payload = json.loads((out / "results.json").read_text())
    return sorted(
        json.dumps({k: v for k, v in row.items() if k not in TIMINGS}, sort_keys=True) for row in payload["rows"]
    )


def interrupted_then_resumed(monkeypatch, tmp_path, name, function, argv):
    """(rows of an uninterrupted run, rows after an interrupted run and its rerun, calls of ``function`` in the
    rerun): ``function`` of the experiment's module raises on its second call in the interrupted run."""
    module = __import__(f"ntkgp_experiments.{name.replace('-', '_')}", fromlist=[function])
    original = getattr(module, function)
    whole = tmp_path / "whole"
    assert main(["run", name, "--config", "tiny", "--out", str(whole), *argv]) == 0
    calls = []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    part = tmp_path / "part"
    monkeypatch.setattr(module, function, interrupt)
    with pytest.raises(KeyboardInterrupt):
        main(["run", name, "--config", "tiny", "--out", str(part), *argv])
    assert rows(part / name) and len(rows(part / name)) < len(rows(whole / name))  # the first job was kept
    calls.clear()

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, function, counted)
    assert main(["run", name, "--config", "tiny", "--out", str(part), *argv]) == 0
    return rows(whole / name), rows(part / name), len(calls)


def test_sinusoid_resumes(monkeypatch, tmp_path):
    whole, resumed, calls = interrupted_then_resumed(
        monkeypatch, tmp_path, "sinusoid", "evaluate", ["--set", "shots=[5, 10]"]
    )
    assert resumed == whole and calls == 1  # two (seed, shots) jobs, one left to run


@pytest.mark.slow
def test_fashion_fewshot_resumes(monkeypatch, tmp_path):
    argv = ["--set", "shots=[1, 2]", "--set", 'methods=["linearised MAP", "NTK-GP one-hot"]']
    whole, resumed, calls = interrupted_then_resumed(monkeypatch, tmp_path, "fashion-fewshot", "adapt", argv)
    assert resumed == whole and calls == 1  # two (shots, draw) jobs, one left to run


def test_fisher_accuracy_resumes(monkeypatch, tmp_path):
    whole, resumed, calls = interrupted_then_resumed(
        monkeypatch, tmp_path, "fisher-accuracy", "measure", ["--set", "stages=[0, 1, 2]"]
    )
    assert resumed == whole and calls == 2  # stages 1 and 2 after the checkpoint of stage 0
