"""False `loss_divergence` on flat runs of noisy single-sample losses, and how soon a real rise is found.

Batch size 1 with a squared error gives losses distributed as χ²₁ about the true loss: the median
of a window of 20 is itself noisy. The rule compares a running median with the first window's
(2x its magnitude above it, `divergence_factor`) and, since the third session of 2026-12-06, also
asks the window's losses to rank above the first window's beyond chance (Mann-Whitney z >
`divergence_rank_z`). This runs the rule itself (`find_loss_divergence`) on synthetic losses, with
and without the rank test (z = -inf), so both columns come from one run:

  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/divergence_noise.py [--seeds 500]
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from gradwatch.diagnose.rules.loss import find_loss_divergence
from gradwatch.diagnose.thresholds import Thresholds
from gradwatch.store.series import METRICS, RunSeries

NOISE = {
    "chi2(1): batch size 1, squared error": lambda rng, n: rng.standard_normal(n) ** 2,
    "chi2(1) x lognormal: heavier tail": lambda rng, n: rng.standard_normal(n) ** 2 * np.exp(rng.standard_normal(n)),
    "mean of 8 chi2(1): batch size 8": lambda rng, n: (rng.standard_normal((n, 8)) ** 2).mean(1),
}


def run_of(loss: np.ndarray) -> RunSeries:
    n = len(loss)
    return RunSeries([], np.arange(n), loss, np.full(n, 0.1), {m: np.full((n, 0), np.nan) for m in METRICS},
                     meta={"optimizer": "SGD", "sample_every": 10, "skipped_steps": []})


def first_found(loss: np.ndarray, th: Thresholds) -> int | None:
    found = find_loss_divergence(run_of(loss), th)
    return found[0].first_step if found else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=500)
    args = ap.parse_args()
    alone = Thresholds()
    object.__setattr__(alone, "divergence_rank_z", -math.inf)  # (no such threshold is valid: a user's must be > 0)
    rules = {"factor alone": alone, "factor + rank test": Thresholds()}
    print("| noise | steps | rule | flat runs flagged | 5x rise at mid-run found | its median delay (steps) |")
    print("|---|---|---|---|---|---|")
    for name, noise in NOISE.items():
        for n in (50, 200, 1000):
            rise = np.where(np.arange(n) >= n // 2, 5.0, 1.0)
            for label, th in rules.items():
                rng = np.random.default_rng(0)
                flat = [first_found(noise(rng, n), th) for _ in range(args.seeds)]
                risen = [first_found(noise(rng, n) * rise, th) for _ in range(args.seeds)]
                # found: flagged no earlier than a window (a tenth of the run) before the rise, where
                # the running median's onset can be placed; earlier is a false alarm before it
                found = [s for s in risen if s is not None and s >= n // 2 - n // 10]
                delays = [s - n // 2 for s in found]
                print(f"| {name} | {n} | {label} | {np.mean([s is not None for s in flat]):.1%} "
                      f"| {len(found) / len(risen):.1%} "
                      f"| {np.median(delays) if delays else '-'} |")


if __name__ == "__main__":
    main()
