"""Layer 4: LQF, linear quadratic fine-tuning as the MAP of the NTK-GP — the trainer, K-FAC preconditioning,
Leaky-ReLU networks, exact influence and leave-one-out, online updates, square-root covariance pooling."""

from .activations import LeakyReLU6, leaky_relu
from .kfac import KFACPreconditioner
from .lqf import LQF
from .pooling import SqrtCovariancePooling

__all__ = ["KFACPreconditioner", "LQF", "LeakyReLU6", "SqrtCovariancePooling", "leaky_relu"]
