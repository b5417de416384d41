"""Runs of one or a few steps: every picture's step axis has whole steps only."""

from __future__ import annotations

import numpy as np
import pytest
from series_builder import build

from gradwatch.report import figures


@pytest.mark.parametrize("n_steps", [1, 2, 3])
def test_the_loss_axis_of_a_short_run_ticks_whole_steps_only(n_steps):
    """A one-step run's loss picture was ticked -0.045, -0.03, ..., 0.045."""
    run = build(n_steps=n_steps)
    fig, _ = figures.loss_curve(run, [])
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert set(run.steps.tolist()) <= set(np.round(ticks).astype(int).tolist()) or n_steps > 1
    assert lo < run.steps[0] and hi > run.steps[-1]  # the points are inside the picture


def test_a_one_step_page_says_step_not_steps():
    """A one-step run's page said "1 steps", "at steps 0" and "(steps 0–0)"."""
    from gradwatch.report import render_html

    page = render_html(build(n_steps=1, depth=1), findings=[])
    assert "1 step, 1 layer, no findings" in page
    assert "at step 0." in page and "(step 0)" in page
    assert "1 steps" not in page and "steps 0–0" not in page and "1 layers" not in page


def test_a_run_recorded_one_step_in_n_says_so_in_its_header():
    from gradwatch.report import render_html

    run = build(n_steps=21)
    run.steps = run.steps * 5  # steps 0, 5, ..., 100
    run.meta["every"] = 5
    assert "21 steps (one in 5 recorded), 5 layers and 4 activations" in render_html(run, findings=[])


def test_layers_never_given_a_gradient_are_said_once_under_the_gradient_flow():
    """A GAN's discriminator under the generator's optimizer (or a frozen layer) showed as a gap in
    every line and a row of dashes, with no word why."""
    from gradwatch.report import render_html

    run = build(n_steps=10, depth=3)
    run.metrics["grad_norm"][:, run.column("fc1")] = np.nan
    page = render_html(run, findings=[])
    said = page[page.index('class="note never-recorded"'):]
    assert "<code>fc1</code>" in said[:300] and "fc0" not in said[:300] and "fc2" not in said[:300]
    assert "never-recorded" not in render_html(build(n_steps=10, depth=3), findings=[])
