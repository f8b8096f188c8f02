"""A gated MLP's gate and up projections as one block-sparse SwiGLU kernel.

``build_block_sparse_swiglu(wg, mg, bg, wu, mu, bu)`` returns a module computing
``silu(x @ (wg*mg).T + bg) * (x @ (wu*mu).T + bu)`` with ``kernels/triton_swiglu.py``: the
output rows are tiled once, on the union of the two masks (clustered as in
``triton_pack.plan_tiles``), and each weight lists its own chunks per tile. Tiles are chosen by
the same measured sweep as the linear kernel, cached per mask pair.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from sparta.errors import BackendError
from sparta.kernels import triton_swiglu

from . import triton_ops
from .cache import cache_key
from .op_call import OpCall
from .triton_gen import _check_target, _not_training
from .triton_load import device_name, inspect_source, interpreting, kernel_id
from .triton_pack import PackedLinear, TilePlan, chunk_pattern, mask_digest, pack_linear, plan_tiles
from .triton_tune import INTERPRETER_CONFIG, LinearConfig, time_ms, token_class, tuned_config


def split_plan(union: TilePlan, mask: torch.Tensor) -> TilePlan:
    """``union``'s tiling (rows, permutation) with the chunk lists of ``mask`` alone."""
    chunks = chunk_pattern(mask.to("cpu"), union.bk)
    rows = union.rows.view(union.n_tiles, union.bn)
    pad = int(rows.max()) + 1 - chunks.shape[0]
    if pad > 0:
        chunks = torch.cat([chunks, chunks.new_zeros(pad, chunks.shape[1])])
    return replace(union, tile_chunks=chunks[rows].any(dim=1))


class BlockSparseSwiGLU(torch.nn.Module):
    """silu(x @ Wg.T + bg) * (x @ Wu.T + bu) through one mask-specialised kernel."""

    def __init__(
        self,
        gate: PackedLinear,
        up: PackedLinear,
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
        self.tokens: int | None = None
        self.n_tiles = plan.n_tiles
        for name, packed in (("g", gate), ("u", up)):
            self.register_buffer(f"slabs_{name}", packed.slabs, persistent=False)
            self.register_buffer(f"tile_ptr_{name}", packed.tile_ptr, persistent=False)
            self.register_buffer(f"kidx_{name}", packed.kidx, persistent=False)
            self.register_buffer(f"bias_{name}", packed.bias, persistent=False)
        self.register_buffer("cols", gate.cols, persistent=False)
        dt = gate.slabs.dtype
        self.kernels = {
            swap: kernel_id(source, triton_swiglu.KERNEL_NAME + ("_t" if swap else ""), dt)
            for swap in (False, True)
        }

    def op_call(self, tokens: int | None = None) -> OpCall:
        tokens = tokens if tokens is not None else self.tokens
        swap, bm, warps, stages = self.config.launch(tokens if tokens is not None else 1 << 30)
        tables = tuple((f"{t}_{w}", getattr(self, f"{t}_{w}"))
                       for w in "gu" for t in ("slabs", "tile_ptr", "kidx"))  # fmt: skip
        tables += (("cols", self.cols), ("bias_g", self.bias_g), ("bias_u", self.bias_u))
        static = (("kernel", self.kernels[swap]), ("out_features", self.out_features),
                  ("block_m", bm), ("warps", warps), ("stages", stages))  # fmt: skip
        return OpCall(triton_ops.BLOCK_SPARSE_SWIGLU, tables, static)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, n = self.in_features, self.out_features
        if x.shape[-1] != k or x.dtype != self.slabs_g.dtype:
            raise BackendError(
                f"block-sparse SwiGLU expects (..., {k}) {self.slabs_g.dtype} input, got "
                f"{tuple(x.shape)} {x.dtype}."
            )
        _not_training(x, "the block-sparse SwiGLU")
        if x.numel() == 0:
            return x.new_empty((*x.shape[:-1], n))
        return self.op_call(x.numel() // k)(x)


def _make(wg, mg, bg, wu, mu, bu, union: TilePlan, config, *, key) -> BlockSparseSwiGLU:
    n, k = wg.shape
    has_bias = (bg is not None, bu is not None)
    source = triton_swiglu.render(
        bn=union.bn, bk=union.bk, k=k, dtype=wg.dtype, bias=has_bias, unit=union.unit
    )
    gate = pack_linear(wg, mg, bg, split_plan(union, mg))
    up = pack_linear(wu, mu, bu, split_plan(union, mu))
    return BlockSparseSwiGLU(gate, up, union, config, in_features=k, out_features=n,
                             source=source, key=key)  # fmt: skip


def build_block_sparse_swiglu(
    wg: torch.Tensor,
    mg: torch.Tensor,
    bg: torch.Tensor | None,
    wu: torch.Tensor,
    mu: torch.Tensor,
    bu: torch.Tensor | None,
    *,
    node: str = "",
    config: LinearConfig | None = None,
    tokens: int | None = None,
) -> BlockSparseSwiGLU:
    """A module computing ``silu(x @ (wg*mg).T + bg) * (x @ (wu*mu).T + bu)``.

    Both weights are (N, K) with bool masks of their shape; the biases (N,) or None. Raises
    BackendError for mismatched shapes or a device/dtype the Triton kernels cannot run on.
    """
    what = f"SwiGLU {node!r}" if node else "block-sparse SwiGLU"
    if wg.dim() != 2 or wg.shape != wu.shape or mg.shape != wg.shape or mu.shape != wu.shape:
        raise BackendError(
            f"{what}: needs two 2-D weights of one shape and bool masks of that shape, got "
            f"{tuple(wg.shape)}, {tuple(wu.shape)}, masks {tuple(mg.shape)}, {tuple(mu.shape)}."
        )
    for b in (bg, bu):
        if b is not None and b.shape != (wg.shape[0],):
            raise BackendError(f"{what}: biases must have shape ({wg.shape[0]},).")
    _check_target(wg.dtype, wg.device, what)
    n, k = wg.shape
    dev = device_name(wg.device)
    tune_m = token_class(tokens)
    key = cache_key("triton-swiglu", mask_digest(mg), mask_digest(mu), n, k, wg.dtype, dev,
                    bg is not None, bu is not None, tune_m)  # fmt: skip
    union = mg | mu
    if config is None:
        if wg.device.type == "cpu" or interpreting():
            config = INTERPRETER_CONFIG
        else:

            def timer_for():
                def timer(plan: TilePlan, m: int, launch) -> float:
                    cfg = LinearConfig.single(plan.bn, plan.bk, launch)
                    try:
                        mod = _make(wg, mg, bg, wu, mu, bu, plan, cfg, key="tuning")
                    except Exception:
                        return float("inf")
                    x = torch.randn(m, k, dtype=wg.dtype, device=wg.device)
                    return time_ms(lambda: mod(x))

                return timer

            config = tuned_config(
                union,
                mask_key=key,
                class_parts=("swiglu", n, k, wg.dtype, dev, bg is not None, bu is not None),
                timer_for=timer_for,
                tokens=tune_m,
            )
    plan = plan_tiles(union, config.bn, config.bk, cluster=config.cluster)
    module = _make(wg, mg, bg, wu, mu, bu, plan, config, key=key)
    module.tokens = tokens
    inspect_source(module.source, node=node, pattern=f"swiglu tiles={plan.n_tiles}", key=key)
    return module
