import os
import sys

import pytest
import torch

# Without a GPU, generated Triton kernels run in interpreter mode; it must be set before
# triton is imported. On a GPU machine compiled kernels run (the gpu-marked tests).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))
# Each test compiles for itself (several inject faults into the planner): the plan cache is off
# unless a test turns it on (tests/test_tools.py). The kernel cache stays on.
os.environ.setdefault("SPARTA_CACHE", "0")


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same random state: masks and inputs drawn without an explicit
    generator are reproducible, and a failure can be replayed."""
    torch.manual_seed(0)


def pytest_terminal_summary(terminalreporter) -> None:
    """The fault-injection table (tests/test_faults*.py), when those tests ran."""
    log = sys.modules.get("fault_log")
    results = getattr(log, "RESULTS", None)
    if not results:
        return
    write = terminalreporter.write_line
    write("")
    write("fault | expected | observed")
    write("--- | --- | ---")
    for r in results:
        write(
            f"{r.fault} | {r.expected} | {r.observed}{'' if r.survived else '  <-- NOT SURVIVED'}"
        )
    survived = sum(r.survived for r in results)
    wrong = sum(r.wrong_answer for r in results)
    write(f"{len(results)} injected, {survived} survived, {wrong} wrong answers")
