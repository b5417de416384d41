"""`gradwatch run` leaves the terminal to the script: no live status line unless asked (--status),
and nothing on its stdout when its stderr is closed."""

import io
import sys

from gradwatch.collect.auto import AutoWatch
from gradwatch.integrations.terminal import StatusLine


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _status_lines(monkeypatch, tmp_path, **options):
    """The status lines a zero-code watch installs with stderr on a terminal."""
    monkeypatch.setattr(sys, "stderr", Terminal())
    watch = AutoWatch(str(tmp_path), warn=False, **options)
    try:
        return [c for c in watch.on_flush if isinstance(c, StatusLine)]
    finally:
        watch.detach()


def test_no_status_line_over_the_scripts_own_output(monkeypatch, tmp_path):
    """Drawn on the script's terminal, the status line mixed with its progress bar (tqdm's
    `\\r` on stderr: "train 150/150 loss=0.0076 0.007639  grad min/max ...")."""
    assert _status_lines(monkeypatch, tmp_path) == []


def test_status_line_when_asked(monkeypatch, tmp_path):
    from gradwatch.cli.main import build_parser

    args = build_parser("run").parse_args(["run", "--status", "train.py"])
    from gradwatch import runner

    assert args.status and runner.child_env(tmp_path, {"status": 1})["GRADWATCH_STATUS"] == "1"
    assert len(_status_lines(monkeypatch, tmp_path, status=1)) == 1  # (GRADWATCH_STATUS=1)


def test_with_stderr_closed_nothing_is_said_on_the_scripts_stdout(monkeypatch, tmp_path, capsys):
    """A script run with `2>&-` has no sys.stderr: print() writes to stdout, so each finding's live
    line (and the note of backward passes that trained nothing) went into the script's output."""
    import torch

    monkeypatch.setattr(sys, "stderr", None)
    watch = AutoWatch(str(tmp_path))
    try:
        assert watch._live is None  # no live lines
        model = torch.nn.Linear(2, 1)
        for _ in range(3):
            model(torch.ones(1, 2)).sum().backward()  # (no optimizer, no update: trained nothing)
    finally:
        watch.detach()
    assert capsys.readouterr().out == ""


def test_with_stderr_closed_the_start_up_hook_says_nothing_on_stdout(tmp_path):
    """The start-up hook's "not watching this process" line (here: a bad GRADWATCH_EVERY) went to
    the script's stdout when its stderr was closed. (A process of its own: the hook runs at start-up.)"""
    import os
    import subprocess

    from gradwatch import runner

    env = dict(runner.child_env(tmp_path, {}), GRADWATCH_EVERY="x", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", "import torch; print('out')"], env=env, capture_output=True,
                            text=True, timeout=120, preexec_fn=lambda: os.close(2))
    assert result.stdout == "out\n"
