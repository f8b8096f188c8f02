"""Triton backend: modules whose kernels are generated and specialised to one mask.

Public entry points (called by the planner):

- ``available(device)``
- ``build_block_sparse_linear(weight, mask, bias, activation, node=...)``
- ``build_sddmm(pattern, block, dtype=..., device=..., node=...)``
- ``build_sparse_input_matmul(pattern, block, dtype=..., device=..., node=...)``

All mask analysis and packing happens at build time; forward() only calls the kernel's
``torch.library`` op (``triton_ops``) on the precomputed tables, and ``op_call()`` gives the
emitted graph that same call. The modules are inference-only (no autograd).
"""

from __future__ import annotations

import torch

from sparta.errors import BackendError
from sparta.kernels import triton_bsmm
from sparta.kernels.epilogue import TRITON_ACTIVATIONS as ACTIVATIONS

from . import triton_ops
from .cache import cache_key, debug_level
from .op_call import OpCall
from .triton_attn import SDDMM, SparseInputMatmul
from .triton_load import available, device_name, inspect_source, interpreting, kernel_id
from .triton_pack import PackedLinear, TilePlan, mask_digest, pack_linear, plan_tiles
from .triton_tune import INTERPRETER_CONFIG, LinearConfig, time_ms, token_class, tuned_config

__all__ = [
    "LinearConfig",
    "available",
    "build_block_sparse_linear",
    "build_sddmm",
    "build_sparse_input_matmul",
]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_target(dtype: torch.dtype, device: torch.device, what: str) -> None:
    if dtype not in DTYPES:
        raise BackendError(f"{what}: the Triton kernels take fp16, bf16 or fp32, got {dtype}.")
    if not available(device):
        raise BackendError(
            f"{what}: the Triton backend cannot run on {device}: it needs triton and a CUDA "
            f"device, or a CPU device with TRITON_INTERPRET=1 set before triton is imported."
        )


def _describe(mask: torch.Tensor, extra: str) -> str:
    """Pattern text for the debug header (only computed when dumping)."""
    if debug_level() < 2:
        return extra
    from sparta.tesa import detect_pattern

    m = mask.to("cpu")
    return f"{detect_pattern(m)} density={float(m.float().mean()):.4f} {extra}"


def _not_training(x: torch.Tensor, what: str) -> None:
    if x.requires_grad and torch.is_grad_enabled():
        raise BackendError(
            f"{what} is inference-only (no autograd through the generated kernel), got an input "
            f"that requires grad. Call it under torch.no_grad() or use the dense module."
        )


class BlockSparseLinear(torch.nn.Module):
    """act(x @ (W * mask).T + b) through a kernel specialised to the mask."""

    def __init__(
        self,
        packed: PackedLinear,
        plan: TilePlan,
        config: LinearConfig,
        *,
        in_features: int,
        out_features: int,
        source: str,
        key: str,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.config, self.source, self.key = config, source, key
        self.tokens: int | None = None  # the token count the planner expects (set by the builder)
        self.n_tiles, self.n_slabs = plan.n_tiles, plan.n_slabs
        self.kept_fraction = plan.n_slabs * plan.bn * plan.bk / max(1, out_features * in_features)
        self.register_buffer("slabs", packed.slabs, persistent=False)
        self.register_buffer("tile_ptr", packed.tile_ptr, persistent=False)
        self.register_buffer("kidx", packed.kidx, persistent=False)
        self.register_buffer("cols", packed.cols, persistent=False)
        self.register_buffer("bias", packed.bias, persistent=False)
        dt = packed.slabs.dtype
        self.kernels = {
            swap: kernel_id(source, name, dt)
            for swap, name in (
                (False, triton_bsmm.KERNEL_NAME),
                (True, triton_bsmm.KERNEL_NAME + "_t"),
            )
        }

    def op_call(self, tokens: int | None = None) -> OpCall:
        """The kernel as the emitted graph calls it, launched as tuned for ``tokens`` rows of
        x (default: the count it was built for; any row count runs correctly either way)."""
        tokens = tokens if tokens is not None else self.tokens
        swap, bm, warps, stages = self.config.launch(tokens if tokens is not None else 1 << 30)
        tables = (("slabs", self.slabs), ("tile_ptr", self.tile_ptr), ("kidx", self.kidx),
                  ("cols", self.cols), ("bias", self.bias))  # fmt: skip
        static = (("kernel", self.kernels[swap]), ("out_features", self.out_features),
                  ("block_m", bm), ("warps", warps), ("stages", stages))  # fmt: skip
        return OpCall(triton_ops.BLOCK_SPARSE_LINEAR, tables, static)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, n = self.in_features, self.out_features
        if x.shape[-1] != k or x.dtype != self.slabs.dtype:
            raise BackendError(
                f"block-sparse linear expects (..., {k}) {self.slabs.dtype} input, got "
                f"{tuple(x.shape)} {x.dtype}."
            )
        _not_training(x, "the block-sparse linear")
        if x.numel() == 0:
            return x.new_empty((*x.shape[:-1], n))
        return self.op_call(x.numel() // k)(x)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"in={self.in_features}, out={self.out_features}, tile={c.bn}x{c.bk}, swap={c.swap}, "
            f"tiles={self.n_tiles}, slabs={self.n_slabs}, kept={self.kept_fraction:.3f}"
        )


def _linear_timer(weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None):
    """Timer for the tuning sweep: real kernels on random data of the target device."""

    def timer(plan: TilePlan, m: int, launch: tuple[bool, int, int, int]) -> float:
        cfg = LinearConfig.single(plan.bn, plan.bk, launch)
        mask = torch.ones_like(weight, dtype=torch.bool)  # plan fixes the structure
        try:
            mod = _make_linear(weight, mask, bias, activation, plan, cfg, key="tuning")
        except Exception:
            return float("inf")
        x = torch.randn(m, weight.shape[1], dtype=weight.dtype, device=weight.device)
        return time_ms(lambda: mod(x))

    return timer


def _make_linear(weight, mask, bias, activation, plan, config, *, key) -> BlockSparseLinear:
    n, k = weight.shape
    source = triton_bsmm.render(
        bn=plan.bn, bk=plan.bk, k=k, dtype=weight.dtype, has_bias=bias is not None,
        activation=activation, unit=plan.unit,
    )  # fmt: skip
    packed = pack_linear(weight, mask, bias, plan)
    return BlockSparseLinear(
        packed, plan, config, in_features=k, out_features=n, source=source, key=key
    )


def build_block_sparse_linear(
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    node: str = "",
    config: LinearConfig | None = None,
    tokens: int | None = None,
) -> torch.nn.Module:
    """A module computing act(x @ (weight * mask).T + bias) with a mask-specialised kernel.

    Any mask is covered exactly: the kernel skips only (BN x BK) slabs with no kept element;
    zeros inside kept slabs are stored. ``config`` overrides the measured tile choice;
    ``tokens`` (rows of x the caller expects) is the token count the tile sweep measures at
    (default: a large batch). Any token count runs correctly whatever was tuned for.
    """
    what = f"node {node!r}" if node else "block-sparse linear"
    if weight.dim() != 2 or mask.shape != weight.shape or mask.dtype != torch.bool:
        raise BackendError(
            f"{what}: needs a 2-D weight and a bool mask of the same shape, got weight "
            f"{tuple(weight.shape)} and mask {tuple(mask.shape)} {mask.dtype}."
        )
    if activation not in ACTIVATIONS:
        raise BackendError(f"{what}: activation must be one of {ACTIVATIONS}, got {activation!r}.")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise BackendError(f"{what}: bias must have shape ({weight.shape[0]},), got {bias.shape}.")
    _check_target(weight.dtype, weight.device, what)
    n, k = weight.shape
    dev = device_name(weight.device)
    digest = mask_digest(mask)
    tune_m = token_class(tokens)
    key = cache_key(
        "triton-linear", digest, n, k, weight.dtype, dev, bias is not None, activation, tune_m
    )
    if config is None:
        if weight.device.type == "cpu" or interpreting():
            config = INTERPRETER_CONFIG
        else:
            config = tuned_config(
                mask,
                mask_key=key,
                class_parts=(n, k, weight.dtype, dev, bias is not None, activation),
                timer_for=lambda: _linear_timer(weight, bias, activation),
                tokens=tune_m,
            )
    plan = plan_tiles(mask, config.bn, config.bk, cluster=config.cluster)
    module = _make_linear(weight, mask, bias, activation, plan, config, key=key)
    module.tokens = tokens
    inspect_source(module.source, node=node, pattern=_describe(mask, module.extra_repr()), key=key)
    return module


def build_sddmm(
    pattern: torch.Tensor, block: int, *, dtype: torch.dtype, device, node: str = ""
) -> torch.nn.Module:
    """forward(a, b) -> a @ b computed only in the kept (block x block) blocks of ``pattern``;
    elements of pruned blocks are written as 0."""
    what = f"SDDMM {node!r}"
    _validate_pattern(pattern, block, what)
    _check_target(dtype, torch.device(device), what)
    return SDDMM(pattern, block, dtype, torch.device(device), node=node)


def build_sparse_input_matmul(
    pattern: torch.Tensor, block: int, *, dtype: torch.dtype, device, node: str = ""
) -> torch.nn.Module:
    """forward(p, v) -> p @ v reading only the blocks of ``p`` that hold kept elements
    (``p`` must be zero outside ``pattern``)."""
    what = f"sparse-input matmul {node!r}"
    _validate_pattern(pattern, block, what)
    _check_target(dtype, torch.device(device), what)
    return SparseInputMatmul(pattern, block, dtype, torch.device(device), node=node)


def _validate_pattern(pattern: torch.Tensor, block: int, what: str) -> None:
    if not isinstance(pattern, torch.Tensor) or pattern.dim() != 2 or pattern.dtype != torch.bool:
        raise BackendError(f"{what}: pattern must be a 2-D bool tensor, got {pattern!r:.80}.")
    if int(block) < 1:
        raise BackendError(f"{what}: block must be a positive int, got {block}.")
