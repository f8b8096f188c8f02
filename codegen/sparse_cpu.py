"""The ``sparse_cpu`` backend: unstructured sparse linear layers as C++ specialised per weight.

``build_sparse_linear`` packs the kept weights once into compact tables
(``sparta.kernels.sparse_layout``: per k block and row, the values and the byte offsets of their
inputs in a transposed panel of x), renders ``kernels/sparse_linear.cpp`` specialised to the
shapes, blocking, ISA, bias and activation, compiles it through the one kernel cache (the same
build machinery as ``nm_cpu``) and runs it as the ``sparta::sparse_linear`` custom op. The
pruned weights are never read or multiplied: the work is proportional to the kept weights.
Loops and measurements: docs/sparse_cpu.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from sparta.codegen import cpu_ops
from sparta.codegen.cache import dump_source
from sparta.codegen.nm_cpu import ISAS, available, compile_source, detect_isa, kernel_text
from sparta.codegen.op_call import OpCall
from sparta.errors import BackendError
from sparta.kernels.epilogue import CPU_ACTIVATIONS as ACTIVATIONS
from sparta.kernels.epilogue import cpu_code
from sparta.kernels.sparse_layout import SparsePacked, check_mask, k_blocking, pack_sparse

# The slice of a transposed x panel that one k block reads (k_block * panel tokens * 4 bytes):
# SLICE_BYTES_AT_1 / density, within [SLICE_MIN, SLICE_MAX]. Dense-ish rows want the slice in
# L1 (24 KB); sparse rows want few, long row segments (each costs a spill of the accumulators),
# and read the slice from L2 (one thread, interleaved, busy host: at 10% kept a 96 KB slice ran
# 1.2-1.6x faster than a 24 KB one, at 25% 24-48 KB were best; docs/sparse_cpu.md).
SLICE_BYTES_AT_1 = 12 * 1024
SLICE_MIN, SLICE_MAX = 24 * 1024, 128 * 1024


@dataclass(frozen=True)
class SparseConfig:
    vl: int  # floats per vector
    tv: int  # token vectors per panel (panel = tv * vl tokens)


# Accumulators: U * V = 8 chains of one row (kernels/sparse_linear.cpp), the inputs read from L1.
SPARSE_CONFIGS: dict[str, SparseConfig] = {
    "avx512": SparseConfig(16, 4),
    "avx2": SparseConfig(8, 4),
    "scalar": SparseConfig(1, 8),
}


def blocking(
    in_features: int, isa: str, density: float = 1.0, k_block: int | None = None
) -> tuple[int, int, int]:
    """(panel tokens TT, inputs per k block KB, k blocks NB) for ``isa`` and the fraction of
    weights kept (``density``); ``k_block`` forces KB (rounded to a multiple of 8)."""
    cfg = SPARSE_CONFIGS[isa]
    tt = cfg.tv * cfg.vl
    slice_bytes = min(SLICE_MAX, max(SLICE_MIN, SLICE_BYTES_AT_1 / max(density, 1e-3)))
    most = k_block if k_block is not None else int(slice_bytes) // (tt * 4)
    most = min(most, 65536 * 2 // tt)
    kb, nb = k_blocking(in_features, most)
    return tt, kb, nb


def render(
    out_features: int,
    in_features: int,
    isa: str,
    has_bias: bool,
    activation: str | None,
    density: float = 1.0,
    k_block: int | None = None,
) -> str:
    """The C++ source of one kernel: a block of constants followed by the template."""
    cfg = SPARSE_CONFIGS[isa]
    _, kb, nb = blocking(in_features, isa, density, k_block)
    consts = {
        "SP_N": out_features,
        "SP_K": in_features,
        "SP_KB": kb,
        "SP_NB": nb,
        "SP_VL": cfg.vl,
        "SP_TV": cfg.tv,
        "SP_HAS_BIAS": int(has_bias),
        "SP_ACT": cpu_code(activation),
    }
    head = "".join(f"#define {k} {v}\n" for k, v in consts.items())
    return f"// isa: {isa}, unstructured, activation: {activation}\n{head}{_template()}"


@functools.lru_cache(maxsize=1)
def _template() -> str:
    return kernel_text("sparse_linear.cpp")


class SparseLinear(torch.nn.Module):
    """``act(x @ (W*mask).T + b)`` through a compiled unstructured kernel (the
    ``sparta::sparse_linear`` op); built by ``build_sparse_linear``.

    ``forward`` takes float32 CPU inputs (..., in_features) and returns (..., out_features).
    """

    def __init__(
        self,
        packed: SparsePacked,
        bias: torch.Tensor | None,
        activation: str | None,
        isa: str,
        source: str,
        key: str,
        lib_path: Path,
    ) -> None:
        super().__init__()
        self.isa, self.activation = isa, activation
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.nnz = packed.nnz
        self.source, self.key, self.lib_path = source, key, lib_path
        self.register_buffer("vals", packed.vals)
        self.register_buffer("offs", packed.offs)
        self.register_buffer("rowptr", packed.rowptr)
        self.register_buffer("rowtot", packed.rowtot)
        self.register_buffer("bias", bias)
        cpu_ops.load_library(key, lib_path, "sparse_cpu")

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"density={self.density:.3f}, isa={self.isa}, activation={self.activation}, "
            f"key={self.key}"
        )

    def op_call(self) -> OpCall:
        """How the emitted graph calls this kernel (``op_call.py``)."""
        tables = (
            ("vals", self.vals),
            ("offs", self.offs),
            ("rowptr", self.rowptr),
            ("rowtot", self.rowtot),
            ("bias", self.bias),
        )
        static = (
            ("lib", self.key),
            ("in_features", self.in_features),
            ("out_features", self.out_features),
        )
        return OpCall(cpu_ops.SPARSE_LINEAR, tables, static)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op_call()(x)


def build_sparse_linear(
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    isa: str | None = None,
    node: str = "",
    k_block: int | None = None,
    tokens: int | None = None,
) -> SparseLinear:
    """A module computing ``act(x @ (weight*mask).T + bias)`` reading only the kept weights.

    ``weight`` (N, K) float, ``mask`` (N, K) bool (True = kept; any pattern, any density),
    ``bias`` (N,) or None, ``activation`` one of None, "relu", "gelu", "gelu_tanh".
    ``isa`` None picks the best for this CPU; "avx512"/"avx2"/"scalar" force a path.
    ``k_block`` overrides the inputs per k block (tuning); ``tokens`` (the caller's token count)
    is accepted for the planner's uniform call and does not change the kernel.
    Raises BackendError when no compiler is found, the ISA is absent, or the shapes disagree.
    """
    del tokens  # one kernel serves every token count
    if activation not in ACTIVATIONS:
        raise BackendError(f"activation must be one of {ACTIVATIONS}, got {activation!r}.")
    check_mask(weight, mask)
    isa = isa or detect_isa()
    if isa not in ISAS:
        raise BackendError(f"isa must be one of {ISAS} or None, got {isa!r}.")
    if isa != "scalar" and ISAS.index(isa) < ISAS.index(detect_isa()):
        raise BackendError(
            f"this CPU lacks {isa} (best available: {detect_isa()}); pass isa=None to pick it."
        )
    if not available():
        compile_source("", isa, "sparse_cpu")  # raises the no-compiler BackendError
    out_features, in_features = weight.shape
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise BackendError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}.")
    density = float(mask.sum()) / max(1, mask.numel())
    tt, kb, _ = blocking(in_features, isa, density, k_block)
    packed = pack_sparse(weight, mask, kb, tt)
    source = render(out_features, in_features, isa, bias is not None, activation, density, k_block)
    lib_path, key = compile_source(source, isa, "sparse_cpu")
    dump_source(
        source,
        node=node or "sparse_linear",
        pattern=f"unstructured {density:.3f}",
        key=key,
        language="c++",
    )
    b = None if bias is None else bias.detach().to("cpu", torch.float32).contiguous().clone()
    return SparseLinear(packed, b, activation, isa, source, key, lib_path)
