"""Fault injection: what users' environments do to a compiler, injected for real.

Each test injects one fault, states what must happen, and records what did happen in
``fault_log.RESULTS``; ``conftest.py`` prints the table "fault | expected | observed" and the count
"N injected, N survived, 0 wrong answers" at the end of the run (``bench/results/faults_*.md``
keeps a copy). A fault is *survived* when the expected behaviour is observed; a *wrong answer*
is any output that differs from the independently masked model.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from fault_log import record

import sparta
from sparta.codegen import cache, nm_cpu

pytestmark = pytest.mark.skipif(not nm_cpu.available(), reason="needs a C++ compiler")


# ---------------------------------------------------------------- a model that builds kernels


class ThreeLayer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(48, 64)
        self.fc2 = torch.nn.Linear(64, 32)
        self.fc3 = torch.nn.Linear(32, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def two_four(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """A seeded 2:4 mask along the last dim."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(shape, generator=gen).reshape(shape[0], -1, 4)
    keep = scores.argsort(dim=-1, descending=True)[..., :2]
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(shape)


SHAPES = ((64, 48), (32, 64), (24, 32))


def model_and_attrs():
    torch.manual_seed(0)
    model = ThreeLayer().eval()
    attrs = {f"fc{i}.weight": two_four(shape, i) for i, shape in enumerate(SHAPES, 1)}
    return model, attrs


def max_error(compiled, model, attrs, batch: int = 5, seed: int = 3) -> float:
    x = torch.randn(batch, 48, generator=torch.Generator().manual_seed(seed))
    ref = sparta.masked_model(model, attrs)
    with torch.no_grad():
        return float((compiled(x) - ref(x)).abs().max())


def forget_loaded_kernels() -> None:
    """What a new process starts with: no in-process memo of cache entries."""
    cache._MEMO.clear()
    cache._FALLBACK.clear()


@pytest.fixture
def cache_at(monkeypatch, tmp_path):
    def point(path: Path | str) -> Path:
        monkeypatch.setenv("SPARTA_CACHE_DIR", str(path))
        forget_loaded_kernels()
        return Path(path)

    yield point
    forget_loaded_kernels()


def compile_nm(model, attrs):
    """Compile with the n:m kernels forced; returns (compiled, warnings raised)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = sparta.compile(
            model, attrs, (torch.randn(4, 48),), backends=["nm_cpu"], measure=False
        )
    impls = {e.impl for e in compiled.report.nodes if e.target == "aten.linear.default"}
    return compiled, [str(w.message) for w in caught], impls


def cache_warnings(messages: list[str]) -> list[str]:
    return [m for m in messages if "kernel cache" in m]


def kernel_files(root: Path) -> list[Path]:
    """Cache entries (temporary files being written start with a dot)."""
    return sorted(p for p in root.glob("*.so") if not p.name.startswith("."))


def temporary_files(root: Path) -> list[Path]:
    return sorted(p for p in root.glob(".*") if p.is_file())


# ---------------------------------------------------------------- the cache directory


def test_cache_dir_cannot_be_created(cache_at, tmp_path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    cache_at(blocker / "cache")
    model, attrs = model_and_attrs()
    compiled, msgs, impls = compile_nm(model, attrs)
    err = max_error(compiled, model, attrs)
    record(
        "cache dir cannot be created (parent is a file)",
        "compiles into a temporary cache, one warning",
        f"impl {sorted(impls)}, {len(cache_warnings(msgs))} cache warning(s), error {err:.1e}",
        impls == {"nm_cpu"} and len(cache_warnings(msgs)) == 1,
        wrong=err > 1e-5,
    )


def test_cache_dir_not_writable(cache_at, tmp_path) -> None:
    if os.geteuid() == 0:
        target = Path("/sys")  # root may write anywhere, but not into sysfs
    else:
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o555)
    cache_at(target)
    model, attrs = model_and_attrs()
    compiled, msgs, impls = compile_nm(model, attrs)
    err = max_error(compiled, model, attrs)
    record(
        "cache dir exists but cannot be written",
        "compiles into a temporary cache, one warning",
        f"impl {sorted(impls)}, {len(cache_warnings(msgs))} cache warning(s), error {err:.1e}",
        impls == {"nm_cpu"} and len(cache_warnings(msgs)) == 1,
        wrong=err > 1e-5,
    )


def _tiny_tmpfs(path: Path) -> bool:
    path.mkdir()
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(path)],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


def test_cache_disk_full(cache_at, tmp_path, monkeypatch) -> None:
    full = tmp_path / "full"
    mounted = _tiny_tmpfs(full)
    if not mounted:  # no mount permission: a write that fails as a full disk does
        full.mkdir(exist_ok=True)
        real_replace = os.replace

        def replace(src, dst, *a, **k):
            if str(dst).startswith(str(full)):
                raise OSError(errno.ENOSPC, "No space left on device", str(dst))
            return real_replace(src, dst, *a, **k)

        monkeypatch.setattr(cache.os, "replace", replace)
    try:
        cache_at(full)
        model, attrs = model_and_attrs()
        compiled, msgs, impls = compile_nm(model, attrs)
        err = max_error(compiled, model, attrs)
        left = temporary_files(full)
    finally:
        if mounted:
            subprocess.run(["umount", str(full)], capture_output=True, timeout=10)
    how = "12 KB tmpfs" if mounted else "writes fail with ENOSPC"
    record(
        f"cache on a full disk ({how})",
        "compiles into a temporary cache, one warning, no half-written file left",
        f"impl {sorted(impls)}, {len(cache_warnings(msgs))} cache warning(s), "
        f"{len(left)} half-written files left, error {err:.1e}",
        impls == {"nm_cpu"} and len(cache_warnings(msgs)) == 1 and not left,
        wrong=err > 1e-5,
    )


def test_cache_deleted_between_compile_and_run(cache_at, tmp_path) -> None:
    import shutil

    root = cache_at(tmp_path / "cache")
    model, attrs = model_and_attrs()
    compiled, _, impls = compile_nm(model, attrs)
    shutil.rmtree(root)
    err = max_error(compiled, model, attrs)
    forget_loaded_kernels()
    again, msgs, impls2 = compile_nm(model, attrs)
    err2 = max_error(again, model, attrs)
    record(
        "cache dir deleted between compile and run",
        "the compiled model runs; the next compile rebuilds",
        f"run error {err:.1e}; recompile impl {sorted(impls2)}, "
        f"{len(kernel_files(root))} entries rebuilt, error {err2:.1e}",
        impls2 == {"nm_cpu"} and len(kernel_files(root)) > 0,
        wrong=max(err, err2) > 1e-5,
    )


def test_corrupt_cache_entries_are_rebuilt(cache_at, tmp_path) -> None:
    root = cache_at(tmp_path / "cache")
    model, attrs = model_and_attrs()
    _compile_in_another_process(root)  # entries this process never mapped, as after a crash
    damages = {
        "truncated": lambda b: b[: len(b) // 2],
        "garbage": lambda b: os.urandom(4096),
        "empty": lambda b: b"",
    }
    entries = kernel_files(root)
    for damage, p in zip(damages.values(), entries):
        p.write_bytes(damage(p.read_bytes()))
    compiled, _, impls = compile_nm(model, attrs)
    err = max_error(compiled, model, attrs)
    intact = all(nm_cpu._elf_complete(p) for p in kernel_files(root))
    record(
        f"cache entries {', '.join(list(damages)[: len(entries)])}",
        "entries rebuilt, never loaded",
        f"impl {sorted(impls)}, entries valid again: {intact}, error {err:.1e}",
        impls == {"nm_cpu"} and intact and len(entries) == 3,
        wrong=err > 1e-5,
    )


def test_entry_of_another_library_version_is_not_used(cache_at, tmp_path) -> None:
    root = cache_at(tmp_path / "cache")
    model, attrs = model_and_attrs()
    _compile_in_another_process(root, fingerprint="|torch0.0-other")
    old = set(kernel_files(root))
    for p in old:  # what another version built is not what this one would build
        p.write_bytes(p.read_bytes()[:64])
    compiled, _, impls = compile_nm(model, attrs)
    err = max_error(compiled, model, attrs)
    new = set(kernel_files(root)) - old
    record(
        "stale entries from another library version",
        "not used: this version builds its own",
        f"impl {sorted(impls)}, {len(new)} new entries beside {len(old)} stale, error {err:.1e}",
        impls == {"nm_cpu"} and len(new) == len(old) > 0,
        wrong=err > 1e-5,
    )


# ---------------------------------------------------------------- several processes, interrupts

_CHILD = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_faults import model_and_attrs, compile_nm, max_error
    model, attrs = model_and_attrs()
    compiled, _, impls = compile_nm(model, attrs)
    print("IMPLS", ",".join(sorted(impls)), "ERR", max_error(compiled, model, attrs))
    """
)


def _compile_in_another_process(root: Path, fingerprint: str = "") -> None:
    code = _CHILD.format(tests=str(Path(__file__).parent))
    if fingerprint:  # as if built by another library version
        code = code.replace(
            "from test_faults",
            "from sparta.codegen import cache; real = cache.environment_fingerprint; "
            f"cache.environment_fingerprint = lambda: real() + {fingerprint!r}\nfrom test_faults",
        )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_child_env(root), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def _child_env(root: Path) -> dict[str, str]:
    env = dict(os.environ, SPARTA_CACHE_DIR=str(root), PYTHONWARNINGS="ignore")
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def test_processes_compile_the_same_model_at_once(tmp_path) -> None:
    root = tmp_path / "cache"
    code = _CHILD.format(tests=str(Path(__file__).parent))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=_child_env(root),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    ok = [p.returncode == 0 and "IMPLS nm_cpu ERR" in o for p, (o, _) in zip(procs, outs)]
    errs = [float(o.split("ERR")[1]) for o, _ in outs if "ERR" in o]
    record(
        "three processes compile the same model into one cache at once",
        "all succeed with the n:m kernels; every entry complete",
        f"{sum(ok)}/3 succeeded, {len(kernel_files(root))} entries, max error "
        f"{max(errs, default=float('nan')):.1e}",
        all(ok) and all(nm_cpu._elf_complete(p) for p in kernel_files(root)),
        wrong=any(e > 1e-5 for e in errs),
    )


def _children(pid: int) -> set[str]:
    try:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True)
    except OSError:
        return set()
    return set(out.stdout.split())


def _compiler_running(pid: int) -> bool:
    """Whether a child of ``pid`` (the C++ compiler) runs now and still 0.2 s later: a kernel
    build, not the quick ``g++ --version``."""
    first = _children(pid)
    if not first:
        return False
    time.sleep(0.2)
    return bool(first & _children(pid))


def test_interrupt_during_kernel_build(tmp_path) -> None:
    root = tmp_path / "cache"
    code = _CHILD.format(tests=str(Path(__file__).parent))
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env=_child_env(root),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 600  # a busy machine imports torch slowly; ends at g++'s start
    while time.monotonic() < deadline and not _compiler_running(proc.pid):
        time.sleep(0.01)
    building = _compiler_running(proc.pid) or bool(_children(proc.pid))
    proc.send_signal(signal.SIGINT)  # KeyboardInterrupt in the compiling process
    _, err = proc.communicate(timeout=120)
    interrupted = "KeyboardInterrupt" in err
    partial = temporary_files(root)
    broken = [p for p in kernel_files(root) if not nm_cpu._elf_complete(p)]
    after = subprocess.run(
        [sys.executable, "-c", code], env=_child_env(root), capture_output=True, text=True
    )
    errs = [float(after.stdout.split("ERR")[1])] if "ERR" in after.stdout else [float("inf")]
    record(
        "KeyboardInterrupt while the C++ compiler runs",
        "no partial entry survives; the next compile works",
        f"interrupted during a build: {building and interrupted}, {len(partial)} temp files and "
        f"{len(broken)} broken entries left; next compile exit {after.returncode}, "
        f"error {errs[0]:.1e}",
        building and interrupted and not partial and not broken and after.returncode == 0,
        wrong=errs[0] > 1e-5 and after.returncode == 0,
    )
