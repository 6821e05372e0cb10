"""The network as a function of its inputs and θ: f(x; θ) (n, C), through the frozen prefix's cached output.

The network is called as ``model(x)``, ``model(*x)`` or ``model(**x)`` by the kind of the inputs
(:mod:`ntkgp.inputs`), and its return value reduced to f (:mod:`~ntkgp.functional.network_output`), flattened to
(n, C).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..inputs import Inputs, check_inputs, describe, inputs_at, leaves, length, magnitude
from ..validation import check_finite, in_transform
from .checked_batching import BATCHING_ERRORS
from .network_output import IntegerOutputsError, OutputSelector, check_floating, select_output
from .prefix_cache import PrefixCache

__all__ = ["NetworkFunction"]


class NetworkFunction(PrefixCache):
    """f(x; θ) (n, C) of the snapshot; ``output`` picks f from what the network returns (default: the tensor itself,
    or a ``ModelOutput``'s logits)."""

    output: OutputSelector | None

    def __call__(self, x: Inputs, theta: Tensor | None = None) -> Tensor:
        """Network output (n, C) at ``theta`` (default theta0) for inputs x (n inputs, :mod:`ntkgp.inputs`)."""
        self._check_state()
        if not in_transform():
            x = check_inputs(x, self.dtype, "x", self.device)
        return self._head(self.features(x), x, theta)

    def _head(self, h: Inputs, x: Inputs, theta: Tensor | None = None) -> Tensor:
        """Output (n, C) for the frozen prefix's output h of inputs x (the rest of the network)."""
        theta = self.theta0 if theta is None else theta
        part = self.split.suffix if self.split is not None and self.splits(x) else self.module
        out = select_output(self._run(part, theta, h), self.output)
        n = length(x)
        if out.dim() == 0 or out.shape[0] != n:
            raise ValueError(
                f"the network must map n inputs to outputs (n, ...); for inputs {describe(x)} its f has shape "
                f"{tuple(out.shape)}: return one row per input (pool over tokens or take the last one), or say which "
                "output is f with FunctionalNetwork(model, output=...)"
            )
        return check_floating(out).reshape(n, -1)

    def _f(self, x: Inputs) -> Callable[[Tensor], Tensor]:
        """θ -> f(x; θ) (n, C), the frozen prefix evaluated (or found cached) now, once."""
        self._check_state()
        h = self.features(x)
        return lambda theta: self._head(h, x, theta)

    def outputs(self, x: Inputs, name: str = "x") -> Tensor:
        """f(x; θ0) (n, C) without gradient, checked finite."""
        with torch.no_grad():
            out = self(x)
        return check_finite(
            out,
            f"the network's output at {name}",
            f"its inputs reach |{name}| = {magnitude(x):.3g}: rescale or normalise them",
        )

    def num_outputs(self, x: Inputs) -> int:
        """C, the network's output width, from one forward pass on the first input; the network's own error, if it
        fails, is raised as a ValueError (a TypeError for integer inputs) that describes the inputs."""
        self._check_state()
        first = slice(0, 1)
        try:
            with torch.no_grad():  # the prefix over all of x: cached, as the products will need it
                return self._head(inputs_at(self.features(x), first), inputs_at(x, first)).shape[-1]
        except (IntegerOutputsError, TypeError) as err:
            if isinstance(err, IntegerOutputsError) or "output=" in str(err):
                raise
            raise self._failure(x, err) from err
        except BATCHING_ERRORS as err:
            raise self._failure(x, err) from err

    def _failure(self, x: Inputs, err: Exception) -> Exception:
        """The error to raise when the network fails on inputs x: a TypeError when x holds integer tensors (the likely
        cause: features given as integers), else a ValueError; both describe x and quote the network's error."""
        integer = [t.dtype for t in leaves(x) if not t.is_floating_point()]
        shown = f"of shape {tuple(x.shape)}" if isinstance(x, Tensor) else describe(x)
        if integer:
            shown += f" with dtype {integer[0]}"
        message = (
            f"the network failed on inputs {shown} (is that what it expects, channels included, called as "
            f"model(x), model(*x) for a tuple or model(**x) for a mapping?): {str(err).splitlines()[0]}"
        )
        if not integer:
            return ValueError(message)
        return TypeError(
            f"{message}. Integer tensors reach the network as they are (token ids for an embedding); features "
            f"must be floating: convert them with x.to({self.dtype})"
        )
