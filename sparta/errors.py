"""Every error SparTA-py raises.

A message states the requirement, what was got, and how to fix it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SpartaError(Exception):
    """Base class of all SparTA-py errors."""


class AttrError(SpartaError, ValueError):
    """A sparsity attribute is wrong: unknown name, wrong shape, non-boolean values."""

    @classmethod
    def unknown_name(cls, name: str, known: Iterable[str], what: str = "attribute") -> AttrError:
        known = list(known)
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        sample = ", ".join(repr(k) for k in known[:8]) + (" ..." if len(known) > 8 else "")
        return cls(
            f"{what} {name!r} names no parameter or forward() argument of the model.{hint} "
            f"Known names include: {sample}. Use a qualified parameter name "
            f"(as in model.named_parameters()) or the name of a forward() argument."
        )


class TraceError(SpartaError, RuntimeError):
    """The model cannot be captured by torch.export."""


class MissingRuleError(SpartaError, KeyError):
    """Strict mode met an op without a propagation rule."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class RuleError(SpartaError, ValueError):
    """A propagation rule is registered wrongly or returned something malformed."""


class BackendError(SpartaError, RuntimeError):
    """A backend cannot build or run an implementation (no compiler, no GPU, bad config)."""


class BuildTimeout(BackendError):
    """A kernel build ran past its time limit (the compiler was killed)."""


class TrainModeError(SpartaError, RuntimeError):
    """A model in training mode was given to ``sparta.compile``, or a compiled model was put in
    training mode: compiled models compute inference (eval-mode) semantics only."""


class InputError(SpartaError, ValueError):
    """An input of a compiled model differs from what it was compiled for (dtype, device, a dim
    torch.export fixed, or the feature size a generated kernel takes)."""


class PlanError(SpartaError, ValueError):
    """The plan cannot be made as asked (e.g. an unknown backend name)."""


class PlanFileError(SpartaError, ValueError):
    """A saved plan that cannot be read, or that does not fit the model it is loaded for."""
