"""Pieces shared by the Triton kernel templates: dtype names and fused epilogues (``epilogue.py``).

Templates are plain Python format strings; ``codegen/triton_gen.py`` renders them with the
constants of one mask (tile sizes, K, dtype, epilogue) and loads the result as a module.
"""

from __future__ import annotations

import re

import torch

TL_DTYPE = {torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16", torch.float32: "tl.float32"}

HEADER = "import triton\nimport triton.language as tl\n\n"


def interpreter_safe(source: str, dtype: torch.dtype) -> str:
    """Triton's CPU interpreter mis-evaluates bf16 ``tl.dot``: feed it the (exact) fp32 upcast.

    Only applied when kernels run in the interpreter; GPU sources keep bf16 tensor-core dots.
    """
    if dtype != torch.bfloat16:
        return source
    upcast = r"tl.dot(\1.to(tl.float32), \2.to(tl.float32), \3)"
    return re.sub(r"tl\.dot\((\w+), (\w+), (acc\w*)\)", upcast, source)
