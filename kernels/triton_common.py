"""Pieces shared by the Triton kernel templates: dtype names and fused epilogues (``epilogue.py``).

Templates are plain Python format strings; ``codegen/triton_gen.py`` renders them with the
constants of one mask (tile sizes, K, dtype, epilogue) and loads the result as a module.
"""

from __future__ import annotations

import re

import torch

TL_DTYPE = {torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16", torch.float32: "tl.float32"}

HEADER = "import triton\nimport triton.language as tl\n\n"
_DOT = re.compile(r"tl\.dot\((\w+), (\w+), (acc\w*)\)")  # every template's accumulating dot


def interpreter_safe(source: str, dtype: torch.dtype) -> str:
    """Triton's CPU interpreter mis-evaluates bf16 ``tl.dot``: feed it the (exact) fp32 upcast.

    Only applied when kernels run in the interpreter; GPU sources keep bf16 tensor-core dots.
    """
    if dtype != torch.bfloat16:
        return source
    return _DOT.sub(r"tl.dot(\1.to(tl.float32), \2.to(tl.float32), \3)", source)


def fp32_precision(source: str, dtype: torch.dtype) -> str:
    """fp32 ``tl.dot``s at the precision PyTorch's own fp32 matmuls use: IEEE fp32 when
    ``torch.get_float32_matmul_precision()`` is ``"highest"`` (PyTorch's default), TF32
    otherwise; Triton's default would be TF32 always, a silent change of precision against the
    dense model."""
    if dtype != torch.float32:
        return source
    precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return _DOT.sub(rf'tl.dot(\1, \2, \3, input_precision="{precision}")', source)
