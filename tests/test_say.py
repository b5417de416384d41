"""gradwatch's own lines on stderr go through tqdm.write while a bar is live, in code as in
zero-code mode: printed plainly, a finding's line went on from the bar's."""

import io

from tqdm import tqdm

from gradwatch.diagnose.finding import Finding
from gradwatch.diagnose.live import LiveDiagnosis


def test_a_live_finding_is_written_above_the_bar_not_onto_it(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    finding = Finding("vanishing_gradient", "warning", 3, ("fc0",), "The gradient vanishes.")
    with tqdm(total=10, file=err, mininterval=0, ascii=True) as bar:
        bar.update(4)
        LiveDiagnosis(warn=True).report([finding], stop=False)
        bar.update(1)
    lines = err.getvalue().replace("\r", "\n").splitlines()
    said = [line for line in lines if "vanishing_gradient" in line]
    assert said == [finding.line()]  # a line of its own, not glued to the bar's "4/10 [...]"


def test_without_a_bar_or_stderr_closed(monkeypatch, capsys):
    from gradwatch.say import say

    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    say("gradwatch: plain")
    assert err.getvalue() == "gradwatch: plain\n"
    monkeypatch.setattr("sys.stderr", None)
    say("gradwatch: nowhere")  # no stderr: nothing, and nothing on stdout
    assert capsys.readouterr().out == ""


def test_a_bar_on_stdout_is_left_alone(monkeypatch):
    """tqdm.write clears and redraws every bar on stdout or stderr: with the script's bar on
    stdout, each line said put clear and redraw lines into the script's own stdout."""
    from gradwatch.say import say

    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr("sys.stderr", err)
    with tqdm(total=10, file=out, mininterval=0, ascii=True) as bar:
        bar.update(4)
        drawn = out.getvalue()
        say("gradwatch: a line")
        assert out.getvalue() == drawn
    assert err.getvalue() == "gradwatch: a line\n"
