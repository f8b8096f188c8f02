"""The one kernel cache: ``$SPARTA_CACHE_DIR`` or ``~/.cache/sparta``.

An entry is one file (a generated Triton module, a compiled shared library, a tuning
result) named by a key that hashes everything that determines it: the source, library
versions, device, compiler and flags. Entries are written to a temporary file and renamed
into place (atomic), builds are serialised per key with a file lock (two processes never
build the same entry twice at once), an in-process memo sits on top, and an entry that
fails its check is rebuilt rather than trusted.
"""

from __future__ import annotations

import errno
import hashlib
import os
import platform
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock

_MEMO: dict[str, Path] = {}
_FALLBACK: list[Path] = []  # the private temporary cache, once one was needed
# Errors that say "this directory cannot hold the entry" (not "the build is wrong").
_STORAGE_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                   errno.ENOENT, errno.ENOTDIR)  # fmt: skip


def configured_dir() -> Path:
    """``$SPARTA_CACHE_DIR`` or ``~/.cache/sparta``, whether or not it is usable."""
    return Path(os.environ.get("SPARTA_CACHE_DIR") or os.path.join(Path.home(), ".cache", "sparta"))


def cache_dir() -> Path:
    """The configured cache directory when it can be created and written, else a private
    temporary one for this process (with one warning saying why)."""
    if _FALLBACK:
        return _FALLBACK[0]
    path = configured_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK | os.X_OK):
            return path
        reason = "it is not writable"
    except OSError as e:
        reason = f"it cannot be created ({e.strerror or e})"
    return _fall_back(path, reason)


def _fall_back(path: Path, reason: str) -> Path:
    if not _FALLBACK:
        tmp = Path(tempfile.mkdtemp(prefix="sparta-cache-"))
        _FALLBACK.append(tmp)
        warnings.warn(
            f"sparta: the kernel cache {path} is unusable ({reason}); this process builds into "
            f"the temporary directory {tmp} instead, and nothing is kept for later runs. Point "
            f"SPARTA_CACHE_DIR at a writable directory to keep compiled kernels.",
            stacklevel=3,
        )
    return _FALLBACK[0]


def environment_fingerprint() -> str:
    """Versions that change what a build produces."""
    parts = [sys.version.split()[0], torch.__version__, platform.machine()]
    try:
        import triton

        parts.append(f"triton{triton.__version__}")
    except ImportError:
        pass
    return "|".join(parts)


def cache_key(*parts: object) -> str:
    h = hashlib.sha256()
    for p in (environment_fingerprint(), *parts):
        h.update(str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def cached_file(
    key: str,
    suffix: str,
    build: Callable[[Path], None],
    check: Callable[[Path], bool] | None = None,
) -> Path:
    """Path of the entry ``key``; ``build(tmp_path)`` writes it when missing or corrupt.

    ``check(path)`` returns False (or raises) for an entry that must not be trusted, e.g. a
    truncated shared library; it is then rebuilt. A complete entry is read without taking
    the lock (entries only appear by atomic rename), so a read-only cache still serves what it
    holds. When the directory cannot hold a new entry (read-only, full, deleted, no
    permission), the entry is built in a private temporary cache instead (one warning).
    An interrupted build leaves no entry behind, only its lock file.
    """
    memo_key = key + suffix
    if memo_key in _MEMO and _MEMO[memo_key].exists():
        return _MEMO[memo_key]
    root = cache_dir()
    final = root / f"{key}{suffix}"
    if not (final.exists() and _trusted(final, check)):
        try:
            _build_locked(root, key, suffix, build, check)
        except OSError as e:
            if e.errno not in _STORAGE_ERRORS or root in _FALLBACK:
                raise
            root = _fall_back(root, f"writing {final.name} failed: {e.strerror or e}")
            final = root / f"{key}{suffix}"
            _build_locked(root, key, suffix, build, check)
    _MEMO[memo_key] = final
    return final


def _build_locked(root: Path, key: str, suffix: str, build: Callable[[Path], None], check) -> None:
    final = root / f"{key}{suffix}"
    with FileLock(str(root / f"{key}.lock")):
        if final.exists() and not _trusted(final, check):
            final.unlink()
        if final.exists():
            return  # another process built it while we waited for the lock
        fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{key}.", suffix=suffix)
        os.close(fd)
        try:
            build(Path(tmp))
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        if check is not None and not _trusted(final, check):
            raise RuntimeError(f"cache entry {final} fails its check right after being built")


def _trusted(path: Path, check: Callable[[Path], bool] | None) -> bool:
    if path.stat().st_size == 0:
        return False
    if check is None:
        return True
    try:
        return bool(check(path))
    except Exception:
        return False


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def debug_level() -> int:
    try:
        return int(os.environ.get("SPARTA_DEBUG", "0"))
    except ValueError:
        return 0


def dump_source(source: str, *, node: str, pattern: str, key: str, language: str) -> None:
    """``SPARTA_DEBUG=2``: print every generated source with a header and keep a copy."""
    if debug_level() < 2:
        return
    header = f"# ---- sparta generated {language} | node: {node} | pattern: {pattern} | key: {key}"
    print(f"{header}\n{source}\n# ---- end {key}", file=sys.stderr)
    ext = {"triton": ".py", "c++": ".cpp"}.get(language, ".txt")
    dump = cache_dir() / "debug"
    dump.mkdir(exist_ok=True)
    write_text_atomic(dump / f"{key}{ext}", f"{header}\n{source}")
