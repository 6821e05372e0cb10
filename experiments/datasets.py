"""Offline datasets under the data root in ``NTKGP_DATA`` (see ../shared/data/README.md)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "data_root",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "load_olivetti",
    "load_uci",
    "support_indices",
]


def data_root() -> Path:
    """The folder named by ``NTKGP_DATA``; a clear error when it is unset or missing."""
    root = os.environ.get("NTKGP_DATA")
    if not root:
        raise RuntimeError(
            "set NTKGP_DATA to the data folder (the one holding FashionMNIST/raw), "
            "e.g. export NTKGP_DATA=../shared/data"
        )
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"NTKGP_DATA={root} is not a folder")
    return path


def _read_idx(path: Path, header: int) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; NTKGP_DATA must hold {path.parent.parent.name}/raw/*.gz")
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), dtype=np.uint8, offset=header)


def _idx_images(folder: str, split: str) -> tuple[Tensor, Tensor]:
    raw = data_root() / folder / "raw"
    images = _read_idx(raw / f"{split}-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    labels = _read_idx(raw / f"{split}-labels-idx1-ubyte.gz", 8)
    return torch.from_numpy(images.astype(np.float32) / 255.0), torch.from_numpy(labels.astype(np.int64))


def load_fashion_mnist(train: bool) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST from the gzipped idx files: images (N, 1, 28, 28) float in [0, 1], labels (N,) int64."""
    return _idx_images("FashionMNIST", "train" if train else "t10k")


def load_mnist() -> tuple[Tensor, Tensor]:
    """The MNIST test set, the only MNIST offline: images (10000, 1, 28, 28) float in [0, 1], labels (10000,)."""
    return _idx_images("MNIST", "t10k")


def load_olivetti() -> tuple[Tensor, Tensor]:
    """Olivetti faces: images (400, 1, 64, 64) float in [0, 1], upright, and the person (400,) in 0..39
    (image j is person j // 10), from ``olivetti/olivettifaces.mat`` by scipy's MATLAB reader."""
    from scipy.io import loadmat  # here: only this loader needs scipy

    path = data_root() / "olivetti" / "olivettifaces.mat"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; NTKGP_DATA must hold olivetti/olivettifaces.mat")
    faces = loadmat(path)["faces"].T.reshape(400, 64, 64).transpose(0, 2, 1)
    images = torch.from_numpy(np.ascontiguousarray(faces).astype(np.float32) / 255.0).unsqueeze(1)
    return images, torch.arange(400) // 10


def load_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled digits: images (1797, 1, 8, 8) float in [0, 1], labels (1797,) int64."""
    from sklearn.datasets import load_digits as sklearn_digits  # bundled with scikit-learn: no download

    data = sklearn_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)
    return images, torch.from_numpy(data.target.astype(np.int64))


def load_uci(name: str, split: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """A UCI regression set from ``uci/<name>/data.csv.gz`` (last column the target): inputs (N, d) and targets (N,)
    in float64, and the boolean test mask (N,) of split ``split`` (0-9) from ``test_mask.csv.gz``."""
    folder = data_root() / "uci" / name
    if not (folder / "data.csv.gz").exists():
        raise FileNotFoundError(f"{folder / 'data.csv.gz'} is missing; NTKGP_DATA must hold uci/{name}/")
    data = np.loadtxt(folder / "data.csv.gz", delimiter=",")
    mask = np.loadtxt(folder / "test_mask.csv.gz", delimiter=",", ndmin=2)
    if not 0 <= split < mask.shape[1]:
        raise ValueError(f"split must be in 0..{mask.shape[1] - 1}, got {split}")
    return (
        torch.from_numpy(data[:, :-1]),
        torch.from_numpy(data[:, -1]),
        torch.from_numpy(mask[:, split].astype(bool)),
    )


def support_indices(labels: Tensor, shots: int, generator: torch.Generator) -> Tensor:
    """``shots`` random indices of every class in ``labels`` (n,) (all of a class that has fewer), class by class."""
    picks = [torch.nonzero(labels == c).squeeze(-1) for c in range(int(labels.max()) + 1)]
    return torch.cat([p[torch.randperm(len(p), generator=generator)[:shots]] for p in picks])
