"""Layer 3: the GPyTorch face — JacobianKernel, the network as a prior mean, the solver choice, and exact NTK-GP
inference in function or parameter space."""

from .jacobian_kernel import JacobianKernel
from .layer_scaled import LayerScaledNTKGP
from .mean import NetworkMean
from .ntk_gp import NTKGP, Prediction
from .solver import Solver

__all__ = ["JacobianKernel", "LayerScaledNTKGP", "NTKGP", "NetworkMean", "Prediction", "Solver"]
