"""Quantization: calibration data, recipes, INT8 static QDQ, INT4/INT8 weight-only, accuracy gates."""

from .calib import CalibrationSet, CalibrationSettings, build_calibration
from .gates import DEFAULT_GATES, Gate, QuantizationGateError, check_gates
from .recipe import QuantRecipe, Rule, default_recipe

__all__ = ["CalibrationSet", "CalibrationSettings", "build_calibration", "DEFAULT_GATES", "Gate",
           "QuantizationGateError", "check_gates", "QuantRecipe", "Rule", "default_recipe"]
