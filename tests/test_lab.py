"""The lab: every experiment's quick mode reproduces its claim (each check can fail), runs are
deterministic, pages are self-contained and escaped, and the CLI is a thin shell."""

from __future__ import annotations

import copy
import errno
import html
import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from gradwatch import lab
from gradwatch.cli.main import main as cli
from gradwatch.errors import ConfigError
from gradwatch.lab import data, nets
from gradwatch.lab.base import Experiment, Result
from gradwatch.lab.page import write
from gradwatch.lab.train import FirstWeightGradients, train
from gradwatch.runner import output_dir

# (a marker, not importorskip: importing scikit-learn took every pytest worker 1.4 s as it collected)
pytestmark = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn not installed")
_CACHE: dict[str, Result] = {}
_AXES: dict[str, list[tuple[str, str, str]]] = {}  # (title, x label, y label) of every saved figure's axes


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("lab")


def quick(name: str, out) -> Result:
    """Each experiment's quick mode runs once per session; several tests read its result."""
    if name not in _CACHE:
        axes, savefig = _AXES.setdefault(name, []), Figure.savefig

        def recording(fig, *args, **kwargs):
            axes.extend((ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes)
            return savefig(fig, *args, **kwargs)

        with mock.patch.object(Figure, "savefig", recording):
            _CACHE[name] = lab.run_one(lab.get(name), True, out)
    return _CACHE[name]


def numbers(res: Result, startswith: str) -> dict:
    matches = [c for c in res.checks if c.description.startswith(startswith)]
    assert len(matches) == 1, [c.description for c in res.checks]
    return matches[0].numbers


@pytest.mark.parametrize("name", lab.NAMES)
def test_quick_mode_passes_every_check(name, out):
    res = quick(name, out)
    failed = [(c.description, c.numbers) for c in res.checks if not c.passed]
    assert res.checks and not failed, failed
    page = (out / name / "index.html").read_text()
    assert "PASS" in page and "data:image/png;base64," in page and "<script" not in page
    assert (out / name / "index.md").exists() and (out / name / "results.csv").exists()
    assert all(p.exists() and p.suffix == ".png" for p in res.figures)


@pytest.mark.parametrize("name", lab.NAMES)
def test_every_axis_of_every_figure_is_labelled(name, out):
    quick(name, out)
    assert _AXES[name] and all(x and y for _, x, y in _AXES[name]), _AXES[name]


def test_activations_sigmoid_derivative_peaks_at_a_quarter_at_zero(out):
    n = numbers(quick("activations", out), "sigmoid'")
    assert n["max"] == 0.25 and n["at"] == 0.0


def test_he30_he_beats_xavier_by_a_margin(out):
    n = numbers(quick("he30", out), "He trains much further")
    assert n["he"] < 0.8 * n["xavier"]


def test_he30_signal_vanishes_but_weight_gradients_stay_level(out):
    """Glorot & Bengio eq. 14: with Xavier, ∂L/∂s shrinks toward the input while ∂L/∂W stays level;
    weights and biases together (the watch's grad_norm) would blur the two."""
    res = quick("he30", out)
    s = numbers(res, "Xavier's back-propagated ∂L/∂s")
    assert s["xavier"] < 1e-2 and 0.1 < s["he"] < 10
    w = numbers(res, "the weight gradients")
    assert w["xavier"] < 10 and w["he"] < 10


def test_init_zeros_pass_no_gradient_and_constant_keeps_units_identical(out):
    res = quick("init", out)
    assert numbers(res, "zeros:")["least_moved"] == 0.0
    c = numbers(res, "constant:")
    assert c["least_moved"] > 1e-6 and c["unit_spread"] < 1e-6


def test_first_weight_gradients_are_step_zeros():
    torch.manual_seed(0)
    model = nets.mlp(64, 16, 2, 10, "tanh", "xavier")
    reference = copy.deepcopy(model)
    task = data.digits()
    first = FirstWeightGradients()
    train(model, task, steps=3, lr=0.1, seed=5, every_step=first)
    x, y = task.batch(torch.Generator().manual_seed(5), 64)
    torch.nn.functional.cross_entropy(reference(x), y).backward()
    expected = [float(m.weight.grad.norm()) for m in reference.modules() if isinstance(m, torch.nn.Linear)]
    assert np.allclose(first.norms, expected, rtol=1e-5)


def test_loss_curve_of_an_early_divergence_lines_up_with_its_marker():
    """A run with fewer finite losses than the smoothing window is drawn at its own steps."""
    from gradwatch.lab.page import figure
    from gradwatch.lab.plots import loss_curves
    early = SimpleNamespace(label="early", losses=np.array([2.3, 5.0, 80.0, np.inf]), diverged_at=3)
    long = SimpleNamespace(label="long", losses=np.linspace(2, 1, 30), diverged_at=None)
    _, (ax,) = figure()
    loss_curves(ax, [early, long], window=10)
    lines = {line.get_label().split(" (")[0]: line for line in ax.lines}
    assert list(lines["early"].get_xdata()) == [0, 1, 2] and list(lines["early"].get_ydata()) == [2.3, 5.0, 80.0]
    assert list(lines["long"].get_xdata())[:2] == [9, 10] and len(lines["long"].get_xdata()) == 21
    assert lines["long"].get_ydata()[0] == pytest.approx(np.mean(np.linspace(2, 1, 30)[:10]))


def test_a_blow_up_does_not_flatten_the_runs_that_learned():
    """One run reaching 1e30 before it turns non-finite must leave the others' curves readable: the y
    range is the finished runs', the diverged one is marked in the legend with its step."""
    from gradwatch.lab.page import figure
    from gradwatch.lab.plots import loss_curves
    blown = SimpleNamespace(label="none", losses=np.array([0.2] * 5 + [1e10, 1e30, np.inf]), diverged_at=7)
    learned = SimpleNamespace(label="clipped", losses=np.linspace(0.17, 0.11, 200), diverged_at=None)
    _, (ax,) = figure()
    loss_curves(ax, [blown, learned])
    low, high = ax.get_ylim()
    assert low < 0.11 and 0.17 < high < 10
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["none (non-finite at step 7)", "clipped"]


def test_a_finite_blow_up_does_not_flatten_the_runs_that_learned_either():
    """ZClip without a cap in `lab clipping` never turns non-finite: its loss rises to 1e19 and stays.
    It must not set the y range either (the clipped runs were one flat line at the bottom of 1e-1..1e20)."""
    from gradwatch.lab.page import figure
    from gradwatch.lab.plots import loss_curves
    blown = SimpleNamespace(label="ZClip", losses=np.geomspace(100, 5e19, 400), diverged_at=None)
    learned = SimpleNamespace(label="norm", losses=np.linspace(0.17, 0.11, 400), diverged_at=None)
    stalled = SimpleNamespace(label="lr 1", losses=np.full(400, 2.3), diverged_at=None)  # up 10%: not a blow-up
    _, (ax,) = figure()
    loss_curves(ax, [blown, learned, stalled])
    low, high = ax.get_ylim()
    assert low < 0.11 and 2.3 < high < 100
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [f"ZClip (blew up: loss to {np.mean(blown.losses[-10:]):.1e})", "norm", "lr 1"]


def test_unwritable_out_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert cli(["lab", "activations", "--quick", "--out", str(afile / "sub")]) == 2
    err = capsys.readouterr().err
    assert "cannot write to the directory" in err and "Traceback" not in err

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "write_text", read_only)
    with pytest.raises(ConfigError, match="Read-only file system"):
        output_dir(tmp_path / "ro")


def test_lab_all_skips_an_unwritable_experiment_and_runs_the_rest(tmp_path):
    def never(quick, out, progress):
        raise AssertionError("trained although its folder cannot be written")

    def fine(quick, out, progress):
        res = Result(["a"], [[1]])
        res.check("ok", True)
        return res

    (tmp_path / "blocked").write_text("a file where the experiment's folder should be")
    blocked, ok = Experiment("blocked", "t", "c", "e", "s", never), Experiment("ok", "t", "c", "e", "s", fine)
    (_, r_blocked), (_, r_ok) = lab.run_many([blocked, ok], True, tmp_path, show=False)
    assert not r_blocked.passed and "cannot write" in r_blocked.checks[0].description
    assert r_ok.passed and (tmp_path / "ok" / "index.html").exists() and (tmp_path / "index.html").exists()


def test_rnn_lstm_and_gru_beat_the_tanh_rnn_on_adding_t50(out):
    res = quick("rnn", out)
    n = numbers(res, "LSTM and GRU")
    assert n["lstm"] < 0.5 * n["rnn"] and n["gru"] < 0.5 * n["rnn"]
    assert numbers(res, "the tanh RNN does not use")["rnn"] > 0.5 * data.ADDING_BASELINE_MSE


def test_rnn_threshold_is_the_floor_of_a_predictor_that_ignores_the_first_marker(out):
    """The RNN's bound, 0.5 × the mean predictor's MSE, is Var(X1) = 1/12: the best predictor that
    ignores X1, X2 + 1/2, reaches it on the lab's own test sequences, and no such predictor does better."""
    floor = numbers(quick("rnn", out), "the tanh RNN does not use")["ignoring_x1_floor"]
    x, y = data.adding(50, n_test=4000).x_test, data.adding(50, n_test=4000).y_test
    second = (x[25:, :, 0] * x[25:, :, 1]).sum(0)  # the value at the marker in the second half
    assert floor == pytest.approx(float(((second + 0.5 - y) ** 2).mean()), rel=0.05)
    assert floor == pytest.approx(1 / 12, rel=0.05)


def test_clipping_worked_examples(out):
    res = quick("clipping", out)
    n = numbers(res, "norm clipping")
    assert n["norm_before"] == pytest.approx(27) and n["norm_after"] == pytest.approx(5, rel=1e-6)
    assert n["factor"] == pytest.approx(5 / 27, rel=1e-6)
    assert numbers(res, "value clipping")["result"] == "[5.0, -5.0, 3.0]"
    assert numbers(res, "without clipping")["diverged_at"] != "never"


def test_clipping_worked_example_is_written_as_the_check_rounds_it(out):
    """The setup line showed [1.666666604938274, 3.333333209876548, ...] (float32 noise) for 5/27 × g."""
    (note,) = [n for n in quick("clipping", out).notes if n.startswith("worked examples")]
    expected = [round(x * 5 / 27, 4) for x in (9.0, 18.0, 18.0)]
    assert note.endswith(f"(norm 27) → {expected}"), note


def test_clipping_page_says_when_capped_zclip_is_just_the_cap(out):
    """ZClip with max_grad_norm=1 trains this RNN exactly as clip_norm(1) does (its own threshold never
    binds below the cap): the page must say so rather than credit ZClip with the capped row."""
    res = quick("clipping", out)
    note = next(n for n in res.notes if n.startswith("ZClip + cap 1.0 trained"))
    from gradwatch.lab.experiments.clipping import exploding_rnn
    from gradwatch.remedies.clip import ZClip, clip_norm
    task = data.adding(10)
    runs = []
    for fn in (lambda ps: clip_norm(ps, 1.0), ZClip(max_grad_norm=1.0)):
        torch.manual_seed(0)
        runs.append(train(exploding_rnn(32), task, steps=60, lr=0.1, seed=0, clip=fn).losses)
    assert np.array_equal(*runs) and "exactly as norm 1.0" in note and "shows the cap, not ZClip" in note


def test_clipping_threshold_rule_uses_the_average_norm_plain_torch_measures(out):
    """Pascanu's rule sets the threshold from the average gradient norm: the page's average (the watch's
    norm of the norm-1.0 run) equals the mean of what torch's clip_grad_norm_ returns in a plain loop,
    and at half of it the RNN learns."""
    from gradwatch.lab.experiments.clipping import LR, exploding_rnn
    n = numbers(quick("clipping", out), "Pascanu's threshold rule")
    assert n["0.5x"] < n["bound"] and math.isfinite(n["5x"])
    task, gen = data.adding(10), torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = exploding_rnn(32)
    opt, norms, losses = torch.optim.SGD(model.parameters(), lr=LR), [], []
    for _ in range(400):
        x, y = task.batch(gen, 64)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        opt.step()
        losses.append(float(loss))
    assert n["average_norm"] == pytest.approx(np.mean(norms), rel=1e-4)
    # the watched run trained exactly as this unwatched one: monitoring changed nothing
    assert numbers(quick("clipping", out), "norm 1.0:")["final"] == float(np.mean(losses[-20:]))


def test_batchnorm_keeps_percentiles_stable(out):
    n = numbers(quick("batchnorm", out), "BN keeps")
    assert n["with_bn"] < 0.5 * n["without_bn"]


def test_batchnorm_percentile_panels_share_one_y_range():
    """The two panels compare stability: on their own scales a drift of 0.2 would look as large as 1."""
    from gradwatch.lab.experiments.batchnorm import percentile_panels
    from gradwatch.lab.page import figure
    steady = np.tile([-1.5, 0.0, 1.5], (50, 1)) + np.linspace(0, 0.2, 50)[:, None]
    drifting = np.tile([-0.5, 0.1, 0.6], (50, 1)) + np.linspace(0, 1.0, 50)[:, None]
    _, (b, c) = figure(2)
    percentile_panels((b, c), (drifting, steady))
    assert b.get_ylim() == c.get_ylim()
    low, high = b.get_ylim()
    assert low <= -1.5 and high >= 1.7 and high - low < 4


def test_residual_plain_bn_is_not_diagnosed_vanishing(out):
    n = numbers(quick("residual", out), "negative control")
    assert all("vanishing_gradient" not in v for v in n.values())


def test_lr_extremes_diverge_and_stall(out):
    res = quick("lr", out)
    assert numbers(res, "too high")["diverged_at"] != "never"
    assert 0 <= numbers(res, "too low")["decrease"] < 0.05


def test_adding_baseline_is_one_sixth():
    _, y = data.adding_batch(torch.Generator().manual_seed(0), 200_000, 20)
    assert float(((y - 1.0) ** 2).mean()) == pytest.approx(1 / 6, rel=0.02)
    assert data.ADDING_BASELINE_MSE == pytest.approx(1 / 6)


def test_training_is_deterministic():
    task = data.digits()

    def once():
        torch.manual_seed(0)
        return train(nets.mlp(64, 32, 3, 10, "tanh", "xavier"), task, steps=40, lr=0.1, seed=3).losses

    a, b = once(), once()
    assert np.array_equal(a, b) and np.isfinite(a).all()


def test_diverged_run_stops_and_reports_the_step():
    torch.manual_seed(0)
    r = train(nets.mlp(64, 32, 3, 10, "relu", "he"), data.digits(), steps=50, lr=100.0, seed=0)
    assert r.diverged_at is not None and r.diverged_at < 50 and math.isinf(r.final_loss()) and math.isnan(r.test)


def test_page_escapes_text_and_embeds_figures(tmp_path):
    png = tmp_path / "f.png"
    from gradwatch.lab.page import figure, save
    fig, (ax,) = figure()
    ax.plot([0, 1])
    png = save(fig, tmp_path, "f")
    exp = Experiment("x", "<b>t</b>", "a < b & c", "e", "s", run=lambda q, o, p: None)
    res = Result(["<col>"], [["<v>", 1.5]], figures=[png])
    res.check("<script>alert(1)</script>", False, n=1.0)
    page = write(exp, res, tmp_path).read_text()
    assert "<script>" not in page and html.escape("<script>alert(1)</script>") in page
    assert html.escape("a < b & c") in page and "data:image/png;base64," in page and "FAIL" in page


def test_unknown_experiment_is_a_config_error():
    with pytest.raises(ConfigError, match="choose one of"):
        lab.get("nope")
    with pytest.raises(ConfigError, match=r"no lab experiment named 'he3' \(did you mean he30\?\)"):
        lab.get("he3")
    assert lab.get("HE30").name == "he30"  # the name as the page and `lab list` write it, whatever the case


def test_cli_list_run_and_error(tmp_path, capsys):
    assert cli(["lab", "list"]) == 0
    assert "he30" in capsys.readouterr().out
    assert cli(["lab", "nope"]) == 2
    assert "no lab experiment named 'nope'" in capsys.readouterr().err
    assert cli(["lab", "Activations", "--quick", "--out", str(tmp_path)]) == 0  # any case
    assert (tmp_path / "activations" / "index.html").exists()
    assert "pages:" in capsys.readouterr().out


def test_progress_is_shown_as_lines_when_stderr_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    """In a log file or a pipe rich's live bar draws nothing until the end: a full run would be
    minutes of silence. Each phase start and each tenth of it is one line there, at most one per
    5 s (a quick phase of a second prints only its start)."""
    from gradwatch.lab.runner import _LineProgress

    def work(quick, out, progress):
        progress.phase("training", 100)
        for _ in range(10):
            progress.advance(10)
        res = Result(["a"], [[1]])
        res.check("ok", True)
        return res

    def lines():
        return [line for line in capsys.readouterr().err.splitlines() if line.startswith("slow: ")]

    lab.run_many([Experiment("slow", "t", "c", "e", "s", work)], True, tmp_path, show=True)
    quick = lines()
    assert [line.split(" [")[0] for line in quick[:-1]] == ["slow: training 0/100"] and quick[-1].startswith("slow: PASS (")
    monkeypatch.setattr(_LineProgress, "every", 0.0)  # every tenth is due
    lab.run_many([Experiment("slow", "t", "c", "e", "s", work)], True, tmp_path, show=True)
    slow = lines()
    assert [line.split(" [")[0] for line in slow[:-1]] == (["slow: training 0/100"] +
                                                         [f"slow: training {k}/100" for k in range(10, 101, 10)])
    assert slow[-1].startswith("slow: PASS (")


def test_depth_shows_the_forward_signal_shrinking_with_standard_init(out):
    """Glorot & Bengio's Fig. 6: with U[±1/√n] the activations' spread shrinks layer after layer; the
    page's forward level is the watch's act_std at step 0, recomputed here with plain torch."""
    n = numbers(quick("depth", out), "forward:")
    torch.manual_seed(0)
    model = nets.mlp(64, 64, 5, 10, "tanh", "standard")  # quick mode's tanh/standard net
    h, stds = data.digits().batch(torch.Generator().manual_seed(0), 64)[0], []
    with torch.no_grad():
        for name, module in model.named_children():
            h = module(h)
            if name.startswith("act"):
                stds.append(float(h.std()))
    assert n["tanh standard"] == pytest.approx(min(stds) / max(stds), rel=1e-3)
    assert stds == sorted(stds, reverse=True) and n["tanh normalized"] > 2 * n["tanh standard"]


def test_depth_checks_the_direction_of_the_standard_inits_gradient_profile(out):
    """min/max alone cannot tell a gradient shrinking toward the input (Glorot & Bengio's Fig. 7) from
    one growing toward it (the N(0,1) tanh net of `lab init`): the check also needs the direction."""
    from gradwatch.lab.experiments.depth import level, shrinks_toward_input
    shrinking, growing = np.array([0.09, 0.18, 0.35, 0.6, 1.0]), np.array([1.0, 0.6, 0.35, 0.18, 0.09])
    assert level(shrinking) == level(growing)
    assert shrinks_toward_input(shrinking) and not shrinks_toward_input(growing)
    for a in ("tanh", "softsign", "relu"):
        assert numbers(quick("depth", out), f"{a}: with standard init")["standard_shrinks_toward_input"] == "yes"


def test_depth_sigmoid_top_layer_is_driven_to_zero_as_in_glorot_fig2(out):
    """Glorot & Bengio 2010, Fig. 2: with sigmoid and standard init the top hidden layer's mean output
    falls from 0.5 toward 0 early in training while the lower layers stay near 0.5. Its value at step 0
    is the watch's act_mean, recomputed here with plain torch on the first batch."""
    n = numbers(quick("depth", out), "sigmoid, standard init")
    assert n["top_mean_lowest"] < 0.2 and n["lower_layers_least_mean"] > 0.4 and n["at_step"] > 0
    torch.manual_seed(0)
    model = nets.mlp(64, 64, 5, 10, "sigmoid", "standard")  # quick mode's Fig. 2 net
    with torch.no_grad():
        h = model[:-1](data.digits().batch(torch.Generator().manual_seed(0), 64)[0])
    assert n["top_mean_at_init"] == pytest.approx(float(h.mean()), rel=1e-4)


def test_init_normal_net_grows_by_the_mean_field_gain(out):
    """The N(0,1) tanh net is saturated yet its ∂L/∂s explodes toward the input (6e7× over 20 layers
    in full mode): the chaotic phase. The predicted per-layer factor, checked here against a Monte
    Carlo of the same fixed point, and the measured one agree."""
    from gradwatch.lab.experiments.init import mean_field_gain
    z = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q = torch.tensor(64.0, dtype=torch.float64)
    for _ in range(30):
        q = 128 * torch.tanh(q.sqrt() * z).pow(2).mean()
    chi = 128 * (1 - torch.tanh(q.sqrt() * z).pow(2)).pow(2).mean()
    assert mean_field_gain(128) == pytest.approx(float(chi.sqrt()), rel=0.01)
    n = numbers(quick("init", out), "N(0,1): saturated")
    assert n["measured_per_layer"] == pytest.approx(n["predicted_per_layer"], rel=0.15) and n["measured_per_layer"] > 1.5


def test_lr_first_loss_of_a_diverged_run_is_its_finite_start():
    from gradwatch.lab.experiments.lr import first_loss
    assert first_loss(np.array([2.1, 5.0, 1e19, np.inf])) == 2.1  # the mean would be inf, or 3e18 without it
    assert first_loss(np.arange(1.0, 41.0)) == pytest.approx(10.5) and math.isnan(first_loss(np.array([])))


def test_long_titles_and_labels_are_wrapped_to_their_panel(tmp_path):
    """The RNN page's middle title was cut to "... best without the first marke" and a y-label to
    "(watch, median of sample": a saved figure's texts fit their panels."""
    from gradwatch.lab.page import figure, save

    fig, (a, b, c) = figure(3)
    title = "adding problem, T = 50 (dashed: mean predictor; dotted: best without the first marker)"
    b.set_title(title, fontsize=8)
    c.set_ylabel("‖∂L/∂x_t‖ / ‖∂L/∂x_T‖ (watch, median of samples)")
    save(fig, tmp_path, "f")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    assert b.title.get_text().replace("\n", " ") == title and "\n" in b.title.get_text()
    assert b.title.get_window_extent(renderer).width <= b.get_window_extent(renderer).width
    assert c.yaxis.label.get_window_extent(renderer).height <= c.get_window_extent(renderer).height
