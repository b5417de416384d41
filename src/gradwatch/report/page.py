"""The report page: one self-contained HTML file (inline CSS, PNG as data: URIs, no script).

Every string that comes from the run (layer names, the command, finding text, metadata) goes
through `esc`; the page's Content-Security-Policy forbids scripts and network access as well.
"""

from __future__ import annotations

import html
import math
import shlex
from typing import Iterable

import numpy as np

from gradwatch.diagnose.signals import functional_activation, quoted
from gradwatch.report import figures
from gradwatch.report.display import Blocks, chosen_steps, layer_columns, recorded_rows
from gradwatch.store.ending import partial_note
from gradwatch.store.schema import EXIT_KEY
from gradwatch.store.series import WEIGHT_ROLES, RunSeries

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1100px;padding:0 16px 40px;color:#222}
h1{font-size:22px;margin:18px 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#555;margin:0 0 10px}.note{color:#555;font-size:12px;margin:4px 0}
.partial{background:#fff3e0;border-left:4px solid #ef6c00;padding:6px 10px;margin:6px 0}
img{max-width:100%;height:auto;display:block}
table{border-collapse:collapse;font-size:12px;margin:6px 0}td,th{border:1px solid #ddd;padding:2px 6px;text-align:left}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.finding{border-left:5px solid #999;background:#fafafa;margin:10px 0;padding:8px 12px}
.finding.error{border-color:#c62828}.finding.warning{border-color:#ef6c00}.finding.info{border-color:#1565c0}
.finding h3{font-size:15px;margin:0 0 4px}.sev{font-weight:bold;text-transform:uppercase}
.finding.error .sev{color:#c62828}.finding.warning .sev{color:#ef6c00}.finding.info .sev{color:#1565c0}
pre{background:#f0f0f0;padding:6px 8px;overflow-x:auto;font-size:12px;margin:2px 0 8px}
code{font-family:ui-monospace,Menlo,Consolas,monospace}.ok{color:#2e7d32}
details summary{cursor:pointer;color:#1565c0}
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
# The per-layer metrics the page shows: with the findings at hand, a run is read for it with these
# alone (6 of 10 arrays of steps x layers; `diagnose` needs them all).
DRAWN_METRICS = ("grad_norm", "update_ratio", "dead", "saturated", "act_mean", "act_std")


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: object) -> str:
    """A number as the page shows it: 4 significant digits; '–' for not recorded."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.4g}"
    if isinstance(value, (list, tuple)):
        # an entry that is itself a list (a live finding's [step, kind]) in parentheses: joined flat,
        # `1, exploding_gradient, 6, 8, non_finite, 0` read as six entries
        return ", ".join(f"({fmt(v)})" if isinstance(v, (list, tuple)) else fmt(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {fmt(v)}" for k, v in value.items())
    return str(value)


def stored(value: float) -> str:
    """A value read from the store: it keeps a measured NaN as +inf, so a non-finite value is said
    as such ("inf" in the gradient-flow table was a NaN gradient as often as an infinite one)."""
    return "non-finite" if math.isinf(float(value)) else fmt(value)


def count(n: int, word: str) -> str:
    """`1 step`, `2 steps`: a one-step run's page said "1 steps" and "at steps 0"."""
    return f"{n:,} {word}{'s' * (n != 1)}"


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{b64}">'


def _note(blocks: Blocks, how: str) -> str:
    if blocks.size == 1:
        return ""
    return f'<p class="note downsampled">Downsampled for display: {esc(blocks.note)}; each shows the block {how}.</p>'


def _table(head: Iterable[str], rows: Iterable[Iterable[str]], numeric_from: int = 1, cls: str = "") -> str:
    head = list(head)
    th = "".join(f'<th class="num">{esc(h)}</th>' if i >= numeric_from else f"<th>{esc(h)}</th>" for i, h in enumerate(head))
    body = []
    for row in rows:
        tds = "".join(f'<td class="num">{esc(c)}</td>' if i >= numeric_from else f"<td>{esc(c)}</td>" for i, c in enumerate(row))
        body.append(f"<tr>{tds}</tr>")
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _section(ident: str, title: str, body: str) -> str:
    return f'<section id="{ident}"><h2>{esc(title)}</h2>\n{body}\n</section>'


def _long(items: list[str], limit: int = 12) -> str:
    """A list of names: the first `limit`, the rest folded away."""
    shown = f"<code>{esc(', '.join(items[:limit]))}</code>"
    if len(items) <= limit:
        return shown
    return (f"{shown} <details><summary>and {len(items) - limit} more</summary>"
            f"<code>{esc(', '.join(items[limit:]))}</code></details>")


def _evidence(value: object) -> str:
    if isinstance(value, dict) and len(value) > 8:
        return _long([f"{k}: {fmt(v)}" for k, v in value.items()], 8)
    if isinstance(value, (list, tuple)) and len(value) > 12:
        return _long([fmt(v) for v in value])
    return esc(fmt(value))


# ---------------------------------------------------------------- sections
def findings_section(findings: list) -> str:
    if not findings:
        return _section("findings", "Findings", '<p class="ok">No findings: no rule of gradwatch diagnose fired on this run.</p>')
    parts = []
    for n, f in enumerate(findings, 1):
        head = (f'<h3>{n}. <span class="sev">{esc(f.severity)}</span> <code>{esc(f.kind)}</code> '
                f"since step {esc(f.first_step)}</h3>")
        where = f'<p class="layers">Layers: {_long(list(f.layers))}</p>' if f.layers else ""
        evidence = "".join(f"<tr><td>{esc(k)}</td><td>{_evidence(v)}</td></tr>" for k, v in f.evidence.items())
        evidence = f'<table class="evidence"><tr><th>evidence</th><th>value</th></tr>{evidence}</table>' if evidence else ""
        causes = "".join(f"<li>{esc(c)}</li>" for c in f.causes)
        causes = f"<p>Likely causes:</p><ol>{causes}</ol>" if causes else ""
        remedies = "".join(f"<li>{esc(r.action)}<pre><code>{esc(r.code)}</code></pre></li>" for r in f.remedies)
        remedies = f'<p>What to change:</p><ul class="remedies">{remedies}</ul>' if remedies else ""
        parts.append(f'<div class="finding {esc(f.severity)}">{head}<p class="message">{esc(f.message)}</p>'
                     f"{where}{evidence}{causes}{remedies}</div>")
    return _section("findings", f"Findings ({len(findings)})", "\n".join(parts))


def flow_section(run: RunSeries, steps: list[int] | None) -> str:
    cols = layer_columns(run, WEIGHT_ROLES)
    chosen = chosen_steps(run, "grad_norm", steps)
    if not cols or not chosen:
        return _section("gradient-flow", "Gradient flow", "<p>No gradient norm was recorded.</p>")
    fig = figures.gradient_flow(run, chosen, cols)
    row_of = {int(s): i for i, s in enumerate(run.steps)}
    g = run.metrics["grad_norm"]
    rows = [[run.layers[c].name, run.layers[c].type] + [stored(g[row_of[s], c]) for s in chosen] for c in cols]
    table = _table(["layer", "type"] + [f"step {s}" for s in chosen], rows, numeric_from=2, cls="flow-table")
    at = ("steps " if len(chosen) > 1 else "step ") + ", ".join(map(str, chosen))
    clip = run.meta.get("grad_clip")  # a trainer's clipping (the callbacks): the norms here are above it
    clip = f": the trainer then clipped {clip}" if clip else ""
    body = (f'<p class="sub">Gradient norm of each layer\'s parameters, input (left) to output (right), at '
            f'{esc(at)}. Norms are taken before any gradient clipping{esc(clip)}. A line falling to the '
            "left is a vanishing gradient; a line rising to the right or climbing over time an exploding one.</p>"
            f'{_img(figures.png(fig), "gradient flow")}'
            f"<details><summary>values ({count(len(cols), 'layer')})</summary>{table}</details>")
    # gaps in the lines and rows of dashes, said once: a GAN's discriminator under the generator's
    # optimizer, a frozen backbone
    never = [run.layers[c].name for c in cols if np.isnan(g[:, c]).all()]
    if never:
        body += (f'<div class="note never-recorded">No gradient norm recorded at any step for {_long(never)}: '
                 "frozen, not updated by the watched optimizer (with several optimizers, the first is watched), "
                 "or never reached by the loss.</div>")
    return _section("gradient-flow", "Gradient flow", body)


def heatmap_section(run: RunSeries) -> str:
    cols = layer_columns(run, WEIGHT_ROLES)
    parts = []
    for metric, label, what in (("grad_norm", "gradient norm", "gradient norm (every recorded step)"),
                                ("update_ratio", "update ratio ‖Δw‖/‖w‖", "update ratio ‖Δw‖/‖w‖ (sampled steps)")):
        m = run.metrics.get(metric)
        if m is None or not cols or len(recorded_rows(m[:, cols])) == 0:
            parts.append(f'<h3>log10 {esc(what)}</h3><p>Not recorded.</p>')
            continue
        fig, blocks = figures.heatmap(run, metric, cols, label)
        parts.append(f'<div class="heatmap" id="heatmap-{metric}"><h3>log10 {esc(what)}</h3>'
                     f'{_img(figures.png(fig), "heat map of log10 " + label)}{_note(blocks, "maximum")}</div>')
    legend = (f'<p class="note">Layers top (input) to bottom (output). Grey: not recorded; black: 0 (exactly, or below the float32 range: every entry under ~1e-19); '
              f'<span style="color:{figures.NONFINITE_COLOUR}">magenta</span>: non-finite (NaN/Inf).</p>')
    return _section("heatmaps", "Heat maps: layers × steps", legend + "\n".join(parts))


def _spread(n: int, k: int = 5) -> list[int]:
    return list(dict.fromkeys(np.linspace(0, n - 1, min(k, n)).round().astype(int).tolist())) if n else []


def time_profile_section(run: RunSeries) -> str:
    """Each recurrent layer's BPTT profile (‖∂L/∂x_t‖ over t) at up to five profiled steps. Only
    when the run has one: before, a run whose finding was "vanishing through time" had no picture
    of it at all."""
    parts = []
    for layer in sorted((l for l in run.layers if l.name in run.time_profiles), key=lambda l: l.index):
        p_steps, table = run.time_profiles[layer.name]
        if not len(p_steps) or not table.size:
            continue
        pick = _spread(len(p_steps))
        fig = figures.time_profile(p_steps[pick], table[pick], layer.name)
        last_t = table.shape[1] - 1
        rows = []
        for i in pick:
            first, last = table[i, 0], table[i, last_t]
            ratio = first / last if np.isfinite(first) and np.isfinite(last) and last > 0 else float("nan")
            rows.append([fmt(int(p_steps[i])), stored(first), stored(last), fmt(ratio)])
        tab = _table(["step", "‖∂L/∂x_t‖ at t = 0", f"at t = {last_t}", "t = 0 / last"], rows, cls="time-profile-table")
        parts.append(f'<h3><code>{esc(layer.name)}</code> ({esc(layer.type)}, {table.shape[1]} time steps, '
                     f'profiled at {len(p_steps)} steps)</h3>{_img(figures.png(fig), "gradient through time, " + layer.name)}{tab}')
    if not parts:
        return ""
    body = ('<p class="sub">Norm of the loss gradient with respect to each recurrent layer\'s input at time step t '
            "(backpropagation through time). A line falling to the left (early time steps getting orders of magnitude "
            "less than the last) is a gradient vanishing through time; rising to the left, exploding.</p>"
            + "\n".join(parts))
    return _section("time-profile", "Gradient through time (recurrent layers)", body)


def loss_section(run: RunSeries, findings: list) -> str:
    if not np.isfinite(run.loss).any():
        return _section("loss", "Loss", "<p>No finite loss was recorded.</p>")
    marks = [(n, f.first_step, f.severity) for n, f in enumerate(findings, 1)]
    fig, blocks = figures.loss_curve(run, marks)
    finite = run.loss[np.isfinite(run.loss)]
    nonfinite = int(np.isinf(run.loss).sum())
    recorded = run.loss[~np.isnan(run.loss)]  # NaN: not recorded; inf: non-finite
    last = "non-finite" if np.isinf(recorded[-1]) else fmt(recorded[-1])
    facts = (f"first {fmt(finite[0])}, last {last}, lowest {fmt(finite.min())}"
             + (f"; {count(nonfinite, 'step')} with a non-finite loss (marked × along the top)" if nonfinite else ""))
    marked = "; dashed lines mark each finding's first step, numbered as in the list above" if marks else ""
    body = (f'<p class="sub">Training loss{marked}. Loss: <span class="loss-facts">{esc(facts)}</span>.</p>'
            f'{_img(figures.png(fig), "loss curve")}{_note(blocks, "median (line) and min–max (band)")}')
    return _section("loss", "Loss", body)


def activation_section(run: RunSeries) -> str:
    # (and the weight layers whose output forward() passes through F.relu & co., shown as that call)
    cols = sorted(layer_columns(run, ("activation",)) + [c for c, l in enumerate(run.layers) if functional_activation(l)],
                  key=lambda c: run.layers[c].index)
    dead, sat = run.metrics.get("dead"), run.metrics.get("saturated")
    if not cols or dead is None or sat is None:
        return _section("activations", "Activations: dead and saturated units", "<p>No activation module was watched.</p>")
    # A fraction measured on NaN/Inf outputs means nothing (a NaN is neither 0 nor near an
    # asymptote: it read as 0% dead): the values shown are those of the steps whose outputs were
    # finite. Before, a run that blew up at step 37 showed "dead 0 at step 110" for a layer 22% dead
    # at step 30. The store keeps a measured NaN as +inf.
    spoilt = np.zeros((len(run.steps), len(run.layers)), dtype=bool)
    for moment in ("act_mean", "act_std"):
        if run.metrics.get(moment) is not None:
            spoilt |= np.isinf(run.metrics[moment])
    rows, last_dead, last_sat, blown = [], [], [], []
    for c in cols:
        shown = quoted(run, run.layers[c].name) if functional_activation(run.layers[c]) else run.layers[c].name
        cells = [shown, run.layers[c].activation or run.layers[c].type]
        for m, out in ((dead, last_dead), (sat, last_sat)):
            recorded = recorded_rows(m[:, c])
            r = recorded[~spoilt[recorded, c]]
            out.append(m[r[-1], c] if len(r) else np.nan)
            gone = "non-finite" if len(recorded) else "–"  # recorded, but only on non-finite outputs
            cells += [stored(m[r[0], c]) if len(r) else gone, stored(out[-1]) if len(r) else gone,
                      fmt(int(run.steps[r[-1]])) if len(r) else "–"]
        if spoilt[:, c].any():
            blown.append((run.layers[c].name, int(run.steps[spoilt[:, c].argmax()])))
        rows.append(cells)
    names = [row[0] for row in rows]
    fig = figures.activation_bars(names, np.array(last_dead), np.array(last_sat))
    table = _table(["layer", "activation", "dead first", "dead last", "at step", "saturated first", "saturated last",
                    "at step"], rows, numeric_from=2, cls="activation-table")
    body = ('<p class="sub">Fraction of dead units (zero for every sample of the batch) and of saturated outputs '
            "(sigmoid/tanh family: within 1% of an asymptote) per activation layer, at the last step each was "
            f'recorded with finite outputs.</p>{_img(figures.png(fig), "dead and saturated fractions")}{table}')
    if blown:
        said = ", ".join(f"{name} first at step {step}" for name, step in blown[:6])
        said += " ..." if len(blown) > 6 else ""
        body += (f'<p class="note nonfinite-activations">Non-finite outputs (NaN/Inf): {esc(said)}. Their fractions '
                 "are those of the steps with finite outputs: on NaN outputs a unit reads as neither dead nor "
                 "saturated.</p>")
    return _section("activations", "Activations: dead and saturated units", body)


META_LABELS = {"skipped_steps": "skipped steps (loss scaler)", "grad_clip": "gradient clipping (after the norms shown)"}


def meta_rows(run: RunSeries, source: str) -> list[tuple[str, str]]:
    meta = dict(run.meta)
    command = meta.pop("command", None)
    for said_below in ("live", EXIT_KEY):  # in the "ended" row
        meta.pop(said_below, None)
    roles = {r: len(run.layer_names(r)) for r in ("param", "recurrent", "activation")}
    rows = [("run", source)]
    if command:
        rows.append(("command", shlex.join(map(str, command)) if isinstance(command, (list, tuple)) else str(command)))
    if len(run.steps):
        span = f"steps {run.steps[0]}–{run.steps[-1]}" if len(run.steps) > 1 else f"step {run.steps[0]}"
        rows.append(("steps recorded", f"{len(run.steps):,} ({span})"))
    rows.append(("layers", ", ".join(f"{n} {r}" for r, n in roles.items() if n)))
    ended = run.meta.get(EXIT_KEY)
    note = partial_note(run)
    if note or isinstance(ended, dict):
        rows.append(("ended", note or "normally (exit code 0)"))
    rows.append(("model size", f"{sum(l.n_params for l in run.layers):,} trainable parameters in watched layers"))
    for key, value in sorted(meta.items()):
        # the event lists (skipped steps, phase starts, ...): their length and first entries, when any
        if isinstance(value, (list, tuple)):
            if key == "models":  # (the first model's layers have no prefix)
                value = [m or "the first (its layers unprefixed)" for m in value]
            if value:
                rows.append((META_LABELS.get(key, key),
                             f"{len(value)}: {fmt(value[:20])}" + (" ..." if len(value) > 20 else "")))
        elif value not in (None, "", {}):
            rows.append((META_LABELS.get(key, key), fmt(value)))
    return rows


def meta_section(run: RunSeries, source: str) -> str:
    return _section("metadata", "Run", _table(["", "value"], meta_rows(run, source), numeric_from=9, cls="meta-table"))


def page(run: RunSeries, findings: list, source: str, steps: list[int] | None = None, version: str = "") -> str:
    n = len(findings)
    worst = next((s for s in ("error", "warning", "info") if any(f.severity == s for f in findings)), None)
    weights, acts = len(run.weight_columns()), len(run.layer_names("activation"))
    # weight layers, as `gradwatch run` counts them (counting the activation modules too, the page
    # said 27 layers where the run had said 14)
    every = run.meta.get("every", 1)
    sparse = isinstance(every, int) and every > 1
    recorded = count(len(run.steps), "step") + (f" (one in {every} recorded)" if sparse else "")
    summary = (f"{recorded}, {count(weights, 'layer')}" + (f" and {count(acts, 'activation')}" if acts else "") + ", "
               + (f"{n} finding{'s' * (n != 1)} (worst: {worst})" if n else "no findings"))
    note = partial_note(run)
    partial = f'<p class="partial"><b>Partial run:</b> {esc(note)}.</p>' if note else ""
    sections = [findings_section(findings), flow_section(run, steps), heatmap_section(run), time_profile_section(run),
                loss_section(run, findings), activation_section(run), meta_section(run, source)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>gradwatch report: {esc(source)}</title><style>{CSS}</style></head><body>\n"
            f'<header><h1>gradwatch report</h1><p class="sub"><code>{esc(source)}</code>: {esc(summary)}. '
            f"Made by gradwatch {esc(version)}.</p>{partial}</header>\n"
            + "\n".join(s for s in sections if s) + "\n</body></html>\n")
