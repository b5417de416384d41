"""The HTML report: values on the page match the store, everything from user code is escaped, the
page needs no network, a long deep run stays small and fast, and a real browser renders it."""

from __future__ import annotations

import html
import importlib.util
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.cli.main import main as cli
from gradwatch.diagnose.finding import Finding, Remedy
from gradwatch.report import render_html, write_report
from gradwatch.report.page import fmt

EVIL = "<script>alert(1)</script>"
SECTIONS = ("findings", "gradient-flow", "heatmaps", "loss", "activations", "metadata")


class Evil(nn.Module):
    """A deep sigmoid MLP (its gradient vanishes: findings to show) with a hostile module name."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(16, 16), nn.Sigmoid())])
        self.add_module(EVIL, nn.Linear(16, 1))

    def forward(self, x):
        return getattr(self, EVIL)(self.body(x))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("run")
    model = Evil()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    with gw.watch(model, opt, out=out, warn=False, flush_every=40):
        for _ in range(120):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    return out


@pytest.fixture(scope="module")
def page(run_dir) -> str:
    return render_html(run_dir, steps=[0, 60, 119])


class Cells(HTMLParser):
    """The text of each row of the table with class `cls`."""

    def __init__(self, cls: str):
        super().__init__()
        self.cls, self.depth, self.rows, self.cell = cls, 0, [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table" and ("class", self.cls) in attrs:
            self.depth = 1
        elif self.depth and tag == "tr":
            self.rows.append([])
        elif self.depth and tag in ("td", "th"):
            self.cell = ""

    def handle_endtag(self, tag):
        if self.depth and tag in ("td", "th"):
            self.rows[-1].append(self.cell)
            self.cell = None
        elif tag == "table":
            self.depth = 0

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def table(page: str, cls: str) -> list[list[str]]:
    parser = Cells(cls)
    parser.feed(page)
    return parser.rows


def test_values_on_the_page_match_the_store(run_dir, page):
    run = gw.read_run(run_dir)
    rows = table(page, "flow-table")
    assert rows[0] == ["layer", "type", "step 0", "step 60", "step 119"]
    names = [r[0] for r in rows[1:]]
    assert names == [l.name for l in sorted(run.layers, key=lambda l: l.index) if l.role == "param"]
    for name, *values in [[r[0]] + r[2:] for r in rows[1:]]:
        _, g = run.series(name, "grad_norm")
        assert values == [fmt(g[0]), fmt(g[60]), fmt(g[119])]
    acts = {r[0]: r for r in table(page, "activation-table")[1:]}
    for name in run.layer_names("activation"):
        steps, sat = run.series(name, "saturated")
        assert acts[name][6] == fmt(sat[-1]) and acts[name][7] == str(steps[-1])
    finite = run.loss[np.isfinite(run.loss)]
    assert f"first {fmt(finite[0])}, last {fmt(finite[-1])}" in page
    meta = dict((r[0], r[1]) for r in table(page, "meta-table")[1:])
    assert meta["torch"] == torch.__version__ and meta["optimizer"] == "SGD"
    assert meta["steps recorded"].startswith("120 ")
    findings = gw.diagnose(run)
    assert findings, "the sigmoid stack should give findings to show"
    assert page.index('id="findings"') < page.index('id="gradient-flow"')  # findings first
    for f in findings:
        assert html.escape(f.message) in page
        for r in f.remedies:
            assert html.escape(r.code) in page


def test_the_page_is_self_contained_and_escaped(page):
    assert "<script" not in page.lower()
    assert html.escape(EVIL) in page
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:|//)", page)
    assert "<link" not in page and "@import" not in page
    srcs = re.findall(r'<img[^>]*src="([^"]*)"', page)
    assert len(srcs) >= 5 and all(s.startswith("data:image/png;base64,") for s in srcs)
    for ident in SECTIONS:
        assert f'id="{ident}"' in page


def test_hostile_text_in_findings_and_metadata_is_escaped(run_dir):
    run = gw.read_run(run_dir)
    run.meta["command"] = ["train.py", "--name", "</td><script>alert(2)</script>"]
    bad = Finding("exploding_gradient", "error", 3, (EVIL,), "<img src=x onerror=alert(3)>",
                  {"<b>key</b>": "<i>v</i>"}, ("<u>cause</u>",), (Remedy("<a>act</a>", "x = '<script>'"),))
    page = render_html(run, findings=[bad], title="<title>run")
    assert "<script" not in page.lower() and "<img src=x" not in page and "<b>key" not in page
    assert "&lt;img src=x onerror=alert(3)&gt;" in page and "x = &#x27;&lt;script&gt;&#x27;" in page


def _synthetic():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "report_size.py"
    spec = importlib.util.spec_from_file_location("report_size", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.synthetic_run


def test_long_deep_run_is_downsampled_small_and_fast():
    """Scaled check (4,000 steps × 200 layers: 5 blocks per column); the full 100k × 200 is
    benchmarks/report_size.py. Blocks keep a one-step spike visible."""
    run = _synthetic()(n_steps=4000, n_param=200, n_act=20)
    run.metrics["grad_norm"][1234, 7] = 1e6
    page = render_html(run, findings=[])  # (its time: benchmarks/report_size.py; a test asserts no timing)
    assert len(page.encode()) < 5e6
    assert "Downsampled for display: 4,000 recorded steps shown in 800 blocks of 5" in page
    from gradwatch.report.display import reduce_blocks

    blocks, v = reduce_blocks(run.steps, run.metrics["grad_norm"], 800, "max")
    assert v[1234 // 5, 7] == 1e6 and np.isposinf(v[3600 // 5, 0])


def test_cli_report(run_dir, tmp_path, capsys):
    assert cli(["report", str(run_dir)]) == 0
    assert (run_dir / "report.html").stat().st_size > 10_000
    err = capsys.readouterr().err  # each stage is said (a deep run's report took 10-35 s in silence)
    assert "gradwatch: reading" in err and "gradwatch: diagnosing 120 steps" in err and "drawing" in err
    out = tmp_path / "sub" / "r.html"
    assert cli(["report", str(run_dir), "-o", str(out), "--steps", "5,50"]) == 0
    assert "step 5" in out.read_text() and str(out) in capsys.readouterr().out
    assert cli(["report", str(tmp_path / "nothing")]) == 2
    assert cli(["report", str(run_dir), "--steps", "x"]) == 2
    assert "--steps='x'" in capsys.readouterr().err


def test_cli_report_says_which_steps_it_could_not_draw(run_dir, tmp_path, capsys, monkeypatch):
    """A step the run never reached was drawn at the nearest recorded one, without a word."""
    from gradwatch.cli import report_cmd
    from gradwatch.report.display import chosen_steps

    drawn = {}

    def write_report(series, out, **options):  # what the page would draw, without drawing it
        drawn["steps"] = chosen_steps(series, wanted=options["steps"])
        return out

    monkeypatch.setattr(report_cmd, "write_report", write_report)
    monkeypatch.setattr(report_cmd, "saved_findings", lambda run: [])
    assert cli(["report", str(run_dir), "-o", str(tmp_path / "r.html"), "--steps", "5,999"]) == 0
    assert "--steps: 999 not recorded (this run has steps 0-119)" in capsys.readouterr().err
    assert drawn["steps"] == [5, 119]
    assert cli(["report", str(run_dir), "-o", str(tmp_path / "r.html"), "--steps", "5,119"]) == 0
    assert "not recorded" not in capsys.readouterr().err


def test_write_report_uses_saved_findings(run_dir, tmp_path):
    saved = Finding("loss_plateau", "info", 7, (), "a saved finding from gradwatch run")
    (run_dir / "findings.json").write_text(__import__("json").dumps([saved.to_dict()]))
    try:
        assert "a saved finding from gradwatch run" in write_report(run_dir, tmp_path / "r.html").read_text()
    finally:
        (run_dir / "findings.json").unlink()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package")
def test_headless_chromium_renders_the_report(run_dir, page, tmp_path):
    path = tmp_path / "report.html"
    path.write_text(page, encoding="utf-8")
    shot = tmp_path / "report.png"
    flags = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--window-size=1200,3000",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run(flags + ["--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=60)
    subprocess.run(flags + [f"--screenshot={shot}", path.as_uri()], capture_output=True, timeout=60)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [l for l in dom.stderr.splitlines() if "CONSOLE" in l or "Uncaught" in l or "Refused" in l]
    assert console == []
    for ident in SECTIONS:
        section = re.search(rf'<section id="{ident}">(.*?)</section>', dom.stdout, re.S)
        assert section and len(re.sub(r"<[^>]+>", "", section.group(1)).strip()) > 20, ident
    assert len(re.findall(r'<img[^>]*src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}"', dom.stdout)) >= 5
    assert html.escape(EVIL) in dom.stdout and "<script" not in dom.stdout.lower()
    assert shot.stat().st_size > 20_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_long_layer_names_are_shortened_on_the_axes_only():
    """Hugging Face names (`bert.encoder.layer.0.attention.self.query`) as rotated tick labels took
    the plot's height and cut the axis title."""
    from gradwatch.report.figures import short_name

    name = "bert.encoder.layer.0.attention.self.query"
    assert short_name(name) == "…0.attention.self.query" and short_name("fc1") == "fc1"
    assert len(short_name("x" * 60)) == 28


def test_heat_map_cells_sit_at_the_steps_recorded_and_zeros_are_not_missing():
    """A metric sampled every 10th step of 50 was drawn as 5 columns spread over 0..41 (sample 40
    at 32.8-41), and exact zeros (no gradient at all) in the grey of 'not recorded'."""
    from series_builder import build

    from gradwatch.report import figures

    run = build(n_steps=50, sample_every=10)
    cols = [run.column(f"fc{k}") for k in range(5)]
    run.metrics["update_ratio"][:, cols[0]] = np.where(np.isnan(run.metrics["update_ratio"][:, cols[0]]), np.nan, 0.0)
    fig, blocks = figures.heatmap(run, "update_ratio", cols, "update ratio")
    meshes = fig.axes[0].collections
    edges = meshes[0].get_coordinates()[0, :, 0]
    np.testing.assert_array_equal(edges, [0, 10, 20, 30, 40, 50])
    zero = [m for m in meshes[1:] if tuple(m.get_cmap().colors) == (figures.ZERO_COLOUR,)]
    assert len(zero) == 1 and zero[0].get_array().count() == 5  # fc0's five samples, drawn black


def test_non_finite_losses_are_marked_not_dropped():
    """The loss picture stopped at the last finite step and the caption said "last 0.01849" of a
    run whose last 15 losses were NaN."""
    from series_builder import build

    from gradwatch.report import figures
    from gradwatch.report.page import loss_section

    run = build(n_steps=40)
    run.loss[25:] = np.inf
    fig, _ = figures.loss_curve(run, [])
    ax = fig.axes[0]
    marked = [line for line in ax.get_lines() if line.get_label() == "non-finite loss"]
    assert len(marked) == 1 and list(marked[0].get_xdata()) == list(range(25, 40))
    assert ax.get_xlim()[1] >= 39
    one = build(n_steps=40)
    one.loss[1:] = np.inf  # one finite loss: a line of one point drew nothing; it has a marker now
    lines = [line for line in figures.loss_curve(one, [])[0].axes[0].get_lines() if line.get_label() == "loss"]
    assert len(lines) == 1 and list(lines[0].get_xdata()) == [0] and lines[0].get_marker() == "o"
    assert "last non-finite" in loss_section(run, []) and "15 steps with a non-finite loss" in loss_section(run, [])


def test_metadata_leaves_out_empty_event_lists_and_shortens_long_ones(run_dir):
    """Before, every run's table had seven empty rows (phase_starts, own_loss_steps, ... with no
    value), and a long event list (guard_skipped_steps of a run with 500 skips) was printed whole."""
    from gradwatch.report.page import meta_rows

    run = gw.read_run(run_dir)
    run.meta.update(phase_starts=[], guard_skipped_steps=list(range(500)), skipped_steps=[3],
                    live_findings=[[1, "exploding_gradient", 6], [8, "non_finite", 0]], models=["", "netD"])
    rows = dict(meta_rows(run, "run"))
    assert rows["live_findings"] == "2: (1, exploding_gradient, 6), (8, non_finite, 0)"  # (was read flat as 6)
    assert rows["models"] == "2: the first (its layers unprefixed), netD"
    assert "phase_starts" not in rows and all(value != "" for value in rows.values())
    assert rows["guard_skipped_steps"].startswith("500: 0, 1, 2") and rows["guard_skipped_steps"].endswith("19 ...")
    assert rows["skipped steps (loss scaler)"] == "1: 3"
    assert rows["optimizer"] == "SGD"


def test_show_says_non_finite_and_takes_the_lowest_finite_loss(tmp_path, capsys):
    """A run whose loss turned NaN at step 3: `gradwatch show` said "last inf, min inf" (the
    store keeps a NaN as +inf, and the minimum took it); now "last non-finite, min" the lowest
    finite loss, as for the per-layer metrics."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    with gw.watch(model, opt, out=tmp_path, warn=False):
        for step in range(6):
            x = torch.randn(8, 4)
            x[0, 0] = float("nan") if step >= 3 else x[0, 0]
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
    assert cli(["show", str(tmp_path)]) == 0
    lowest = min(v for v in losses if np.isfinite(v))
    assert f"loss: first {losses[0]:.3g}, last non-finite, min {lowest:.3g}" in capsys.readouterr().out


def test_gradient_flow_marks_layers_whose_gradient_is_exactly_zero():
    """A 301-layer tanh MLP's gradient underflows to exactly 0 below layer 150: the flow picture
    (log axis) drew nothing there and said nothing. Zeros are marked along the bottom now."""
    from series_builder import build

    from gradwatch.report import figures
    from gradwatch.report.display import layer_columns

    run = build(n_steps=20)
    cols = layer_columns(run, ("param",))
    run.metrics["grad_norm"][10, [cols[0], cols[1]]] = 0.0
    fig = figures.gradient_flow(run, [0, 10], cols)
    marks = [line for line in fig.axes[0].get_lines() if line.get_marker() == "v"]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [0, 1]
    assert marks[0].get_label().startswith("0, or below float32")


def test_heat_maps_span_the_run_with_whole_step_ticks():
    """A metric sampled at steps 0 and 40 of a 50-step run drew its last cell over 40-80 (the
    picture ran to a step 80 that never was, its axis unlike the gradient-norm map's 0-50); a
    metric recorded at step 0 only had an axis 0-1 ticked 0.2, 0.4, ..."""
    from series_builder import build

    from gradwatch.report import figures

    run = build(n_steps=50, sample_every=40)
    cols = [run.column(f"fc{k}") for k in range(5)]
    grad, _ = figures.heatmap(run, "grad_norm", cols, "gradient norm")
    upd, _ = figures.heatmap(run, "update_ratio", cols, "update ratio")
    np.testing.assert_array_equal(upd.axes[0].collections[0].get_coordinates()[0, :, 0], [0, 40, 50])
    assert upd.axes[0].get_xlim() == grad.axes[0].get_xlim() == (0.0, 50.0)
    from matplotlib.colors import to_rgba

    assert upd.axes[0].get_facecolor() == to_rgba(figures.MISSING_COLOUR)  # no cell there: grey, not white
    run = build(n_steps=3, sample_every=10)
    fig, _ = figures.heatmap(run, "update_ratio", cols, "update ratio")
    fig.canvas.draw()
    ticks = fig.axes[0].get_xticks()
    assert len(ticks) and all(float(t).is_integer() for t in ticks)


def test_gradient_flow_axis_title_fits_in_the_picture():
    """The y title was one line longer than the 4-inch picture: "(before clippin" was cut."""
    from series_builder import build

    from gradwatch.report import figures
    from gradwatch.report.display import layer_columns

    from dataclasses import replace

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    run = build(n_steps=5, depth=26)
    run.layers = [replace(l, name=f"transformer_encoder_stack.layers.{l.index}.self_attn.out_proj") for l in run.layers]
    fig = figures.gradient_flow(run, [0, 4], layer_columns(run, ("param",)))
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    box = fig.axes[0].yaxis.label.get_window_extent(canvas.get_renderer())
    assert box.y0 >= 0 and box.y1 <= fig.bbox.height and "before clipping" in fig.axes[0].get_ylabel()
    short = figures.gradient_flow(build(n_steps=5, depth=3), [0], [0, 2, 4])
    labels = short.axes[0].get_xticklabels()
    assert [t.get_text() for t in labels] == ["fc0", "fc1", "fc2"]
    assert all(t.get_rotation() == 0 and t.get_fontsize() >= 8 for t in labels)  # few short names: upright, legible


def test_gradient_flow_shows_the_steps_before_a_blow_up(monkeypatch):
    """A run whose norms were non-finite from step 2 of 30: the default steps 0, 7, 14, 22, 29 drew
    one line (step 0) and four of × marks only; step 1, the blow-up itself, was not drawn."""
    from series_builder import build

    from gradwatch.report.display import chosen_steps

    run = build(n_steps=30)
    run.metrics["grad_norm"][2:] = np.inf
    assert chosen_steps(run) == [0, 1, 2]
    from gradwatch.report import figures
    from gradwatch.report.page import flow_section

    monkeypatch.setattr(figures, "png", lambda fig: "")
    rows = table(flow_section(run, None), "flow-table")
    assert rows[0][2:] == ["step 0", "step 1", "step 2"]
    assert all(r[4] == "non-finite" and r[2] == fmt(run.metrics["grad_norm"][0, run.column(r[0])]) for r in rows[1:])
    run = build(n_steps=100)
    run.metrics["grad_norm"][40, 0] = np.inf  # one overflowed step in a healthy run
    assert chosen_steps(run) == [0, 33, 40, 66, 99]
    assert chosen_steps(build(n_steps=100)) == [0, 25, 50, 74, 99]
    assert chosen_steps(run, wanted=[40, 41]) == [40, 41]


def test_recurrent_layers_get_their_gradient_through_time(tmp_path, monkeypatch):
    """A vanilla RNN whose finding was "vanishing through time" had no picture of it: the store's
    time profiles (‖∂L/∂x_t‖ per t) were on no page. Now a section per recurrent layer."""
    from gradwatch.report.page import time_profile_section

    torch.manual_seed(0)
    rnn, head = nn.RNN(3, 8, batch_first=True), nn.Linear(8, 1)
    model = nn.ModuleDict({"rnn": rnn, "head": head})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 12, 3), torch.randn(4, 1)
    with gw.watch(model, opt, out=tmp_path, warn=False, sample_every=2):
        for _ in range(7):
            opt.zero_grad()
            nn.functional.mse_loss(head(rnn(x)[0][:, -1]), y).backward()
            opt.step()
    run = gw.read_run(tmp_path)
    p_steps, profile = run.time_profiles["rnn"]
    assert len(p_steps) >= 2 and profile.shape[1] == 12
    from gradwatch.report import figures

    monkeypatch.setattr(figures, "png", lambda fig: "")  # the numbers only: drawing six PNGs takes 3 s
    page = render_html(run, findings=[])
    assert page.index('id="heatmaps"') < page.index('id="time-profile"') < page.index('id="loss"')
    rows = table(page, "time-profile-table")
    assert rows[0][:3] == ["step", "‖∂L/∂x_t‖ at t = 0", "at t = 11"]
    for row, s, p in zip(rows[1:], p_steps, profile):
        assert row[:4] == [str(s), fmt(p[0]), fmt(p[11]), fmt(p[0] / p[11])]
    run.time_profiles = {}
    assert time_profile_section(run) == ""  # no recurrent layer: no section


def test_show_never_cuts_metric_or_layer_names_and_filters_metrics(tmp_path, capsys):
    """Piped (80 columns), `gradwatch show` printed `update_rat…` and `grad_out_r…`, and cut long
    layer names; a 300-layer model's table had no way to show one row per layer."""
    torch.manual_seed(0)
    name = "encoder_stack_with_a_long_name.block_number_0.attention_projection"
    model = nn.Sequential()
    model.add_module(name.replace(".", "_"), nn.Linear(4, 4))
    model.add_module("act", nn.Tanh())
    model.add_module("out", nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, out=tmp_path, warn=False):
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
    assert cli(["show", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "update_ratio" in out and "grad_out_rms" in out and name.replace(".", "_") in out and "…" not in out
    assert cli(["show", str(tmp_path), "--metric", "grad_norm"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum("grad_norm" in l for l in lines) == 2 and not any("weight_norm" in l for l in lines)
    assert cli(["show", str(tmp_path), "--metric", "grad_nrom"]) == 2
    assert "--metric='grad_nrom'" in capsys.readouterr().err


def test_header_counts_layers_as_run_does_and_loss_caption_names_only_what_is_drawn(run_dir, page):
    """The header counted the activation modules as layers (27 where `gradwatch run` said 14), and
    the loss caption spoke of dashed finding lines on a page with no finding."""
    run = gw.read_run(run_dir)
    weights = len(run.layer_names("param")) + len(run.layer_names("recurrent"))
    acts = len(run.layer_names("activation"))
    assert weights == 7 and acts == 6
    assert f"{len(run.steps):,} steps, 7 layers and 6 activations, " in page
    assert "dashed lines mark each finding" in page
    assert "dashed lines mark each finding" not in render_html(run_dir, findings=[])


def test_activation_fractions_are_those_of_the_last_step_with_finite_outputs(monkeypatch):
    """A run that blew up at step 37 showed "dead 0 at step 110" for a ReLU layer 22% dead at step
    30: on NaN outputs a unit reads as neither dead (NaN == 0 is false) nor saturated."""
    from series_builder import build

    from gradwatch.report import figures
    from gradwatch.report.page import activation_section

    run = build(n_steps=60, activation="tanh")
    acts = [i for i, l in enumerate(run.layers) if l.role == "activation"]
    sampled = run.steps % 10 == 0
    for c in acts:
        run.metrics["dead"][sampled, c] = 0.2 + 0.01 * np.arange(sampled.sum())  # 0.2 .. 0.25
        run.metrics["saturated"][sampled, c] = 0.4
    blown = sampled & (run.steps >= 40)
    run.metrics["act_mean"][blown, acts[-1]] = np.inf  # the store keeps a measured NaN as +inf
    run.metrics["act_std"][blown, acts[-1]] = np.inf
    run.metrics["dead"][blown, acts[-1]] = 0.0  # what the hooks measure on NaN outputs
    run.metrics["saturated"][blown, acts[-1]] = 0.0
    drawn = {}
    monkeypatch.setattr(figures, "activation_bars",
                        lambda names, d, s, _orig=figures.activation_bars: drawn.update(dead=d, sat=s) or _orig(names, d, s))
    html_text = activation_section(run)
    rows = {r[0]: r for r in table(html_text, "activation-table")[1:]}
    healthy, last = rows[run.layers[acts[0]].name], rows[run.layers[acts[-1]].name]
    assert healthy[2:] == ["0.2", "0.25", "50", "0.4", "0.4", "50"]
    assert last[2:] == ["0.2", "0.23", "30", "0.4", "0.4", "30"]  # step 30: the last with finite outputs
    np.testing.assert_allclose(drawn["dead"], [0.25] * (len(acts) - 1) + [0.23])
    np.testing.assert_allclose(drawn["sat"], [0.4] * len(acts))
    assert f"{run.layers[acts[-1]].name} first at step 40" in html_text
    run.metrics["act_mean"][:, acts[-1]] = np.inf  # non-finite from the first step: nothing to show
    last = {r[0]: r for r in table(activation_section(run), "activation-table")[1:]}[run.layers[acts[-1]].name]
    assert last[2:] == ["non-finite", "non-finite", "–", "non-finite", "non-finite", "–"]
