"""The repair benchmark: does `gradwatch fix` repair the faulty detection scenarios, and at what cost,
beside AutoTrainer's fixed repair order and a random remedy, all applied through the same hooks.

    python benchmarks/repair/run.py [--only NAME ...] [--jobs 2] [--cap 200] [--out DIR] [--markdown]

A scenario is faulty when its expected kinds include a harmful one (gradwatch.fix.candidates.HARMFUL).
Per scenario: `gradwatch.fix.fix(script)` (its default strategy: every candidate built from the
findings screened for a quarter of the budget, then the leader combined with the runner-up and
with the third at full length); AutoTrainer's order (full trials, stop at the first that
works) and the random pick are run from the same baseline. A full-length trial is run once and
charged to every strategy that runs it.

Repaired: the strategy's winner (FixResult.winner) leaves no harmful finding and its final loss is
<= the healthy variant's final loss + 10% of its magnitude. The healthy variant (`script --healthy`)
is measured once, with the same budget and the same hooks, and cached in healthy.json.
Cost: optimizer steps of the baseline and every trial the strategy runs / the baseline's steps.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent / "detection"))
import harness  # noqa: E402

from gradwatch.fix import FixResult, fix  # noqa: E402
from gradwatch.fix.candidates import HARMFUL, Candidate, autotrainer_order  # noqa: E402
from gradwatch.fix.trial import Trial, run_trial  # noqa: E402
from gradwatch.store import read_run  # noqa: E402

HEALTHY_CACHE = HERE / "healthy.json"
DEFAULT_OUT = HERE / "out"
TOLERANCE = 0.10
STRATEGIES = ("gradwatch", "AutoTrainer order", "random")
ANCHOR = "AutoTrainer (Zhang et al., ICSE 2021) repaired 97.33% of its buggy models at 1.19x the training time."
TRIAL_TIMEOUT = 600.0
BASELINE = Candidate("baseline (no change)")


def faulty(scenarios: list[harness.Scenario]) -> list[harness.Scenario]:
    return [s for s in scenarios if set(s.expected) & set(HARMFUL)]


def command(s: harness.Scenario, healthy: bool = False) -> list[str]:
    return [sys.executable, str(s.path)] + (["--healthy"] if healthy else [])


def loss_ok(loss: float, healthy: float) -> bool:
    return loss != float("inf") and loss <= healthy + TOLERANCE * abs(healthy)


def clean(t: Trial) -> bool:
    """fix's stopping test, and no finding of a harmful kind left at any severity: fix itself lets
    one the diagnosis rates "info" pass, the issue's definition of repaired does not."""
    return t.works and not {f.kind for f in t.findings} & set(HARMFUL)


def repaired(t: Trial | None, healthy: float) -> bool:
    return t is not None and clean(t) and loss_ok(t.final_loss, healthy)


def repaired_drop(t: Trial | None, healthy: dict) -> bool:
    """The looser reading: no harmful finding and at least 90% of the healthy variant's loss drop
    (final <= healthy final + 10% of (healthy initial - healthy final))."""
    h0, h = healthy["initial_loss"], healthy["final_loss"]
    return t is not None and clean(t) and t.final_loss <= h + TOLERANCE * max(h0 - h, 0.0)


def initial_loss(run_dir: Path) -> float:
    """The median of the first tenth of the recorded finite losses."""
    loss = read_run(run_dir).loss
    loss = loss[np.isfinite(loss)]
    return float(np.median(loss[:max(1, len(loss) // 10)])) if len(loss) else float("inf")


def works(t: Trial) -> bool:
    """fix's stopping test: the trial ran, left no harmful finding and a finite loss."""
    return bool(t.steps) and not t.harmful and t.final_loss != float("inf")


def healthy_loss(s: harness.Scenario, budget: int, out: Path, refresh: bool) -> dict:
    """The healthy variant's final loss at this budget, from the cache or measured (same hooks)."""
    cache = json.loads(HEALTHY_CACHE.read_text()) if HEALTHY_CACHE.exists() else {}
    entry = cache.get(s.name)
    if entry and entry["budget_steps"] == budget and "initial_loss" in entry and not refresh:
        return entry
    t = run_trial(command(s, healthy=True), out / s.name / "healthy", BASELINE, budget, timeout=TRIAL_TIMEOUT)
    rel = os.path.relpath(s.path, ROOT)
    return {"command": f"OMP_NUM_THREADS=1 GRADWATCH_MAX_STEPS={budget} (gradwatch.fix.trial.run_trial) python {rel} --healthy",
            "budget_steps": budget, "steps": t.steps, "initial_loss": initial_loss(t.run_dir), "final_loss": t.final_loss,
            "findings": sorted({f.kind for f in t.findings}), "exit_code": t.exit_code}


def describe(result: FixResult, healthy: dict, chosen: Trial | None = None) -> dict:
    """A strategy's outcome; `chosen` is the trial it stands by (default: FixResult.winner)."""
    w = result.winner if chosen is None else chosen
    return {
        "trials": [t.candidate.name for t in result.trials],
        "winner": w.candidate.name if w else None,
        "winner_loss": w.final_loss if w else None,
        "winner_harmful": w.harmful if w else None,
        "repaired": repaired(w, healthy["final_loss"]),
        "repaired_drop": repaired_drop(w, healthy),
        "cost_steps": result.cost_steps,
        "trial_steps": result.cost_steps - result.baseline.steps,
    }


def why(d: dict, healthy: float, baseline_harmful: list[str]) -> str:
    if d["repaired"]:
        return ""
    if not d["trials"]:
        return "no candidate" + ("" if baseline_harmful else " (the baseline showed no harmful finding)")
    if d["winner"] is None:
        return "no trial beat the baseline"
    if d["winner_harmful"]:
        return f"best trial ({d['winner']}) still has {', '.join(d['winner_harmful'])}"
    return f"{d['winner']}: loss {d['winner_loss']:.4g} > healthy {healthy:.4g} + 10%"


def run_scenario(s: harness.Scenario, budget: int, out: Path, refresh: bool) -> dict:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    # a working directory of its own, as a user's project is: fix puts back what the trials write
    # there, and the scenarios run beside it (--jobs) wrote into a shared one (their trials' new
    # directories read as written by this one's, which then never paused)
    (out / s.name / "workdir").mkdir(parents=True, exist_ok=True)
    os.chdir(out / s.name / "workdir")
    start = time.perf_counter()
    say = lambda msg: print(f"  [{s.name}] {msg}", file=sys.stderr, flush=True)
    healthy = healthy_loss(s, budget, out, refresh)
    say(f"healthy variant: final loss {healthy['final_loss']:.4g}, findings {healthy['findings'] or '-'}")
    target = healthy["final_loss"]
    cmd = command(s)
    gw = fix(cmd, out=out / s.name / "gradwatch", budget_steps=budget, strategy="screen", progress=say,
             timeout=TRIAL_TIMEOUT)
    base = gw.baseline
    # (a final fix stopped halfway, behind, is no full trial: the other strategies run theirs)
    cache: dict[str, Trial] = {json.dumps(t.candidate.spec, sort_keys=True): t for t in gw.trials if not t.stopped}

    def trial(c: Candidate) -> Trial:
        key = json.dumps(c.spec, sort_keys=True)
        if key not in cache:
            say(f"trial: {c.name}")
            cache[key] = run_trial(cmd, out / s.name / f"extra-{len(cache) + 1}", c, budget, timeout=TRIAL_TIMEOUT)
        return cache[key]

    at_cands, at_trials = autotrainer_order(base.findings), []
    for c in at_cands:
        at_trials.append(trial(c))
        if works(at_trials[-1]):
            break
    union = {json.dumps(c.spec, sort_keys=True): c for c in [t.candidate for t in gw.screened or gw.trials] + at_cands}
    pick = random.Random(zlib.crc32(s.name.encode())).choice(list(union.values())) if union else None
    rnd = FixResult(base, [trial(pick)] if pick else [])
    results = {
        "gradwatch": describe(gw, healthy),
        "AutoTrainer order": describe(FixResult(base, at_trials), healthy),
        # a random pick is judged as picked, whether or not it beats the baseline
        "random": describe(rnd, healthy, chosen=rnd.trials[0] if rnd.trials else None),
    }
    for d in results.values():
        d["why"] = why(d, target, base.harmful)
    return {"scenario": s.name, "family": s.family, "expected": s.expected, "budget_steps": budget,
            "baseline": {"steps": base.steps, "final_loss": base.final_loss, "harmful": base.harmful,
                         "findings": sorted({f.kind for f in base.findings})},
            "healthy": healthy, "strategies": results, "wall_s": round(time.perf_counter() - start, 1)}


def save_healthy(entries: dict) -> None:
    cache = json.loads(HEALTHY_CACHE.read_text()) if HEALTHY_CACHE.exists() else {}
    cache.update(entries)
    HEALTHY_CACHE.write_text(json.dumps(dict(sorted(cache.items())), indent=1) + "\n")


# ---------------------------------------------------------------- tables


def _fmt_loss(x) -> str:
    return "-" if x is None else ("inf" if x == float("inf") else f"{x:.3g}")


def table(rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def summary(results: list[dict], markdown: bool) -> str:
    n = len(results)
    at_trial = sum(r["strategies"]["AutoTrainer order"]["trial_steps"] for r in results)
    at_total = sum(r["strategies"]["AutoTrainer order"]["cost_steps"] for r in results)
    rows = [["strategy", "repaired", "mean trials / scenario", "cost (x one baseline run)",
             "trial steps / AutoTrainer's", "incl. baseline", "repaired (90% of healthy loss drop)"]]
    for name in STRATEGIES:
        ds = [r["strategies"][name] for r in results]
        k = sum(d["repaired"] for d in ds)
        multiples = [d["cost_steps"] / r["baseline"]["steps"] for d, r in zip(ds, results)]
        trial_steps, total = sum(d["trial_steps"] for d in ds), sum(d["cost_steps"] for d in ds)
        rows.append([name, f"{k}/{n} ({100 * k / max(n, 1):.1f}%)", f"{sum(len(d['trials']) for d in ds) / max(n, 1):.2f}",
                     f"{sum(multiples) / max(n, 1):.2f}", f"{trial_steps / at_trial:.2f}" if at_trial else "-",
                     f"{total / at_total:.2f}" if at_total else "-",
                     f"{sum(d['repaired_drop'] for d in ds)}/{n}"])
    return table(rows, markdown) + f"\n\nPublished anchor: {ANCHOR}"


def per_scenario(results: list[dict], markdown: bool) -> str:
    yn = lambda d: "y" if d["repaired"] else ("~" if d["repaired_drop"] else "n")
    rows = [["scenario", "kinds", "baseline harmful", "healthy loss", "gradwatch winner", "rep",
             "AutoTrainer winner", "rep", "random pick", "rep"]]
    for r in results:
        st = r["strategies"]
        cell = lambda d: f"{d['winner'] or '-'} ({_fmt_loss(d['winner_loss'])})"
        rows.append([r["scenario"], ", ".join(r["expected"]), ", ".join(r["baseline"]["harmful"]) or "-",
                     _fmt_loss(r["healthy"]["final_loss"]),
                     cell(st["gradwatch"]), yn(st["gradwatch"]), cell(st["AutoTrainer order"]), yn(st["AutoTrainer order"]),
                     cell(st["random"]), yn(st["random"])])
    return table(rows, markdown) + "\n\nrep: y repaired; ~ only by the 90%-of-the-loss-drop reading; n not repaired."


def failures(results: list[dict]) -> str:
    lines = []
    for r in results:
        for name in STRATEGIES:
            d = r["strategies"][name]
            if not d["repaired"]:
                lines.append(f"  {r['scenario']} / {name}: {d['why']}  (tried: {', '.join(d['trials']) or '-'})")
    return "\n".join(lines) or "  none"


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", help="scenario names (faulty ones)")
    ap.add_argument("--jobs", type=int, default=2, help="scenarios run at once, one process each (default 2)")
    ap.add_argument("--cap", type=int, default=200, help="steps per trial: the scenario's own length, at most this")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="trial run directories and results.json")
    ap.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    ap.add_argument("--refresh-healthy", action="store_true", help="re-measure the healthy variants")
    ap.add_argument("--healthy-only", action="store_true", help="measure (or show) the healthy variants and stop")
    args = ap.parse_args(argv)
    args.out = args.out.resolve()  # (each scenario runs in a working directory of its own)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    todo = faulty(harness.scenarios(args.only))
    if args.healthy_only:
        with ProcessPoolExecutor(max(1, args.jobs), mp_context=get_context("spawn")) as pool:
            got = list(pool.map(healthy_loss, todo, [args.cap] * len(todo), [args.out] * len(todo),
                                [args.refresh_healthy] * len(todo)))
        save_healthy(dict(zip((s.name for s in todo), got)))
        rows = [["scenario", "steps", "initial loss", "final loss", "findings"]]
        rows += [[s.name, str(h["steps"]), _fmt_loss(h["initial_loss"]), _fmt_loss(h["final_loss"]),
                  ", ".join(h["findings"]) or "-"] for s, h in zip(todo, got)]
        print(table(rows, args.markdown))
        return 0
    print(f"{len(todo)} faulty scenarios, {args.cap}-step cap per trial, {args.jobs} jobs", file=sys.stderr, flush=True)
    start, results = time.perf_counter(), []
    with ProcessPoolExecutor(max(1, args.jobs), mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_scenario, s, args.cap, args.out, args.refresh_healthy) for s in todo]
        for fut in as_completed(futures):
            r = fut.result()
            results.append(r)
            marks = " ".join(f"{k.split()[0]}={'y' if d['repaired'] else 'n'}" for k, d in r["strategies"].items())
            print(f"[{len(results)}/{len(todo)}] {r['scenario']} ({r['wall_s']}s): {marks}", file=sys.stderr, flush=True)
    results.sort(key=lambda r: r["scenario"])
    save_healthy({r["scenario"]: r["healthy"] for r in results})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    print(f"{len(results)} faulty scenarios; wall {time.perf_counter() - start:.0f}s\n")
    print(summary(results, args.markdown))
    print("\nPer scenario (winner, its final loss; rep = repaired):\n")
    print(per_scenario(results, args.markdown))
    print("\nNot repaired, and why:\n")
    print(failures(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
