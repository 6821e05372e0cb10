"""The target tasks of the LQF experiments and their seeded draws (stand-ins for the paper's datasets).

- ``fashion``: Fashion-MNIST, 10 classes; training draws from its 60,000 training images, test images from its
  test set (a near-ImageNet-domain stand-in it is not: grey 28 × 28 clothes);
- ``mnist``: the 10,000-image MNIST test set (the only MNIST offline), split in halves by the experiment's seed:
  training draws from one half, test images from the other;
- ``digits``: scikit-learn's 1,797 8 × 8 digits, split in halves the same way (about 90 per class to draw from);
- ``olivetti``: Olivetti faces as 40-way identity classification (10 images per person): a draw takes ``shots``
  images of every person for training and the person's other images are the test set (fine-grained and far from
  ImageNet: the stand-in for the paper's fine-grained sets of Table 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .datasets import load_digits, load_fashion_mnist, load_mnist, load_olivetti, support_indices

__all__ = ["DATASETS", "Pool", "Task", "draw_task", "load_pool"]

DATASETS = ("fashion", "mnist", "digits", "olivetti")


@dataclass(frozen=True)
class Pool:
    """A dataset's images (n, 1, h, w) in [0, 1] to draw training sets from, and its fixed test images (None:
    each draw's test set is the rest of the pool, as for Olivetti)."""

    name: str
    images: Tensor
    labels: Tensor
    test_images: Tensor | None
    test_labels: Tensor | None

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1


@dataclass(frozen=True)
class Task:
    """One draw, as the backbone's inputs: train_x (n, ...), train_y (n,), test_x (m, ...), test_y (m,)."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    train_index: Tensor  # rows of the pool used for training (n,)


def _halves(images: Tensor, labels: Tensor, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    first, second = order[: len(order) // 2], order[len(order) // 2 :]
    return images[first], labels[first], images[second], labels[second]


def load_pool(name: str, seed: int, test_size: int) -> Pool:
    """The pool of ``name`` (one of :data:`DATASETS`), with at most ``test_size`` test images chosen by ``seed``."""
    if name == "fashion":
        images, labels = load_fashion_mnist(train=True)
        test_images, test_labels = load_fashion_mnist(train=False)
    elif name in ("mnist", "digits"):
        images, labels, test_images, test_labels = _halves(*(load_mnist() if name == "mnist" else load_digits()), seed)
    elif name == "olivetti":
        images, labels = load_olivetti()
        return Pool(name, images, labels, None, None)
    else:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    pick = torch.randperm(len(test_labels), generator=torch.Generator().manual_seed(seed + 1))[:test_size]
    return Pool(name, images, labels, test_images[pick], test_labels[pick])


def draw_task(pool: Pool, shots: int, seed: int, prepare) -> Task:
    """``shots`` training images of every class drawn by ``seed`` (all of a class with fewer), through
    ``prepare`` (grey images -> the backbone's inputs)."""
    index = support_indices(pool.labels, shots, torch.Generator().manual_seed(seed))
    if pool.test_images is None:
        rest = torch.ones(len(pool.labels), dtype=torch.bool)
        rest[index] = False
        test_images, test_labels = pool.images[rest], pool.labels[rest]
    else:
        test_images, test_labels = pool.test_images, pool.test_labels
    x, x_test = prepare(pool.images[index]), prepare(test_images)
    return Task(x, pool.labels[index].to(x.device), x_test, test_labels.to(x.device), index)
