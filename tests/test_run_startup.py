"""The start-up hook `gradwatch run` puts on PYTHONPATH, beside the script's own start-up code."""

import os
import subprocess
import sys


def run(tmp_path, code, env=None):
    (tmp_path / "script.py").write_text(code)
    return subprocess.run([sys.executable, "-m", "gradwatch", "run", "--out", str(tmp_path / "r"), str(tmp_path / "script.py")],
                          capture_output=True, text=True, env=env or dict(os.environ), timeout=60)


def test_the_users_own_sitecustomize_runs_and_is_the_one_imported(tmp_path):
    """A PYTHONPATH of the user's own with a sitecustomize.py: it ran, but `import sitecustomize`
    in the script found gradwatch's (a script reading a setting from it got an AttributeError)."""
    own = tmp_path / "own"
    own.mkdir()
    (own / "sitecustomize.py").write_text("import os\nSETTING = 42\nos.environ['OWN_STARTUP'] = 'ran'\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(own), os.environ.get("PYTHONPATH")])))
    code = "import os, sitecustomize\nprint(os.environ.get('OWN_STARTUP'), getattr(sitecustomize, 'SETTING', None))\n"
    (tmp_path / "alone.py").write_text(code)
    alone = subprocess.run([sys.executable, str(tmp_path / "alone.py")], capture_output=True, text=True, env=env, timeout=60)
    result = run(tmp_path, code, env)
    assert result.stdout == alone.stdout == "ran 42\n", result.stderr


def test_a_process_without_torch_dies_of_sigterm_as_before(tmp_path):
    """The SIGTERM handler is installed at start-up, before torch is imported: until a watch
    exists it ends the process by the signal, as the default would."""
    code = "import os, signal\nprint('before', flush=True)\nos.kill(os.getpid(), signal.SIGTERM)\nprint('not reached')\n"
    (tmp_path / "alone.py").write_text(code)
    alone = subprocess.run([sys.executable, str(tmp_path / "alone.py")], capture_output=True, text=True, timeout=60)
    result = run(tmp_path, code)
    assert alone.returncode == -15 and result.returncode == 128 + 15
    assert result.stdout == alone.stdout == "before\n"


CAUGHT = """
import signal, subprocess, sys

def caught():  # is SIGTERM caught (a handler installed), from the kernel's view
    mask = int(open("/proc/self/status").read().split("SigCgt:")[1].split()[0], 16)
    return bool(mask >> (signal.SIGTERM - 1) & 1)

if len(sys.argv) > 1:
    print("helper", caught())
else:
    print("command", caught(), flush=True)
    subprocess.run([sys.executable, __file__, "helper"], check=True)
"""


def test_only_the_command_itself_catches_sigterm_before_importing_torch(tmp_path):
    """Every Python process under `gradwatch run` had a Python SIGTERM handler from start-up: a
    helper with no torch, busy in a long C call, ignored `terminate()` until the call returned
    (9.3 s, not 0.0 s). Only the command `gradwatch run` started gets one at start-up (torch may
    be imported in a thread there); the others at torch's import, as before."""
    if not os.path.exists("/proc/self/status"):
        import pytest

        pytest.skip("reads the signal mask from /proc")
    result = run(tmp_path, CAUGHT)
    assert result.stdout == "command True\nhelper False\n", result.stderr


def test_a_script_that_imports_gradwatchs_remedies_before_torch_is_watched(tmp_path):
    """`from gradwatch import clip` first: torch is imported while gradwatch.remedies is, the watch
    starts then, and the trials' remedy hooks imported names from the half-made module (an
    ImportError: nothing was recorded)."""
    from gradwatch.store import read_run

    code = ("from gradwatch import clip\nimport torch\nmodel = torch.nn.Linear(4, 1)\n"
            "opt = torch.optim.SGD(model.parameters(), lr=0.01)\nclip.attach(opt, clip.ClipNorm(1.0))\n"
            "for _ in range(5):\n    opt.zero_grad()\n    model(torch.randn(8, 4)).pow(2).mean().backward()\n    opt.step()\n")
    result = run(tmp_path, code, dict(os.environ, OMP_NUM_THREADS="1"))
    assert "not watching" not in result.stderr and result.returncode == 0, result.stderr
    assert len(read_run(tmp_path / "r").steps) == 5
