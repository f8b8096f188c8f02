"""The record of injected faults (tests/test_faults*.py), printed by conftest.py at the end."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FaultResult:
    fault: str
    expected: str
    observed: str
    survived: bool
    wrong_answer: bool


RESULTS: list[FaultResult] = []


def record(fault: str, expected: str, observed: str, survived: bool, wrong: bool = False) -> None:
    """Log one injected fault, then fail the test unless it was survived with no wrong answer."""
    RESULTS.append(FaultResult(fault, expected, observed, survived, wrong))
    assert not wrong, f"{fault}: wrong answer ({observed})"
    assert survived, f"{fault}: expected {expected}, observed {observed}"
