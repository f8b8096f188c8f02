"""The ``nm_cpu`` backend: n:m sparse linear layers as C++ generated per weight, built with g++.

``build_nm_linear`` packs the weight once (``sparta.kernels.nm_layout``), renders
``kernels/nm_linear.cpp`` specialised to (n, m, shapes, path, tiles, ISA, bias, activation),
compiles it into a plain shared library (no torch headers: about a second cold) through the one
kernel cache, and runs it as the ``sparta::nm_linear`` custom op (``sparta.codegen.cpu_ops``).
The kernel threads with OpenMP, using ``torch.get_num_threads()`` threads at each call. Paths,
layout and loops: docs/nm_cpu.md.
"""

from __future__ import annotations

import functools
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from sparta.codegen import cpu_ops
from sparta.codegen.cache import cache_key, cached_file, dump_source
from sparta.codegen.op_call import OpCall
from sparta.errors import BackendError, BuildTimeout
from sparta.kernels.epilogue import CPU_ACTIVATIONS as ACTIVATIONS
from sparta.kernels.epilogue import cpu_code
from sparta.kernels.nm_layout import NMPacked, pack_nm

ISAS = ("avx512", "avx2", "scalar")


@dataclass(frozen=True)
class IsaConfig:
    vl: int  # floats per vector
    rows: int  # output rows per register tile (R)
    tv: int  # token vectors per register tile (<= 4)
    flags: tuple[str, ...]


# Register budget: R * TV accumulators + one broadcast, 32 zmm (AVX-512) / 16 ymm (AVX2) regs.
ISA_CONFIGS: dict[str, IsaConfig] = {
    "avx512": IsaConfig(16, 6, 4, ("-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma")),
    "avx2": IsaConfig(8, 3, 4, ("-mavx2", "-mfma")),
    "scalar": IsaConfig(1, 4, 4, ()),
}
BASE_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno")
# Chunks per k block: the x panel slice a block reads (KBC * m * TV * VL floats) stays in L1.
L1_PANEL_BYTES = 24 * 1024
# Permute path (AVX-512; docs/nm_cpu.md): tokens per block (one accumulator each), the slice of
# x a k block reads (tokens x k block, kept in L1), and the packed weights of a group of row
# tiles (kept in L2 while every token block passes over them).
PERM_TOKENS = 16
L1_XBLOCK_BYTES = 24 * 1024
PERM_GROUP_BYTES = 768 * 1024
PATHS = ("perm", "tile")
# Between 1 in 4 and 1 in 8 kept, the tile path wins above this many tokens (choose_path).
PERM_MAX_TOKENS = 32


def _perm_slot(m: int) -> int:
    """Floats per chunk in the perm path's packed copy of x: m rounded up to 4, 8, 16 or 32."""
    return next(s for s in (4, 8, 16, 32) if m <= s)


def _even_blocks(chunks: int, most: int) -> int:
    """Chunks per k block: at most ``most``, the blocks as even as possible (77 chunks at most
    24 a block: 20+20+20+17 rather than 24+24+24+5)."""
    blocks = -(-chunks // max(1, most))
    return -(-chunks // blocks)


def perm_eligible(n: int, m: int, isa: str) -> bool:
    """Whether the permute path can run: AVX-512, n divides 16 (R = 16 / n rows), m <= 32."""
    return isa == "avx512" and 16 % n == 0 and m <= 32


def choose_path(
    n: int,
    m: int,
    isa: str,
    path: str | None = None,
    tiles: tuple[int, int, int] | None = None,
    tokens: int | None = None,
) -> str:
    """The kernel path: "perm" (permute, rows as lanes) or "tile" (token vectors).

    Default, where perm is eligible (bench/results/nm_cpu_2026-11-22b.md, 2 threads): "perm" at
    1 in 8 kept or sparser (1:8, 1:10, 2:16...), where it is 1.2-1.5x faster at every token
    count; between 1 in 4 and 1 in 8 (1:4, 2:8) "perm" for at most PERM_MAX_TOKENS tokens
    (decode: 1.1-1.4x faster) and "tile" for more (1.1-1.2x faster at 64-128); "tile" for
    denser masks (2:4). ``tokens`` is the caller's token count (None: few). ``tiles`` only
    applies to the tile path.
    """
    if path is None:
        eligible = tiles is None and m >= 4 * n and perm_eligible(n, m, isa)
        few = tokens is None or tokens <= PERM_MAX_TOKENS
        path = "perm" if eligible and (m >= 8 * n or few) else "tile"
    if path not in PATHS:
        raise BackendError(f"path must be one of {PATHS} or None, got {path!r}.")
    if path == "perm" and not perm_eligible(n, m, isa):
        raise BackendError(
            f"the perm path needs AVX-512, n dividing 16 and m <= 32; got {n}:{m} on {isa}."
        )
    if path == "perm" and tiles is not None:
        raise BackendError("tiles (rows, token vectors, chunks) only apply to the tile path.")
    return path


def rows_per_tile(n: int, isa: str, path: str, tiles: tuple[int, int, int] | None) -> int:
    """R: 16 / n for the perm path (the n picks of R rows fill 16 lanes), else the tile's rows."""
    if path == "perm":
        return 16 // n
    return tiles[0] if tiles is not None else ISA_CONFIGS[isa].rows


CXX_TIMEOUT_S = 300.0  # default limit of one kernel build ($SPARTA_CXX_TIMEOUT, seconds)


def compiler_timeout_s() -> float:
    """Seconds one kernel build may take before it is killed: $SPARTA_CXX_TIMEOUT or 300."""
    raw = os.environ.get("SPARTA_CXX_TIMEOUT", "")
    try:
        return float(raw) if raw else CXX_TIMEOUT_S
    except ValueError:
        raise BackendError(
            f"$SPARTA_CXX_TIMEOUT must be a number of seconds, got {raw!r}."
        ) from None


def compiler() -> str | None:
    """The C++ compiler to use: $SPARTA_CXX, $CXX or g++, if it can be found."""
    name = os.environ.get("SPARTA_CXX") or os.environ.get("CXX") or "g++"
    return shutil.which(name)


@functools.lru_cache(maxsize=8)
def _compiler_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def available() -> bool:
    """Whether a working C++ compiler was found."""
    cxx = compiler()
    return cxx is not None and bool(_compiler_version(cxx))


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """CPU feature flags of this machine (Linux /proc/cpuinfo, else torch's capability)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    cap = torch.backends.cpu.get_cpu_capability().lower()
    if cap.startswith("avx512"):
        return frozenset({"avx512f", "avx512dq", "avx512vl", "avx2", "fma"})
    return frozenset({"avx2", "fma"}) if cap == "avx2" else frozenset()


def detect_isa() -> str:
    """The best kernel ISA for this CPU: "avx512", "avx2" or "scalar"."""
    flags = cpu_flags()
    if {"avx512f", "avx512dq", "avx512vl"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "scalar"


def _supported(isa: str) -> bool:
    return isa == "scalar" or ISAS.index(isa) >= ISAS.index(detect_isa())


def _elf_complete(path: Path) -> bool:
    """A shared library is trusted when its ELF headers say every segment and section fits."""
    data = path.read_bytes()
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    phoff, shoff = struct.unpack_from("<QQ", data, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 0x36)
    if phoff + phentsize * phnum > len(data) or shoff + shentsize * shnum > len(data):
        return False
    for i in range(phnum):
        _, _, offset, _, _, filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if offset + filesz > len(data):
            return False
    return True


def compile_source(source: str, isa: str, family: str = "nm_cpu") -> tuple[Path, str]:
    """Compile C++ ``source`` for ``isa`` into a cached shared library: (path, cache key).

    ``family`` (the backend's name) is part of the key and of error messages.
    """
    cxx = compiler()
    version = _compiler_version(cxx) if cxx else ""
    if not cxx or not version:
        raise BackendError(
            f"the {family} backend needs a C++ compiler, found none (looked for $SPARTA_CXX, "
            f"$CXX, g++). Install g++ (e.g. `apt-get install g++`) or leave {family!r} out of "
            f"backends."
        )
    flags = (*BASE_FLAGS, *ISA_CONFIGS[isa].flags)
    key = cache_key(family, source, version, sorted(cpu_flags()), flags, isa)

    def build(out: Path) -> None:
        # The compiler writes into a private directory; only the copy touches the cache, so a
        # cache that cannot hold the entry fails as an OSError (and the cache falls back).
        with tempfile.TemporaryDirectory(prefix="sparta-cxx-") as tmp:
            src, lib = Path(tmp) / "kernel.cpp", Path(tmp) / "kernel.so"
            src.write_text(source)
            timeout = compiler_timeout_s()
            try:
                proc = subprocess.run(
                    [cxx, *flags, str(src), "-o", str(lib)],
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                )
            except subprocess.TimeoutExpired as e:
                raise BuildTimeout(
                    f"the C++ compiler {cxx} did not finish the {family} kernel {key} within "
                    f"{timeout:g} s (killed); raise $SPARTA_CXX_TIMEOUT or check the compiler."
                ) from e
            if proc.returncode != 0:
                raise BackendError(
                    f"{cxx} failed to build the {family} kernel {key} (exit {proc.returncode}):\n"
                    f"{proc.stderr[-4000:]}\nRe-run with SPARTA_DEBUG=2 to see the source."
                )
            shutil.copyfile(lib, out)

    return cached_file(key, ".so", build, _elf_complete), key


def kernel_text(*names: str) -> str:
    """Kernel template files of ``sparta.kernels`` joined into one translation unit, each line
    ``// @include NAME`` replaced by that file (so the cache key hashes everything built)."""
    kernels = resources.files("sparta.kernels")
    out = []
    for name in names:
        for line in kernels.joinpath(name).read_text().splitlines(keepends=True):
            if line.startswith("// @include "):
                line = kernels.joinpath(line.split()[-1]).read_text()
            out.append(line)
    return "".join(out)


@functools.lru_cache(maxsize=1)
def _template() -> str:
    """nm_linear.cpp with nm_perm.cpp (the permute path) appended: one translation unit."""
    return kernel_text("nm_linear.cpp", "nm_perm.cpp")


def render(
    n: int,
    m: int,
    out_features: int,
    in_features: int,
    isa: str,
    has_bias: bool,
    activation: str | None,
    tiles: tuple[int, int, int] | None = None,
    path: str | None = None,
) -> str:
    """The C++ source of one kernel: a block of constants followed by the template.

    ``tiles`` = (rows, token vectors, chunks per k block) overrides the ISA's defaults (tuning)
    of the token-vector ("tile") path; ``path`` forces "perm" or "tile" (None: ``choose_path``).
    """
    path = choose_path(n, m, isa, path, tiles)
    cfg = ISA_CONFIGS[isa]
    chunks = -(-in_features // m)
    kbc = max(1, L1_PANEL_BYTES // (m * cfg.tv * cfg.vl * 4))
    if tiles is not None:
        cfg = IsaConfig(cfg.vl, tiles[0], tiles[1], cfg.flags)
        kbc = tiles[2]
    consts = {
        "NM_N": n,
        "NM_M": m,
        "NM_K": in_features,
        "NM_OUT": out_features,
        "NM_C": chunks,
        "NM_R": cfg.rows,
        "NM_TV": cfg.tv,
        "NM_VL": cfg.vl,
        "NM_KBC": min(kbc, chunks),
        "NM_HAS_BIAS": int(has_bias),
        "NM_ACT": cpu_code(activation),
        "NM_PERM": int(path == "perm"),
        "NM_PTB": PERM_TOKENS,
        "NM_PKB": _even_blocks(chunks, L1_XBLOCK_BYTES // (PERM_TOKENS * _perm_slot(m) * 4)),
        "NM_PGB": PERM_GROUP_BYTES,
        "NM_PS": _perm_slot(m),
    }
    if path == "perm":
        consts["NM_R"] = rows_per_tile(n, isa, path, tiles)
    head = "".join(f"#define {k} {v}\n" for k, v in consts.items())
    return f"// isa: {isa}, {n}:{m}, path: {path}, activation: {activation}\n{head}{_template()}"


class NMLinear(torch.nn.Module):
    """``act(x @ (W*mask).T + b)`` through a compiled n:m kernel; built by ``build_nm_linear``."""

    def __init__(
        self,
        packed: NMPacked,
        bias: torch.Tensor | None,
        activation: str | None,
        isa: str,
        source: str,
        key: str,
        lib_path: Path,
        path: str = "tile",
    ) -> None:
        super().__init__()
        self.n, self.m, self.isa, self.activation = packed.n, packed.m, isa, activation
        self.path = path
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.source, self.key, self.lib_path = source, key, lib_path
        # flat, with 16 floats of slack: the permute path loads 16 values at a time
        vals = torch.zeros(packed.vals.numel() + 16, dtype=torch.float32)
        vals[: packed.vals.numel()] = packed.vals.flatten()
        self.register_buffer("vals", vals)
        # flat, with 16 bytes of slack: the small-token path loads 16 indices at a time
        idx = torch.zeros(packed.idx.numel() + 16, dtype=torch.uint8)
        idx[: packed.idx.numel()] = packed.idx.flatten()
        self.register_buffer("idx", idx)
        self.register_buffer("bias", bias)
        cpu_ops.load_library(key, lib_path, "nm_cpu")

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"pattern={self.n}:{self.m}, isa={self.isa}, path={self.path}, "
            f"activation={self.activation}, "
            f"key={self.key}"
        )

    def op_call(self) -> OpCall:
        """How the emitted graph calls this kernel (``op_call.py``)."""
        tables = (("vals", self.vals), ("idx", self.idx), ("bias", self.bias))
        static = (
            ("lib", self.key),
            ("in_features", self.in_features),
            ("out_features", self.out_features),
        )
        return OpCall(cpu_ops.NM_LINEAR, tables, static)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) float32 CPU -> (..., out_features), via ``sparta::nm_linear``."""
        return self.op_call()(x)


def build_nm_linear(
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    n: int,
    m: int,
    isa: str | None = None,
    node: str = "",
    tiles: tuple[int, int, int] | None = None,
    path: str | None = None,
    tokens: int | None = None,
) -> torch.nn.Module:
    """A module computing ``act(x @ (weight*mask).T + bias)`` with a kernel built for this mask.

    ``isa`` None picks the best for this CPU; "avx512"/"avx2"/"scalar" force a path.
    ``tiles`` (rows, token vectors, chunks per k block) overrides the tile path's tile sizes;
    ``path`` forces "perm" or "tile" (None: ``choose_path`` for ``tokens``, the token count the
    caller expects; any count runs either way).
    Raises BackendError when no compiler is found, the mask is not n:m, or the ISA is absent.
    """
    if activation not in ACTIVATIONS:
        raise BackendError(f"activation must be one of {ACTIVATIONS}, got {activation!r}.")
    if weight.dim() != 2:
        raise BackendError(f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}.")
    isa = isa or detect_isa()
    if isa not in ISAS:
        raise BackendError(f"isa must be one of {ISAS} or None, got {isa!r}.")
    if not _supported(isa):
        raise BackendError(
            f"this CPU lacks {isa} (best available: {detect_isa()}); pass isa=None to pick it."
        )
    if not available():
        compile_source("", isa)  # raises the no-compiler BackendError
    out_features, in_features = weight.shape
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise BackendError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}.")
    path = choose_path(n, m, isa, path, tiles, tokens)
    packed = pack_nm(weight, mask, n, m, rows_per_tile(n, isa, path, tiles))
    source = render(n, m, out_features, in_features, isa, bias is not None, activation, tiles, path)
    lib_path, key = compile_source(source, isa)
    dump_source(source, node=node or "nm_linear", pattern=f"{n}:{m}", key=key, language="c++")
    b = None if bias is None else bias.detach().to("cpu", torch.float32).contiguous().clone()
    return NMLinear(packed, b, activation, isa, source, key, lib_path, path)
