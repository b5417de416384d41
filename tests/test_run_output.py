"""What a script watched by `gradwatch run` prints, beside what gradwatch prints into its stderr."""

import io
import sys

import pytest

from gradwatch.collect import auto
from gradwatch.diagnose.finding import Finding


def test_a_finding_is_said_on_a_line_of_its_own_under_a_progress_bar(monkeypatch, tmp_path):
    """A finding said while training, printed plainly, went on from the script's tqdm bar
    ("49/200 [00:00<00:02, 69.81it/s, loss=1.41]gradwatch: [error] vanishing_gradient ..."),
    and the bar was redrawn over it on a terminal. It goes through tqdm, which clears the bar first."""
    tqdm = pytest.importorskip("tqdm")
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    watch = auto.AutoWatch(str(tmp_path))
    try:
        bar = tqdm.tqdm(total=10, file=err, mininterval=0, ascii=True)
        bar.update(3)
        finding = Finding("loss_plateau", "warning", 0, (), "The loss has not improved.")
        watch._live.report([finding], watch)  # as at a flush
        bar.update(1)
        bar.close()
    finally:
        watch.detach()
    text = err.getvalue()
    before, after = text.split(finding.line(), 1)
    assert before.endswith(("\n", "\r")) and after.startswith("\n")  # a line of its own
    assert text.count(finding.line()) == 1
    assert "4/10" in after  # the bar goes on after it


def test_without_a_bar_a_finding_is_printed_plainly(monkeypatch, tmp_path):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    watch = auto.AutoWatch(str(tmp_path))
    try:
        finding = Finding("loss_plateau", "warning", 0, (), "The loss has not improved.")
        watch._live.report([finding], watch)
    finally:
        watch.detach()
    assert err.getvalue() == finding.line() + "\n"
