"""Quiet runs: progress bars only for work over a second, one switch (a setting and NTKGP_PROGRESS) to turn them off,
and no torch.jit.script FutureWarning from our calls. Each check runs in a fresh process: what it prints is the point,
and torch loads its forward-mode decompositions (the warning's source) once per process."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from ntkgp import show_progress
from ntkgp.progress import progress_bar

FAST_CALLS = """
import torch
from torch import nn
import ntkgp

torch.manual_seed(0)
net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).eval()
x, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
gp = ntkgp.NTKGP(net, x, torch.randn(20, 2)).fit()
gp.predict(x[:5])
ntkgp.LQF(net, params=["2."]).fit(x, y, epochs=5)
ntkgp.Laplace(net, "classification").fit(x, y).predict(x[:5])
model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
trainer = ntkgp.IterativeLinearisation(model, torch.optim.SGD(model.parameters(), lr=0.1), period=10)
trainer.fit((x, y), steps=100, batch_size=20)
print("done")
"""


def run(code: str, **environment: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **environment}
    return subprocess.run(
        [sys.executable, "-W", "default", "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env
    )


def test_fast_calls_print_nothing_and_no_jit_warning():
    """IterativeLinearisation wrote 205 bar refreshes (23 KB) for a 0.35 s fit and LQF a bar for 0.1 s; the first JVP
    of a process printed torch's `torch.jit.script` deprecation: every entry point here is silent now."""
    done = run(FAST_CALLS)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "done"
    assert "jit.script" not in done.stderr
    assert done.stderr == ""


SLOW_BAR = """
import time
import ntkgp
from ntkgp.progress import progress_bar
{setup}
for _ in progress_bar(range(3), desc="slow work"):
    time.sleep(0.6)
"""


@pytest.mark.parametrize(
    "setup, environment, shown",
    [
        ("", {}, True),
        ("", {"NTKGP_PROGRESS": "0"}, False),
        ("", {"NTKGP_PROGRESS": "off"}, False),
        ("ntkgp.show_progress.set(False)", {}, False),
        ("ntkgp.show_progress.set(True)", {"NTKGP_PROGRESS": "0"}, True),
    ],
)
def test_a_slow_bar_shows_unless_switched_off(setup, environment, shown):
    done = run(SLOW_BAR.format(setup=setup), **environment)
    assert done.returncode == 0, done.stderr
    assert ("slow work" in done.stderr) is shown


def test_the_setting_nests_as_a_context_manager(capsys):
    assert show_progress.on()
    with show_progress(False):
        assert not show_progress.on()
        with show_progress(True):
            assert show_progress.on()
        for _ in progress_bar(range(2), desc="quiet"):
            time.sleep(0.7)
    assert show_progress.on()
    assert "quiet" not in capsys.readouterr().err
    with pytest.raises(TypeError, match="show_progress takes True or False"):
        show_progress("no")
    with pytest.raises(TypeError, match="show_progress.set takes True, False or None"):
        show_progress.set(0)
