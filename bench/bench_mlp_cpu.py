"""CPU, fp32, 2 threads: MLP 1024->4096->1024 at batch 64 with 75% of hidden units pruned.

Compiled (planner's choice, here structured shrinking) vs the masked dense model, measured
round-robin in one run. Ideal speedup 4x. Prints a table; pass --md to also print markdown.
"""

from __future__ import annotations

import platform
import sys

import torch
import torch.nn as nn

import sparta
from sparta.timing import compare_ms


class MLP(nn.Module):
    def __init__(self, d: int = 1024, h: int = 4096) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = MLP().eval()
    rows = []
    for kept in (0.5, 0.25, 0.1):
        units = torch.randperm(4096)[: int(4096 * kept)]
        keep = torch.zeros(4096, dtype=torch.bool)
        keep[units] = True
        attrs = {"fc1.weight": keep[:, None].expand(4096, 1024).clone(), "fc1.bias": keep}
        x = torch.randn(64, 1024)
        compiled = sparta.compile(model, attrs, (x,), measure=False)
        masked = MLP().eval()
        masked.load_state_dict(model.state_dict())
        with torch.no_grad():
            masked.fc1.weight.mul_(attrs["fc1.weight"])
            masked.fc1.bias.mul_(keep)
            err = (compiled(x) - masked(x)).abs().max().item()
        t = compare_ms(
            {"dense": lambda m=masked, x=x: m(x), "compiled": lambda c=compiled, x=x: c(x)},
            torch.device("cpu"),
            budget_ms=2000,
            max_reps=300,
        )
        impls = ",".join(sorted({n.impl for n in compiled.report.nodes if n.latency_ms}))
        rows.append(
            (1 - kept, t["dense"], t["compiled"], t["dense"] / t["compiled"], 1 / kept, impls, err)
        )
    print(
        f"# MLP 1024->4096->1024, batch 64, fp32, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    print("| units pruned | dense ms | compiled ms | speedup | ideal | impl | max abs err |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r[0]:.0%} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.2f}x | {r[4]:.0f}x | {r[5]} "
            f"| {r[6]:.1e} |"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
