"""``--auto --jobs 2`` against ``--jobs 1``: compile time, and the choice with a latency cache.

    python benchmarks/jobs.py [--only NAME ...]

Per case, four compiles of the same ``--auto`` run, in this order:

1. ``--jobs 1`` with a fresh latency cache A (every latency measured);
2. ``--jobs 2`` with a fresh latency cache B (measured too, under the workers' shared lock);
3. ``--jobs 2`` with cache A: every measurement is replayed, so the choice must be run 1's;
4. ``--jobs 1`` with cache A: the serial time of a replayed run, to compare run 3 with.

Runs 1 vs 2 say what the workers save when everything is measured (the measurements take the
lock in turn, so they do not overlap), runs 4 vs 3 what they save on the compile work alone.
Writes results/jobs.md and .json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from cases import CASES
from common import calibration, fixed_batch, write

from onnxcomp.auto import AutoConfig, run_auto
from onnxcomp.executor import Processes, Serial
from onnxcomp.judge import Judge
from onnxcomp.passbase import RunContext

# (case, calibration samples, --target-speedup, --max-drop)
RUNS: list[tuple[str, int, float | None, float]] = [
    ("fashion_mnist_vgg", 256, 3.0, 0.02),
    ("mobilenetv2", 64, None, 0.05),
]


def one_case(name: str, n: int, target: float | None, budget: float) -> list[dict[str, Any]]:
    case = CASES[name]
    model = case.load()
    calib = calibration(case.inputs("calib"), n, fixed_batch=fixed_batch(model))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        a, b = str(Path(tmp) / "a.json"), str(Path(tmp) / "b.json")
        for label, jobs, cache in (("jobs 1, measured", 1, a), ("jobs 2, measured", 2, b),
                                   ("jobs 2, replayed from run 1", 2, a),
                                   ("jobs 1, replayed from run 1", 1, a)):
            config = AutoConfig(target_speedup=target, max_drop=budget, latency_cache=cache)
            ctx = RunContext(judge=Judge(), executor=Processes(jobs) if jobs > 1 else Serial())
            start = time.perf_counter()
            chosen = run_auto(model, calib, config, context=ctx)
            seconds = time.perf_counter() - start
            rows.append({"model": name, "run": label, "jobs": jobs, "seconds": seconds,
                         "chosen": chosen.chosen, "outcome": chosen.code,
                         "plans": {p.name: round(p.speedup, 3) for p in chosen.plans}})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    docs: list[dict[str, Any]] = []
    for name, n, target, budget in RUNS:
        if args.only and name not in args.only:
            continue
        docs += one_case(name, n, target, budget)
    rows = []
    for d in docs:
        first = next(x for x in docs if x["model"] == d["model"])
        rows.append([d["model"], d["run"], f"{d['seconds']:.0f}",
                     f"{first['seconds'] / d['seconds']:.2f}x", d["chosen"], d["outcome"],
                     ", ".join(f"{k} {v:.2f}x" for k, v in d["plans"].items())])
    pre = ("`--auto` compiled with its plans in 1 or 2 worker processes (`--jobs`), on this "
           "2-core machine (ORT CPU, 1 intra-op thread for every latency). Runs 3 and 4 "
           "replay run 1's latency cache: they must choose what run 1 chose.\n\n")
    write("jobs_partial" if args.only else "jobs",
          ["model", "run", "compile s", "vs run 1", "chosen", "outcome", "plans (speedup)"],
          rows, docs, pre)


if __name__ == "__main__":
    main()
