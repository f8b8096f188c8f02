"""Pieces shared by the Triton kernel templates: dtype names and fused epilogue snippets.

Templates are plain Python format strings; ``codegen/triton_gen.py`` renders them with the
constants of one mask (tile sizes, K, dtype, epilogue) and loads the result as a module.
"""

from __future__ import annotations

import re

import torch

from . import reference

ACTIVATIONS = (*reference.ACTIVATIONS, "silu")  # the epilogues the Triton kernels fuse

TL_DTYPE = {torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16", torch.float32: "tl.float32"}

# Epilogue code applied to the fp32 accumulator ``acc`` (indentation added by the renderer).
_ACT_SRC = {
    None: "",
    "relu": "acc = tl.maximum(acc, 0.0)",
    "gelu": "acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))",
    # tanh(u) = 1 - 2 / (exp(2u) + 1); 2u is clamped at 80 (tanh is 1 there in any dtype).
    "gelu_tanh": (
        "u = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)\n"
        "acc = 0.5 * acc * (2.0 - 2.0 / (tl.exp(tl.minimum(2.0 * u, 80.0)) + 1.0))"
    ),
    # silu(x) = x * sigmoid(x); exp(-x) is clamped at 80 (sigmoid is 0 there in any dtype).
    "silu": "acc = acc / (1.0 + tl.exp(tl.minimum(-acc, 80.0)))",
}

HEADER = "import triton\nimport triton.language as tl\n\n"


def activation_src(activation: str | None, indent: int) -> str:
    """The epilogue lines of ``activation``, indented for the kernel body."""
    if activation not in _ACT_SRC:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    pad = " " * indent
    return "".join(f"{pad}{line}\n" for line in _ACT_SRC[activation].splitlines())


def interpreter_safe(source: str, dtype: torch.dtype) -> str:
    """Triton's CPU interpreter mis-evaluates bf16 ``tl.dot``: feed it the (exact) fp32 upcast.

    Only applied when kernels run in the interpreter; GPU sources keep bf16 tensor-core dots.
    """
    if dtype != torch.bfloat16:
        return source
    upcast = r"tl.dot(\1.to(tl.float32), \2.to(tl.float32), \3)"
    return re.sub(r"tl\.dot\((\w+), (\w+), (acc\w*)\)", upcast, source)
