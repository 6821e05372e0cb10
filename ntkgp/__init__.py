"""ntkgp: Gaussian processes from pretrained PyTorch networks through their finite neural tangent kernel."""

import os
import warnings
from importlib.metadata import PackageNotFoundError, version

try:  # the one version is pyproject.toml's
    __version__ = version("ntkgp")
except PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0+unknown"

with warnings.catch_warnings():
    # torch 2.14 deprecates torch.jit.script, which linear_operator calls at import and torch's forward-mode AD at the
    # first JVP of a process (it loads its JVP decompositions then, when PYTORCH_JIT is on): both are loaded here,
    # once, with the warning silenced, so that no call of ours prints it
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)
    import gpytorch  # noqa: F401
    import linear_operator  # noqa: F401

    if os.environ.get("PYTORCH_JIT", "1") == "1" and __debug__:  # torch.autograd.forward_ad's own condition
        import torch._decomp.decompositions_for_jvp  # noqa: F401

from .functional import FunctionalNetwork
from .gp import NTKGP, JacobianKernel, LayerScaledNTKGP, NetworkMean, Prediction, Solver
from .iterative import (
    DampedGaussNewton,
    FixedPeriod,
    IterativeLinearisation,
    KernelDistanceThreshold,
    LossPlateau,
    Relinearisation,
    gauss_newton_step,
    kernel_distance,
)
from .lqf import LQF, KFACPreconditioner, LeakyReLU6, SqrtCovariancePooling, leaky_relu
from .operators import (
    FisherOperator,
    GramOperator,
    LayerKernel,
    NTKOperator,
    fisher_operator,
    gram_operator,
    ntk_operator,
)
from .posteriors import SVI, Laplace, PosteriorCovariance
from .progress import show_progress

__all__ = [
    "DampedGaussNewton",
    "FisherOperator",
    "FixedPeriod",
    "FunctionalNetwork",
    "GramOperator",
    "IterativeLinearisation",
    "JacobianKernel",
    "KFACPreconditioner",
    "KernelDistanceThreshold",
    "LQF",
    "Laplace",
    "LayerKernel",
    "LayerScaledNTKGP",
    "LeakyReLU6",
    "LossPlateau",
    "NTKGP",
    "NTKOperator",
    "NetworkMean",
    "PosteriorCovariance",
    "Prediction",
    "Relinearisation",
    "SVI",
    "Solver",
    "SqrtCovariancePooling",
    "fisher_operator",
    "gauss_newton_step",
    "gram_operator",
    "kernel_distance",
    "leaky_relu",
    "ntk_operator",
    "show_progress",
]
