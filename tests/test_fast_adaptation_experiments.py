"""The Fast Adaptation supplement's remaining experiments (issue 13): tiny configurations end to end."""

import json

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
        assert r["noise"] > 0 and r["outputscale"] > 0 and len(r["mean"]) == len(r["grid"]) == 21
        assert r["std_away"] > 0 and r["std_gap"] > 0
    assert (out / "clusters.png").stat().st_size > 5_000 and (out / "architectures.png").stat().st_size > 5_000
    payload["rows"].pop()
    (out / "results.json").write_text(json.dumps(payload))
    assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())["rows"]
    assert [r["name"] for r in again] == ["clusters", "[10, 1000, 10]"] and again[0] == rows[0]
