"""Replay cheaper versions of `gradwatch fix` on the trials a run of `run.py` recorded, without
running anything: how many trial steps each would save, and in how many scenarios its choice would
differ: other finals (whose outcome the recording cannot tell), or, when a final is stopped, another winner.

    .venv/bin/python benchmarks/repair/replay.py [--out benchmarks/repair/out]

Policies (the trials are deterministic, so the first k steps of a recorded trial are the k-step trial):
  shorter screening   every screening trial cut to k steps (past the fault's onset, as fix counts them),
                      re-diagnosed, re-ranked, finals re-picked
  stop the 2nd final  ended at half the budget when the first final works and the second's loss (median
                      of the last tenth) is above the first's there (median stopping rule, Golovin et
                      al. 2017, with one completed trial)
  ... beyond noise    the same, when the second's loss there is above the first's by more than twice the
                      standard error of the difference (as fix's verdict reads two losses)
  stop screening      a screening trial ended at half its length when its loss there is above the
                      median of those screened before it (at least 2)
  finals as now       `pick_finals` and `spare_final` of the code as it is now, on the recorded screening:
                      the recorded finals it would no longer run are saved; a final the recording
                      lacks counts as a differing choice (it needs a re-run)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from gradwatch.diagnose import diagnose
from gradwatch.errors import GradwatchError
from gradwatch.fix import FixResult, applied, pick_finals, spare_final
from gradwatch.fix.candidates import Candidate
from gradwatch.fix.inject import NOT_APPLIED
from gradwatch.fix.trial import REMEDY_FILE, Trial, final_error, final_loss, first_loss, last_phase
from gradwatch.store import read_run
from gradwatch.store.series import RunSeries

HERE = Path(__file__).resolve().parent


def first_steps(run: RunSeries, k: int) -> RunSeries:
    """The series of the run's first k steps."""
    keep = run.steps < run.steps[0] + k
    profiles = {n: (s[s < run.steps[0] + k], v[s < run.steps[0] + k]) for n, (s, v) in run.time_profiles.items()}
    return dataclasses.replace(run, steps=run.steps[keep], loss=run.loss[keep], lr=run.lr[keep],
                               metrics={m: a[keep] for m, a in run.metrics.items()}, time_profiles=profiles)


def trial(run_dir: Path, k: int | None = None) -> Trial:
    info = json.loads((run_dir / REMEDY_FILE).read_text())
    cand = Candidate(info["name"], info["spec"], info["code"])
    skipped = run_dir / NOT_APPLIED  # the remedy changed nothing: the trial ended before its first step
    try:
        run = read_run(run_dir)
    except GradwatchError:  # recorded nothing
        return Trial(cand, run_dir, 1, 0.0)
    run = first_steps(run, k) if k else run
    return Trial(cand, run_dir, 0, 0.0, len(run.steps), final_loss(run.loss), diagnose(run),
                 first_loss(run.loss[run.steps >= last_phase(run)]),  # as `measure` reads a trial
                 skipped.read_text().strip() if skipped.is_file() else "", final_error(run.loss))


def loss_at(run_dir: Path, step: int, window: int) -> float:
    try:
        loss = read_run(run_dir).loss
    except GradwatchError:  # recorded nothing
        return float("nan")
    if len(loss) <= step:
        return float("nan")
    recent = loss[max(0, step - window):step]  # the window before `step`, read like final_loss reads the end
    return float(np.median(recent)) if np.isfinite(recent).all() else float("inf")


def behind_beyond_noise(loss: np.ndarray, other: np.ndarray, z: float = 2.0) -> bool:
    """`loss` ended above `other` by more than `z` standard errors of the difference, each read as fix
    reads a trial of that length (`final_loss`, `final_error`); a non-finite one is behind a finite one."""
    a, b = final_loss(loss), final_loss(other)
    if not np.isfinite(a) or not np.isfinite(b):
        return np.isfinite(b) and not np.isfinite(a)
    return a - b > z * float(np.hypot(np.nan_to_num(final_error(loss)), np.nan_to_num(final_error(other))))


def recorded(d: Path, kind: str) -> list[tuple[Path, int]]:
    """fix.json's `kind` ("screened" or "trials"): each trial's directory and the steps it was
    measured at. A final run on from its screening trial shares that trial's directory, which then
    holds more steps than the screening measured."""
    rows = json.loads((d / "fix.json").read_text())[kind]
    return [(d / row["run_dir"], row["steps"]) for row in rows]


def specs(cands: list[Candidate]) -> list[str]:
    return sorted(json.dumps(c.spec, sort_keys=True) for c in cands)


def replay(out: Path) -> list[list[str]]:
    results = json.loads((out / "results.json").read_text())
    ours = sum(r["strategies"]["gradwatch"]["trial_steps"] for r in results)
    theirs = sum(r["strategies"]["AutoTrainer order"]["trial_steps"] for r in results)
    rows = [["policy", "trial steps saved", "trial steps / AutoTrainer's", "choice differs in", "of them repaired now"]]

    def row(name: str, saved: int, changed: list[dict]) -> None:
        repaired = [r["scenario"] for r in changed if r["strategies"]["gradwatch"]["repaired"]]
        rows.append([name, str(saved), f"{(ours - saved) / theirs:.2f}", str(len(changed)),
                     f"{len(repaired)}" + (f" ({', '.join(repaired)})" if repaired else "")])

    row("as recorded", 0, [])
    cases = []
    for r in results:
        d = out / r["scenario"] / "gradwatch"
        screens = recorded(d, "screened")
        if len(screens) > 1:
            cases.append((r, d, [p for p, _ in screens], [trial(p, k) for p, k in screens]))
    for frac in (8, 6, 5):
        saved, changed = 0, []
        for r, d, screens, full in cases:
            budget = r["budget_steps"]
            onset = max(t.steps for t in full) - max(budget // 4, 10)  # counted from the fault's onset, as fix does
            k = min(budget, max(budget // frac, 10) + max(onset, 0))
            short = [trial(p, k) for p in screens]
            saved += sum(t.steps - s.steps for t, s in zip(full, short))
            finals = [pick_finals(sorted(ts, key=lambda t: t.score)) for ts in (full, short)]
            if specs(finals[0]) != specs(finals[1]):
                changed.append(r)
        row(f"screening 1/{frac} of the budget (not 1/4)", saved, changed)
    saved, changed = 0, []
    for r in results:
        g, d, budget = r["strategies"]["gradwatch"], out / r["scenario"] / "gradwatch", r["budget_steps"]
        if len(g["trials"]) < 2:
            continue
        (one, _), (two, _) = recorded(d, "trials")[:2]
        first, second = trial(one), trial(two)
        half, window = budget // 2, max(1, budget // 10)
        if first.works and second.steps > half and loss_at(two, half, window) > loss_at(one, half, window):
            saved += second.steps - half
            if g["winner"] == g["trials"][1]:
                changed.append(r)
    row("stop the 2nd final at half the budget when behind", saved, changed)
    saved, changed = 0, []
    for r in results:
        g, d, half = r["strategies"]["gradwatch"], out / r["scenario"] / "gradwatch", r["budget_steps"] // 2
        if len(g["trials"]) < 2 or not trial(recorded(d, "trials")[0][0]).works:
            continue
        first, second = (read_run(p).loss for p, _ in recorded(d, "trials")[:2])
        if len(second) > half and behind_beyond_noise(second[:half], first[:half]):
            saved += len(second) - half
            if g["winner"] == g["trials"][1]:
                changed.append(r)
    row("stop the 2nd final at half when behind beyond the noise", saved, changed)
    saved, changed = 0, []
    for r, d, screens, full in cases:
        half, window, done, stopped = full[0].steps // 2, max(1, full[0].steps // 10), [], set()
        for p, t in zip(screens, full):
            at = loss_at(p, half, window)
            if len(done) >= 2 and np.isfinite(at) and at > np.median(done):
                saved += t.steps - half
                stopped.add(p)
            elif np.isfinite(at):
                done.append(at)
        finals = [pick_finals(sorted(full, key=key))
                  for key in (lambda t: t.score, lambda t: (t.run_dir in stopped, t.score))]
        if specs(finals[0]) != specs(finals[1]):
            changed.append(r)
    row("stop screening at half when above the median", saved, changed)
    saved, changed = 0, []
    for r, d, screens, full in cases:
        k = max(t.steps for t in full)
        half = k - max(r["budget_steps"] // 4, 10) // 2  # halfway through the steps past the onset
        early = [trial(p, half) for p in screens]
        by_half = sorted(range(len(full)), key=lambda i: early[i].score)
        kept, dropped = by_half[:(len(full) + 1) // 2], by_half[(len(full) + 1) // 2:]
        order = sorted((full[i] for i in kept), key=lambda t: t.score) + [early[i] for i in dropped]
        saved += sum(max(0, full[i].steps - half) for i in dropped)
        if specs(pick_finals(sorted(full, key=lambda t: t.score))) != specs(pick_finals(order)):
            changed.append(r)
    row("halve the screened at half the screening (successive halving)", saved, changed)
    saved, changed = 0, []
    for r, d, screens, full in cases:
        step, change = finals_now(d, full)
        saved += step
        if change:
            changed.append(r)
    row("finals as the code picks them now", saved, changed)
    return rows


def finals_now(d: Path, screened: list[Trial]) -> tuple[int, bool]:
    """The recorded final steps the code's `pick_finals` (and `spare_final`) would not run on this
    screening, and whether its choice differs: a final the recording lacks, or another winner."""
    key = lambda c: json.dumps(c.spec, sort_keys=True)
    finals = {key(t.candidate): t for t in (trial(p) for p, _ in recorded(d, "trials"))}
    done = applied(screened)
    if not done or not finals:
        return 0, False
    picked = pick_finals(done)[:2]
    if any(key(c) not in finals for c in picked):
        return 0, True
    kept = [finals[key(c)] for c in picked]
    if (spare := spare_final(FixResult(Trial(Candidate("baseline"), d, 0, 0.0), kept, screened=screened))) is not None:
        if key(spare) not in finals:
            return 0, True
        kept.append(finals[key(spare)])
    best = lambda ts: min(ts, key=lambda t: t.score).candidate.name
    saved = sum(t.steps for t in finals.values()) - sum(t.steps for t in kept)
    return saved, best(kept) != best(list(finals.values()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "out", help="run.py's --out (default out/)")
    args = parser.parse_args(argv)
    if not (args.out / "results.json").exists():
        sys.exit(f"no {args.out / 'results.json'}: run benchmarks/repair/run.py first")
    rows = replay(args.out)
    print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    print("\n".join("| " + " | ".join(r) + " |" for r in rows[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
