"""The detection benchmark: gradwatch's findings vs TerminateOnNaN and AutoTrainer's rules.

    python benchmarks/detection/run.py [--only NAME ...] [--jobs 1] [--out DIR] [--reuse] [--markdown]

Each scenario runs under `gradwatch run --out OUT/<name>` (OMP_NUM_THREADS=1); gradwatch's
findings are read from OUT/<name>/findings.json. With --reuse, recorded stores are kept and the
rules are re-evaluated with `gradwatch.diagnose.diagnose(read_run(dir))`, without retraining.
The baselines (baselines.py) read the same stores.

Scoring, per kind: TP = an expected kind was found; FN = an expected kind was not found; FP = a
found kind outside expected + allowed. Precision = TP / (TP + FP), recall = TP / (TP + FN).
A healthy run (expected = allowed = []) is a false alarm if anything is found in it.
Lead time, over runs labelled exploding_gradient whose loss turns non-finite: the step of the
first non-finite loss (as the script saw it) minus the first step of the first exploding_gradient
finding. Target (issue 3): >= 5 steps in >= 90% of those runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baselines  # noqa: E402
import harness  # noqa: E402

TOOLS = ("gradwatch", "TerminateOnNaN", "AutoTrainer")
# kinds each baseline has a rule for; elsewhere its recall is shown as "-" (it cannot find them)
COVERS = {
    "gradwatch": set(harness.KINDS),
    "TerminateOnNaN": {"non_finite"},
    "AutoTrainer": {"vanishing_gradient", "exploding_gradient", "dead_units", "non_finite"},
}
LEAD_TARGET = 5


def gradwatch_findings(run_dir: Path, rediagnose: bool) -> dict[str, int]:
    """{kind: first step of its earliest finding}."""
    path = run_dir / "findings.json"
    if rediagnose or not path.exists():
        from gradwatch import read_run
        from gradwatch.diagnose import diagnose

        items = [f.to_dict() for f in diagnose(read_run(run_dir))]
        path.write_text(json.dumps(items, indent=1, default=str))
    else:
        items = json.loads(path.read_text())
    found: dict[str, int] = {}
    for f in items:
        found[f["kind"]] = min(found.get(f["kind"], 1 << 60), int(f["first_step"]))
    return found


def evaluate(s: harness.Scenario, out: Path, rediagnose: bool) -> dict:
    from gradwatch import read_run

    run_dir = out / s.name
    rs = read_run(run_dir)
    result = harness.script_result(run_dir)
    found = {"gradwatch": gradwatch_findings(run_dir, rediagnose)}
    for name, fn in baselines.BASELINES.items():
        found[name] = fn(rs)
    return {"scenario": s, "found": found, "nan_step": result.get("first_nonfinite_step"),
            "wall_s": harness.bench_info(run_dir).get("wall_s")}


def score(rows: list[dict]) -> dict:
    table = {}
    for tool in TOOLS:
        per_kind = {}
        for kind in harness.KINDS:
            tp = fn = fp = 0
            for r in rows:
                s, got = r["scenario"], r["found"][tool]
                if kind in s.expected:
                    tp += kind in got
                    fn += kind not in got
                elif kind in got and kind not in s.allowed:
                    fp += 1
            per_kind[kind] = {"tp": tp, "fn": fn, "fp": fp}
        healthy = [r for r in rows if r["scenario"].healthy]
        alarms = [r["scenario"].name for r in healthy if r["found"][tool]]
        leads = []
        for r in rows:
            if "exploding_gradient" in r["scenario"].expected and r["nan_step"] is not None:
                first = r["found"][tool].get("exploding_gradient")
                leads.append((r["scenario"].name, r["nan_step"], None if first is None else r["nan_step"] - first))
        table[tool] = {"kinds": per_kind, "healthy": len(healthy), "false_alarm_runs": alarms, "leads": leads}
    return table


def _ratio(a: int, b: int) -> str:
    return "-" if b == 0 else f"{a / b:.2f}"


def render(table: dict, rows: list[dict], markdown: bool) -> str:
    lines = []

    def row(cells):
        lines.append("| " + " | ".join(cells) + " |" if markdown else "  ".join(f"{c:>18s}" if i else f"{c:<20s}" for i, c in enumerate(cells)))

    head = ["kind", "n"] + [f"{t} P / R" for t in TOOLS]
    row(head)
    if markdown:
        lines.append("|" + "---|" * len(head))
    totals = {t: [0, 0, 0] for t in TOOLS}
    for kind in harness.KINDS:
        n = sum(kind in r["scenario"].expected for r in rows)
        cells = [kind, str(n)]
        for t in TOOLS:
            c = table[t]["kinds"][kind]
            for j, k in enumerate(("tp", "fn", "fp")):
                totals[t][j] += c[k]
            if kind not in COVERS[t]:
                cells.append("- / -" + (f" ({c['fp']} FP)" if c["fp"] else ""))
            else:
                cells.append(f"{_ratio(c['tp'], c['tp'] + c['fp'])} / {_ratio(c['tp'], c['tp'] + c['fn'])}")
        row(cells)
    row(["all kinds (micro)", str(sum(len(r["scenario"].expected) for r in rows))]
        + [f"{_ratio(tp, tp + fp)} / {_ratio(tp, tp + fn)}" for tp, fn, fp in totals.values()])
    row(["healthy runs w/ finding", str(table["gradwatch"]["healthy"])]
        + [str(len(table[t]["false_alarm_runs"])) for t in TOOLS])
    leads = {t: table[t]["leads"] for t in TOOLS}
    n_lead = len(leads["gradwatch"])
    row([f"lead >= {LEAD_TARGET} steps", str(n_lead)]
        + [f"{sum(l is not None and l >= LEAD_TARGET for _, _, l in leads[t])}/{n_lead}" for t in TOOLS])
    lines.append("")
    lines.append("P / R = precision / recall; '-' = the tool has no rule for that kind.")
    lines.append("")
    lines.append("Lead time (first non-finite loss step - first exploding_gradient step), per NaN run:")
    for i, (name, nan_step, _) in enumerate(leads["gradwatch"]):
        per_tool = ", ".join(f"{t} {'miss' if leads[t][i][2] is None else leads[t][i][2]}" for t in TOOLS)
        lines.append(f"  {name}: loss non-finite at step {nan_step}; lead: {per_tool}")
    return "\n".join(lines)


def per_scenario(rows: list[dict], markdown: bool) -> str:
    lines = []
    if markdown:
        lines += ["| scenario | expected | allowed | gradwatch | AutoTrainer | TerminateOnNaN |", "|---|---|---|---|---|---|"]
    for r in rows:
        s, f = r["scenario"], r["found"]
        fmt = lambda d: ", ".join(f"{k}@{v}" for k, v in sorted(d.items(), key=lambda kv: kv[1])) or "-"
        cells = [s.name, ", ".join(s.expected) or "(healthy)", ", ".join(s.allowed) or "-",
                 fmt(f["gradwatch"]), fmt(f["AutoTrainer"]), fmt(f["TerminateOnNaN"])]
        lines.append("| " + " | ".join(cells) + " |" if markdown else "  ".join(cells))
    return "\n".join(lines)


def misses_and_alarms(rows: list[dict]) -> str:
    labels_path = Path(__file__).resolve().parent / "labels.json"
    labels = json.loads(labels_path.read_text()) if labels_path.exists() else {}
    lines = []
    for r in rows:
        s, got = r["scenario"], r["found"]["gradwatch"]
        miss = [k for k in s.expected if k not in got]
        extra = [k for k in got if k not in s.expected + s.allowed]
        if miss or extra:
            ev = labels.get(s.name, {}).get("evidence", s.evidence)
            what = "; ".join(filter(None, [miss and f"missed {miss}", extra and f"false alarm {extra}"]))
            lines.append(f"  {s.name}: {what}\n      {ev}")
    return "\n".join(lines) or "  none"


def scenario_table(todo: list[harness.Scenario]) -> str:
    lines = ["| scenario | family | optimizer | expected | allowed | evidence |", "|---|---|---|---|---|---|"]
    for s in todo:
        ev = s.evidence.removeprefix("measured: ")
        lines.append(f"| {s.name} | {s.family} | {s.optimizer} | {', '.join(s.expected) or '(none)'} | "
                     f"{', '.join(s.allowed) or '-'} | {ev} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", help="scenario names")
    ap.add_argument("--jobs", type=int, default=1, help="scenarios recorded at once (default 1: timing-neutral)")
    ap.add_argument("--out", type=Path, default=harness.DEFAULT_OUT, help="run directories (default: out/)")
    ap.add_argument("--reuse", action="store_true", help="keep recorded stores; re-run only the rules")
    ap.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    ap.add_argument("--list", action="store_true", help="print the scenario table (markdown) and exit")
    args = ap.parse_args(argv)
    todo = harness.scenarios(args.only)
    if args.list:
        print(scenario_table(todo))
        return 0
    pending = [s for s in todo if not (args.reuse and list((args.out / s.name).glob("gradwatch*.sqlite")))]
    done = 0

    def rec(s):
        nonlocal done
        info = harness.record(s, args.out)
        done += 1
        print(f"[{done}/{len(pending)}] {s.name}: exit {info['exit_code']}, {info['wall_s']}s", file=sys.stderr, flush=True)

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(rec, pending))
    rows = [evaluate(s, args.out, args.reuse) for s in todo]
    table = score(rows)
    walls = [r["wall_s"] for r in rows if r["wall_s"] is not None]
    print(f"{len(rows)} scenarios ({sum(r['scenario'].healthy for r in rows)} healthy); "
          f"recording wall time {sum(walls):.0f}s total, max {max(walls, default=0):.1f}s\n")
    print(render(table, rows, args.markdown))
    print("\nPer scenario (kind@first step):\n")
    print(per_scenario(rows, args.markdown))
    print("\ngradwatch misses and false alarms, with the measured evidence:\n")
    print(misses_and_alarms(rows))
    summary = {t: {k: v for k, v in table[t].items()} for t in TOOLS}
    (args.out / "results.json").write_text(json.dumps(
        {"score": summary, "found": {r["scenario"].name: r["found"] for r in rows}}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
