"""Offline datasets under the data root in ``NTKGP_DATA`` (see ../shared/data/README.md)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["data_root", "load_fashion_mnist"]


def data_root() -> Path:
    """The folder named by ``NTKGP_DATA``; a clear error when it is unset or missing."""
    root = os.environ.get("NTKGP_DATA")
    if not root:
        raise RuntimeError("set NTKGP_DATA to the data folder (the one holding FashionMNIST/raw), "
                           "e.g. export NTKGP_DATA=../shared/data")
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"NTKGP_DATA={root} is not a folder")
    return path


def _read_idx(path: Path, header: int) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; NTKGP_DATA must hold FashionMNIST/raw/*.gz")
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), dtype=np.uint8, offset=header)


def load_fashion_mnist(train: bool) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST from the gzipped idx files: images (N, 1, 28, 28) float in [0, 1], labels (N,) int64."""
    raw = data_root() / "FashionMNIST" / "raw"
    split = "train" if train else "t10k"
    images = _read_idx(raw / f"{split}-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    labels = _read_idx(raw / f"{split}-labels-idx1-ubyte.gz", 8)
    return torch.from_numpy(images.astype(np.float32) / 255.0), torch.from_numpy(labels.astype(np.int64))
