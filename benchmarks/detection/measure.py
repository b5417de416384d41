"""Establish each scenario's label by measurement, independently of gradwatch's diagnose rules.

    python benchmarks/detection/measure.py [--only NAME ...] [--reuse] [--write] [--out DIR]

Runs every scenario under `gradwatch run` (or reuses the stores with --reuse) and computes, from
the raw recorded statistics and the script's own RESULT line, one number per symptom (below).
A symptom is *measured* when its number passes a fixed criterion. A label is consistent when

  * every expected kind is measured,
  * a healthy scenario (expected = allowed = []) measures nothing,
  * nothing is measured outside expected + allowed (else the label is incomplete).

The criteria are this file's own, chosen before the diagnose rules were read, and deliberately
blunt (orders of magnitude), so a label is evidence about the training, not about gradwatch:

| kind | number | measured when |
|---|---|---|
| non_finite | first step whose loss the script saw as NaN/Inf; weights non-finite at the end (the script's own check) | any |
| exploding_gradient | max over steps of the total gradient norm / its median over the first 10 steps (`growth`); per-entry dL/ds RMS of the first / last parameter layer (`depth`) | growth >= 100 or depth >= 100 |
| vanishing_gradient | `depth` (median over sampled steps); for recurrent layers, median of dL/dx_0 / dL/dx_{T-1} (`bptt`) | depth <= 1e-2 or bptt <= 1e-3 |
| dead_units | largest fraction of units of a ReLU layer that output 0 for every training sample at the end (the script's own check; the recorded per-batch fraction where the script has none) (`dead`) | >= 0.5 |
| saturation | largest median fraction of sigmoid/tanh outputs within 1% of an asymptote (`sat`) | >= 0.5 |
| stalled_layers | smallest median update ratio ||dw||/||w|| in the lower half of the parameter layers / largest in the upper half (`upd`) | <= 1e-2 |
| loss_plateau | (loss[0] - median of the last 10% of losses) / loss[0] (`improve`) | abs(improve) < 0.05 |
| loss_divergence | median of the last 10% of finite losses / loss[0]; max finite loss / loss[0] in runs that end non-finite | >= 2, resp. >= 100 |

Statistics are taken over the steps before the first non-finite loss. `depth` uses dL/ds (the
gradient w.r.t. a layer's output, Glorot & Bengio 2010), not the weight gradient, which can look
level while dL/ds shrinks; it falls back to the per-entry weight-gradient RMS where dL/ds is absent.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

RELU_FAMILY = {"relu", "relu6", "leaky_relu", "leakyrelu", "elu", "selu", "gelu", "silu"}
SATURATING = {"sigmoid", "tanh", "hardtanh", "softsign"}
CRITERIA = {
    "growth": 100.0, "depth_explode": 100.0, "depth_vanish": 1e-2, "bptt": 1e-3,
    "dead": 0.5, "sat": 0.5, "upd": 1e-2, "plateau": 0.05, "diverge": 2.0, "diverge_nan": 100.0,
}


def _median(values) -> float | None:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if len(v) else None


def measure_run(run_dir: Path) -> dict:
    """The numbers of the table above for one recorded run."""
    from gradwatch import read_run

    np.seterr(divide="ignore", invalid="ignore")
    rs = read_run(run_dir)
    res = harness.script_result(run_dir)
    losses_first_bad = res.get("first_nonfinite_step")
    n = len(rs.steps)
    stop = n if losses_first_bad is None else int(np.searchsorted(rs.steps, losses_first_bad))
    m = {k: v[:stop] for k, v in rs.metrics.items()}
    params = [i for i, l in enumerate(rs.layers) if l.role in ("param", "recurrent") and l.n_params > 0]
    params.sort(key=lambda i: rs.layers[i].index)
    out: dict = {"first_nonfinite_step": losses_first_bad, "steps": int(n)}

    # non-finite gradients anywhere (the store keeps a measured NaN as +inf)
    gn_all = rs.metrics["grad_norm"][:, params]
    bad = np.isinf(gn_all).any(axis=1)
    out["first_nonfinite_grad_step"] = int(rs.steps[np.argmax(bad)]) if bad.any() else None

    # growth of the total gradient norm over steps
    gn = m["grad_norm"][:, params]
    total = np.sqrt(np.nansum(np.where(np.isfinite(gn), gn, np.nan) ** 2, axis=1)) if len(gn) else np.array([])
    total = total[np.isfinite(total) & (total > 0)]
    out["growth"] = float(total.max() / np.median(total[:10])) if len(total) >= 2 else None

    # depth profile: first / last parameter layer, per-entry dL/ds RMS (or weight-gradient RMS)
    first, last = params[0], params[-1]
    gor = m["grad_out_rms"]
    ratio = gor[:, first] / gor[:, last]
    out["depth"] = _median(ratio)
    rms = gn / np.sqrt([max(1, rs.layers[i].n_params) for i in params])
    out["depth_wgrad"] = _median(rms[:, 0] / rms[:, -1])
    if out["depth"] is None:
        out["depth"] = out["depth_wgrad"]

    # vanishing through time (recurrent layers): dL/dx_0 / dL/dx_{T-1}
    bptt = []
    for name, (p_steps, table) in rs.time_profiles.items():
        keep = p_steps < (losses_first_bad if losses_first_bad is not None else np.inf)
        if keep.any() and table.shape[1] > 1:
            bptt.append(_median(table[keep, 0] / table[keep, -1]))
    bptt = [b for b in bptt if b is not None]
    out["bptt"] = min(bptt) if bptt else None

    # dead ReLU units and saturated sigmoid/tanh outputs
    # (a weight layer's activation: the one forward() calls as a function on its output, F.relu)
    acts = [(i, l.activation.lower()) for i, l in enumerate(rs.layers) if l.role == "activation" or l.role == "param" and l.activation]
    dead = [_median(m["dead"][:, i]) for i, a in acts if a in RELU_FAMILY]
    sat = [_median(m["saturated"][:, i]) for i, a in acts if a in SATURATING]
    out["dead_batch"] = max([d for d in dead if d is not None], default=None)
    out["dead"] = res.get("dead_full", out["dead_batch"])
    out["nonfinite_weights"] = res.get("nonfinite_weights")
    out["sat"] = max([s for s in sat if s is not None], default=None)

    # stalled lower layers: update ratios, lower half vs upper half of the parameter layers
    ur = [_median(m["update_ratio"][1:, i]) for i in params]
    half = max(1, len(params) // 2)
    lower, upper = [u for u in ur[:half] if u is not None], [u for u in ur[half:] if u is not None]
    out["upd"] = (min(lower) / max(upper)) if lower and upper and max(upper) > 0 else None

    # loss: the script's own losses are not stored, so use the recorded ones (same numbers)
    loss = rs.loss
    finite = loss[np.isfinite(loss)]
    if len(finite):
        l0 = float(loss[0]) if np.isfinite(loss[0]) else float(finite[0])
        tail = loss[-max(1, n // 10):]
        tail_med = _median(tail) if np.isfinite(tail).all() else None
        out["loss0"] = l0
        out["loss_end"] = tail_med
        out["improve"] = None if tail_med is None else (l0 - tail_med) / abs(l0)
        out["diverge"] = None if tail_med is None else tail_med / l0
        out["loss_max_ratio"] = float(finite.max() / l0)
    w = m["weight_norm"][:, params]
    wtot = np.sqrt(np.nansum(w**2, axis=1))
    wtot = wtot[np.isfinite(wtot) & (wtot > 0)]
    out["weight_growth"] = float(wtot[-1] / wtot[0]) if len(wtot) >= 2 else None
    out["acc_init"], out["acc_final"] = res.get("acc_init"), res.get("acc_final")
    out["skipped_steps"] = len(rs.meta.get("skipped_steps", []))
    return out


def measured_kinds(x: dict) -> list[str]:
    c, found = CRITERIA, []
    if x["first_nonfinite_step"] is not None or x["nonfinite_weights"]:
        found.append("non_finite")
    if (x["growth"] or 0) >= c["growth"] or (x["depth"] or 0) >= c["depth_explode"]:
        found.append("exploding_gradient")
    if (x["depth"] is not None and x["depth"] <= c["depth_vanish"]) or (x["bptt"] is not None and x["bptt"] <= c["bptt"]):
        found.append("vanishing_gradient")
    if (x["dead"] or 0) >= c["dead"]:
        found.append("dead_units")
    if (x["sat"] or 0) >= c["sat"]:
        found.append("saturation")
    if x["upd"] is not None and x["upd"] <= c["upd"]:
        found.append("stalled_layers")
    if x.get("improve") is not None and abs(x["improve"]) < c["plateau"]:
        found.append("loss_plateau")
    ends_bad = x["first_nonfinite_step"] is not None
    if (x.get("diverge") or 0) >= c["diverge"] or (ends_bad and (x.get("loss_max_ratio") or 0) >= c["diverge_nan"]):
        found.append("loss_divergence")
    return found


def _g(v, fmt=".2g"):
    return "-" if v is None else format(v, fmt)


def evidence_text(x: dict) -> str:
    """One line of measured numbers for the scenario's `evidence` field."""
    parts = [f"loss {_g(x.get('loss0'), '.3g')}->{_g(x.get('loss_end'), '.3g')}"]
    if x["acc_init"] is not None:
        parts.append(f"acc {_g(x['acc_init'], '.2f')}->{_g(x['acc_final'], '.2f')}")
    parts += [
        f"non-finite loss at step {_g(x['first_nonfinite_step'], 'd')}",
        f"grads at step {_g(x['first_nonfinite_grad_step'], 'd')}",
        f"dL/ds first/last {_g(x['depth'])}",
        f"|g| growth x{_g(x['growth'])}",
    ]
    if x["bptt"] is not None:
        parts.append(f"dL/dx_0/dL/dx_T {_g(x['bptt'])}")
    parts += [f"dead {_g(x['dead'])}", f"saturated {_g(x['sat'])}", f"update lower/upper {_g(x['upd'])}",
              f"|w| x{_g(x['weight_growth'])}"]
    if x["skipped_steps"]:
        parts.append(f"{x['skipped_steps']} scaler-skipped steps")
    return "measured: " + "; ".join(parts)


def check(s: harness.Scenario, kinds: list[str]) -> tuple[str, str]:
    missing = [k for k in s.expected if k not in kinds]
    extra = [k for k in kinds if k not in s.expected + s.allowed]
    if s.healthy and kinds:
        return "MISLABELLED", f"healthy but measured {kinds}"
    if missing:
        return "MISLABELLED", f"expected {missing} not measured"
    if extra:
        return "INCOMPLETE", f"measured {extra} outside expected+allowed"
    return "ok", ""


def write_evidence(s: harness.Scenario, text: str) -> None:
    src = s.path.read_text()
    new = re.sub(r'^(    "evidence": ).*,$', lambda mo: mo.group(1) + json.dumps(text) + ",", src, count=1, flags=re.M)
    s.path.write_text(new)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", help="scenario names")
    ap.add_argument("--out", type=Path, default=harness.DEFAULT_OUT, help="run directories (default: out/)")
    ap.add_argument("--reuse", action="store_true", help="reuse recorded runs where present")
    ap.add_argument("--write", action="store_true", help="write the measured numbers into each scenario's evidence")
    args = ap.parse_args(argv)
    todo = harness.scenarios(args.only)
    labels, problems = {}, 0
    for i, s in enumerate(todo, 1):
        run_dir = args.out / s.name
        if not (args.reuse and list(run_dir.glob("gradwatch*.sqlite"))):
            info = harness.record(s, args.out)
            print(f"[{i}/{len(todo)}] {s.name}: recorded in {info['wall_s']}s", file=sys.stderr)
        x = measure_run(run_dir)
        kinds = measured_kinds(x)
        status, why = check(s, kinds)
        problems += status != "ok"
        text = evidence_text(x)
        labels[s.name] = {"expected": s.expected, "allowed": s.allowed, "measured_kinds": kinds,
                          "status": status, "why": why, "numbers": x, "evidence": text}
        print(f"{status:12s} {s.name:32s} expected={s.expected} measured={kinds} {why}")
        print(f"{'':12s} {text}")
        if args.write:
            write_evidence(s, text)
    path = Path(__file__).resolve().parent / "labels.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(labels)
    path.write_text(json.dumps(dict(sorted(old.items())), indent=1, default=float) + "\n")
    print(f"\n{len(todo) - problems}/{len(todo)} labels consistent with measurement; written to {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
