"""Which output of the network is f: a tensor as it is, a HuggingFace ``ModelOutput``'s logits, or the user's choice.

Networks return a tensor (n, ...) — flattened to (n, C) — or something that holds it: HuggingFace models return a
``ModelOutput`` whose ``logits`` are f (found without a wrapper, as is a mapping with a ``"logits"`` entry); for
anything else (a tuple, an LSTM's ``(output, (h, c))``) ``FunctionalNetwork(model, output=...)`` takes a function
from the network's return value to the tensor f, e.g. ``output=lambda out: out[0][:, -1]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

__all__ = ["IntegerOutputsError", "OutputSelector", "check_floating", "select_output"]

#: a function from the network's return value to f (a tensor (n, ...))
OutputSelector = Callable[[Any], Tensor]


class IntegerOutputsError(TypeError):
    """The network's outputs are not floating (raised as it is, not as a failure on the inputs' shape)."""


def select_output(out: Any, output: OutputSelector | None) -> Tensor:
    """f from the network's return value ``out``: ``output(out)`` when given, else ``out`` itself if it is a tensor,
    else its ``logits`` (HuggingFace ``ModelOutput``, or a mapping's ``"logits"`` entry)."""
    if output is not None:
        f = output(out)
        if not isinstance(f, Tensor):
            raise TypeError(f"output= must return a tensor (n, ...), the network's f; it returned {type(f).__name__}")
        return f
    if isinstance(out, Tensor):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(
        f"the network returned a {type(out).__name__}, not a tensor, and it holds no 'logits': say which output is "
        "f with FunctionalNetwork(model, output=lambda out: ...) (e.g. out[0] for a tuple) and pass that "
        "FunctionalNetwork wherever the model goes"
    )


def check_floating(f: Tensor) -> Tensor:
    """Raise an :class:`IntegerOutputsError` unless the outputs f are floating."""
    if not f.is_floating_point():
        raise IntegerOutputsError(
            f"the network returned {f.dtype} outputs: ntkgp linearises floating outputs "
            "(logits, regression values), which an integer output (argmax, labels) has no "
            "derivative of; return the floating outputs"
        )
    return f
