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
