"""Propagation rules, one module per op family, registered into sparta.registry on import."""

from . import (
    attention,
    conv,
    elementwise,
    factory,
    index,
    linear,
    norm,
    recurrent,
    reduce,
    shape,
)

__all__ = [
    "attention",
    "conv",
    "elementwise",
    "factory",
    "index",
    "linear",
    "norm",
    "recurrent",
    "reduce",
    "shape",
]
