"""A transformer end to end: few-shot transfer of a small Vision Transformer pretrained here, against a CNN of similar
size as a control.

Both networks are pretrained on the source split of Fashion-MNIST (classes 0–4, 28 × 28, from scratch on the CPU,
cached beside the results), then adapted to the 5 held-out classes (5–9) from k labelled images per class with a new
5-way head, by: the NTK-GP (function space, one-hot regression with the evidence-fitted scale and noise, class
probabilities by sampling its marginals), Laplace (GLM probit predictive, prior precision by the evidence), LQF (the
linearised network trained with K-FAC-preconditioned SGD), the NTK-GP over LoRA adapters (the ViT only: peft's
``lora_B`` matrices on every attention output and MLP layer, plus the head; ``lora_A`` is random and fixed, as peft
starts it), last-layer retraining and fine-tuning of the whole network. The linearised methods work on the last
block and the head. Accuracy, NLL, ECE and seconds per adaptation on held-out test images of the target classes.
Results are written after every draw; a rerun with the same configuration and seed resumes.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from ntkgp import LQF, NTKGP, FunctionalNetwork, Laplace
from ntkgp.progress import progress_bar

from .common import (
    Experiment,
    adam_epochs,
    atomic_path,
    begin,
    format_table,
    mean_and_stderr,
    save_figure_atomic,
    write_json_atomic,
)
from .datasets import load_fashion_mnist, support_indices
from .fashion_fewshot import gp_class_probabilities, metrics, train_cross_entropy

METHODS = ["NTK-GP", "Laplace", "LQF", "NTK-GP LoRA", "retrain last layer", "fine-tune"]
MODELS = ["vit", "cnn"]
SOURCE, TARGET = list(range(5)), list(range(5, 10))
WAYS = len(TARGET)


class SmallCNN(nn.Module):
    """Three 3 × 3 convolution blocks and a linear head: about the ViT's size."""

    def __init__(self, width: int, classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def build(kind: str, config: dict, classes: int) -> nn.Module:
    """The ViT (torchvision's, 7 × 7 patches of 28 × 28 images) or the control CNN, random weights."""
    if kind == "vit":
        from torchvision.models import VisionTransformer

        layers, hidden, heads = config["vit"]
        vit = VisionTransformer(28, 7, layers, heads, hidden, 2 * hidden, num_classes=classes, dropout=0.0)
        vit.conv_proj = nn.Conv2d(1, hidden, kernel_size=7, stride=7)  # grey images: one channel
        return vit
    return SmallCNN(config["cnn_width"], classes)


def last_block(kind: str, config: dict) -> list[str]:
    """The linearised scope: the last transformer block or convolution block, and the head."""
    if kind == "vit":
        return [f"encoder.layers.encoder_layer_{config['vit'][0] - 1}.", "heads."]
    return ["features.6.", "head."]


def head_name(kind: str) -> str:
    return "heads.head" if kind == "vit" else "head"


def replace_head(model: nn.Module, kind: str, seed: int) -> nn.Module:
    """The network with a new WAYS-way head (seeded), in float64 and eval mode."""
    torch.manual_seed(seed)
    if kind == "vit":
        model.heads.head = nn.Linear(model.heads.head.in_features, WAYS)
    else:
        model.head = nn.Linear(model.head.in_features, WAYS)
    return model.double().eval()


def pretrained(kind: str, config: dict, images: Tensor, labels: Tensor, cache: Path, seed: int) -> nn.Module:
    """The network pretrained on the source classes, loaded from ``cache`` when a run of the same settings made it."""
    key = {"kind": kind, "vit": config["vit"], "cnn_width": config["cnn_width"], **config["pretrain"], "seed": seed}
    path = cache / f"{kind}.pt"
    model = build(kind, config, len(SOURCE)).float()  # pretrained in float32 (the test suite defaults to float64)
    if path.exists():
        saved = torch.load(path, weights_only=False)
        if saved["key"] == key:
            model.load_state_dict(saved["state"])
            return model.eval()
    settings = config["pretrain"]
    clock = time.perf_counter()
    model.train()
    adam_epochs(model, model.parameters(), images, labels, settings["lr"], settings["batch"], settings["steps"], seed)
    model.eval()
    with torch.no_grad():
        accuracy = float((model(images[:2000]).argmax(-1) == labels[:2000]).float().mean())
    print(f"pretrained the {kind} on the source classes in {time.perf_counter() - clock:.0f} s "
          f"(training accuracy {accuracy:.3f})")  # fmt: skip
    with atomic_path(path) as tmp:
        torch.save({"key": key, "state": model.state_dict(), "accuracy": accuracy}, tmp)
    return model


def with_lora(model: nn.Module, config: dict) -> tuple[nn.Module, list[str]]:
    """peft LoRA adapters (rank ``config["lora_rank"]``) on the ViT's attention output projections and MLP layers;
    the names of the ``lora_B`` matrices and the head, the scope of the LoRA NTK-GP (J in ``lora_A`` is zero where
    peft starts, lora_B = 0)."""
    import peft

    targets = ["out_proj", "mlp.0", "mlp.3"]
    lora = peft.LoraConfig(r=config["lora_rank"], lora_alpha=config["lora_rank"], target_modules=targets,
                           modules_to_save=None)  # fmt: skip
    wrapped = peft.get_peft_model(copy.deepcopy(model), lora).double().eval()  # peft rewrites the modules it wraps
    names = [n for n, _ in wrapped.named_parameters() if "lora_B" in n or ".heads.head." in n]
    return wrapped, names


def adapt(kind: str, model: nn.Module, config: dict, support: dict, test: Tensor, seed: int) -> dict:
    """method -> (test probabilities (m, WAYS), seconds) for the methods of ``config["methods"]`` on one draw."""
    x, y = support["inputs"], support["labels"]
    scope, generator, out = last_block(kind, config), torch.Generator().manual_seed(seed), {}
    onehot = nn.functional.one_hot(y, WAYS).to(torch.float64)
    for method in config["methods"]:
        if method == "NTK-GP LoRA" and kind != "vit":
            continue
        clock = time.perf_counter()
        if method in ("NTK-GP", "NTK-GP LoRA"):
            network, names = (model, scope) if method == "NTK-GP" else with_lora(model, config)
            gp = NTKGP(network, x, onehot, params=names, mean="zero", progress=False).fit()
            pred = gp.predict(test)
            probs = gp_class_probabilities(pred.mean, pred.variance, config["predictive_samples"], generator)
        elif method == "Laplace":
            fixed = config["laplace_prior_precision"]
            laplace = Laplace(model, "classification", params=scope, num_classes=WAYS, progress=False,
                              prior_precision=1.0 if fixed is None else fixed).fit(x, y)  # fmt: skip
            if fixed is None:
                laplace.optimize_prior_precision(torch.logspace(*config["prior_grid"], dtype=torch.float64), False)
            probs = laplace.predict(test)
        elif method == "LQF":
            lqf = LQF(model, params=scope, weight_decay=config["lqf_weight_decay"])
            if config["lqf_solver"] == "closed_form":
                lqf.fit(x, y, solver="closed_form", progress=False)
            else:
                lqf.fit(x, y, epochs=config["lqf_epochs"], lr=config["lqf_lr"], seed=seed, progress=False)
            probs = lqf.predict_proba(test)
        elif method == "retrain last layer":
            net = FunctionalNetwork(model, [f"{head_name(kind)}."])
            theta = train_cross_entropy(net, x, y, config["retrain_steps"], config["retrain_lr"])
            with torch.no_grad():
                probs = torch.softmax(net(test, theta), -1)
        else:  # fine-tune: every parameter, from the pretrained weights and the new head
            net = FunctionalNetwork(model, [n for n, _ in model.named_parameters()])
            theta = train_cross_entropy(net, x, y, config["finetune_steps"], config["finetune_lr"])
            with torch.no_grad():
                probs = torch.softmax(net(test, theta), -1)
        out[method] = (probs.detach(), time.perf_counter() - clock)
    return out


def summarise(rows: list[dict], config: dict) -> str:
    tables = []
    for kind in config["models"]:
        for k in config["shots"]:
            table = []
            for method in config["methods"]:
                sel = [r for r in rows if (r["model"], r["shots"], r["method"]) == (kind, k, method)]
                if not sel:
                    continue
                cells = [mean_and_stderr(r[key] for r in sel) for key in ("accuracy", "nll", "ece", "seconds")]
                table.append([method] + [f"{m:.3f} ± {e:.3f}" for m, e in cells])
            tables.append(
                f"{kind}, {WAYS}-way {k}-shot (mean ± standard error over {config['draws']} draws)\n"
                + format_table(["method", "accuracy", "NLL", "ECE", "seconds"], table)
            )
    return "\n\n".join(tables)


def plot(rows: list[dict], config: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(config["models"]), 3, figsize=(13, 3.6 * len(config["models"])), squeeze=False)
    for row, kind in enumerate(config["models"]):
        for ax, key in zip(axes[row], ("accuracy", "nll", "ece")):
            for method in config["methods"]:
                stats = [
                    mean_and_stderr(r[key] for r in rows if (r["model"], r["shots"], r["method"]) == (kind, k, method))
                    for k in config["shots"]
                ]
                if all(s[0] == s[0] for s in stats):  # methods that ran for this model (NaN otherwise)
                    means, errors = [s[0] for s in stats], [s[1] for s in stats]
                    colour = f"C{METHODS.index(method)}"  # one colour per method in every panel
                    ax.errorbar(config["shots"], means, yerr=errors, marker="o", capsize=3, label=method, color=colour)
            ax.set_xscale("log")
            ax.set_xticks(config["shots"], [str(k) for k in config["shots"]])
            ax.set_xlabel("shots per class")
            ax.set_title(
                f"{kind}: {'expected calibration error' if key == 'ece' else key.upper() if key == 'nll' else key}"
            )
        axes[row][0].legend(fontsize=7)
    save_figure_atomic(fig, path)


def run(config: dict, out_dir: Path, device: str = "cpu", seed: int = 0) -> dict:
    unknown = [m for m in config["methods"] if m not in METHODS] + [m for m in config["models"] if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown {unknown}; the methods are {METHODS}, the models {MODELS}")
    path, payload, start = begin(config, out_dir, device, seed, rows=[], done=[])
    images, labels = load_fashion_mnist(train=True)
    test_images, test_labels = load_fashion_mnist(train=False)
    source = torch.isin(labels, torch.tensor(SOURCE))
    pool, pool_labels = images[~source], labels[~source] - len(SOURCE)
    target = torch.isin(test_labels, torch.tensor(TARGET))
    pick = torch.randperm(int(target.sum()), generator=torch.Generator().manual_seed(seed))[: config["test_size"]]
    test = test_images[target][pick].double()
    test_y = test_labels[target][pick] - len(SOURCE)
    cache = out_dir / "pretrained"
    for kind in config["models"]:
        model = pretrained(kind, config, images[source], labels[source], cache, seed)
        payload.setdefault("parameters", {})[kind] = sum(p.numel() for p in model.parameters())
        jobs = [(k, d) for k in config["shots"] for d in range(config["draws"])]
        for k, draw in progress_bar(jobs, desc=f"vit-fewshot {kind}"):
            if [kind, k, draw] in payload["done"]:
                continue
            draw_seed = 1000 * seed + 100 * k + draw
            idx = support_indices(pool_labels, k, torch.Generator().manual_seed(draw_seed))
            support = {"inputs": pool[idx].double(), "labels": pool_labels[idx]}
            adapted = replace_head(
                pretrained(kind, config, images[source], labels[source], cache, seed), kind, draw_seed
            )
            for method, (probs, seconds) in adapt(kind, adapted, config, support, test, draw_seed).items():
                row = {"model": kind, "shots": k, "draw": draw, "method": method, "seconds": seconds}
                payload["rows"].append({**row, **metrics(probs, test_y)})
            payload["done"].append([kind, k, draw])
            write_json_atomic(path, payload)  # after every draw: a rerun resumes here
    rows = payload["rows"]
    plot(rows, config, out_dir / "vit_fewshot.png")
    print(f"{len(test_y)} test images of the target classes; parameters {payload['parameters']}; "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    print(summarise(rows, config))
    print(f"results: {path}  figure: {out_dir / 'vit_fewshot.png'}")
    return {"rows": len(rows)}


DEFAULT = {
    "models": MODELS,
    "methods": METHODS,
    "shots": [1, 5, 10, 25],
    "draws": 5,
    "test_size": 1000,
    "vit": [2, 64, 4],  # layers, hidden size, heads
    "cnn_width": 32,
    "pretrain": {"steps": 1500, "batch": 128, "lr": 1e-3},
    "lora_rank": 4,
    # the unit Gaussian prior of the NTK-GP: the evidence over δ rises to the top of any grid here (the MAP then sits
    # at θ0, whose new head is random: chance accuracy); None chooses δ on prior_grid by the evidence all the same
    "laplace_prior_precision": 1.0,
    "prior_grid": [-3, 3, 13],
    "predictive_samples": 1000,
    # SGD (K-FAC, lr 0.05 or 0.005, 20 epochs) diverged on the ViT's last block without an error (|f| ~ 1e37);
    # the closed form is the exact minimiser of the same objective
    "lqf_solver": "closed_form",
    "lqf_epochs": 20,
    "lqf_lr": 0.05,
    "lqf_weight_decay": 1e-3,
    "retrain_steps": 200,
    "retrain_lr": 1e-2,
    "finetune_steps": 50,
    "finetune_lr": 1e-3,
}
TINY = {
    **DEFAULT,
    "shots": [1, 2],
    "draws": 1,
    "test_size": 20,
    "vit": [1, 16, 2],
    "cnn_width": 4,
    "pretrain": {"steps": 5, "batch": 32, "lr": 1e-3},
    "lora_rank": 2,
    "prior_grid": [-1, 1, 3],
    "predictive_samples": 50,
    "lqf_epochs": 2,
    "retrain_steps": 3,
    "finetune_steps": 2,
}

EXPERIMENT = Experiment(
    name="vit-fewshot",
    description="5-way k-shot transfer of a small ViT pretrained here (and a CNN control): NTK-GP, Laplace, LQF, LoRA",
    run=run,
    configs={
        "default": DEFAULT,
        "tiny": TINY,
        "paper": {
            **DEFAULT,
            "draws": 10,
            "test_size": 5000,
            "vit": [4, 128, 4],
            "cnn_width": 48,
            "pretrain": {"steps": 6000, "batch": 256, "lr": 1e-3},
        },  # fmt: skip
    },
)
