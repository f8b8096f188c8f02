"""The generated CPU kernels as ``torch.library`` custom ops (namespace ``sparta``).

The ops are defined with ``torch.library.define`` / ``impl`` / ``register_fake`` rather than the
``custom_op`` decorator: the decorator's Python autograd and Dynamo-disable layers cost ~20-30
us per eager call (measured: 31 us against 8 us here), which a 24-layer model pays 24 times.
Each op takes the activation, the packed weight tables as tensors, and static configuration as
int/str arguments; ``lib`` is the kernel's cache key, which names its shared library (loaded
once per process, from the kernel cache when this process did not build it). Each op has a fake
(meta) implementation, so ``torch.export`` / ``torch.compile`` trace through it without a graph
break and Inductor calls it as an extern kernel:

- ``sparta::nm_linear(x, vals, idx, bias, lib, out_features)``: grouped n:m (docs/nm_cpu.md);
- ``sparta::sparse_linear(x, vals, offs, rowptr, rowtot, bias, lib, out_features)``:
  unstructured (docs/sparse_cpu.md).

``x`` is float32 (..., K) on the CPU; the result is (..., out_features) float32 with the bias
and the activation compiled into the kernel already applied. The kernels thread with OpenMP,
using ``torch.get_num_threads()`` threads at each call, or one when a call has less than
``PARALLEL_MIN_MACS`` multiply-adds (as ``at::parallel_for`` runs small work serially: a
parallel region whose other thread is descheduled on a busy host costs milliseconds).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sparta.codegen.cache import cache_dir
from sparta.errors import BackendError, InputError

# family -> (ABI version symbol, version)
ABI = {"nm_cpu": ("nm_abi_version", 3), "sparse_cpu": ("sp_abi_version", 1)}


@dataclass
class Loaded:
    """A kernel library loaded with ctypes, and its scratch (shared by every caller of it)."""

    family: str
    path: Path
    lib: ctypes.CDLL
    lock: threading.Lock = field(default_factory=threading.Lock)
    scratch: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    scratch2: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    scratch_tokens: int = 0

    def buffer(self, floats: int, second: bool = False) -> torch.Tensor:
        cur = self.scratch2 if second else self.scratch
        if cur.numel() < floats:
            cur = torch.empty(max(1, floats), dtype=torch.float32)
            if second:
                self.scratch2 = cur
            else:
                self.scratch = cur
        return cur


# Below this many multiply-adds (kept weights x tokens) a call runs on the calling thread alone.
PARALLEL_MIN_MACS = 1 << 20


def _threads(kept: int, tokens: int) -> int:
    return 1 if kept * tokens < PARALLEL_MIN_MACS else torch.get_num_threads()


_LIBS: dict[str, Loaded] = {}
_LIBS_LOCK = threading.Lock()


def load_library(key: str, path: Path, family: str) -> Loaded:
    """Load (once per process) the kernel library ``path`` under ``key``; check its ABI."""
    with _LIBS_LOCK:
        if key in _LIBS:
            return _LIBS[key]
        lib = ctypes.CDLL(str(path))
        symbol, version = ABI[family]
        if getattr(lib, symbol)() != version:
            raise BackendError(f"the kernel library {path} has an unexpected ABI version")
        p, i64, i32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
        if family == "nm_cpu":
            lib.nm_xt_floats.argtypes, lib.nm_xt_floats.restype = [i64], i64
            lib.nm_ybuf_floats.argtypes, lib.nm_ybuf_floats.restype = [], i64
            lib.nm_forward.argtypes = [p, i64, p, p, p, p, p, p, i32]
            lib.nm_forward.restype = i32
        else:
            lib.sp_scratch_floats.argtypes, lib.sp_scratch_floats.restype = [i64], i64
            lib.sp_forward.argtypes = [p, i64, p, p, p, p, p, p, p, i32]
            lib.sp_forward.restype = i32
        loaded = Loaded(family, path, lib)
        _LIBS[key] = loaded
        return loaded


def library(key: str, family: str) -> Loaded:
    """The library ``key``: loaded in this process already, or found in the kernel cache."""
    found = _LIBS.get(key)
    if found is not None:
        return found
    path = cache_dir() / f"{key}.so"
    if not path.exists():
        raise BackendError(
            f"the {family} kernel {key} is neither loaded in this process nor in the kernel "
            f"cache {cache_dir()}; rebuild it (compile the model again) on this machine."
        )
    return load_library(key, path, family)


def _check_x(x: torch.Tensor, in_features: int, family: str) -> torch.Tensor:
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise BackendError(
            f"the {family} kernel takes float32 CPU inputs, got {x.dtype} on {x.device}; "
            f"cast with x.float().cpu() or use the dense implementation."
        )
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise InputError(
            f"the {family} kernel of this layer takes inputs of shape (..., {in_features}), got "
            f"{tuple(x.shape)}: the model was called with another feature size than its example "
            f"(or the layer's input is wrongly shaped); pass inputs of the example's feature size."
        )
    return x.reshape(-1, in_features).contiguous()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


torch.library.define(
    "sparta::nm_linear",
    "(Tensor x, Tensor vals, Tensor idx, Tensor? bias, str lib, int in_features, "
    "int out_features) -> Tensor",
)
torch.library.define(
    "sparta::sparse_linear",
    "(Tensor x, Tensor vals, Tensor offs, Tensor rowptr, Tensor rowtot, Tensor? bias, str lib, "
    "int in_features, int out_features) -> Tensor",
)


@torch.library.impl("sparta::nm_linear", "cpu")
def nm_linear(
    x: torch.Tensor,
    vals: torch.Tensor,
    idx: torch.Tensor,
    bias: torch.Tensor | None,
    lib: str,
    in_features: int,
    out_features: int,
) -> torch.Tensor:
    """``act(x @ W.T + bias)`` through the n:m kernel ``lib`` (packed ``vals``/``idx``)."""
    x2 = _check_x(x, in_features, "nm_cpu")
    tokens = x2.shape[0]
    y = torch.empty(tokens, out_features, dtype=torch.float32)
    if tokens:
        k = library(lib, "nm_cpu")
        with k.lock:
            # scratch sizes are asked for only when tokens grow (a ctypes call costs microseconds)
            if tokens > k.scratch_tokens:
                k.buffer(k.lib.nm_xt_floats(tokens))
                k.buffer(k.lib.nm_ybuf_floats(), second=True)
                k.scratch_tokens = tokens
            k.lib.nm_forward(
                x2.data_ptr(),
                tokens,
                vals.data_ptr(),
                idx.data_ptr(),
                _ptr(bias),
                y.data_ptr(),
                k.scratch.data_ptr(),
                k.scratch2.data_ptr(),
                _threads(vals.numel(), tokens),
            )
    return y.reshape(*x.shape[:-1], out_features)


@torch.library.register_fake("sparta::nm_linear")
def _nm_linear_fake(x, vals, idx, bias, lib, in_features, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.impl("sparta::sparse_linear", "cpu")
def sparse_linear(
    x: torch.Tensor,
    vals: torch.Tensor,
    offs: torch.Tensor,
    rowptr: torch.Tensor,
    rowtot: torch.Tensor,
    bias: torch.Tensor | None,
    lib: str,
    in_features: int,
    out_features: int,
) -> torch.Tensor:
    """``act(x @ W.T + bias)`` through the unstructured kernel ``lib`` (packed tables)."""
    x2 = _check_x(x, in_features, "sparse_cpu")
    tokens = x2.shape[0]
    y = torch.empty(tokens, out_features, dtype=torch.float32)
    if tokens:
        k = library(lib, "sparse_cpu")
        with k.lock:
            if tokens > k.scratch_tokens:
                k.buffer(k.lib.sp_scratch_floats(tokens))
                k.scratch_tokens = tokens
            k.lib.sp_forward(
                x2.data_ptr(),
                tokens,
                vals.data_ptr(),
                offs.data_ptr(),
                rowptr.data_ptr(),
                rowtot.data_ptr(),
                _ptr(bias),
                y.data_ptr(),
                k.scratch.data_ptr(),
                _threads(vals.numel(), tokens),
            )
    return y.reshape(*x.shape[:-1], out_features)


@torch.library.register_fake("sparta::sparse_linear")
def _sparse_linear_fake(x, vals, offs, rowptr, rowtot, bias, lib, in_features, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


NM_LINEAR = torch.ops.sparta.nm_linear.default
SPARSE_LINEAR = torch.ops.sparta.sparse_linear.default
