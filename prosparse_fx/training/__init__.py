"""Training: the lambda schedules, the activation regularizer, and the loop the CLI runs."""

from .regularizer import ActivationRegularizer
from .schedule import ConstantSchedule, ProSparseSchedule

__all__ = ["ActivationRegularizer", "ConstantSchedule", "ProSparseSchedule"]
