"""Loading generated Triton sources through the one kernel cache, and inspection.

A generated source is written to the cache as ``<key>.py`` (content-addressed: the key
hashes the source and the versions) and imported from there, since Triton reads a kernel's
source from its file. Identical sources share one loaded kernel per process, so masks with
the same shapes and tile choice share one compiled binary.

A kernel is named by its *kernel id* ``"<key>/<function>"``, the ``str`` argument through
which the emitted graph's ops (``codegen/triton_ops.py``) find it: a constant of the graph that
changes whenever the source does, so any cache keyed on the graph stays correct.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch

from sparta.errors import BackendError
from sparta.kernels.triton_common import fp32_precision, interpreter_safe

from .cache import cache_dir, cache_key, cached_file, debug_level, dump_source

_LOADED: dict[tuple[str, bool], Any] = {}  # (key, interpreting) -> imported module
_PATHS: dict[str, Path] = {}  # key -> cached source file


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def available(device: torch.device | str) -> bool:
    """Triton importable, and a CUDA device, or a CPU device in interpreter mode."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    dev = torch.device(device)
    if dev.type == "cuda":  # the interpreter does not run kernels on CUDA tensors
        return torch.cuda.is_available() and not interpreting()
    return dev.type == "cpu" and interpreting()


def kernel_id(source: str, name: str, dtype: torch.dtype) -> str:
    """Write ``source`` to the cache (once) and return the id of its function ``name``."""
    source = fp32_precision(source, dtype)
    if interpreting():
        source = interpreter_safe(source, dtype)
    key = cache_key("triton-source", source)
    if key not in _PATHS:

        def build(path: Path) -> None:
            path.write_text(source)

        _PATHS[key] = cached_file(key, ".py", build, check=lambda p: p.read_text() == source)
    return f"{key}/{name}"


def kernel_by_id(kid: str) -> Any:
    """The ``@triton.jit`` function named by a :func:`kernel_id` (imported once per process)."""
    key, _, name = kid.partition("/")
    memo = (key, interpreting())
    module = _LOADED.get(memo)
    if module is None:
        path = _PATHS.get(key, cache_dir() / f"{key}.py")
        if not path.exists():
            raise BackendError(
                f"generated Triton kernel {kid!r} is not in the kernel cache {cache_dir()}: "
                f"compile the model again in this environment (sparta.compile)."
            )
        module = _import(path, f"sparta_triton_{key}_{int(memo[1])}")
        _LOADED[memo] = module
    return getattr(module, name)


def load_kernel(source: str, name: str, dtype: torch.dtype) -> Any:
    """The ``@triton.jit`` function ``name`` of ``source``, via the cache."""
    return kernel_by_id(kernel_id(source, name, dtype))


def _import(path: Path, mod_name: str) -> Any:
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the generated kernel file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module


def inspect_source(source: str, *, node: str, pattern: str, key: str) -> None:
    """``SPARTA_DEBUG=2``: dump the source with a header naming node, pattern and key."""
    if debug_level() >= 2:
        dump_source(source, node=node or "<unnamed>", pattern=pattern, key=key, language="triton")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu-interpreter"
