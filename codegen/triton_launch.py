"""Low-overhead launches of an already compiled Triton kernel.

``kernel[grid](...)`` re-derives the argument specialisation on every call (tens of
microseconds of Python on small problems). After the first launch of a given launch config
and argument specialisation (pointer alignment, stride divisibility), the compiled kernel is
called directly. The direct path is checked once against the standard path (bitwise equal
outputs) and dropped for good if it differs or fails, so it can only be faster, never wrong.
"""

from __future__ import annotations

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


class Launcher:
    """Launches ``kernel`` with all args positional (trailing ``n_constexpr`` are constexprs)."""

    def __init__(self, kernel: Any, *, n_constexpr: int, out_index: int) -> None:
        self.kernel = kernel
        self.n_constexpr = n_constexpr
        self.out_index = out_index
        # Off by default: on triton 3.6 (H200, 2026-11-21) the direct runner measured slower
        # on the host (41 us/call) than the standard launch (33 us/call). SPARTA_TRITON_DIRECT=1
        # turns it on for Triton versions where it pays.
        self.direct_ok = not interpreting() and os.environ.get("SPARTA_TRITON_DIRECT") == "1"
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

            def direct(g: tuple[int, int, int], a: Args) -> None:
                ck[g](*a)

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
