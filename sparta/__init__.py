"""SparTA-py: a graph-level sparsity compiler for PyTorch.

report = sparta.propagate(model, attrs, example_inputs)
compiled = sparta.compile(model, attrs, example_inputs)
"""

from . import sparsifiers
from .compile import CompiledModel, compile
from .errors import (
    AttrError,
    BackendError,
    BuildTimeout,
    InputError,
    MissingRuleError,
    PlanError,
    SpartaError,
    TraceError,
    TrainModeError,
)
from .measure import Measurement, measure
from .propagate import propagate
from .reference import masked_model
from .registry import Call, Refined, refine, register_rule, unregister_rule
from .report import Report
from .saved import load
from .soundness import check_soundness
from .sparsify import masks_from, sparsify
from .tesa import Pattern, TeSA

__all__ = [
    "AttrError",
    "BackendError",
    "BuildTimeout",
    "Call",
    "CompiledModel",
    "InputError",
    "Measurement",
    "MissingRuleError",
    "Pattern",
    "PlanError",
    "Refined",
    "Report",
    "SpartaError",
    "TeSA",
    "TraceError",
    "TrainModeError",
    "check_soundness",
    "masked_model",
    "load",
    "masks_from",
    "measure",
    "sparsifiers",
    "sparsify",
    "compile",
    "propagate",
    "refine",
    "register_rule",
    "unregister_rule",
]
__version__ = "0.1.0"
