"""SparTA-py: a graph-level sparsity compiler for PyTorch."""

from .errors import AttrError, MissingRuleError, SpartaError, TraceError
from .registry import Call, Refined, refine, register_rule, unregister_rule
from .tesa import Pattern, TeSA

__all__ = [
    "AttrError",
    "Call",
    "MissingRuleError",
    "Pattern",
    "Refined",
    "SpartaError",
    "TeSA",
    "TraceError",
    "refine",
    "register_rule",
    "unregister_rule",
]
__version__ = "0.1.0"
