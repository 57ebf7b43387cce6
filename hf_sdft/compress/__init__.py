"""Degradations: quantization (optimum-quanto) and pruning, behind one small registry."""

from .base import DEGRADATIONS, Degradation, get_degradation, register_degradation

__all__ = ["DEGRADATIONS", "Degradation", "get_degradation", "register_degradation"]
