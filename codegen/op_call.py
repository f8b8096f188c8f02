"""How the emitted graph calls a generated kernel: one registered ``torch.library`` op.

Every generated kernel (Triton on GPU, C++ on CPU) is reached through an op registered with
``torch.library`` (``triton_op`` for Triton kernels, ``custom_op`` for C++ ones) that has a fake
(meta) implementation, so ``torch.export``, Dynamo and Inductor see it as one node with known
output shapes and no graph break. The calling convention is fixed:

    op(*activations, *tables, **static)

- ``activations``: the tensors flowing through the graph (``x`` of a linear, ``a, b`` of a
  matmul), at any batch size;
- ``tables``: the kernel's packed data (weight slabs, index tables, bias), plain tensors that
  the compiled module registers as buffers, so they move with ``.to()`` and are guarded by
  nothing but their (fixed) shapes;
- ``static``: the kernel's configuration as ``int``/``float``/``str``/``bool`` arguments
  (which generated source, tile and launch sizes, output width) — constants of the graph.

A kernel module built by a backend exposes ``op_call() -> OpCall``; calling the module is the
same as calling its ``OpCall`` on the activations.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

Static = int | float | str | bool


class OpCall(NamedTuple):
    """One generated kernel as the emitted graph calls it (see the module docstring). A named
    tuple, not a dataclass: a kernel module's ``forward`` builds one per call, and Dynamo
    (torch 2.11) fails on a frozen dataclass built inside a traced ``forward``."""

    op: torch._ops.OpOverload
    tables: tuple[tuple[str, torch.Tensor | None], ...]  # (name, tensor or None if absent)
    static: tuple[tuple[str, Static], ...]

    def __call__(self, *activations: torch.Tensor) -> torch.Tensor:
        return self.op(*activations, *(t for _, t in self.tables), **dict(self.static))
