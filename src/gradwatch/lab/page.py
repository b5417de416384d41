"""An experiment's page: figures (PNG), the results table (CSV), and the page in Markdown and in
self-contained HTML (figures embedded as base64, every text escaped)."""

from __future__ import annotations

import base64
import csv
import html
import textwrap
from pathlib import Path
from typing import Iterable

from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

from gradwatch.lab.base import Experiment, Result
from gradwatch.report.page import fmt


def figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (5.0, 3.6)):
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def save(fig: Figure, out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    _wrap_labels(fig)
    fig.savefig(path, dpi=90)
    return path


def _wrap_labels(fig: Figure) -> None:
    """Titles and axis labels wrapped to their panel (a three-panel figure cut its middle title to
    "... best without the first marke" and a y-label to "(watch, median of sample"): about as many
    characters as the panel's inches hold at the text's size."""
    for ax in fig.axes:
        box = ax.get_position()
        width_in, height_in = box.width * fig.get_figwidth(), box.height * fig.get_figheight()
        for text, room in ((ax.title, width_in), (ax.xaxis.label, width_in), (ax.yaxis.label, height_in)):
            chars = max(12, int(room * 72 / (0.55 * text.get_fontsize())))
            if len(text.get_text()) > chars and "\n" not in text.get_text():
                text.set_text(textwrap.fill(text.get_text(), chars))


def _numbers(numbers: dict) -> str:
    return ", ".join(f"{k} = {fmt(v)}" for k, v in numbers.items())


def _md_row(cells: Iterable) -> str:
    return "| " + " | ".join(fmt(c).replace("|", "\\|") for c in cells) + " |"


def verdict(result: Result) -> str:
    return "PASS" if result.passed else "FAIL"


def markdown(exp: Experiment, result: Result) -> str:
    lines = [f"# {exp.name}: {exp.title} — {verdict(result)}", "", f"**Claim.** {exp.claim}", "",
             f"**Source.** {exp.source}", "", f"**Expected.** {exp.expected}", ""]
    if result.notes:
        lines += ["## Setup", ""] + [f"- {n}" for n in result.notes] + [""]
    lines += ["## Checks", ""]
    for c in result.checks:
        lines.append(f"- **{'PASS' if c.passed else 'FAIL'}** {c.description} ({_numbers(c.numbers)})")
    lines += ["", "## Results", "", _md_row(result.columns), "|" + "---|" * len(result.columns)]
    lines += [_md_row(r) for r in result.rows]
    lines += ["", "## Figures", ""] + [f"![{p.stem}]({p.name})" for p in result.figures]
    lines += ["", f"_Ran in {result.seconds:.1f} s._", ""]
    return "\n".join(lines)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f4f4f4}.PASS{color:#127a12}.FAIL{color:#b00}img{max-width:100%;display:block;margin:1em 0}"""


def html_page(exp: Experiment, result: Result) -> str:
    e = html.escape
    v = verdict(result)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>gradwatch lab: {e(exp.name)}</title>",
             f"<style>{STYLE}</style></head><body>",
             f"<h1>{e(exp.name)}: {e(exp.title)} — <span class='{v}'>{v}</span></h1>",
             f"<p><b>Claim.</b> {e(exp.claim)}</p><p><b>Source.</b> {e(exp.source)}</p>",
             f"<p><b>Expected.</b> {e(exp.expected)}</p>"]
    if result.notes:
        parts.append("<h2>Setup</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in result.notes) + "</ul>")
    parts.append("<h2>Checks</h2><ul>")
    for c in result.checks:
        cv = "PASS" if c.passed else "FAIL"
        parts.append(f"<li><b class='{cv}'>{cv}</b> {e(c.description)} ({e(_numbers(c.numbers))})</li>")
    parts.append("</ul><h2>Results</h2><table><tr>" + "".join(f"<th>{e(c)}</th>" for c in result.columns) + "</tr>")
    for row in result.rows:
        parts.append("<tr>" + "".join(f"<td>{e(fmt(c))}</td>" for c in row) + "</tr>")
    parts.append("</table><h2>Figures</h2>" + "".join(_img(p) for p in result.figures))
    parts.append(f"<p><i>Ran in {result.seconds:.1f} s.</i></p></body></html>")
    return "\n".join(parts)


def write(exp: Experiment, result: Result, out: Path) -> Path:
    """Write results.csv, index.md and index.html into `out`; return the HTML page's path."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(result.columns)
        writer.writerows([[fmt(c) for c in row] for row in result.rows])
    (out / "index.md").write_text(markdown(exp, result))
    page = out / "index.html"
    page.write_text(html_page(exp, result))
    return page


def write_index(entries: list[tuple[Experiment, Result]], out: Path) -> Path:
    """The overview of several experiments: one line each, linking to its page."""
    e = html.escape
    md = ["# gradwatch lab", "", "| experiment | claim | verdict | seconds |", "|---|---|---|---|"]
    rows = []
    for exp, res in entries:
        md.append(f"| [{exp.name}]({exp.name}/index.md) | {exp.claim} | {verdict(res)} | {res.seconds:.1f} |")
        rows.append(f"<tr><td style='text-align:left'><a href='{e(exp.name)}/index.html'>{e(exp.name)}</a></td>"
                    f"<td style='text-align:left'>{e(exp.claim)}</td><td class='{verdict(res)}'>{verdict(res)}</td>"
                    f"<td>{res.seconds:.1f}</td></tr>")
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.md").write_text("\n".join(md) + "\n")
    page = out / "index.html"
    page.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>gradwatch lab</title><style>{STYLE}</style>"
                    "</head><body><h1>gradwatch lab</h1><table><tr><th>experiment</th><th>claim</th><th>verdict</th>"
                    f"<th>seconds</th></tr>{''.join(rows)}</table></body></html>")
    return page
