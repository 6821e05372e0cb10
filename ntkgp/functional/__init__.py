"""The functional layer: a network as a pure function of a flat parameter vector θ, and its checked Jacobian
products. :class:`FunctionalNetwork` (:mod:`.network`) is the one class the layers above use."""

from .checked_batching import map_blocks, relative_difference
from .network import FunctionalNetwork, as_functional_network
from .network_output import IntegerOutputsError
from .parameters import select_parameters

__all__ = [
    "FunctionalNetwork",
    "IntegerOutputsError",
    "as_functional_network",
    "map_blocks",
    "relative_difference",
    "select_parameters",
]
