"""The plan cache: a second ``sparta.compile`` of the same model, masks and options loads the
saved plan of the first instead of tracing, propagating and measuring again.

An entry is a saved plan (``sparta/saved.py``) in the kernel cache (``codegen/cache.py``:
``$SPARTA_CACHE_DIR`` or ``~/.cache/sparta``, atomic writes, a lock per key), named by a key
that hashes everything that determines the plan:

- the model: its parameters' and buffers' names, shapes, dtypes and a digest of their values,
  and its code and configuration — for every submodule its class, the source files of the
  class and its bases, its plain attributes (numbers, strings, a ``config``) and
  ``extra_repr`` — so that a hit needs no trace (the traced graph is a function of these);
- the attributes (each mask's digest and pattern), the example inputs' shapes and dtypes;
- the options (device, backends, mode, strict, measure), library versions, and a digest of
  sparta's own source (the packages sparta, codegen, kernels, propagation_rules): a plan made
  by other planner code is never reused, whatever the version number says.

``SPARTA_CACHE=0`` turns it off. An entry that cannot be read (truncated, another format, a
graph that no longer resolves) is deleted and rebuilt, with a warning. Entries hold the masked
weights, so the cache is bounded: after each store the least recently used plans (a hit counts
as a use) are deleted until all plans fit in ``$SPARTA_PLAN_CACHE_MB`` (default 4096 MB).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .codegen.cache import cache_dir, cache_key, cached_file
from .errors import SpartaError
from .saved import load_checked, read, signature

if TYPE_CHECKING:
    from .compile import CompiledModel

SUFFIX = ".sparta"
DEFAULT_BUDGET_MB = 4096
_FILES: dict[tuple[str, float, int], str] = {}


def enabled() -> bool:
    return os.environ.get("SPARTA_CACHE", "1").strip().lower() not in ("0", "false", "off", "no")


def _file_digest(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "?"
    memo = (path, st.st_mtime, st.st_size)
    if memo not in _FILES:
        with open(path, "rb") as f:
            _FILES[memo] = hashlib.blake2b(f.read(), digest_size=16).hexdigest()
    return _FILES[memo]


def source_digest() -> str:
    """A digest of every source file of sparta's packages (``.py``, ``.cpp``, ``.inc``)."""
    import importlib

    h = hashlib.blake2b(digest_size=16)
    for name in ("sparta", "sparta.codegen", "sparta.kernels", "sparta.propagation_rules"):
        root = Path(importlib.import_module(name).__file__).parent
        for f in sorted(root.glob("*")):
            if f.suffix in (".py", ".cpp", ".inc"):
                h.update(f"{name}/{f.name}:{_file_digest(str(f))}".encode())
    return h.hexdigest()


def _plain(v: Any) -> bool:
    if isinstance(v, (bool, int, float, str, type(None))):
        return True
    return isinstance(v, (tuple, list)) and len(v) < 64 and all(_plain(x) for x in v)


def _code(cls: type) -> list[str]:
    out = []
    for base in cls.__mro__:
        if base in (torch.nn.Module, object):
            break
        try:
            path = inspect.getsourcefile(base)
        except TypeError:
            path = None
        out.append(f"{base.__module__}.{base.__qualname__}:{_file_digest(path) if path else '?'}")
        top = sys.modules.get(base.__module__.split(".")[0])
        out.append(str(getattr(top, "__version__", "")))
    return out


def model_fingerprint(model: torch.nn.Module) -> list[str]:
    """The model's code and configuration (see the module docstring); weights excluded."""
    parts = []
    for name, mod in model.named_modules():
        attrs = sorted(
            (k, repr(v)) for k, v in vars(mod).items() if not k.startswith("_") and _plain(v)
        )
        config = getattr(mod, "config", None)
        parts += [name, *_code(type(mod)), repr(attrs), mod.extra_repr(), mod.training.__repr__()]
        if config is not None:
            parts.append(repr(config))
    return parts


def _input_spec(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"T{tuple(v.shape)}{v.dtype}{v.device}"
    if isinstance(v, (tuple, list)):
        return f"{type(v).__name__}[{','.join(_input_spec(x) for x in v)}]"
    if isinstance(v, Mapping):
        return "{" + ",".join(f"{k}:{_input_spec(x)}" for k, x in sorted(v.items())) + "}"
    return repr(v)


def _mask_digest(name: str, value: Any) -> str:
    from .tesa import as_tesa

    t = as_tesa(value, name)
    data = t.mask.contiguous().view(torch.uint8).numpy().tobytes()
    return f"{name}:{tuple(t.mask.shape)}:{t.pattern}:{hashlib.blake2b(data).hexdigest()}"


def plan_key(
    model: torch.nn.Module,
    attrs: Mapping[str, Any],
    example_inputs: tuple,
    example_kwargs: Mapping[str, Any],
    options: Mapping[str, Any],
    sig: Mapping[str, Any],
) -> str:
    """The cache key of a compile (see the module docstring)."""
    from . import __version__

    return "plan-" + cache_key(
        "plan",
        __version__,
        source_digest(),
        repr(sorted(sig["tensors"].items())),
        sig["digest"],
        *model_fingerprint(model),
        *sorted(_mask_digest(k, v) for k, v in attrs.items()),
        _input_spec(tuple(example_inputs)),
        _input_spec(dict(example_kwargs)),
        repr(sorted((k, repr(v)) for k, v in options.items())),
    )


def lookup(key: str, model: torch.nn.Module, sig: Mapping[str, Any]) -> CompiledModel | None:
    """The cached compiled module of ``key``, or None; a corrupt entry is deleted (warning)."""
    path = cache_dir() / f"{key}{SUFFIX}"
    if not path.exists():
        return None
    try:
        loaded = load_checked(path, model, sig)
        loaded.report.origin = f"plan from the plan cache ({path})"
        os.utime(path)  # a use: eviction removes the least recently used plans first
        return loaded
    except Exception as e:  # noqa: BLE001  (any unreadable entry is rebuilt, never trusted)
        warnings.warn(
            f"sparta: the cached plan {path} could not be used ({type(e).__name__}: {e}); "
            f"compiling again and replacing it.",
            stacklevel=3,
        )
        path.unlink(missing_ok=True)
        return None


def store(key: str, compiled: CompiledModel) -> Path | None:
    """Save ``compiled`` under ``key``; None (nothing cached) for plans a file cannot hold."""

    def readable(path: Path) -> bool:
        read(path)
        return True

    try:
        path = cached_file(key, SUFFIX, compiled.save, readable)
        evict(budget_bytes(), keep=path)
        return path
    except SpartaError:
        return None  # e.g. a 2:4 module or an SDDMM kernel: kept in memory only
    except Exception as e:  # noqa: BLE001  (the compiled module is fine; only caching failed)
        warnings.warn(
            f"sparta: the plan could not be cached ({type(e).__name__}: {e}); the compiled "
            f"module is unaffected, the next compile of this model starts afresh.",
            stacklevel=3,
        )
        return None


def budget_bytes() -> int:
    """``$SPARTA_PLAN_CACHE_MB`` (default ``DEFAULT_BUDGET_MB``) in bytes."""
    raw = os.environ.get("SPARTA_PLAN_CACHE_MB", "").strip()
    try:
        mb = float(raw) if raw else DEFAULT_BUDGET_MB
    except ValueError:
        warnings.warn(
            f"sparta: SPARTA_PLAN_CACHE_MB={raw!r} is not a number of megabytes; using "
            f"{DEFAULT_BUDGET_MB}.",
            stacklevel=3,
        )
        mb = DEFAULT_BUDGET_MB
    return int(mb * 1024 * 1024)


def evict(budget: int, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used plans until the plans in the cache directory total at most
    ``budget`` bytes (``keep`` is never deleted); the deleted paths."""
    entries = []
    for path in cache_dir().glob(f"plan-*{SUFFIX}"):
        try:
            st = path.stat()
        except OSError:
            continue  # deleted meanwhile by another process
        entries.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, path in sorted(entries, key=lambda e: e[0]):
        if total <= budget:
            break
        if keep is not None and path == keep:
            continue
        path.unlink(missing_ok=True)
        total -= size
        removed.append(path)
    return removed


__all__ = ["budget_bytes", "enabled", "evict", "lookup", "plan_key", "signature", "store"]
