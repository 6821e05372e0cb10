"""Data-parallel products on torch.distributed: two CPU processes (gloo), each with half of the training inputs,
give the products of one process over all of them (1e-10 in float64)."""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ntkgp import LQF, NTKGP, FunctionalNetwork, Laplace, Solver, fisher_operator, gram_operator, ntk_operator

WORLD = 2


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 3, (12,))
    v = torch.randn(59, 2, dtype=torch.float64)  # p = 59
    u = torch.randn(36, 1, dtype=torch.float64)  # N = 12 · 3
    return model, x, y, v, u


def shared_data():
    """Regression targets (12, 3) for the training inputs and test inputs (5, 3), replicated on every rank."""
    generator = torch.Generator().manual_seed(1)
    return (
        torch.randn(12, 3, dtype=torch.float64, generator=generator),
        torch.randn(5, 3, dtype=torch.float64, generator=generator),
    )


def products(net, x, y, v, u):
    """Everything a sharded run must reproduce; on a shard, u is the shard's rows of the output-space vector."""
    lqf = LQF(net, weight_decay=0.3, preconditioner=None).fit(x, y, solver="closed_form", progress=False)
    return {
        "gram": gram_operator(net, x) @ v,
        "gram_diagonal": gram_operator(net, x).diagonal(),
        "fisher_exact": fisher_operator(net, x, "categorical", method="exact") @ v,
        "fisher_fd": fisher_operator(net, x, "categorical") @ v,
        "ntk": ntk_operator(net, x) @ u,
        "gradient": net.vjp(x, torch.ones(1, x.shape[0], 3, dtype=x.dtype))[0],
        "lqf_parameter_space": lqf.solve("parameter", progress=False).delta,
        **methods(net, x, y),
    }


def methods(net, x, y):
    """Parameter-space NTKGP, the matrix-free Laplace and LQF's SGD (full batches: one process's batch is the
    union of the ranks') on x: what they give on replicated test inputs."""
    targets, x_test = shared_data()
    rows = slice(6 * dist.get_rank(), 6 * (dist.get_rank() + 1)) if net.is_sharded(x) else slice(None)
    gp = NTKGP(net, x, targets[rows], space="parameter", progress=False).fit(max_iter=5)
    gp_prediction = gp.predict(x_test)
    la = Laplace(
        net,
        "classification",
        prior_precision=0.5,
        progress=False,
        solver=Solver("cg", cg_tolerance=1e-12, lanczos_rank=59),
    ).fit(x, y)
    out = {
        "ntkgp_hyperparameters": torch.tensor([gp.noise, gp.outputscale]),
        "ntkgp_mean": gp_prediction.mean,
        "ntkgp_variance": gp_prediction.variance,
        "laplace_map": la.mean,
        "laplace_probit": la.predict(x_test),
        "laplace_evidence": la.log_marginal_likelihood(),
        "laplace_samples": la.sample(3, generator=torch.Generator().manual_seed(2)),
        "laplace_prior_precision": torch.tensor(
            la.optimize_prior_precision([0.1, 1.0, 10.0, 100.0, 1000.0], progress=False)
        ),
    }
    for name, preconditioner in (("lqf_sgd", None), ("lqf_sgd_kfac", "kfac")):
        lqf = LQF(net, weight_decay=0.3, preconditioner=preconditioner)
        lqf.fit(x, y, epochs=3, lr=None if preconditioner else 0.05, batch_size=x.shape[0], progress=False)
        out[name] = lqf.delta
        out[name + "_loss"] = torch.tensor([record["loss"] for record in lqf.history])
    return out


def worker(rank: int, path: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # as conftest sets it in the parent: the same initial weights
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    try:
        model, x, y, v, u = problem()
        rows = slice(rank * 6, (rank + 1) * 6)
        net = FunctionalNetwork(model)
        shard = net.shard(x[rows].clone())
        torch.save(products(net, shard, y[rows], v, u[rank * 18 : (rank + 1) * 18]), f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_two_gloo_processes_equal_one():
    model, x, y, v, u = problem()
    single = products(FunctionalNetwork(model), x, y, v, u)
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(worker, args=(os.path.join(out, "rendezvous"), out), nprocs=WORLD, join=True)
        ranks = [torch.load(f"{out}/{rank}.pt") for rank in range(WORLD)]
    for name, expected in single.items():
        if name == "ntk":  # rows of K v: each rank holds its own
            got = torch.cat([r[name] for r in ranks])
        else:  # replicated p-vectors: the same on every rank
            assert torch.equal(ranks[0][name], ranks[1][name]), name
            got = ranks[0][name]
        assert float((got - expected).norm() / expected.norm()) < 1e-10, name


def test_a_shard_without_a_process_group_says_so():
    model, x, *_ = problem()
    net = FunctionalNetwork(model)
    with pytest.raises(RuntimeError, match="init_process_group"):
        net.vjp(net.shard(x), torch.ones(1, 12, 3, dtype=x.dtype))


def test_methods_that_need_every_input_refuse_a_shard():
    from ntkgp import NTKGP, Laplace

    model, x, y, *_ = problem()
    net = FunctionalNetwork(model)
    shard = net.shard(x[:6].clone())
    with pytest.raises(NotImplementedError, match="NTKGP in function space.*needs all its training inputs on one"):
        NTKGP(net, shard, torch.randn(6, 3), space="function")
    with pytest.raises(ValueError, match="function-space posterior needs every training input on one process"):
        Laplace(net, "classification", solver="cholesky").fit(shard, y[:6])
    with tempfile.TemporaryDirectory() as out:  # a process group of one, so that the shard's products run
        dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=0, world_size=1)
        try:
            lqf = LQF(net, weight_decay=0.3, preconditioner=None).fit(shard, y[:6], epochs=1, progress=False)
            with pytest.raises(ValueError, match="sharded across processes.*space='parameter'"):
                lqf.solve("function")
        finally:
            dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_the_documented_script_runs_under_two_gloo_processes(tmp_path):
    """docs/distributed.md's script (a fragment with an undefined model, x and rank until issue 26) as written, under
    torchrun with 2 processes on gloo."""
    text = (Path(__file__).parents[1] / "docs" / "distributed.md").read_text()
    (script,) = re.findall(r"```python notest\n(# shards\.py.*?)```", text, re.S)
    (tmp_path / "shards.py").write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NTKGP_PROGRESS": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "shards.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes: σ² = " in done.stdout and done.stdout.count("tensor(") == 1
