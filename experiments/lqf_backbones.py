"""The pretrained networks of the LQF experiments, each with a ReLU and a Leaky-ReLU version and a new seeded head.

- ``mobilenet``: torchvision's ImageNet MobileNetV2 (stands in for the paper's ImageNet ResNet-50). Its ReLU
  version is the original ReLU6 network; its Leaky-ReLU version is :func:`ntkgp.leaky_relu` applied to the same
  ImageNet weights — no retraining, so it runs a slightly different function than the one that was trained.
  Inputs: grey images resized to ``image_size``, replicated to 3 channels, ImageNet-normalised.
- ``cnn``: a small CNN trained here on the 60,000 Fashion-MNIST training images, once with ``nn.ReLU`` and once
  with ``nn.LeakyReLU(0.01)`` (Adam; epochs, batch size, lr and training-set size from the configuration,
  :data:`CNN_TRAINING` by default), so that both activations are really pretrained; the
  weights are cached under the experiment's results folder. Inputs: 28 × 28, normalised by Fashion-MNIST's
  mean and standard deviation.

A network's scopes name the parameters adapted: ``last_layer`` (the new head), ``last_block`` (MobileNetV2's
last inverted residual block, its final 1 × 1 convolution and the head; the CNN's last convolution, its dense
layer and the head) or ``all``.
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn

from ntkgp import SqrtCovariancePooling, leaky_relu
from ntkgp.progress import progress_bar

from .common import atomic_path
from .datasets import load_fashion_mnist
from .fashion_fewshot import SCOPES as MOBILENET_SCOPES
from .fashion_fewshot import load_mobilenet, preprocess

__all__ = ["ACTIVATIONS", "Backbone", "CNN_TRAINING", "bilinear_mobilenet", "pretrain_cnn", "small_cnn"]

ACTIVATIONS = ("relu", "leaky")
CNN_SCOPES = {"last_layer": ["head."], "last_block": ["conv3.", "fc.", "head."], "all": None}
CNN_TRAINING = {"epochs": 2, "batch_size": 128, "lr": 1e-3, "train_size": 60000}
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


def small_cnn(activation: str) -> nn.Sequential:
    """Three 3 × 3 convolutions (16, 32, 64 channels; max pooling after the first two), global average pooling,
    a dense layer of 64 and a 10-way head: 28,106 parameters; ``activation`` ``"relu"`` or ``"leaky"`` (0.01)."""
    act = (lambda: nn.ReLU()) if activation == "relu" else (lambda: nn.LeakyReLU(0.01))
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 16, 3, padding=1),
            act1=act(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(16, 32, 3, padding=1),
            act2=act(),
            pool2=nn.MaxPool2d(2),
            conv3=nn.Conv2d(32, 64, 3, padding=1),
            act3=act(),
            gap=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(64, 64),
            act4=act(),
            head=nn.Linear(64, 10),
        )
    )


def pretrain_cnn(activation: str, path: Path, seed: int, training: dict) -> tuple[nn.Sequential, dict]:
    """The small CNN trained on the first ``training["train_size"]`` Fashion-MNIST training images with
    ``activation``, loaded from ``path`` when a previous run saved it with the same ``training`` and ``seed``;
    returns it in eval mode and its record (the settings, Fashion-MNIST test accuracy, seconds)."""
    model = small_cnn(activation)
    if path.exists():
        saved = torch.load(path, weights_only=True)
        if saved["record"]["training"] == training and saved["record"]["seed"] == seed:
            model.load_state_dict(saved["state"])
            return model.eval(), saved["record"]
    torch.manual_seed(seed)
    model = small_cnn(activation)
    start = time.perf_counter()
    images, labels = load_fashion_mnist(train=True)
    x, labels = (images[: training["train_size"]] - FASHION_MEAN) / FASHION_STD, labels[: training["train_size"]]
    x = x.to(model.conv1.weight.dtype)  # the default dtype, in which the CNN is built
    optimizer = torch.optim.Adam(model.parameters(), lr=training["lr"])
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in progress_bar(range(training["epochs"]), desc=f"pretraining the {activation} CNN", unit="epoch"):
        for rows in torch.randperm(len(x), generator=generator).split(training["batch_size"]):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[rows]), labels[rows]).backward()
            optimizer.step()
    model.eval()
    test_images, test_labels = load_fashion_mnist(train=False)
    with torch.no_grad():
        predicted = model(((test_images - FASHION_MEAN) / FASHION_STD).to(x.dtype)).argmax(-1)
    record = {
        "fashion_test_accuracy": float((predicted == test_labels).double().mean()),
        "seconds": time.perf_counter() - start,
        "training": training,
        "seed": seed,
    }
    with atomic_path(path) as tmp:
        torch.save({"state": model.state_dict(), "record": record}, tmp)
    return model, record


class Backbone:
    """A pretrained network in its two activations: :meth:`network` gives a copy with a new seeded head.

    Args:
        name: ``"mobilenet"`` or ``"cnn"``.
        image_size: MobileNetV2's input side (the CNN takes 28).
        device: where the networks live.
        cache: folder for the CNN's pretrained weights.
        seed, cnn_training: the CNN's pretraining seed and settings (:data:`CNN_TRAINING`).
    """

    def __init__(
        self, name: str, image_size: int, device: str, cache: Path, seed: int = 0, cnn_training: dict | None = None
    ):
        if name not in ("mobilenet", "cnn"):
            raise ValueError(f"backbone must be 'mobilenet' or 'cnn', got {name!r}")
        self.name, self.image_size, self.device = name, image_size, device
        self.records: dict[str, dict] = {}
        if name == "mobilenet":
            relu = load_mobilenet(device)
            self.scopes = MOBILENET_SCOPES
            self.bodies = {"relu": relu, "leaky": leaky_relu(relu)}
        else:
            self.scopes = CNN_SCOPES
            self.bodies = {}
            for activation in ACTIVATIONS:
                model, self.records[activation] = pretrain_cnn(
                    activation, cache / f"cnn-{activation}.pt", seed, cnn_training or CNN_TRAINING
                )
                self.bodies[activation] = model.to(device)

    def prepare(self, images: Tensor) -> Tensor:
        """Grey images (n, 1, h, w) in [0, 1] -> the network's inputs."""
        images = images.to(self.device)
        if self.name == "mobilenet":
            return preprocess(images, self.image_size)
        x = nn.functional.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
        return ((x - FASHION_MEAN) / FASHION_STD).to(self.bodies["relu"].conv1.weight.dtype)

    def network(self, num_classes: int, activation: str, seed: int) -> nn.Module:
        """A copy of the ``activation`` network with a new ``num_classes``-way head seeded by ``seed`` (the same
        head for both activations), in eval mode."""
        model = copy.deepcopy(self.bodies[activation])
        torch.manual_seed(seed)
        if self.name == "mobilenet":
            model.classifier[-1] = nn.Linear(1280, num_classes).to(self.device)
        else:
            model.head = nn.Linear(64, num_classes).to(self.device)
        return model.eval()

    def params(self, scope: str) -> list[str] | None:
        if scope not in self.scopes:
            raise ValueError(f"scope must be one of {list(self.scopes)}, got {scope!r}")
        return self.scopes[scope]


def bilinear_mobilenet(
    backbone: Backbone, num_classes: int, activation: str, reduction: int, train_x: Tensor, seed: int
) -> nn.Module:
    """MobileNetV2's features, :class:`ntkgp.SqrtCovariancePooling` (a 1 × 1 reduction to ``reduction`` channels
    set to the principal directions of the training feature maps, frozen) and a new seeded linear head: B-LQF's
    network. Its parameter names keep MobileNetV2's scopes (``features.17.``, ``features.18.``, ``classifier.``)."""
    body = backbone.network(num_classes, activation, seed)
    pool = SqrtCovariancePooling(1280, reduction=reduction, seed=seed).to(backbone.device)
    with torch.no_grad():
        pool.init_pca(body.features(train_x))
    pool.requires_grad_(False)
    torch.manual_seed(seed)
    head = nn.Linear(pool.out_features, num_classes).to(backbone.device)
    return nn.Sequential(OrderedDict(features=body.features, pool=pool, classifier=head)).eval()
