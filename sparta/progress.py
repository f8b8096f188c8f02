"""Progress of a long ``sparta.compile``: one tqdm bar over tracing, propagation, each node's
measurements and the whole-graph check.

The bar appears only once a compile has run for ``DELAY_S`` seconds (tqdm's ``delay``), only
on a terminal (stderr a TTY), and never with ``progress=False`` or ``SPARTA_PROGRESS=0``;
``progress=True`` shows it on any stream. Without tqdm installed there is no bar.
"""

from __future__ import annotations

import os
import sys
from typing import Any

DELAY_S = 2.0


def wanted(progress: bool | None) -> bool:
    if progress is not None:
        return bool(progress)
    if os.environ.get("SPARTA_PROGRESS", "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    return sys.stderr.isatty()


class Progress:
    """``advance(next_step)`` marks the current step done and names the next one."""

    def __init__(self, progress: bool | None = None, steps: int = 3) -> None:
        self.bar: Any = None
        if not wanted(progress):
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self.bar = tqdm(
            total=steps,
            desc="sparta: tracing",
            delay=DELAY_S,
            leave=False,
            file=sys.stderr,
            dynamic_ncols=True,
            unit="step",
        )

    def advance(self, step: str, more: int = 0) -> None:
        if self.bar is None:
            return
        if more:
            self.bar.total += more
            self.bar.refresh()
        self.bar.update(1)
        self.bar.set_description(f"sparta: {step}")  # a few steps per compile: draw each

    def node(self, name: str, index: int, total: int) -> None:
        """Called by the planner before measuring node ``index`` of ``total``."""
        if index == 0:
            self.advance(f"measuring {name}", more=total)
        else:
            self.advance(f"measuring {name}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
