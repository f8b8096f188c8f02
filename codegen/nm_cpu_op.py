"""The nm_cpu kernel as a ``torch.library`` custom op (calling convention: ``op_call.py``).

``sparta::nm_linear(x, vals, idx, bias, lib, out_features)``: ``x`` (..., K) float32 on the
CPU; ``vals``/``idx``/``bias`` the packed tables of ``NMLinear`` (plain tensors, buffers of the
compiled module); ``lib`` the path of the compiled kernel library in the kernel cache. The fake
implementation gives the output shape, so Dynamo and Inductor see one opaque node.

``NMLinearOp`` wraps a built ``NMLinear`` so that the planner times, and the emitted graph
calls, this op.
"""

from __future__ import annotations

import ctypes
import functools
import threading

import torch

from sparta.errors import BackendError

from .nm_cpu import NMLinear
from .op_call import OpCall


class _Kernel:
    """One loaded kernel library and its scratch buffers (shared by calls, under a lock)."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        if lib.nm_abi_version() != 3:
            raise BackendError(f"the kernel library {path} has an unexpected ABI version")
        p, i64, i32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
        lib.nm_xt_floats.argtypes, lib.nm_xt_floats.restype = [i64], i64
        lib.nm_ybuf_floats.argtypes, lib.nm_ybuf_floats.restype = [], i64
        lib.nm_forward.argtypes = [p, i64, p, p, p, p, p, p, i32]
        lib.nm_forward.restype = i32
        self.lib = lib
        self.ybuf = torch.empty(max(1, lib.nm_ybuf_floats()), dtype=torch.float32)
        self.xt = torch.empty(0, dtype=torch.float32)
        self.xt_tokens = 0
        self.lock = threading.Lock()


@functools.cache
def _kernel(path: str) -> _Kernel:
    return _Kernel(path)


@torch.library.custom_op("sparta::nm_linear", mutates_args=())
def nm_linear(
    x: torch.Tensor,
    vals: torch.Tensor,
    idx: torch.Tensor,
    bias: torch.Tensor | None,
    lib: str,
    out_features: int,
) -> torch.Tensor:
    """``act(x @ (W*mask).T + b)`` through the compiled n:m kernel ``lib``."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    tokens = x2.shape[0]
    y = torch.empty(tokens, out_features, dtype=torch.float32)
    if tokens:
        kern = _kernel(lib)
        with kern.lock:
            if tokens > kern.xt_tokens:
                need = kern.lib.nm_xt_floats(tokens)
                if kern.xt.numel() < need:
                    kern.xt = torch.empty(need, dtype=torch.float32)
                kern.xt_tokens = tokens
            kern.lib.nm_forward(
                x2.data_ptr(),
                tokens,
                vals.data_ptr(),
                idx.data_ptr(),
                bias.data_ptr() if bias is not None else None,
                y.data_ptr(),
                kern.xt.data_ptr(),
                kern.ybuf.data_ptr(),
                torch.get_num_threads(),
            )
    return y.reshape(*x.shape[:-1], out_features)


@nm_linear.register_fake
def _(x, vals, idx, bias, lib, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


NM_LINEAR = torch.ops.sparta.nm_linear.default


class NMLinearOp(torch.nn.Module):
    """A built ``NMLinear`` called through ``sparta::nm_linear``."""

    def __init__(self, inner: NMLinear) -> None:
        super().__init__()
        self.inner = inner

    @property
    def path(self) -> str:
        return self.inner.path

    def op_call(self) -> OpCall:
        m = self.inner
        tables = (("vals", m.vals), ("idx", m.idx), ("bias", m.bias))
        static = (("lib", str(m.lib_path)), ("out_features", m.out_features))
        return OpCall(NM_LINEAR, tables, static)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.inner
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise BackendError(
                f"the nm_cpu kernel takes float32 CPU inputs, got {x.dtype} on {x.device}; "
                f"cast with x.float().cpu() or use the dense implementation."
            )
        if x.shape[-1] != m.in_features:
            raise BackendError(
                f"expected inputs of shape (..., {m.in_features}), got {tuple(x.shape)}."
            )
        return self.op_call()(x)
