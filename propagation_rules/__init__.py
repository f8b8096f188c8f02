"""Propagation rules, one module per op family, registered into sparta.registry on import."""

from . import (
    activation,
    attention,
    conv,
    elementwise,
    factory,
    index,
    linear,
    norm,
    padding,
    recurrent,
    reduce,
    resample,
    scatter,
    shape,
    sort,
)

__all__ = [
    "activation",
    "attention",
    "conv",
    "elementwise",
    "factory",
    "index",
    "linear",
    "norm",
    "padding",
    "recurrent",
    "reduce",
    "resample",
    "scatter",
    "shape",
    "sort",
]
