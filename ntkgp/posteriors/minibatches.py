"""Training data for the posteriors and trainers that take minibatches: checked (x, targets, f(x; θ0)) batches
from tensors or a DataLoader, reshuffled on every pass."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ..functional import FunctionalNetwork
from ..inputs import Inputs, Structure, cat, check_inputs, convert, length, loader_pair, structure
from ..validation import as_count, check_generator
from .linearised_model import prepare_data

__all__ = ["Minibatches"]


class Minibatches:
    """Minibatches (x (b inputs), targets, f(x; θ0) (b, C)) on the network's device, one pass per iteration.

    Inputs x are a tensor, a tuple of tensors or a mapping (:mod:`ntkgp.inputs`). Targets are checked for ``task``
    (regression (b, C) floats, classification (b,) labels, :func:`prepare_data`). With inputs x and targets y the
    targets are checked and f(x; θ0) computed once, and every pass is a fresh permutation from ``generator`` in
    batches of ``batch_size`` (default the full batch); a DataLoader of (x, y) batches is iterated as it is, each
    batch checked as it comes. ``like``: the structure the inputs must have (default: that of the first inputs
    seen). ``outputs``: f(x; θ0) (n, C) of the inputs when the caller has it already.
    """

    def __init__(
        self,
        network: FunctionalNetwork,
        task: str,
        x: Inputs | torch.utils.data.DataLoader,
        y: Tensor | None = None,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
        num_classes: int | None = None,
        like: Structure | None = None,
        outputs: Tensor | None = None,
    ):
        loader = isinstance(x, torch.utils.data.DataLoader)
        if not loader and y is None:
            raise ValueError("give train_y with the inputs train_x, or pass a DataLoader of (x, y) batches")
        if loader and y is not None:
            raise ValueError("train_y must be None when train_x is a DataLoader (its batches hold the targets)")
        self.network, self.task, self.num_classes = network, task, num_classes
        self.batch_size = None if batch_size is None else as_count(batch_size, "batch_size")
        self.generator = check_generator(generator)
        self.structure = like
        self.loader = x if isinstance(x, torch.utils.data.DataLoader) else None
        if isinstance(x, torch.utils.data.DataLoader):
            self.num_data = len(x.dataset)  # type: ignore[arg-type]  # a DataLoader over a sized dataset
        else:
            assert y is not None  # refused above for inputs
            x = self._checked(x, "train_x")
            y = y.to(network.device) if isinstance(y, Tensor) else y  # anything else: prepare_data says what is wrong
            self.x, self.targets = x, prepare_data(task, network, x, y, num_classes)[0]
            self.outputs = network.outputs(x, "train_x") if outputs is None else outputs
            self.num_data = length(x)

    def _checked(self, x: Inputs, name: str) -> Inputs:
        """x checked and moved to the network's device; the first inputs fix the structure, later ones must share it."""
        net = self.network
        x = convert(check_inputs(x, net.dtype, name, like=self.structure), net.device)
        if self.structure is None:
            self.structure = structure(x)
        return x

    def __iter__(self) -> Iterator[tuple[Inputs, Tensor, Tensor]]:
        if self.loader is None:
            n = self.num_data
            size = n if self.batch_size is None else self.batch_size
            order = torch.randperm(n, generator=self.generator, device="cpu").to(self.network.device)
            for i in range(0, n, size):
                batch = order[i : i + size]
                yield self.network.take(self.x, batch), self.targets[batch], self.outputs[batch]
            return
        net = self.network
        for batch in self.loader:
            x, y = loader_pair(batch)
            x = self._checked(x, "the DataLoader's x")
            y = y.to(net.device) if isinstance(y, Tensor) else y
            targets = prepare_data(self.task, net, x, y, self.num_classes)[0]
            yield x, targets, net.outputs(x, "train_x")  # outside no_grad: a caller's step may need autograd

    def tensors(self) -> tuple[Inputs, Tensor, Tensor]:
        """All inputs (n), checked targets and f(x; θ0) (n, C), concatenated (one pass over a DataLoader)."""
        if self.loader is None:
            return self.x, self.targets, self.outputs
        xs, ys, fs = zip(*self)
        return cat(xs), torch.cat(ys), torch.cat(fs)
