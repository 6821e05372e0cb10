"""Layer 3: the GPyTorch face — JacobianKernel, the network as a prior mean, the solver choice, and exact NTK-GP
inference in function or parameter space."""

from .jacobian_kernel import JacobianKernel
from .mean import NetworkMean
from .ntk_gp import NTKGP, Prediction
from .solver import Solver

__all__ = ["JacobianKernel", "NTKGP", "NetworkMean", "Prediction", "Solver"]
