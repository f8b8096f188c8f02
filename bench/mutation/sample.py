"""Keep a seeded random sample of a cosmic-ray session's pending mutants; skip the rest.

    python bench/mutation/sample.py SESSION.sqlite FRACTION [--seed N] [--module PATH=FRACTION ...]

Run after ``cosmic-ray init`` and ``cr-filter-operators``: the skipped ones read
"not sampled" in ``cr-report``. A fraction of 1 keeps everything. The sample is drawn per
module file, so every file is represented in proportion.
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict

from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import WorkerOutcome, WorkResult


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("session")
    ap.add_argument("fraction", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--module", action="append", default=[], help="PATH=FRACTION override")
    args = ap.parse_args()
    per_module = {k: float(v) for k, v in (m.split("=", 1) for m in args.module)}
    with use_db(args.session, WorkDB.Mode.open) as db:
        by_module: dict[str, list[str]] = defaultdict(list)
        for item in db.pending_work_items:
            by_module[str(item.mutations[0].module_path)].append(item.job_id)
        rng = random.Random(args.seed)
        skipped = []
        for module, jobs in sorted(by_module.items()):
            fraction = per_module.get(module, args.fraction)
            keep = set(rng.sample(jobs, round(fraction * len(jobs))))
            skipped += [j for j in jobs if j not in keep]
            print(f"{module}: {len(keep)} of {len(jobs)} mutants sampled")
        if skipped:
            result = WorkResult(output="not sampled", worker_outcome=WorkerOutcome.SKIPPED)
            db.set_multiple_results(skipped, result)


if __name__ == "__main__":
    main()
