"""Sparse feature updates (the iterative-linearisation paper's Figures 2, 5, 6 and 8), on our library.

Stand-in: Fashion-MNIST (28 × 28, grey) for the paper's CIFAR-10, which is not available offline; the first
``train_size`` training images and ``test_size`` test images. The network is the paper's modified LeNet — two 5 × 5
convolutions of ``channels`` channels (50 in the paper) each followed by ReLU and 2 × 2 max pooling, dense layers of
120 and 84, ReLU, a 10-way output — trained with the cross-entropy of the linearised logits (the softmax not
linearised) by :class:`ntkgp.IterativeLinearisation`. Parts:

- ``periods`` (Fig. 2): full-batch SGD at ``lr`` and minibatch SGD (batch ``batch_size``, lr ``minibatch_lr``, K
  scaled by ``minibatch_scale`` as the paper does) for every K in ``periods`` (None: K = ∞), and the adaptive policies
  (:class:`ntkgp.LossPlateau`, :class:`ntkgp.KernelDistanceThreshold`); test accuracy against steps and against the
  number of feature updates, the kernel distance to θ0's NTK on a probe batch of ``probe_size`` images over training,
  and the feature updates each run needed to reach ``target_fraction`` of K = 1's final test accuracy.
- ``scaling`` (Fig. 5): full batch, K ∈ ``scaling_periods``, training sets of ``scaling_sizes`` images, test
  accuracy with optimal early stopping (the best evaluation, as the paper); for K = ∞ also that of the proxy (the
  linearised network at θ0 is the model K = ∞ trains: the network at its weights is not).
- ``probes`` (Fig. 6): logistic-regression probes (scikit-learn) on the first and second convolution blocks'
  features during the full-batch runs with K = 1, K = ``probe_period`` and K = ∞.
- ``converged`` (Fig. 8): each linearisation solved with Adam (lr ``adam_lr``) for a large fixed K
  (``converged["period"]`` steps, enough for the proxy to fit the training set: its loss just before each
  re-linearisation is reported) against K = 1 with SGD and plain Adam (K = 1, Adam).

The network's and the proxy's test accuracy are both recorded; for finite K they are equal at every
re-linearisation. Every run is written to ``results.json`` when it finishes (a rerun resumes with the next one);
figures ``periods.png`` (Figs. 2 and 5, the kernel distance) and ``probes.png`` (Figs. 6 and 8).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import matplotlib
import torch
from torch import nn

from ntkgp import IterativeLinearisation, KernelDistanceThreshold, LossPlateau

from .common import Experiment, begin, format_table, save_figure_atomic, write_json_atomic
from .datasets import load_fashion_mnist

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MEAN, STD = 0.2860, 0.3530


def lenet(channels: int, in_channels: int = 1, size: int = 28) -> nn.Sequential:
    """The paper's modified LeNet for ``in_channels`` × ``size`` × ``size`` inputs (Fashion-MNIST's 1 × 28 × 28 by
    default; the paper's CIFAR-10 is 3 × 32 × 32): conv 5 × 5 (``channels``) – ReLU – max pool, twice, then dense
    120 – ReLU – 84 – ReLU – 10; He (Kaiming normal, fan-in, ReLU gain) weights and zero biases, drawn from torch's
    global generator (PyTorch's default initialisation leaves this network on a plateau of the loss for hundreds of
    steps at the small learning rates that the linearised proxies need)."""
    side = ((size - 4) // 2 - 4) // 2  # after two 5 × 5 convolutions and two 2 × 2 pools
    model = nn.Sequential(
        nn.Conv2d(in_channels, channels, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(channels, channels, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(channels * side * side, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, 10),
    )
    for layer in model:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    return model


def load(config: dict) -> dict:
    x, y = load_fashion_mnist(train=True)
    xt, yt = load_fashion_mnist(train=False)
    prep = lambda images: ((images - MEAN) / STD).to(torch.get_default_dtype())  # noqa: E731
    n, m = max(config["train_size"], *config["scaling_sizes"]), config["test_size"]
    return {"x": prep(x[:n]), "y": y[:n], "test_x": prep(xt[:m]), "test_y": yt[:m]}


def probe_accuracy(model: nn.Sequential, data: dict, rows: int) -> dict:
    """Test accuracy of logistic-regression probes on the outputs of the first and second convolution blocks."""
    from sklearn.linear_model import LogisticRegression

    out = {}
    with torch.no_grad():
        for layer, cut in (("layer1", 3), ("layer2", 6)):
            features = [
                model[:cut](data[k][:rows] if k == "x" else data[k]).flatten(1).double().numpy()
                for k in ("x", "test_x")
            ]
            mean, std = features[0].mean(0), features[0].std(0) + 1e-6
            clf = LogisticRegression(max_iter=300).fit((features[0] - mean) / std, data["y"][:rows].numpy())
            out[layer] = float(clf.score((features[1] - mean) / std, data["test_y"].numpy()))
    return out


def train_run(spec: dict, data: dict, config: dict, seed: int) -> dict:
    """One training run of ``spec`` (size, period or policy, optimizer, lr, batch, steps, probes): its evaluations,
    feature updates, seconds."""
    torch.manual_seed(seed)
    model = lenet(config["channels"]).eval()
    params = list(model.parameters())
    optimizer = (
        torch.optim.Adam(params, lr=spec["lr"])
        if spec["optimizer"] == "adam"
        else torch.optim.SGD(params, lr=spec["lr"])
    )
    policy = spec.get("policy")
    kwargs = (
        {"relinearise": LossPlateau(**policy[1]) if policy[0] == "plateau" else KernelDistanceThreshold(**policy[1])}
        if policy
        else {"period": math.inf if spec["period"] is None else spec["period"]}
    )
    n = spec.get("size", config["train_size"])
    probe = data["x"][: config["probe_size"]]
    trainer = IterativeLinearisation(model, optimizer, probe=probe if spec.get("kernel", True) else None, **kwargs)
    probes: list[dict] = []
    probe_every = max(1, spec["steps"] // config["probe_evaluations"])

    def callback(t: IterativeLinearisation, entry: dict) -> None:  # probes at the first evaluation past each mark
        due = not probes or entry["step"] >= probes[-1]["step"] + probe_every or entry["step"] == spec["steps"]
        if spec.get("probes") and due and (not probes or probes[-1]["step"] != entry["step"]):
            probes.append({"step": entry["step"], **probe_accuracy(model, data, config["probe_rows"])})

    start = time.perf_counter()
    diverged = None
    try:
        trainer.fit(
            (data["x"][:n], data["y"][:n]),
            spec["steps"],
            batch_size=spec.get("batch_size"),
            test=(data["test_x"], data["test_y"]),
            eval_every=spec["eval_every"],
            seed=seed,
            progress=True,
            callback=callback,
        )
    except FloatingPointError:  # the proxy's loss or outputs overflowed: recorded, the evaluations so far kept
        diverged = trainer.steps
    history = trainer.history
    return {
        **spec,
        "evaluations": history.evaluations,
        "feature_updates": trainer.feature_updates,
        "proxy_loss_before_relinearising": [history.proxy_loss[s - 1] for s in history.relinearised_at],
        "probes": probes,
        "diverged_at": diverged,
        "seconds": time.perf_counter() - start,
    }


def specs(config: dict) -> dict[str, dict]:
    """Every run of the configuration, by key."""
    out = {}
    steps, scale = config["steps"], config["minibatch_scale"]
    every = max(1, steps // config["evaluations"])
    for k in config["periods"]:
        name = "inf" if k is None else str(k)
        out[f"periods/full/K={name}"] = {
            "part": "periods",
            "mode": "full",
            "period": k,
            "optimizer": "sgd",
            "lr": config["lr"],
            "steps": steps,
            "eval_every": every,
            "probes": k in (1, config["probe_period"], None),
        }
        out[f"periods/mini/K={name}"] = {
            "part": "periods",
            "mode": "mini",
            "optimizer": "sgd",
            "period": None if k is None else k * scale,
            "lr": config["minibatch_lr"],
            "batch_size": config["batch_size"],
            "steps": steps * scale,
            "eval_every": every * scale,
        }
    for name, policy in config["policies"].items():
        out[f"periods/full/{name}"] = {
            "part": "periods",
            "mode": "full",
            "policy": policy,
            "optimizer": "sgd",
            "lr": config["lr"],
            "steps": steps,
            "eval_every": every,
        }
    for size in config["scaling_sizes"]:
        for k in config["scaling_periods"]:
            out[f"scaling/n={size}/K={'inf' if k is None else k}"] = {
                "part": "scaling",
                "size": size,
                "period": k,
                "optimizer": "sgd",
                "lr": config["lr"],
                "steps": config["scaling_steps"],
                "eval_every": max(1, config["scaling_steps"] // 10),
                "kernel": False,
            }
    converged = config["converged"]
    out["converged/K=1 SGD"] = {
        "part": "converged",
        "period": 1,
        "optimizer": "sgd",
        "lr": config["lr"],
        "steps": converged["steps"],
        "eval_every": converged["eval_every"],
        "kernel": False,
    }
    out["converged/Adam"] = {
        "part": "converged",
        "period": 1,
        "optimizer": "adam",
        "lr": converged["adam_lr"],
        "steps": converged["steps"],
        "eval_every": converged["eval_every"],
        "kernel": False,
    }
    out["converged/solved by Adam"] = {
        "part": "converged",
        "period": converged["period"],
        "optimizer": "adam",
        "lr": converged["adam_lr"],
        "steps": converged["steps"],
        "eval_every": converged["eval_every"],
        "kernel": False,
    }
    return out


def best_accuracy(run: dict, kind: str = "network") -> float:
    """The best test accuracy of the network (or the proxy) over a run's evaluations: optimal early stopping."""
    return max(e[f"test_{kind}_accuracy"] for e in run["evaluations"])


def final(run: dict, key: str) -> float:
    return run["evaluations"][-1][key]


def updates_to_reach(run: dict, target: float) -> int | None:
    """Feature updates at the first evaluation with test accuracy >= target (None: never)."""
    return next((e["feature_updates"] for e in run["evaluations"] if e["test_network_accuracy"] >= target), None)


def tables(runs: dict, config: dict) -> str:
    out = []
    for mode in ("full", "mini"):
        reference = runs.get(f"periods/{mode}/K=1")
        target = None if reference is None else config["target_fraction"] * final(reference, "test_network_accuracy")
        body = []
        for key, r in runs.items():
            if r["part"] != "periods" or r["mode"] != mode:
                continue
            reach = None if target is None else updates_to_reach(r, target)
            body.append(
                [
                    key.split("/")[-1] + (f" (diverged at step {r['diverged_at']})" if r["diverged_at"] else ""),
                    f"{final(r, 'test_network_accuracy'):.3f}",
                    f"{final(r, 'test_proxy_accuracy'):.3f}",
                    f"{final(r, 'train_network_accuracy'):.3f}",
                    str(r["feature_updates"]),
                    "never" if reach is None else str(reach),
                    f"{final(r, 'kernel_distance'):.3f}" if "kernel_distance" in r["evaluations"][-1] else "—",
                    f"{r['seconds']:.0f}",
                ]
            )
        if body:
            out.append(
                f"Figure 2, {'full batch' if mode == 'full' else 'minibatches'}: final test accuracy of the "
                f"network and of the proxy, train accuracy, feature updates, feature updates to reach "
                f"{config['target_fraction']:.0%} of K = 1's final test accuracy"
                + (f" ({target:.3f})" if target else "")
                + ", kernel distance to θ0, seconds\n"
                + format_table(
                    ["K", "test", "test proxy", "train", "updates", "updates to target", "kernel dist.", "s"], body
                )
            )
    sizes, periods = config["scaling_sizes"], config["scaling_periods"]
    columns = [(p, kind) for p in periods for kind in (("network", "proxy") if p is None else ("network",))]
    body = [
        [str(n)]
        + [
            f"{best_accuracy(runs[k], kind):.3f}"
            if (k := f"scaling/n={n}/K={'inf' if p is None else p}") in runs
            else "—"
            for p, kind in columns
        ]
        for n in sizes
    ]
    out.append(
        "Figure 5: test accuracy with optimal early stopping (the best evaluation) against the training-set "
        "size; for K = ∞ also the proxy (the linearised network at θ0, the model K = ∞ trains)\n"
        + format_table(
            ["n"] + [f"K={'∞' if p is None else p}" + (" proxy" if kind == "proxy" else "") for p, kind in columns],
            body,
        )
    )
    body = []
    for key, r in runs.items():
        for p in r.get("probes") or []:
            if p["step"] == r["probes"][-1]["step"] or p is r["probes"][0]:
                body.append([key.split("/")[-1], str(p["step"]), f"{p['layer1']:.3f}", f"{p['layer2']:.3f}"])
    if body:
        out.append(
            "Figure 6: linear-probe test accuracy on the first and second blocks' features (first and last)\n"
            + format_table(["K", "step", "layer 1", "layer 2"], body)
        )
    body = [
        [
            key.split("/")[-1],
            f"{final(r, 'test_network_accuracy'):.3f}",
            f"{best_accuracy(r):.3f}",
            f"{final(r, 'train_network_accuracy'):.3f}",
            str(r["feature_updates"]),
            " ".join(f"{v:.2g}" for v in r["proxy_loss_before_relinearising"][:8])
            if r["feature_updates"] < 50
            else "—",
        ]
        for key, r in runs.items()
        if r["part"] == "converged"
    ]
    if body:
        out.append(
            f"Figure 8: each linearisation solved by Adam (K = {config['converged']['period']}) against K = 1 "
            "(SGD) and plain Adam; the proxy's train loss just before each re-linearisation\n"
            + format_table(["run", "final test", "best test", "train", "updates", "proxy loss at the ends"], body)
        )
    return "\n\n".join(out)


def plot(runs: dict, config: dict, out_dir: Path) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    for key, r in runs.items():
        if r["part"] != "periods":
            continue
        e = r["evaluations"]
        style = "-" if r["mode"] == "full" else "--"
        label = f"{r['mode']} {key.split('/')[-1]}"
        steps = [v["step"] / (config["minibatch_scale"] if r["mode"] == "mini" else 1) for v in e]
        axes[0].plot(steps, [v["test_network_accuracy"] for v in e], style, label=label)
        if r["mode"] == "full":
            axes[1].plot(
                [max(v["feature_updates"], 0.5) for v in e],
                [v["test_network_accuracy"] for v in e],
                marker=".",
                label=label,
            )
            if "kernel_distance" in e[-1]:
                axes[2].plot([v["step"] for v in e], [v["kernel_distance"] for v in e], label=label)
    axes[0].set_xlabel("steps (minibatch steps / scale)")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("feature updates (0 shown at 0.5)")
    axes[2].set_xlabel("steps")
    axes[2].set_ylabel("kernel distance to θ0")
    for ax in axes[:2]:
        ax.set_ylabel("test accuracy")
    for ax in axes[:3]:
        ax.legend(fontsize=6)
    for p in config["scaling_periods"]:
        keys = [(n, f"scaling/n={n}/K={'inf' if p is None else p}") for n in config["scaling_sizes"]]
        keys = [(n, k) for n, k in keys if k in runs]
        for kind in ("network", "proxy") if p is None else ("network",):
            axes[3].plot(
                [n for n, _ in keys],
                [best_accuracy(runs[k], kind) for _, k in keys],
                marker="o",
                label=f"K={'∞' if p is None else p}" + (" proxy" if kind == "proxy" else ""),
            )
    axes[3].set_xscale("log")
    axes[3].set_xlabel("training images")
    axes[3].set_ylabel("test accuracy (optimal early stopping)")
    axes[3].legend(fontsize=7)
    axes[0].set_title("Fig. 2: test accuracy against steps")
    axes[1].set_title("Fig. 2: against feature updates")
    axes[2].set_title("kernel distance over training")
    axes[3].set_title("Fig. 5: data scaling")
    save_figure_atomic(fig, out_dir / "periods.png")
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for key, r in runs.items():
        if r.get("probes"):
            for ax, layer in zip(axes[:2], ("layer1", "layer2")):
                ax.plot(
                    [p["step"] for p in r["probes"]],
                    [p[layer] for p in r["probes"]],
                    marker="o",
                    label=key.split("/")[-1],
                )
        if r["part"] == "converged":
            axes[2].plot(
                [v["step"] for v in r["evaluations"]],
                [v["test_network_accuracy"] for v in r["evaluations"]],
                label=key.split("/")[-1],
            )
    for ax, title in zip(
        axes, ("Fig. 6: probe on layer 1", "Fig. 6: probe on layer 2", "Fig. 8: linearisations solved by Adam")
    ):
        ax.set_title(title)
        ax.set_xlabel("steps")
        ax.set_ylabel("test accuracy")
        ax.legend(fontsize=7)
    save_figure_atomic(fig, out_dir / "probes.png")


def run(config: dict, out_dir: Path, device: str = "cpu", seed: int = 0) -> dict:
    path, payload, start = begin(config, out_dir, device, seed, runs={})
    data = load(config)
    todo = [(k, s) for k, s in specs(config).items() if k not in payload["runs"]]
    for i, (key, spec) in enumerate(todo):
        print(f"[{i + 1}/{len(todo)}] {key}")
        payload["runs"][key] = train_run(spec, data, config, seed)
        write_json_atomic(path, payload)
    payload["wall_seconds_this_run"] = time.perf_counter() - start
    write_json_atomic(path, payload)
    plot(payload["runs"], config, out_dir)
    print(
        f"Fashion-MNIST ({config['train_size']} training, {config['test_size']} test images), LeNet with "
        f"{config['channels']} channels"
    )
    print(tables(payload["runs"], config))
    print(
        f"results: {path}; figures: {out_dir / 'periods.png'}, {out_dir / 'probes.png'}; "
        f"{payload['wall_seconds_this_run']:.0f} s this run"
    )
    return {"runs": len(payload["runs"])}


DEFAULT = {
    "train_size": 500,
    "test_size": 1000,
    "channels": 8,
    "lr": 0.005,
    "steps": 800,
    "evaluations": 10,
    "periods": [1, 10, 100, None],
    "minibatch_lr": 0.0025,
    "minibatch_scale": 2,
    "batch_size": 128,
    "policies": {
        "plateau": ["plateau", {"patience": 20, "tolerance": 0.02}],
        "kernel-distance": ["kernel", {"threshold": 0.02, "every": 10}],
    },
    "probe_size": 16,
    "target_fraction": 0.95,
    "probe_period": 100,
    "probe_evaluations": 3,
    "probe_rows": 500,
    "scaling_sizes": [125, 250, 500, 1000],
    "scaling_periods": [1, 100, None],
    "scaling_steps": 400,
    "converged": {"steps": 800, "eval_every": 40, "adam_lr": 1e-3, "period": 200},
}
TINY = {
    **DEFAULT,
    "train_size": 40,
    "test_size": 30,
    "channels": 2,
    "steps": 6,
    "evaluations": 2,
    "periods": [1, None],
    "probe_period": 3,
    "probe_rows": 40,
    "probe_size": 3,
    "scaling_sizes": [20, 40],
    "scaling_periods": [1, None],
    "scaling_steps": 4,
    "policies": {"plateau": ["plateau", {"patience": 2, "tolerance": 1e-3}]},
    "converged": {**DEFAULT["converged"], "steps": 6, "eval_every": 3, "period": 3},
}

EXPERIMENT = Experiment(
    name="iterative-linearisation",
    description="Iterative-linearisation paper Figs. 2, 5, 6, 8: sparse feature updates on Fashion-MNIST",
    run=run,
    configs={
        "default": DEFAULT,
        "tiny": TINY,
        "paper": {
            **DEFAULT,
            "train_size": 60000,
            "test_size": 10000,
            "channels": 50,
            "lr": 1e-3,
            "steps": 100000,
            "periods": [1, 10, 100, 1000, 10000, None],
            "minibatch_lr": 1e-4,
            "minibatch_scale": 10,
            "batch_size": 256,
            "probe_period": 10000,
            "probe_evaluations": 10,
            "probe_size": 64,
            "probe_rows": 10000,
            "scaling_sizes": [1000, 2000, 5000, 10000, 20000, 60000],
            "scaling_steps": 50000,
            "converged": {"steps": 100000, "eval_every": 1000, "adam_lr": 1e-4, "period": 20000},
        },
    },
)
