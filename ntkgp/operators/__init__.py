"""Layer 2: lazy LinearOperators on the functional layer — the NTK (n·C × n'·C), the Gram JᵀJ and the Fisher
JᵀHJ (p × p). None of them holds a Jacobian of the data set."""

from .fisher_operator import FisherOperator, fisher_operator
from .gram_operator import GramOperator, gram_operator
from .layer_kernel import LayerKernel
from .network_operator import NetworkOperator
from .ntk_operator import NTKOperator, ntk_operator

__all__ = [
    "FisherOperator",
    "GramOperator",
    "LayerKernel",
    "NTKOperator",
    "NetworkOperator",
    "fisher_operator",
    "gram_operator",
    "ntk_operator",
]
