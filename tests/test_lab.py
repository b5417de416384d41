"""The lab: every experiment's quick mode reproduces its claim (each check can fail), runs are
deterministic, pages are self-contained and escaped, and the CLI is a thin shell."""

from __future__ import annotations

import html
import math

import numpy as np
import pytest
import torch

from gradwatch import lab
from gradwatch.cli.main import main as cli
from gradwatch.errors import ConfigError
from gradwatch.lab import data, nets
from gradwatch.lab.base import Experiment, Result
from gradwatch.lab.page import write
from gradwatch.lab.train import train

pytest.importorskip("sklearn")
_CACHE: dict[str, Result] = {}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("lab")


def quick(name: str, out) -> Result:
    """Each experiment's quick mode runs once per session; several tests read its result."""
    if name not in _CACHE:
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


def test_activations_sigmoid_derivative_peaks_at_a_quarter_at_zero(out):
    n = numbers(quick("activations", out), "sigmoid'")
    assert n["max"] == 0.25 and n["at"] == 0.0


def test_he30_he_beats_xavier_by_a_margin(out):
    n = numbers(quick("he30", out), "He learns")
    assert n["he"] < 0.8 * n["xavier"]
    v = numbers(quick("he30", out), "Xavier's gradients vanish")
    assert v["xavier"] < 1e-2 < 0.1 < v["he"]


def test_rnn_lstm_and_gru_beat_the_tanh_rnn_on_adding_t50(out):
    res = quick("rnn", out)
    n = numbers(res, "LSTM and GRU")
    assert n["lstm"] < 0.5 * n["rnn"] and n["gru"] < 0.5 * n["rnn"]
    assert numbers(res, "the tanh RNN stays")["rnn"] > 0.5 * data.ADDING_BASELINE_MSE


def test_clipping_worked_examples(out):
    res = quick("clipping", out)
    n = numbers(res, "norm clipping")
    assert n["norm_before"] == pytest.approx(27) and n["norm_after"] == pytest.approx(5, rel=1e-6)
    assert n["factor"] == pytest.approx(5 / 27, rel=1e-6)
    assert numbers(res, "value clipping")["result"] == "[5.0, -5.0, 3.0]"
    assert numbers(res, "without clipping")["diverged_at"] != "never"


def test_batchnorm_keeps_percentiles_stable(out):
    n = numbers(quick("batchnorm", out), "BN keeps")
    assert n["with_bn"] < 0.5 * n["without_bn"]


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


def test_cli_list_run_and_error(tmp_path, capsys):
    assert cli(["lab", "list"]) == 0
    assert "he30" in capsys.readouterr().out
    assert cli(["lab", "nope"]) == 2
    assert "no lab experiment named 'nope'" in capsys.readouterr().err
    assert cli(["lab", "activations", "--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "activations" / "index.html").exists()
    assert "pages:" in capsys.readouterr().out
