"""Iterative linearisation and damped Gauss-Newton: training a network through its linearisations."""

from .gauss_newton import DampedGaussNewton, gauss_newton_step
from .iterative_linearisation import History, IterativeLinearisation
from .kernel_distance import kernel_distance
from .policies import FixedPeriod, KernelDistanceThreshold, LossPlateau, Relinearisation

__all__ = [
    "DampedGaussNewton",
    "FixedPeriod",
    "History",
    "IterativeLinearisation",
    "KernelDistanceThreshold",
    "LossPlateau",
    "Relinearisation",
    "gauss_newton_step",
    "kernel_distance",
]
