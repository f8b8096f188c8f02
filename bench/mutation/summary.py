"""Markdown summary of cosmic-ray sessions: kill rate per module and the surviving mutants.

    python bench/mutation/summary.py out/mutation/emitter.sqlite [more.sqlite ...]
        [--equivalent bench/mutation/equivalent.toml]

A mutant is *killed* when the test command failed (a timeout counts as killed: the tests did
not pass), *survived* when it passed. Mutants skipped by the operator filter ("filtered out")
or the sample ("not sampled") are not counted. ``equivalent.toml`` lists survivors that no
test can kill, each with a reason:

    ["sparta/compile.py:core/ReplaceComparisonOperator_Eq_NotEq:3"]
    reason = "..."

They are excluded from the kill rate and listed apart. Keys name the occurrence of an operator
in a file, so they hold for the source the session was made from.
"""

from __future__ import annotations

import argparse
import difflib
from collections import Counter, defaultdict
from pathlib import Path

import toml  # a cosmic-ray dependency (tomllib is Python 3.11+)
from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import TestOutcome, WorkerOutcome


def _diff(m) -> str:
    """The mutation's diff, recomputed from the file (for results stored without one)."""
    from cosmic_ray.mutating import mutate_code
    from cosmic_ray.plugins import get_operator

    source = Path(m.module_path).read_text()
    mutated = mutate_code(source, get_operator(m.operator_name)(**m.operator_args), m.occurrence)
    if mutated is None:
        return ""
    lines = difflib.unified_diff(source.split("\n"), mutated.split("\n"), lineterm="")
    return "\n".join(lines)


def _changed_lines(diff: str | None) -> str:
    if not diff:
        return "(no diff)"
    lines = [ln for ln in diff.splitlines() if ln[:1] in "-+" and ln[:3] not in ("---", "+++")]
    cells = (ln.strip().replace("|", "\\|") for ln in lines[:4])  # a table cell: escape pipes
    return "<br>".join(f"`{c}`" for c in cells)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("sessions", nargs="+")
    ap.add_argument("--equivalent", default=None)
    args = ap.parse_args()
    equivalent: dict = {}
    if args.equivalent and Path(args.equivalent).exists():
        equivalent = toml.loads(Path(args.equivalent).read_text())
    counts: dict[str, Counter] = defaultdict(Counter)
    survivors: list[tuple[str, str, int, str, str]] = []
    equivalents: list[tuple[str, str, str]] = []
    for session in args.sessions:
        with use_db(session, WorkDB.Mode.open) as db:
            for item, result in db.completed_work_items:
                m = item.mutations[0]
                module = str(m.module_path)
                if result.worker_outcome == WorkerOutcome.SKIPPED:  # operator filter or sample
                    filtered = (result.output or "").startswith("Filtered")
                    counts[module]["filtered" if filtered else "skipped"] += 1
                    continue
                key = f"{module}:{m.operator_name}:{m.occurrence}"
                if result.test_outcome == TestOutcome.SURVIVED:
                    change = _changed_lines(result.diff or _diff(m))
                    if key in equivalent:
                        counts[module]["equivalent"] += 1
                        equivalents.append((key, change, equivalent[key]["reason"]))
                    else:
                        counts[module]["survived"] += 1
                        survivors.append((module, m.operator_name, m.start_pos[0], key, change))
                elif result.worker_outcome == WorkerOutcome.NORMAL:
                    counts[module]["killed"] += 1
                else:  # the mutant broke the run itself (timeout, exception): not a pass
                    counts[module]["killed"] += 1
                    counts[module]["timeout/error"] += 1
            for item in db.pending_work_items:
                counts[str(item.mutations[0].module_path)]["pending"] += 1
    print(
        "| module | run | killed | survived | equivalent | kill rate | not sampled "
        "| filtered out | pending |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    total = Counter()
    for module in sorted(counts):
        c = counts[module]
        total.update(c)
        print(_row(module, c))
    print(_row("**all**", total))
    if survivors:
        print("\n### Surviving mutants\n")
        print("| file:line | operator | change |")
        print("|---|---|---|")
        for module, op, line, _key, diff in sorted(survivors):
            print(f"| {module}:{line} | {op.split('/')[-1]} | {diff} |")
    if equivalents:
        print("\n### Equivalent mutants (excluded from the kill rate)\n")
        print("| mutant | change | why no test can kill it |")
        print("|---|---|---|")
        for key, diff, reason in sorted(equivalents):
            print(f"| {key} | {diff} | {reason} |")


def _row(name: str, c: Counter) -> str:
    run = c["killed"] + c["survived"] + c["equivalent"]
    denom = c["killed"] + c["survived"]
    rate = f"{c['killed'] / denom:.0%}" if denom else "-"
    return (
        f"| {name} | {run} | {c['killed']} | {c['survived']} | {c['equivalent']} | {rate} | "
        f"{c['skipped']} | {c['filtered']} | {c['pending']} |"
    )


if __name__ == "__main__":
    main()
