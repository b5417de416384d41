"""gradwatch run / show from the command line, as a user types them."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradwatch.store import read_run

SCRIPTS = Path(__file__).parent / "scripts"
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def gradwatch(*args, cwd=None):
    """The command in a process of its own; the timeout only ends a hang (`fix` runs its trials in
    ~1 min alone, and shares the cores with the other test worker)."""
    return subprocess.run([sys.executable, "-m", "gradwatch", *map(str, args)], capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=300)


def gradwatch_here(*args, cwd=None):
    """The command in this process, for input it refuses before starting anything: a subprocess
    costs ~3 s of imports. (Refusals in a process of their own: `-m` without a module, below.)"""
    from gradwatch.cli.main import main

    out, err, before = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        os.chdir(cwd or before)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:  # argparse's own refusals
                code = exc.code
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def optim_run(tmp_path_factory):
    """`gradwatch run` of a 30-step Adam script that exits 3: its result and its run directory."""
    out = tmp_path_factory.mktemp("optim") / "r"
    return gradwatch("run", "--out", out, SCRIPTS / "train_optim.py", 30, 3), out


def test_run_script_with_optimizer(optim_run):
    result, out = optim_run
    assert result.returncode == 3  # the script's own exit code
    assert "argv=['30', '3']" in result.stdout  # same argv, stdout untouched
    series = read_run(out)
    assert list(series.steps) == list(range(30))
    final = float(result.stdout.split("final_loss=")[1])
    assert series.loss[-1] == pytest.approx(final, rel=1e-5)
    assert series.meta["optimizer"] == "Adam"
    assert series.layer_names("param") == ["0", "2"]
    assert json.loads((out / "findings.json").read_text()) is not None
    assert "steps" in result.stderr and "gradwatch" in result.stderr


def test_run_manual_update_loop(tmp_path):
    result = gradwatch("run", "--out", tmp_path / "r", SCRIPTS / "train_manual.py")
    assert result.returncode == 0, result.stderr
    series = read_run(tmp_path / "r")
    assert len(series.steps) == 12  # one step per backward
    ratio = series.metrics["update_ratio"][:, 0]
    assert np.isfinite(ratio[0]) and ratio[0] > 0


def test_run_command_form_into_the_default_out_linked_as_latest(tmp_path):
    """`gradwatch run -- python script.py` (the `-m` form: test_a_modules_own_options_are_its_own),
    with no --out: runs/<time>, linked as runs/latest."""
    result = gradwatch("run", "--", "python", SCRIPTS / "train_optim.py", 5, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(read_run(tmp_path / "runs" / "latest").steps) == 5


def test_a_modules_own_options_are_its_own(tmp_path):
    """`gradwatch run -m pkg.train --steps 4` exited 2 with "unrecognized arguments: --steps":
    after the module, as after `python -m pkg.train`, every argument is the module's."""
    from gradwatch.cli.main import build_parser

    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "opts.py").write_text(
        "import argparse, runpy, sys\n"
        "a = argparse.ArgumentParser(); a.add_argument('--steps', type=int); n = a.parse_args().steps\n"
        f"sys.argv = [sys.argv[0], str(n)]; runpy.run_path({str(SCRIPTS / 'train_optim.py')!r}, run_name='__main__')\n")
    result = gradwatch("run", "--out", tmp_path / "m", "-m", "pkg.opts", "--steps", 4, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(read_run(tmp_path / "m").steps) == 4
    args = build_parser("fix").parse_args(["fix", "--budget-steps", "9", "-m", "pkg.opts", "--steps", "4", "--out", "x"])
    assert (args.module, args.out, args.budget_steps) == (["pkg.opts", "--steps", "4", "--out", "x"], "runs/fix", 9)
    result = gradwatch("run", "--out", tmp_path / "e", "-m", cwd=tmp_path)
    assert result.returncode == 2 and "-m needs a module name" in result.stderr


def test_runs_latest_is_the_live_run_from_its_start(tmp_path, monkeypatch):
    """runs/latest was linked when the run ended: `gradwatch show runs/latest` during a training
    showed the run before it, and of two runs at once, latest was the one that ended last."""
    from gradwatch import runner

    seen = []

    def fake_run(command, run_dir, options, lock=None):
        seen.append((tmp_path / "runs" / "latest").resolve())
        return runner.RunResult(run_dir, 0)

    monkeypatch.setattr(runner, "run", fake_run)
    (tmp_path / "train.py").write_text("")
    for _ in range(2):
        assert gradwatch_here("run", "train.py", cwd=tmp_path).returncode == 0
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if p.name != "latest")
    assert seen == [r.resolve() for r in runs] and len(runs) == 2
    assert (tmp_path / "runs" / "latest").resolve() == runs[1].resolve()
    assert [p.name for p in (tmp_path / "runs").iterdir() if p.name.startswith(".")] == []  # no link left aside


@pytest.mark.parametrize("args, message", [
    (["run", "nope.py"], "no such script"),
    (["run", "."], "'.' is a directory, not a Python file"),
    (["run", "--out", "/proc/forbidden/x", SCRIPTS / "train_optim.py", 1], "cannot write to the run directory"),
    (["run", "--every", "0", SCRIPTS / "train_optim.py"], "--every=0"),
    (["run"], "nothing to run"),
    (["show", "does-not-exist"], "no run at"),
    # an --out where a file is: NotADirectoryError tracebacks before
    (["fix", "--out", "afile", SCRIPTS / "train_optim.py"], "(a file of that name is in the way); choose another --out"),
    (["lab", "he30", "--quick", "--out", "afile/x"], "('afile' on its way is a file, not a directory); choose another --out"),
    (["run", "--out", "", SCRIPTS / "train_optim.py"], "--out is empty"),  # not the current directory
])
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    (tmp_path / "afile").write_text("not a directory")
    result = gradwatch_here(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_show_prints_a_per_layer_table(optim_run):
    result = gradwatch("show", optim_run[1])
    assert result.returncode == 0, result.stderr
    series = read_run(optim_run[1])
    first = series.series("0", "grad_norm")[1][0]
    assert f"{first:.3g}" in result.stdout and "grad_norm" in result.stdout


def _started(proc, pidfile, steps):
    """Wait until the watched script printed `steps` steps; its pid."""
    for line in proc.stdout:
        if line.strip().isdigit() and int(line) >= steps:
            return int(pidfile.read_text())
    raise AssertionError("the script ended early")


def _gone(pid, seconds=20.0):
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_sigterm_to_gradwatch_run_reaches_the_script_which_stores_its_last_steps(tmp_path):
    """A SIGTERM sent to `gradwatch run` alone (not its process group) is passed on; the script,
    dying of it, first stores the steps since its last flush (every 50: none had been stored)."""
    import signal

    pidfile = tmp_path / "pid"
    proc = subprocess.Popen([sys.executable, "-m", "gradwatch", "run", "--out", str(tmp_path / "r"),
                             str(SCRIPTS / "killme.py"), "--pid", str(pidfile)],
                            stdout=subprocess.PIPE, text=True, env=ENV)
    child = _started(proc, pidfile, 12)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM  # the script's own end, as the shell says it
    assert _gone(child)
    assert len(read_run(tmp_path / "r").steps) >= 12


def test_sigint_to_gradwatch_run_alone_reaches_the_script(tmp_path):
    """A SIGINT sent to `gradwatch run` alone (a supervisor, not a terminal's Ctrl-C to the whole
    group) was swallowed: a tester's training ran on for 1500 more steps. Now it is passed on:
    the script ends with KeyboardInterrupt and its steps are stored."""
    import signal

    pidfile = tmp_path / "pid"
    proc = subprocess.Popen([sys.executable, "-m", "gradwatch", "run", "--out", str(tmp_path / "r"),
                             str(SCRIPTS / "killme.py"), "--pid", str(pidfile)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            stdin=subprocess.DEVNULL)
    child = _started(proc, pidfile, 12)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) != 0
    assert _gone(child)
    assert len(read_run(tmp_path / "r").steps) >= 12


def test_sigterm_to_gradwatch_fix_ends_the_running_trial(tmp_path):
    import signal

    pidfile = tmp_path / "pid"
    proc = subprocess.Popen([sys.executable, "-m", "gradwatch", "fix", "--budget-steps", "100000", "--out",
                             str(tmp_path / "fix"), str(SCRIPTS / "killme.py"), "--pid", str(pidfile)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path)
    import time

    deadline = time.monotonic() + 60
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    child = int(pidfile.read_text())
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    gone = _gone(child)
    if not gone:
        os.kill(child, signal.SIGKILL)
    assert gone  # not left running on its own to the end of its budget


def test_the_script_starts_with_ctrl_c_working(tmp_path):
    """An ignored SIGINT stays ignored across exec: Python would start the script with Ctrl-C off."""
    script = tmp_path / "handler.py"
    script.write_text("import signal\nprint(signal.getsignal(signal.SIGINT))\n")
    result = gradwatch("run", "--out", tmp_path / "r", script)
    assert "default_int_handler" in result.stdout


def test_a_compiled_model_under_run_keeps_its_names_and_its_whole_graph(tmp_path):
    """The sampled steps' hooks break the compiled forward into a graph per module. That broken
    code guards on nothing of theirs, so torch ran it on every later step too (1.37x the step).
    Keyed apart (a mode active on sampled steps only), the other steps run the one whole graph."""
    script = tmp_path / "compiled.py"
    script.write_text(
        "import torch\nfrom torch import nn\nfrom torch.profiler import profile\n"
        "model = torch.compile(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),"
        " nn.Linear(8, 1)), backend='aot_eager')\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.01)\n"
        "def step():\n"
        "    opt.zero_grad(); model(torch.randn(8, 4)).pow(2).mean().backward(); opt.step()\n"
        "for _ in range(15):\n"
        "    step()\n"
        "with profile() as prof:\n"
        "    step()\n"
        "print('regions', sum(e.name == 'CompiledFunction' for e in prof.events()))\n")
    plain = subprocess.run([sys.executable, script], capture_output=True, text=True, env=ENV)
    result = gradwatch("run", "--out", tmp_path / "r", script)
    assert result.returncode == 0, result.stderr
    assert "global hooks" not in result.stderr  # the discovery hooks are ours, and handled
    assert "regions 1" in plain.stdout and "regions 1" in result.stdout, (plain.stdout, result.stdout)
    run = read_run(tmp_path / "r")
    assert run.layer_names() == ["0", "1", "2", "3", "4"]  # no _orig_mod. prefix
    act = run.metrics["act_std"][:, run.column("1")]
    assert list(run.steps[np.isfinite(act)]) == [0, 10]  # step 0's statistics too


def test_a_command_that_cannot_start_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a program")
    result = gradwatch("run", "--out", tmp_path / "r", "--", "notes.txt", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "cannot run 'notes.txt': not an executable command" in result.stderr


def test_a_script_started_with_ctrl_c_off_keeps_it_off(tmp_path):
    """A job started with `&` from a shell script starts with SIGINT ignored, and so does its
    python: a Ctrl-C at the terminal leaves it running. Under `gradwatch run` the script started
    with Ctrl-C on and died of it. (In this process: runner.run of a command that imports no torch.)"""
    import signal

    from gradwatch import runner

    show = [sys.executable, "-c", "import signal, sys; sys.exit(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"]
    plain = subprocess.run(show, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)).returncode
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        watched = runner.run(show, tmp_path, {}).exit_code
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # and it is off for us again
    finally:
        signal.signal(signal.SIGINT, previous)
    assert plain == watched == 1
    assert runner.run(show, tmp_path, {}).exit_code == 0  # on, it stays on (test_the_script_starts_with_ctrl_c_working)


def test_a_command_given_without_double_dash_is_run_as_a_command(tmp_path):
    """`gradwatch run python train.py` (the `--` forgotten) said "no such script: 'python'": a
    command on PATH, where no file of that name is, is that command."""
    from gradwatch import runner

    # (`sh`: on every PATH; a `python` there may not be)
    assert runner.command_from_target(["sh", "train.sh", "--lr", "1"], None) == ["sh", "train.sh", "--lr", "1"]
    assert runner.command_from_target(["--", "sh", "train.sh"], None) == ["sh", "train.sh"]
    result = gradwatch_here("run", "no-such-command-x", "train.py", cwd=tmp_path)
    assert result.returncode == 2 and "no such script: 'no-such-command-x'" in result.stderr


def test_a_shell_script_given_as_the_script_is_refused_with_the_command_to_type(tmp_path):
    """`gradwatch run train.sh` ran `python train.sh`: a SyntaxError from python, then "nothing recorded"."""
    (tmp_path / "train.sh").write_text("#!/bin/bash\necho hi\n")
    (tmp_path / "train.py").write_text("#!/usr/bin/env python3\nprint('hi')\n")
    result = gradwatch_here("run", "--out", "r", "train.sh", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "'train.sh' is not a Python script (#!/bin/bash): run it as a command, gradwatch run -- /bin/bash train.sh" \
        in result.stderr
    from gradwatch import runner
    from gradwatch.errors import GradwatchError

    script = str(tmp_path / "train.py")
    assert runner.command_from_target([script], None) == [sys.executable, script]  # a python shebang is python's
    # a PEP 723 script run by uv, or any interpreter but a shell's, is still a Python script
    for line, shell in (("/usr/bin/env -S uv run --script", False), ("/usr/bin/pypy3", False),
                        ("/usr/bin/env bash", True), ("/bin/sh -e", True)):
        (tmp_path / "s.py").write_text(f"#!{line}\nprint('hi')\n")
        if shell:
            with pytest.raises(GradwatchError, match="is not a Python script"):
                runner.command_from_target([str(tmp_path / "s.py")], None)
        else:
            assert runner.command_from_target([str(tmp_path / "s.py")], None) == [sys.executable, str(tmp_path / "s.py")]


def test_with_stderr_closed_the_summary_stays_out_of_the_scripts_stdout(tmp_path, monkeypatch):
    """`gradwatch run train.py 2>&- > results.txt`: with no stderr, print() writes to stdout, and the
    summary ended up in the script's own results."""
    from gradwatch import runner
    from gradwatch.cli.main import main

    monkeypatch.setattr(runner, "run", lambda command, run_dir, options, lock=None: runner.RunResult(run_dir, 0))
    (tmp_path / "train.py").write_text("")
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", None)
    with contextlib.redirect_stdout(out):
        assert main(["run", "--out", str(tmp_path / "r"), str(tmp_path / "train.py")]) == 0
    assert out.getvalue() == ""


def test_a_command_installed_beside_gradwatch_runs_without_the_venv_on_path(tmp_path, monkeypatch):
    """`gradwatch run -- torchrun ...` from an unactivated venv said "command not found: 'torchrun'",
    though the command's PATH puts the venv's bin first (as for `-- python`)."""
    from gradwatch import runner

    tool = Path(sys.executable).parent / "torchrun"
    if not tool.exists():
        pytest.skip("no torchrun beside this Python")
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing of the venv on it
    assert runner.build_command(None, None, ["torchrun", "--nproc_per_node=2", "train.py"])[0] == "torchrun"
    assert runner.child_env(tmp_path, {})["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    from gradwatch.errors import ConfigError

    with pytest.raises(ConfigError, match="command not found: .no-such-tool."):
        runner.build_command(None, None, ["no-such-tool"])
