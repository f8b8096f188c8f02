"""Low-overhead launches of an already compiled Triton kernel.

``kernel[grid](...)`` re-derives the argument specialisation on every call (about 21 us of
Python per launch on triton 3.6, more than a small kernel runs). After the first launch of a
given launch config and argument specialisation (pointer alignment, stride divisibility), the
compiled kernel's C launcher is called directly (about 7 us). That call follows Triton's
internal signature, so the direct path is checked once against the standard path (bitwise equal
outputs) and dropped for good if it differs or fails: it can only be faster, never wrong.
Launch hooks (a profiler's) are honoured as in Triton's own launch.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from .cache import debug_level
from .triton_load import interpreting

Args = tuple[Any, ...]


def _spec(args: Args) -> tuple[object, ...]:
    """What Triton specialises on: 16-byte alignment of pointers, ints divisible by 16 or 1."""
    out: list[object] = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a.data_ptr() % 16 == 0)
        elif isinstance(a, int):
            out.append((a % 16 == 0, a == 1))
    return tuple(out)


@functools.cache
def _knobs() -> Any:
    from triton import knobs  # Triton >= 3.4; older ones fail the check-once and stay standard

    return knobs


class Launcher:
    """Launches ``kernel`` with all args positional (trailing ``n_constexpr`` are constexprs)."""

    def __init__(self, kernel: Any, *, n_constexpr: int, out_index: int) -> None:
        self.kernel = kernel
        self.n_constexpr = n_constexpr
        self.out_index = out_index
        # SPARTA_TRITON_DIRECT=0 forces the standard path (e.g. to rule this one out).
        self.direct_ok = not interpreting() and os.environ.get("SPARTA_TRITON_DIRECT") != "0"
        self._direct: dict[tuple[object, ...], Callable[[tuple[int, int, int], Args], None]] = {}

    def launch(self, grid: tuple[int, int, int], args: Args, warps: int, stages: int) -> None:
        key = (warps, stages, args[0].device, args[-self.n_constexpr :], _spec(args))
        direct = self._direct.get(key)
        if direct is not None:
            direct(grid, args)
            return
        ck = self._standard(grid, args, warps, stages)
        if self.direct_ok and args[0].is_cuda and not torch.cuda.is_current_stream_capturing():
            self._try_direct(key, ck, grid, args)

    def _standard(self, grid, args: Args, warps: int, stages: int) -> Any:
        names = self.kernel.arg_names[-self.n_constexpr :]
        consts = dict(zip(names, args[-self.n_constexpr :]))
        plain = args[: -self.n_constexpr]
        return self.kernel[grid](*plain, **consts, num_warps=warps, num_stages=stages)

    def _try_direct(self, key, ck: Any, grid, args: Args) -> None:
        try:
            ck._init_handles()
            run, function, meta = ck.run, ck.function, ck.packed_metadata
            device = args[0].device.index
            raw_stream = torch._C._cuda_getCurrentRawStream
            hooks = _knobs().runtime

            def direct(g: tuple[int, int, int], a: Args) -> None:
                # what Triton's own launch does, minus re-binding and re-specialising the args
                stream = raw_stream(device)
                enter = hooks.launch_enter_hook
                md = ck.launch_metadata(g, stream, *a) if enter is not None else None
                run(g[0], g[1], g[2], stream, function, meta, md, enter, hooks.launch_exit_hook, *a)

            out = args[self.out_index]
            expected = out.clone()
            out.fill_(float("nan"))
            direct(grid, args)
            good = torch.equal(out, expected)
            out.copy_(expected)
        except Exception as e:  # noqa: BLE001 - any mismatch with this Triton's internals
            if debug_level() >= 1:
                print(f"sparta: direct Triton launch disabled: {e!r}", file=sys.stderr)
            good = False
        if good:
            self._direct[key] = direct
        else:
            if debug_level() >= 1:
                print("sparta: direct Triton launch disabled (output differs)", file=sys.stderr)
            self.direct_ok = False
